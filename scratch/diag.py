"""Diagnostic (not committed): where does e8_decode_attention's time go on the GPU."""
import importlib, json, os, re, sys, time
from pathlib import Path
sys.path.insert(0, ".")
import torch, triton
from benchmarks.decode_attention import parse_args, inputs
from nqcompile.kernels import decode_attention as K

OUT = Path(os.environ.get("OUT", "/tmp/out"))
VDIR = Path("scratch/variants"); VDIR.mkdir(parents=True, exist_ok=True); sys.path.insert(0, str(VDIR))
src = Path("nqcompile/kernels/decode_attention.py").read_text().replace("from ..", "from nqcompile.")

def variant(name, *subs):
    s = src.replace('"nqcompile::e8_decode_attention"', f'"nqdiag::{name}"')
    for a, b in subs:
        assert a in s, (name, a); s = s.replace(a, b)
    (VDIR / f"v_{name}.py").write_text(s)
    return importlib.import_module(f"v_{name}")

NP = "    c = y - Q * tl.where(take0[:, :, None], y0, y1)\n"
variants = {
    "base": K,
    "nonp": variant("nonp", (NP, "    c = y\n")),
    "rope32": variant("rope32", ("    cos, sin = _cos_sin(pos[:, None] * freq[None, :], TWO_PI)\n",
                                 "    cos = tl.cos(pos[:, None] * freq[None, :]); sin = tl.sin(pos[:, None] * freq[None, :])\n")),
    "norope": variant("norope", ("        k_a = pre_a * cos - pre_b * sin\n        k_b = pre_b * cos + pre_a * sin\n",
                                 "        k_a = pre_a\n        k_b = pre_b\n")),
    "nonp_norope": variant("nonp_norope", (NP, "    c = y\n"), ("        k_a = pre_a * cos - pre_b * sin\n        k_b = pre_b * cos + pre_a * sin\n",
                                 "        k_a = pre_a\n        k_b = pre_b\n")),
}
for bn, w in ((16, 4), (64, 8), (32, 4), (32, 8), (64, 4)):
    m = variant(f"ls{bn}_{w}")
    m.launch_shape = (lambda bn, w: (lambda dim: (bn, w)))(bn, w)
    variants[f"ls{bn}_{w}"] = m

args = parse_args([])
def call(mod, a):
    return mod.e8_decode_attention(a["query"], a["k_codes"], a["k_scales"], a["v_codes"], a["v_scales"], a["code_pos"], a["code_len"],
        a["warm_k_codes"], a["warm_k_scales"], a["warm_v_codes"], a["warm_v_scales"], a["warm_pos"], a["warm_mask"],
        a["warm_bits"], a["exact_k"], a["exact_v"], a["exact_mask"], a["hadamard"], a["inv_freq"], a["norm_mean"],
        a["norm_scale"], K.centroid_table(a["query"].device), a["key_bits"], a["value_bits"],
        a["attention_scaling"], a["rotary_dim"], a["layout"], a["scaling"])

def graph_ms(fn, iters=20):
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3): fn()
    torch.cuda.current_stream().wait_stream(s); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g): fn()
    g.replay(); torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(iters): g.replay()
    e1.record(); torch.cuda.synchronize()
    return e0.elapsed_time(e1) / iters

def eager_ms(fn, iters=20):
    for _ in range(3): fn()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(iters): fn()
    torch.cuda.synchronize(); return (time.perf_counter() - t) * 1e3 / iters

res = {}
lines = []
data = {T: inputs(args, T, 4, 2) for T in (4096, 32768, 131072)}
ref = {T: call(K, dict(data[T], query=data[T]["query"].float())).double() for T in data}
for name, mod in variants.items():
    for T, a in data.items():
        try:
            out = call(mod, dict(a, query=a["query"].float())).double()
            err = float((out - ref[T]).norm() / ref[T].norm())
            g = graph_ms(lambda: call(mod, a)); e = eager_ms(lambda: call(mod, a))
            res[(name, T)] = (g, e, err)
            line = f"{name:12s} T={T:6d} graph {g*1e3:9.1f} us  eager {e*1e3:9.1f} us  err-vs-base {err:.2e}"
        except Exception as ex:
            line = f"{name:12s} T={T:6d} FAILED {type(ex).__name__}: {str(ex)[:300]}"
        print(line, flush=True); lines.append(line)
# registers / spills
for name, mod in variants.items():
    try:
        for dev, v in mod._code_split_kernel.device_caches.items():
            for key, ck in v[0].items():
                print(f"{name:12s} regs {ck.n_regs} spills {ck.n_spills} warps {ck.metadata.num_warps} shared {ck.metadata.shared}")
    except Exception as ex:
        print(name, "cache inspect failed", type(ex).__name__, ex)
# profiler breakdown of base at 4K and 128K
from torch.profiler import profile, ProfilerActivity
for T in (4096, 131072):
    a = data[T]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10): call(K, a)
        torch.cuda.synchronize()
    print(f"--- profile T={T} (10 calls)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))
# sdpa
import torch.nn.functional as F
for T in data:
    a = data[T]; k = torch.randn(1, 8, T, 128, device="cuda", dtype=torch.bfloat16); v = torch.randn_like(k)
    print(f"sdpa T={T} graph {graph_ms(lambda: F.scaled_dot_product_attention(a['query'], k, v, enable_gqa=True))*1e3:.1f} us")
try:
    import flashinfer; print("flashinfer", flashinfer.__version__)
except Exception as ex:
    print("no flashinfer:", ex)
