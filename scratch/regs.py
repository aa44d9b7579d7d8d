"""Scratch (not committed): registers and spills of the kernels for sm_90 via ptxas -v (no GPU needed)."""
import os, subprocess, sys, tempfile
os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, ".")
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from nqcompile.kernels import lattice as L
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")

def regs(fn, sig, constants, warps):
    k = triton.compile(ASTSource(fn, sig, constants), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(k.asm["ptx"])
    r = subprocess.run([PTXAS, "-v", "--gpu-name=sm_90a", f.name, "-o", "/dev/null"], capture_output=True, text=True)
    return " | ".join(l.split("ptxas info    :")[-1].strip() for l in r.stderr.splitlines() if "registers" in l or "spill" in l)

if __name__ == "__main__":
    from nqcompile.kernels import dequant_kv as K, decode_attention as D
    P = dict(kc_ptr="*u8", ks_ptr="*u8", vc_ptr="*u8", vs_ptr="*u8", pos_ptr="*i64", hpm_ptr="*fp16", freq_ptr="*fp32",
             kmean_ptr="*fp32", kscale_ptr="*fp32", vmean_ptr="*fp32", vscale_ptr="*fp32", cent_ptr="*fp32",
             ko_ptr="*fp32", vo_ptr="*fp32", q_ptr="*bf16", mean_ptr="*fp32", scale_ptr="*fp32", o_ptr="*fp32",
             m_ptr="*fp32", l_ptr="*fp32", lim_ptr="*i64")
    F = ("key_unit", "value_unit", "attention_scaling", "qk_scale", "value_gain")
    for dim in (64, 128, 256):
        block, warps = K._launch_shape(dim)
        c = dict(D=dim, ROTARY=dim, INTERLEAVED=False, KEY_BITS=4, VALUE_BITS=2, BLOCK_N=block, BLOCK_D=L.pow2(dim),
                 BLOCK_P=L.pow2(dim // 2), TWO_PI=K._TWO_PI)
        sig = {n: "constexpr" if n in c else P.get(n, "fp32" if n in F else "i32") for n in K._dequant_kernel.arg_names}
        print("dequant", dim, block, warps, regs(K._dequant_kernel, sig, c, warps))
        block, warps = D.launch_shape(dim)
        c = dict(G=4, D=dim, ROTARY=dim, INTERLEAVED=False, KEY_BITS=4, VALUE_BITS=2, BY_MASK=False, BLOCK_N=block,
                 BLOCK_G=16, BLOCK_D=L.pow2(dim), BLOCK_P=L.pow2(dim // 2), TWO_PI=D._TWO_PI)
        sig = {n: "constexpr" if n in c else P.get(n, "fp32" if n in F else "i32") for n in D._code_split_kernel.arg_names}
        print("decode", dim, block, warps, regs(D._code_split_kernel, sig, c, warps))
