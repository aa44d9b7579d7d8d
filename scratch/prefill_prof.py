"""Diagnostic (not committed): where a prefill chunk's time goes, 1 Llama-8B-shaped layer."""
import sys, time
sys.path.insert(0, "."); sys.path.insert(0, "benchmarks")
import torch
import nqcompile
from benchmarks.e2e_decode import parse_args, build_model
from torch.profiler import profile, ProfilerActivity
T = int(sys.argv[1]) if len(sys.argv) > 1 else 65536
args = parse_args(["--layers", "1", "--lengths", str(T)])
model = build_model(args)
ids = torch.randint(0, 1000, (1, T), device="cuda")
for preset in ("quant_only", "balanced"):
    nqcompile.optimize(model, preset)
    cache = nqcompile.NexusCache(model.config, preset, max_cache_len=T + 8)
    chunk = 8192
    times = []
    for s in range(0, T, chunk):
        piece = ids[:, s:s + chunk]
        torch.cuda.synchronize(); t = time.perf_counter()
        last = s + chunk >= T
        if last:
            prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]); prof.__enter__()
        with torch.no_grad():
            model(input_ids=piece, position_ids=torch.arange(s, s + piece.shape[1], device="cuda")[None],
                  past_key_values=cache, use_cache=True, logits_to_keep=1)
            if getattr(cache, "awaiting_reconstruction", False):
                cache.reconstruct(model, piece)
        torch.cuda.synchronize()
        if last:
            prof.__exit__(None, None, None)
        times.append(time.perf_counter() - t)
    print(f"=== {preset} T={T}: chunk seconds", [round(x, 2) for x in times], "total", round(sum(times), 1), flush=True)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=50))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=50))
