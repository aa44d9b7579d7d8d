"""Peak CPU memory a call allocates, from the profiler's raw memory records (the bounded-transient-memory tests and
``benchmarks/attention_memory.py`` on a CPU)."""

from torch.profiler import ProfilerActivity, profile

__all__ = ["peak_allocated_bytes"]


def peak_allocated_bytes(fn) -> int:
    """Largest number of bytes held at once by the tensors ``fn()`` allocates (freed or not by its end).

    Every allocation and free of the CPU allocator is one ``[memory]`` record of the profiler's raw results
    (``+bytes`` / ``-bytes``); their running sum in time order is the memory held, its maximum the peak.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return peak
