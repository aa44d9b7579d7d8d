import sys, importlib
sys.path.insert(0, "."); sys.path.insert(0, "scratch")
from pathlib import Path
from regs import regs
from nqcompile.kernels import lattice as L
src = Path("nqcompile/kernels/decode_attention.py").read_text().replace("from ..", "from nqcompile.").replace("from .lattice", "from nqcompile.kernels.lattice")
VD = Path("scratch/variants"); VD.mkdir(exist_ok=True); sys.path.insert(0, str(VD))
def variant(name, *subs):
    s = src.replace('"nqcompile::e8_decode_attention"', f'"nqdiag::{name}"')
    for a, b in subs:
        assert a in s, (name, a); s = s.replace(a, b)
    (VD / f"r_{name}.py").write_text(s); return importlib.import_module(f"r_{name}")
P = dict(kc_ptr="*u8", ks_ptr="*u8", vc_ptr="*u8", vs_ptr="*u8", pos_ptr="*i64", hpm_ptr="*fp16", freq_ptr="*fp32",
         q_ptr="*bf16", mean_ptr="*fp32", scale_ptr="*fp32", o_ptr="*fp32", cent_ptr="*fp32", m_ptr="*fp32", l_ptr="*fp32", lim_ptr="*i64")
F = ("attention_scaling", "qk_scale", "value_gain", "key_unit")
HOIST = '''    ha = tl.load(hpm_ptr + r[:, None] * D + ca[None, :], mask=h_ok, other=0.0)
    hb = tl.load(hpm_ptr + r[:, None] * D + cb[None, :], mask=h_ok, other=0.0)
'''
V = {
 "tf32_norope": (('input_precision="ieee"', 'input_precision="tf32"'), ("        k_a = pre_a * cos - pre_b * sin\n        k_b = pre_b * cos + pre_a * sin\n", "        k_a = pre_a\n        k_b = pre_b\n")),
 "tf32_g4": (('input_precision="ieee"', 'input_precision="tf32"'),),
}
for name, subs in V.items():
    m = variant(name, *subs)
    for bn, w in ((16, 4), (32, 8)):
        c = dict(G=4, D=128, ROTARY=128, INTERLEAVED=False, KEY_BITS=4, VALUE_BITS=2, BY_MASK=False, BLOCK_N=bn,
                 BLOCK_G=16, BLOCK_D=128, BLOCK_P=64, TWO_PI=m._TWO_PI)
        sig = {n: "constexpr" if n in c else P.get(n, "fp32" if n in F else "i32") for n in m._code_split_kernel.arg_names}
        print(name, bn, w, regs(m._code_split_kernel, sig, c, w), flush=True)
