"""Diagnostic (not committed): kernel variants, graph-replay timing."""
import importlib, os, sys, time
from pathlib import Path
sys.path.insert(0, ".")
import torch
from benchmarks.decode_attention import parse_args, inputs
from nqcompile.kernels import decode_attention as K

VDIR = Path("scratch/variants"); VDIR.mkdir(parents=True, exist_ok=True); sys.path.insert(0, str(VDIR))
src = Path("nqcompile/kernels/decode_attention.py").read_text().replace("from ..", "from nqcompile.")

def variant(name, *subs, shape=None):
    s = src.replace('"nqcompile::e8_decode_attention"', f'"nqdiag::{name}"')
    for a, b in subs:
        assert a in s, (name, a); s = s.replace(a, b)
    (VDIR / f"w_{name}.py").write_text(s)
    m = importlib.import_module(f"w_{name}")
    if shape:
        m.launch_shape = lambda dim: shape
    return m

SPLIT = "target = 2 * torch.cuda"
variants = {"v2": K}
for bn, w in ((16, 4), (32, 4), (16, 8), (64, 8), (64, 4)):
    variants[f"ls{bn}_{w}"] = variant(f"ls{bn}_{w}", shape=(bn, w))
variants["stages1"] = variant("stages1", ("num_warps=warps,", "num_warps=warps, num_stages=1,"))
variants["split8"] = variant("split8", (SPLIT, "target = 8 * torch.cuda"))
variants["ls16_4_split8"] = variant("ls16_4_split8", (SPLIT, "target = 8 * torch.cuda"), shape=(16, 4))
variants["ls32_4_split8"] = variant("ls32_4_split8", (SPLIT, "target = 8 * torch.cuda"), shape=(32, 4))

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

from nqcompile.ops.fused import cache_attention_reference
lens = [int(x) for x in os.environ.get("LENS", "32768,131072").split(",")]
bits = [tuple(int(b) for b in p.split(",")) for p in os.environ.get("BITS", "4,2").split(";")]
for kb, vb in bits:
    data = {T: inputs(args, T, kb, vb) for T in lens}
    small = inputs(args, 4096, kb, vb)
    ref = cache_attention_reference(**dict(small, query=small["query"].float())).double()
    for name, mod in variants.items():
        try:
            out = call(mod, dict(small, query=small["query"].float())).double()
            err = float((out - ref).norm() / ref.norm())
            ts = [graph_ms(lambda: call(mod, data[T])) for T in lens]
            print(f"K{kb}V{vb} {name:14s} err-vs-ref@4K {err:.1e}  " + "  ".join(f"T={T} {t*1e3:8.1f} us" for T, t in zip(lens, ts)), flush=True)
        except Exception as ex:
            print(f"K{kb}V{vb} {name:14s} FAILED {type(ex).__name__}: {str(ex)[:400]}", flush=True)
for name, mod in variants.items():
    try:
        for dev, v in mod._code_split_kernel.device_caches.items():
            for key, ck in v[0].items():
                print(f"{name:14s} regs {ck.n_regs} spills {ck.n_spills} warps {ck.metadata.num_warps} stages {ck.metadata.num_stages} shared {ck.metadata.shared}")
    except Exception as ex:
        print(name, "cache inspect failed", type(ex).__name__, ex)
