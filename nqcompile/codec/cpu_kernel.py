"""CPU kernels that Inductor generates from traceable torch functions of the codec.

Eager torch runs a function one op at a time, each op a pass over memory. Decoding one 8-dim E8 block takes a few
hundred such elementwise steps (:func:`nqcompile.codec.lattice.decode_blocks`), so eagerly the decode of a cache's
codes costs tens of passes over arrays of megabytes at every decode step. Inductor (PyTorch's compiler) fuses the
same function into one vectorized C++ loop: about 30x faster for 3- and 4-bit codes on the CPU.

:func:`cpu_kernel` traces a function once per process with symbolic shapes
(``torch.fx.experimental.proxy_tensor.make_fx``, ``tracing_mode="symbolic"``) and compiles the graph with
``torch._inductor.compile``. No Dynamo frame is involved: the kernel adds no graph to Dynamo's counters, triggers no
recompilation of a caller's ``torch.compile`` and survives ``torch.compiler.reset()``. Inductor's FX graph cache
(on disk) makes a later process load the kernel in seconds instead of compiling it again (about 15 s on a 2-core
machine). Inductor bakes the number of OpenMP threads (``torch.get_num_threads()`` when it builds) into the
kernel, so a kernel is built per name and thread count: one built for 2 threads would start 2 threads after
``torch.set_num_threads(1)``. The generated code has no shape guards: :func:`cpu_kernel` is for functions whose only dynamic
dimensions are those of its inputs' shapes, every other parameter being baked in under the kernel's ``name``.

Every kernel is checked once, when built, against the function it was generated from, on seeded random inputs of
the example's shapes: torch 2.13's Inductor has served, from its FX graph cache, a kernel whose integer indexing was
wrong for the graph that looked it up (3-bit key decode off by order one; seen on a machine whose cache many test
processes had filled; the entry's graph and input metadata matched, its generated loops did not). So each kernel's
cache entries are tagged with its name, the thread count and a format version
(``torch.compiler.config.cache_key_tag``), and a kernel that fails its check is compiled again without the cache.

Where Inductor cannot build a kernel (no C++ compiler, an unsupported platform) or the rebuilt kernel still fails its
check, :func:`cpu_kernel` returns None after one warning that names the cause, and the caller runs its torch
reference instead.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

__all__ = ["cpu_kernel", "eager_on_cpu"]

_KERNELS: dict[tuple[str, int], Optional[Callable[..., Tensor]]] = {}
#: Part of every kernel's FX graph cache tag: a new value keeps a later version off the entries of an earlier one.
_FORMAT = "v2"


def cpu_kernel(name: str, fn: Callable[..., Tensor], *example: Tensor) -> Optional[Callable[..., Tensor]]:
    """The Inductor-compiled CPU kernel of ``fn``, built at the first call for ``name`` and the current thread count
    (``torch.get_num_threads()``) and kept for the process.

    Args:
        name: identifies ``fn`` together with every non-tensor parameter baked into it (e.g. ``"e8_decode_4"``):
            a later call with the same name (and thread count) returns the kernel built first, whatever ``fn`` it
            passes.
        fn: a traceable torch function of CPU tensors returning one tensor (no data-dependent control flow).
        example: distinct contiguous CPU tensors of the dtypes and ranks ``fn`` will be called with. Every size is
            traced as a symbol except sizes 0 and 1, which are baked in; equal sizes share one symbol (so give
            dimensions that may differ different sizes), and the kernel takes contiguous tensors only (it checks
            sizes and strides against the symbols and raises ``AssertionError`` otherwise).

    Returns:
        A callable taking tensors like ``example`` and returning ``fn``'s result, or None where Inductor cannot
        build the kernel (warned once per name, with the exception).
    """
    key = (name, torch.get_num_threads())
    if key not in _KERNELS:
        _KERNELS[key] = _build(name, fn, example)
    return _KERNELS[key]


def eager_on_cpu(*tensors: Tensor) -> bool:
    """Whether a kernel can run on ``tensors`` now: all on the CPU, none fake, and not inside a ``torch.compile``
    trace (there is no data to run a kernel on there; the compiled graph gets the torch reference instead)."""
    return (not torch.compiler.is_compiling()
            and all(t.device.type == "cpu" and not is_fake(t) for t in tensors))


def _build(name: str, fn: Callable[..., Tensor], example: tuple[Tensor, ...]) -> Optional[Callable[..., Tensor]]:
    from torch.fx.experimental.proxy_tensor import make_fx

    try:
        graph = make_fx(fn, tracing_mode="symbolic")(*example)
        # The symbolic placeholders carry the tracing's shape environment, which Inductor's FX graph cache needs.
        fakes = [node.meta["val"] for node in graph.graph.nodes if node.op == "placeholder"]
        check = _check_inputs(example)
        for cached in (True, False):
            kernel = _compile(name, graph, fakes, cached=cached)
            if _agrees(kernel(*check), fn(*check)):
                return kernel
        raise RuntimeError("the kernel's output differs from the function it was generated from, also when built "
                           "without Inductor's FX graph cache")
    except Exception as err:  # noqa: BLE001 - any failure to build means: run the torch reference
        warnings.warn(f"nqcompile: Inductor could not build the CPU kernel {name!r} ({type(err).__name__}: {err}); "
                      "decoding with the torch reference instead, several times slower", RuntimeWarning, stacklevel=3)
        return None


def _compile(name: str, graph: torch.fx.GraphModule, fakes: list, *, cached: bool) -> Callable[..., Tensor]:
    """Inductor's kernel of ``graph``; with ``cached``, through the FX graph cache under a key tagged with ``name`` and
    the thread count (so an entry is only ever shared by builds of one kernel), else compiled afresh."""
    from torch._inductor import compile as inductor_compile

    user_tag = torch.compiler.config.cache_key_tag
    tag = f"{user_tag}nqcompile.cpu_kernel:{_FORMAT}:{name}:threads={torch.get_num_threads()}"
    with torch.compiler.config.patch(cache_key_tag=tag), torch._inductor.config.patch(fx_graph_cache=cached):
        compiled = inductor_compile(graph, fakes)

    def kernel(*args: Tensor) -> Tensor:
        out = compiled(*args)
        return out[0] if isinstance(out, (list, tuple)) else out

    return kernel


def _check_inputs(example: tuple[Tensor, ...]) -> list[Tensor]:
    """Random tensors of the example's shapes and dtypes (integers over the whole int32 range or the dtype's, which
    the codec's kernels mask into labels), seeded: the inputs of a built kernel's check against its function."""
    g = torch.Generator().manual_seed(0)
    out = []
    for t in example:
        if t.is_floating_point():
            out.append(torch.randn(t.shape, generator=g, dtype=t.dtype))
        else:
            info = torch.iinfo(t.dtype)
            low, high = max(info.min, -2 ** 31), min(info.max, 2 ** 31 - 1)
            out.append(torch.randint(low, high, t.shape, generator=g, dtype=t.dtype))
    return out


def _agrees(out: Tensor, ref: Tensor) -> bool:
    """Whether a kernel's output ``out`` is its function's ``ref`` (same shape, relative L2 error at most 1e-6: the
    kernels round as the eager ops do, a miscompiled kernel is off by order one)."""
    if out.shape != ref.shape or out.dtype != ref.dtype:
        return False
    ref64 = ref.double()
    return bool((out.double() - ref64).norm() <= 1e-6 * ref64.norm())
