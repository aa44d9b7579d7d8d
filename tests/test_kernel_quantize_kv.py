"""The Triton quantize-on-write kernel (:mod:`nqcompile.kernels.quantize_kv`) against ``nqcompile::write_kv``'s torch
reference.

Without a GPU the kernel runs under Triton's interpreter on CPU tensors (``tests/conftest.py`` sets
``TRITON_INTERPRET=1``) on small shapes; the ``gpu`` tests run realistic ones on CUDA. Inputs are fresh random keys
and values with per-channel offsets, written into storage poisoned with a constant byte at per-sequence offsets (one
sequence writes nothing). The reference always runs on the CPU. Codes may differ where float32 rounding differs
(the Hadamard product's and the RMS's summation order, the RoPE cos/sin): :func:`_compare` bounds the fraction of
differing 8-dim blocks and their squared error against the reference's.
"""

import os

import pytest
import torch

triton = pytest.importorskip("triton")
ON_GPU = torch.cuda.is_available()
if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("neither CUDA nor TRITON_INTERPRET=1", allow_module_level=True)

from nqcompile import ops  # noqa: E402
from nqcompile.codec.hadamard import hadamard_matrix  # noqa: E402
from nqcompile.codec.registry import code_for  # noqa: E402
from nqcompile.codec.vector import dequantize_vectors  # noqa: E402
from nqcompile.kernels import dequant_kv as DQ  # noqa: E402
from nqcompile.kernels import quantize_kv as K  # noqa: E402
from nqcompile.kernels.lattice import centroid_table  # noqa: E402
from nqcompile.ops import cuda as ops_cuda  # noqa: E402
from nqcompile.ops.reference import _write  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
POISON = 0xA5
STORAGE = ("k_codes", "k_scales", "v_codes", "v_scales")


def _case(n=5, dim=64, key_bits=4, value_bits=2, rotary_dim=None, layout="half", attention_scaling=1.0, heads=2,
          dest=(3, 0, 1), count=(5, 0, 3), capacity=None, dtype=torch.float32, seed=0, device=DEVICE):
    """``write_kv``'s arguments as a dict: ``len(dest)`` sequences of ``n`` new tokens, storage of ``capacity`` slots
    (default: room for every ``dest[b] + n``) filled with :data:`POISON`."""
    g = torch.Generator().manual_seed(seed)
    batch = len(dest)
    rotary_dim = dim if rotary_dim is None else rotary_dim
    capacity = max(dest) + n + 2 if capacity is None else capacity
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    norm_mean = torch.randn(2, batch, heads, dim, generator=g) * 0.5
    norm_scale = torch.rand(2, batch, heads, dim, generator=g) + 0.5
    key = (torch.randn(batch, heads, n, dim, generator=g) * 2 + torch.randn(dim, generator=g) * 3).to(dtype)
    value = (torch.randn(batch, heads, n, dim, generator=g) + torch.randn(dim, generator=g)).to(dtype)
    pos = (torch.randint(0, 5000, (batch, heads, 1), generator=g) + torch.arange(n)).contiguous()
    args = dict(
        k_codes=torch.full((batch, heads, capacity, key_bits * dim // 8), POISON, dtype=torch.uint8),
        k_scales=torch.full((batch, heads, capacity), POISON, dtype=torch.uint8),
        v_codes=torch.full((batch, heads, capacity, value_bits * dim // 8), POISON, dtype=torch.uint8),
        v_scales=torch.full((batch, heads, capacity), POISON, dtype=torch.uint8),
        key=key, value=value, positions=pos, dest=torch.tensor(dest), count=torch.tensor(count),
        hadamard=hadamard_matrix(dim), inv_freq=inv_freq, norm_mean=norm_mean, norm_scale=norm_scale, kind="e8",
        key_bits=key_bits, value_bits=value_bits, attention_scaling=attention_scaling, rotary_dim=rotary_dim,
        layout=layout)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


_NAMES = ("k_codes", "k_scales", "v_codes", "v_scales", "key", "value", "positions", "dest", "count", "hadamard",
          "inv_freq", "norm_mean", "norm_scale", "kind", "key_bits", "value_bits", "attention_scaling", "rotary_dim",
          "layout")


def _op_args(a):
    return [a[name] for name in _NAMES]


def _kernel(a):
    """The kernel op on (a copy of the storage of) ``a``: the four written tensors, on the CPU."""
    a = {k: v.clone() if k in STORAGE else v for k, v in a.items()}
    args = _op_args(a)
    K.e8_quantize_kv(*args[:13], centroid_table(a["key"].device), K.encoder_table(a["key"].device), *args[14:])
    return [a[k].cpu() for k in STORAGE]


def _reference(a):
    """The torch reference of ``write_kv`` on CPU copies: the four written tensors."""
    cpu = {k: v.cpu().clone() if isinstance(v, torch.Tensor) else v for k, v in a.items()}
    _write(*_op_args(cpu))
    return [cpu[k] for k in STORAGE]


def _rotated(a):
    """The vectors the reference codes: float32 ``(keys, values)`` ``[B, H, n, D]`` (RoPE removed, normalized,
    rotated), on the CPU."""
    from nqcompile.codec.rope import apply_rotary

    c = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in a.items()}
    pre = apply_rotary(c["key"].float(), c["positions"], c["inv_freq"], attention_scaling=c["attention_scaling"],
                       rotary_dim=c["rotary_dim"], layout=c["layout"], inverse=True)
    keys = (pre - c["norm_mean"][0][:, :, None]) / c["norm_scale"][0][:, :, None] @ c["hadamard"].T
    values = (c["value"].float() - c["norm_mean"][1][:, :, None]) / c["norm_scale"][1][:, :, None] @ c["hadamard"].T
    return keys, values


def _compare(a, out, ref):
    """Mismatch statistics of the kernel's storage ``out`` against the reference's ``ref`` (both CPU, as
    :func:`_kernel` returns them), asserting: every slot not written keeps its poison and the written ones equal the
    reference's up to float32 rounding: at most ``max(1e-3 of the blocks, 1)`` blocks differ (or their vector's
    scale code), and the kernel's squared error summed over all written blocks is within 1e-4 relative of the
    reference's. (An input an ulp away from a decision boundary of the overloaded-block search can take another,
    individually worse or better, codeword: the H200 gives about 2e-5 of the blocks of an 8192-token chunk.)

    Returns:
        ``dict(blocks=..., differing=..., worst=..., excess=...)``: written blocks, differing blocks, the largest
        relative excess of the kernel's squared error over the reference's among them, and the relative excess of
        the summed squared error.
    """
    batch, heads, capacity = out[1].shape
    n, dim = a["key"].shape[2:]
    dest, count = a["dest"].cpu(), a["count"].cpu()
    written = torch.zeros(batch, heads, capacity, dtype=torch.bool)
    for b in range(batch):
        written[b, :, int(dest[b]):int(dest[b]) + min(int(count[b]), n)] = True
    stats = dict(blocks=0, differing=0, worst=0.0)
    total_got = total_want = 0.0
    for which, (codes, scales, ref_codes, ref_scales, bits) in enumerate(
            [(out[0], out[1], ref[0], ref[1], a["key_bits"]), (out[2], out[3], ref[2], ref[3], a["value_bits"])]):
        assert (codes[~written] == POISON).all() and (scales[~written] == POISON).all()
        assert (ref_codes[~written] == POISON).all()
        target = _rotated(a)[which]  # [B, H, n, D]
        code = code_for("e8", bits)
        for b in range(batch):
            if min(int(count[b]), n) == 0:
                continue
            rows = slice(int(dest[b]), int(dest[b]) + min(int(count[b]), n))
            got = dequantize_vectors(codes[b, :, rows], scales[b, :, rows], code, dim)
            want = dequantize_vectors(ref_codes[b, :, rows], ref_scales[b, :, rows], code, dim)
            x = target[b, :, :got.shape[1]]
            err_got = (got - x).reshape(*x.shape[:-1], -1, 8).square().sum(-1)
            err_want = (want - x).reshape(*x.shape[:-1], -1, 8).square().sum(-1)
            differs = (codes[b, :, rows].reshape(*x.shape[:-1], dim // 8, bits)
                       != ref_codes[b, :, rows].reshape(*x.shape[:-1], dim // 8, bits)).any(-1)
            differs |= (scales[b, :, rows] != ref_scales[b, :, rows])[..., None]
            total_got, total_want = total_got + float(err_got.sum()), total_want + float(err_want.sum())
            stats["blocks"] += differs.numel()
            stats["differing"] += int(differs.sum())
            if differs.any():
                excess = (err_got[differs] - err_want[differs]) / err_want[differs].clamp(min=1e-30)
                stats["worst"] = max(stats["worst"], float(excess.max()))
    stats["excess"] = (total_got - total_want) / max(total_want, 1e-30)
    assert stats["differing"] <= max(1e-3 * stats["blocks"], 1), stats
    assert stats["excess"] <= 1e-4, stats
    return stats


def _check(a):
    out, ref = _kernel(a), _reference(a)
    return _compare(a, out, ref)


@pytest.mark.parametrize("key_bits,value_bits", [(4, 2), (3, 3), (2, 4)])
@pytest.mark.parametrize("dim", [64, 128])
def test_matches_the_reference(dim, key_bits, value_bits):
    """Every E8 bit width for keys and values, head_dim 64 and 128, three sequences (one writing nothing) at
    different offsets into poisoned storage."""
    stats = _check(_case(n=4, dim=dim, key_bits=key_bits, value_bits=value_bits, count=(4, 0, 3), seed=dim + key_bits))
    assert stats["blocks"] == 2 * 2 * 7 * dim // 8


@pytest.mark.parametrize("layout,rotary_dim,attention_scaling", [("interleaved", 64, 1.0), ("half", 32, 1.25),
                                                                 ("interleaved", 48, 0.8)])
def test_rope_layouts_partial_rotary_and_scaling(layout, rotary_dim, attention_scaling):
    _check(_case(n=4, layout=layout, rotary_dim=rotary_dim, attention_scaling=attention_scaling, dest=(0, 2),
                 count=(4, 2), key_bits=3, value_bits=2, seed=rotary_dim))


@pytest.mark.parametrize("dim", [96, 256])
def test_other_head_dims(dim):
    """A ``±1`` Hadamard matrix of order 96 (Paley ⊗ Sylvester: the padded tail of the tile) and the largest head."""
    _check(_case(n=2, dim=dim, dest=(1,), count=(2,), key_bits=4, value_bits=3, seed=dim))


def test_model_dtype_and_a_count_past_the_new_tokens():
    """bfloat16 keys and values (computed in float32 as the reference); ``count`` larger than ``n`` writes ``n``."""
    _check(_case(n=3, dtype=torch.bfloat16, dest=(0, 4), count=(7, 1), seed=5))


def test_round_trip_through_dequant_kv():
    """The kernel's codes decode (by the dequant kernel) to the inputs as closely as the reference's codes do."""
    a = _case(n=6, dest=(0,), count=(6,), key_bits=4, value_bits=4, seed=6)
    dev = a["key"].device
    errors = []
    for storage in (_kernel(a), _reference(a)):
        keys, values = DQ.e8_dequant_kv(*[t[:, :, :6].to(dev) for t in storage], a["positions"], a["hadamard"],
                                        a["inv_freq"], a["norm_mean"], a["norm_scale"], centroid_table(dev), 4, 4,
                                        1.0, 64, "half")
        errors.append([float((got.cpu() - want.cpu()).norm() / want.cpu().norm())
                       for got, want in ((keys, a["key"]), (values, a["value"]))])
    (key_err, value_err), (ref_key_err, ref_value_err) = errors
    assert 0 < key_err <= 1.001 * ref_key_err and 0 < value_err <= 1.001 * ref_value_err, errors
    assert key_err < 0.1 and value_err < 0.2, errors  # 4 bits, per-channel offsets kept exactly


def test_no_tokens_and_nothing_to_write():
    a = _case(n=0, dest=(0, 1), count=(0, 0))
    assert all((t == POISON).all() for t in _kernel(a))
    a = _case(n=3, dest=(0, 1), count=(0, 0))
    assert all((t == POISON).all() for t in _kernel(a))


def test_slots_past_the_capacity_are_skipped():
    """The reference raises on slots outside the storage; the kernel writes the ones inside and no others."""
    a = _case(n=4, dest=(5,), count=(4,), capacity=7)
    out = _kernel(a)
    assert (out[1][0, :, :5] == POISON).all() and (out[1][0, :, 5:] != POISON).all()
    b = dict(a, key=a["key"][:, :, :2], value=a["value"][:, :, :2], positions=a["positions"][:, :, :2].contiguous(),
             count=torch.tensor([2], device=a["key"].device))
    ref = _reference(b)  # the two tokens that fit
    assert torch.equal(out[1][:, :, 5:], ref[1][:, :, 5:]) and torch.equal(out[0][:, :, 5:], ref[0][:, :, 5:])


def test_encoder_table_reproduces_the_scale_code():
    """Row 0's thresholds code every RMS as :func:`~nqcompile.codec.scales.encode_scale` does (at the thresholds and
    one float32 step below them), row 1 holds the decoded scales."""
    from nqcompile.codec.scales import decode_scale, encode_scale

    table = K.encoder_table("cpu")
    bounds = table[0, 1:]
    below = torch.nextafter(bounds, torch.zeros_like(bounds))
    for r in (bounds, below, torch.rand(1000) * 300):
        codes = (r[:, None] >= table[0, 1:][None, :]).sum(-1)  # the kernel's binary search, written as a count
        assert torch.equal(codes, encode_scale(r).long())
    assert torch.equal(table[1], decode_scale(torch.arange(256, dtype=torch.uint8)))
    assert table[2:10, :240].abs().square().sum(0).eq(2).all() and (table[2:10, 240:] == 0).all()


def test_opcheck():
    """torch.library.opcheck: the schema everywhere (under the interpreter ``wrap_triton`` hands back the plain
    kernel, which cannot run on fake tensors)."""
    a = _case(n=2)
    args = _op_args(a)
    args = (*args[:13], centroid_table(DEVICE), K.encoder_table(DEVICE), *args[14:])
    utils = ("test_schema", "test_faketensor") if ON_GPU else ("test_schema",)
    torch.library.opcheck(K.e8_quantize_kv, args, test_utils=utils)


def test_refusals_name_the_property():
    a = _case(n=2)
    kc, ks, key, freq = a["k_codes"], a["k_scales"], a["key"], a["inv_freq"]
    assert K.unsupported_reason(kc, ks, key, "e8", (4, 2), 64, 64, "half", freq) is None
    assert "kind" in K.unsupported_reason(kc, ks, key, "exact", (4, 2), 64, 64, "half", freq)
    assert "kind" in K.unsupported_reason(kc, ks, key, "lloyd_max", (4, 2), 64, 64, "half", freq)
    assert "bit widths" in K.unsupported_reason(kc, ks, key, "e8", (5, 2), 64, 64, "half", freq)
    assert "Hadamard" in K.unsupported_reason(kc, ks, key, "e8", (4, 2), 184, 184, "half", torch.zeros(92))
    assert "RoPE" in K.unsupported_reason(kc, ks, key, "e8", (4, 2), 64, 62, "half", freq)
    assert "dtype" in K.unsupported_reason(kc.float(), ks, key, "e8", (4, 2), 64, 64, "half", freq)
    assert "float dtype" in K.unsupported_reason(kc, ks, key.long(), "e8", (4, 2), 64, 64, "half", freq)


def test_the_cuda_implementation_of_write_kv_runs_the_kernel(monkeypatch):
    """On CUDA, ``nqcompile::write_kv`` of E8 codes goes to the kernel (with the tables); the exact kind and scalar
    codecs to the reference."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key("nqcompile::write_kv", "CUDA")
    calls = []
    monkeypatch.setattr(K, "e8_quantize_kv", lambda *args: calls.append(args))
    a = _case(n=2, device="cpu")
    ops_cuda.write_kv_cuda(*_op_args(a))
    assert len(calls) == 1 and calls[0][14].shape == (13, 256)
    assert ops_cuda.write_kernel_reason(a["k_codes"], a["k_scales"], a["key"], "e8", (4, 2), 64, 64, "half",
                                        a["inv_freq"]) is None
    b = _case(n=2, device="cpu", key_bits=2, value_bits=2)
    b["kind"] = "lloyd_max"
    ops_cuda.write_kv_cuda(*_op_args(b))
    assert len(calls) == 1 and (b["k_scales"][0, :, 3:5] != POISON).all()  # written by the reference
    assert "kind" in ops_cuda.write_kernel_reason(b["k_codes"], b["k_scales"], b["key"], "lloyd_max", (2, 2), 64, 64,
                                                  "half", b["inv_freq"])


# Compiled for sm_90 by Triton's compiler and ptxas in a fresh interpreter without TRITON_INTERPRET (no GPU needed):
# catches what only the GPU compiler checks, and reports the registers and spills ptxas finds.
_SM90_COMPILE = r"""
import json, os, re, subprocess, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from nqcompile.codec.registry import code_for
from nqcompile.kernels import lattice as L
from nqcompile.kernels import quantize_kv as K

POINTERS = dict(x_ptr="*bf16", pos_ptr="*i64", dest_ptr="*i64", count_ptr="*i64", hs_ptr="*fp32", freq_ptr="*fp32",
                mean_ptr="*fp32", scale_ptr="*fp32", table_ptr="*fp32", cent_ptr="*fp32", codes_ptr="*u8",
                scales_ptr="*u8", su_ptr="*fp32", sid_ptr="*i32")
FLOATS = ("unit", "gain", "attention_scaling")
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
for dim, bits, rope, interleaved in [(64, 4, True, False), (128, 2, False, False), (128, 3, True, True),
                                     (128, 4, True, False), (256, 2, False, False)]:
    block_d, warps = K._program_shape(dim)
    code = code_for("e8", bits)
    grid = len(code.shrink_grid) + 1
    constants = dict(D=dim, ROPE=rope, ROTARY=dim, INTERLEAVED=interleaved, BITS=bits, GRID=grid,
                     STEPS=code.search_steps, BLOCK_N=K.BLOCK_N, BLOCK_D=block_d, BLOCK_G=L.pow2(grid),
                     KC=min(K._KC, block_d))
    fn = K._quantize_kernel
    signature = {name: "constexpr" if name in constants else POINTERS.get(name, "fp32" if name in FLOATS else "i32")
                 for name in fn.arg_names}
    kernel = triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=warps, enable_fp_fusion=False))
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        log = subprocess.run([PTXAS, "-v", "--gpu-name=sm_90a", ptx, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = [int(x) for x in re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups()]
    print(json.dumps(dict(dim=dim, bits=bits, rope=rope, registers=regs, spill_stores=spills[0],
                          spill_loads=spills[1], shared=kernel.metadata.shared)))
"""


def test_the_kernel_compiles_for_sm90_without_spills():
    """Triton compiles the kernel for sm_90 at head_dim 64 to 256, every bit width, keys (both RoPE layouts) and
    values; ptxas allocates it without spilling, within the shared memory a block may use there."""
    from sm90 import compile_for_sm90

    configs = compile_for_sm90(_SM90_COMPILE)
    print("\n".join(map(str, configs)))
    assert [c["dim"] for c in configs] == [64, 128, 128, 128, 256]
    assert all(c["spill_stores"] == 0 and c["spill_loads"] == 0 and c["registers"] <= 255 for c in configs), configs
    assert all(c["shared"] <= 227 * 1024 for c in configs), configs


def test_benchmark_smoke(tmp_path, capsys):
    """benchmarks/quantize_kv.py --smoke runs (kernel and reference on tiny CPU shapes) and writes its rows."""
    import importlib.util
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "quantize_kv.py"
    spec = importlib.util.spec_from_file_location("quantize_kv_benchmark", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "quantize.json"
    flags = ["--smoke", "--out", str(out)] + ([] if not ON_GPU else ["--device", "cuda"])
    assert module.main(flags) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["tokens"], r["bits"]) for r in rows] == [(t, b) for t in (8, 1) for b in ("K4V2", "K3V2")]
    for r in rows:
        assert r["kernel_us"] > 0 and r["reference_us"] > 0 and r["bytes_written"] > 0, r
        assert r["differing_blocks"] <= max(1e-3 * r["blocks"], 1), r
    printed = capsys.readouterr().out
    assert "| tokens | bits | kernel us |" in printed and "command: python benchmarks/quantize_kv.py --smoke" in printed


@pytest.mark.gpu
@pytest.mark.parametrize("n", [8192, 1])
@pytest.mark.parametrize("key_bits,value_bits", [(4, 2), (3, 2)])
def test_llama_shapes_on_gpu(n, key_bits, value_bits):
    """Llama-3.1-8B's KV shape (8 KV heads, head_dim 128, bfloat16) for an 8192-token chunk and a 1-token write,
    through the op's CUDA dispatch, against the CPU reference."""
    a = _case(n=n, dim=128, heads=8, key_bits=key_bits, value_bits=value_bits, dest=(5,), count=(n,),
              dtype=torch.bfloat16, seed=n + key_bits, device="cuda")
    ref = _reference(a)
    ops.write_kv(*_op_args(a))
    stats = _compare(a, [a[k].cpu() for k in STORAGE], ref)
    print(f"\nn={n} K{key_bits}V{value_bits}: {stats}")
    assert stats["blocks"] == 2 * 8 * n * 128 // 8
