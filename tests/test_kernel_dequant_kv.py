"""The Triton dequant kernel (:mod:`nqcompile.kernels.dequant_kv`) against ``nqcompile::dequant_kv``'s torch reference.

Without a GPU the kernel runs under Triton's interpreter on CPU tensors (``tests/conftest.py`` sets
``TRITON_INTERPRET=1``) on small shapes; the ``gpu`` tests run realistic ones on CUDA. Inputs are fresh random keys
and values (with per-channel offsets) coded by ``nqcompile::write_kv``, so every label decodes to a real codeword.
"""

import math
import os

import pytest
import torch

triton = pytest.importorskip("triton")
ON_GPU = torch.cuda.is_available()
if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("neither CUDA nor TRITON_INTERPRET=1", allow_module_level=True)

from nqcompile import ops  # noqa: E402
from nqcompile.codec.hadamard import hadamard_matrix  # noqa: E402
from nqcompile.kernels import decode_attention as DA  # noqa: E402
from nqcompile.kernels import dequant_kv as K  # noqa: E402
from nqcompile.kernels import launch_configs as LC  # noqa: E402
from nqcompile.ops import cuda as ops_cuda  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"


def _case(batch=2, heads=3, n=40, dim=64, key_bits=4, value_bits=2, rotary_dim=None, layout="half",
          attention_scaling=1.0, shared_positions=False, seed=0, device=DEVICE):
    """Codes of ``n`` random tokens per (sequence, KV head) and the codec arguments of ``dequant_kv``, as a dict."""
    g = torch.Generator().manual_seed(seed)
    rotary_dim = dim if rotary_dim is None else rotary_dim
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    hadamard = hadamard_matrix(dim)
    norm_mean = torch.randn(2, batch, heads, dim, generator=g) * 0.5
    norm_scale = torch.rand(2, batch, heads, dim, generator=g) + 0.5
    kc = torch.zeros(batch, heads, n, key_bits * dim // 8, dtype=torch.uint8)
    vc = torch.zeros(batch, heads, n, value_bits * dim // 8, dtype=torch.uint8)
    ks, vs = torch.zeros(batch, heads, n, dtype=torch.uint8), torch.zeros(batch, heads, n, dtype=torch.uint8)
    key = torch.randn(batch, heads, n, dim, generator=g) * 2 + torch.randn(dim, generator=g)
    value = torch.randn(batch, heads, n, dim, generator=g)
    start = torch.randint(0, 5000, (batch, 1 if shared_positions else heads, 1), generator=g)
    pos = start + torch.arange(n)
    ops.write_kv(kc, ks, vc, vs, key, value, pos.expand(batch, heads, n).contiguous(),
                 torch.zeros(batch, dtype=torch.long), torch.full((batch,), n), hadamard, inv_freq, norm_mean,
                 norm_scale, "e8", key_bits, value_bits, attention_scaling, rotary_dim, layout)
    args = dict(k_codes=kc, k_scales=ks, v_codes=vc, v_scales=vs, positions=pos, hadamard=hadamard,
                inv_freq=inv_freq, norm_mean=norm_mean, norm_scale=norm_scale, kind="e8", key_bits=key_bits,
                value_bits=value_bits, attention_scaling=attention_scaling, rotary_dim=rotary_dim, layout=layout)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


def _kernel(a):
    return K.e8_dequant_kv(a["k_codes"], a["k_scales"], a["v_codes"], a["v_scales"], a["positions"], a["hadamard"],
                           a["inv_freq"], a["norm_mean"], a["norm_scale"], DA.centroid_table(a["k_codes"].device),
                           a["key_bits"], a["value_bits"], a["attention_scaling"], a["rotary_dim"], a["layout"])


def _reference(a):
    """The torch reference of ``dequant_kv`` (what the CPU runs), on CPU tensors."""
    from nqcompile.ops.reference import _decode

    cpu = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in a.items()}
    return _decode(cpu["k_codes"], cpu["k_scales"], cpu["v_codes"], cpu["v_scales"], cpu["positions"],
                   cpu["hadamard"], cpu["inv_freq"], cpu["norm_mean"], cpu["norm_scale"], "e8", cpu["key_bits"],
                   cpu["value_bits"], cpu["attention_scaling"], cpu["rotary_dim"], cpu["layout"])


def _check(a):
    keys, values = _kernel(a)
    ref_k, ref_v = _reference(a)
    assert keys.shape == ref_k.shape and keys.dtype == torch.float32 and values.shape == ref_v.shape
    for out, ref in ((keys, ref_k), (values, ref_v)):
        assert torch.isfinite(out).all()
        # Same codewords, same float32 operations in another order: float32 rounding only, which in the Hadamard
        # product's sums of head_dim terms grows with head_dim (at 256: 2.4e-5 on the H200, 10 of 12.3M elements
        # beyond 1e-5).
        dim = out.shape[-1]
        torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5 * max(1.0, dim / 64))


@pytest.mark.parametrize("key_bits,value_bits", [(4, 2), (3, 2), (2, 4), (3, 3)])
@pytest.mark.parametrize("dim", [64, 96, 128])
def test_matches_the_reference(dim, key_bits, value_bits):
    _check(_case(dim=dim, key_bits=key_bits, value_bits=value_bits, seed=dim + key_bits))


@pytest.mark.parametrize("layout,rotary_dim", [("half", 32), ("interleaved", 64), ("interleaved", 48)])
def test_rope_layouts_partial_rotary_and_scaling(layout, rotary_dim):
    _check(_case(dim=64, layout=layout, rotary_dim=rotary_dim, attention_scaling=1.25, seed=rotary_dim))


def test_positions_shared_by_the_heads_and_a_ragged_last_block():
    _check(_case(n=37, shared_positions=True, seed=3))


@pytest.mark.parametrize("config", [LC.DequantConfig(16, 2), LC.DequantConfig(64, 8)], ids=["16x2", "64x8"])
def test_any_table_configuration_matches_the_reference(config, monkeypatch):
    """A launch table entry other than the default gives the torch reference's keys and values (70 slots: a ragged
    last block for both), and the kernel is launched with it."""
    launched, lookup = [], K.dequant_config
    monkeypatch.setattr(K, "dequant_config", lambda *args: launched.append(lookup(*args)) or launched[-1])
    with LC.using(LC.LaunchTable({}, {}, {(64, 3, 2): config})):
        _check(_case(n=70, key_bits=3, value_bits=2, seed=9))
    assert launched == [config]


def test_no_tokens():
    keys, values = _kernel(_case(n=0))
    assert keys.shape == (2, 3, 0, 64) and values.shape == (2, 3, 0, 64)


def test_opcheck():
    """torch.library.opcheck: the schema everywhere, the fake implementation on CUDA (under the interpreter
    ``wrap_triton`` hands back the plain kernel, which cannot run on fake tensors)."""
    a = _case(n=20, seed=4)
    args = (a["k_codes"], a["k_scales"], a["v_codes"], a["v_scales"], a["positions"], a["hadamard"], a["inv_freq"],
            a["norm_mean"], a["norm_scale"], DA.centroid_table(a["k_codes"].device), 4, 2, 1.0, 64, "half")
    utils = ("test_schema", "test_faketensor") if ON_GPU else ("test_schema",)
    torch.library.opcheck(K.e8_dequant_kv, args, test_utils=utils)


# Compiled for sm_90 by Triton's compiler and ptxas in a fresh interpreter without TRITON_INTERPRET (no GPU needed):
# catches what only the GPU compiler checks (dot shapes, layouts, shared memory).
_SM90_COMPILE = r"""
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from nqcompile.kernels import dequant_kv as K
from nqcompile.kernels import lattice as L
from nqcompile.kernels.launch_configs import default_dequant_config

POINTERS = dict(kc_ptr="*u8", ks_ptr="*u8", vc_ptr="*u8", vs_ptr="*u8", pos_ptr="*i64", hpm_ptr="*fp16",
                freq_ptr="*fp32", kmean_ptr="*fp32", kscale_ptr="*fp32", vmean_ptr="*fp32", vscale_ptr="*fp32",
                cent_ptr="*fp32", ko_ptr="*fp32", vo_ptr="*fp32")
FLOATS = ("key_unit", "value_unit", "attention_scaling")
for dim, key_bits, value_bits, interleaved in [(64, 4, 2, False), (128, 3, 2, True), (96, 2, 4, False),
                                               (256, 4, 2, False)]:
    block, warps = default_dequant_config(dim)
    constants = dict(D=dim, ROTARY=dim, INTERLEAVED=interleaved, KEY_BITS=key_bits, VALUE_BITS=value_bits,
                     BLOCK_N=block, BLOCK_D=L.pow2(dim), BLOCK_P=L.pow2(dim // 2), TWO_PI=K._TWO_PI)
    fn = K._dequant_kernel
    signature = {name: "constexpr" if name in constants else POINTERS.get(name, "fp32" if name in FLOATS else "i32")
                 for name in fn.arg_names}
    kernel = triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=warps))
    print(json.dumps(dict(dim=dim, shared=kernel.metadata.shared)))
"""


def test_the_kernel_compiles_for_sm90():
    """Triton compiles the kernel to a cubin for sm_90 at head_dim 64 to 256, every bit width and both RoPE
    layouts, within the shared memory a block may use there."""
    from sm90 import compile_for_sm90

    configs = compile_for_sm90(_SM90_COMPILE)
    assert [c["dim"] for c in configs] == [64, 128, 96, 256]
    assert all(c["shared"] <= 227 * 1024 for c in configs), configs


def test_refusals_name_the_property():
    a = _case(n=4)
    assert K.unsupported_reason(a["k_codes"], "e8", (4, 2), 64, 64, "half", a["inv_freq"]) is None
    assert "kind" in K.unsupported_reason(a["k_codes"], "lloyd_max", (4, 2), 64, 64, "half", a["inv_freq"])
    assert "bit widths" in K.unsupported_reason(a["k_codes"], "e8", (5, 2), 64, 64, "half", a["inv_freq"])
    assert "Hadamard" in K.unsupported_reason(a["k_codes"], "e8", (4, 2), 184, 184, "half", torch.zeros(92))
    assert "RoPE" in K.unsupported_reason(a["k_codes"], "e8", (4, 2), 64, 62, "half", a["inv_freq"])


def test_the_cuda_implementation_of_dequant_kv_runs_the_kernel(monkeypatch):
    """On CUDA, ``nqcompile::dequant_kv`` of E8 codes goes to the kernel; other kinds to the reference."""
    calls = []
    monkeypatch.setattr(K, "e8_dequant_kv", lambda *args: calls.append(1) or _kernel_args(*args))
    a = _case(n=8, device="cpu")
    ops_cuda.dequant_kv_cuda(*_op_args(a))
    assert calls == [1]
    ops_cuda.dequant_kv_cuda(*_op_args(dict(a, kind="lloyd_max")))
    assert calls == [1]


def _op_args(a):
    return (a["k_codes"], a["k_scales"], a["v_codes"], a["v_scales"], a["positions"], a["hadamard"], a["inv_freq"],
            a["norm_mean"], a["norm_scale"], a["kind"], a["key_bits"], a["value_bits"], a["attention_scaling"],
            a["rotary_dim"], a["layout"])


def _kernel_args(*args):
    return torch.zeros(1), torch.zeros(1)


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [64, 128, 256])
def test_realistic_sizes_on_gpu(dim):
    """Thousands of tokens, 8 KV heads, through the op's CUDA dispatch."""
    a = _case(batch=2, heads=8, n=3000, dim=dim, seed=dim, device="cuda")
    _check(a)
    keys, values = ops.dequant_kv(*_op_args(a))
    ref_k, ref_v = _kernel(a)
    assert torch.equal(keys, ref_k) and torch.equal(values, ref_v)
    assert math.isfinite(keys.double().norm().item())
