"""The chunk path of the attention ops (:mod:`nqcompile.ops.chunk_attention`: codes decoded piece by piece, fused
attention kernels, parts merged by log-sum-exp) against the torch reference in float64.

On CPU the path runs with the reference dequant and torch's CPU flash kernel (the algorithm: pieces, GQA grouping,
masks, the merge), as ``nqcompile::dequant_attention(_lse)`` dispatch it there for a chunk of queries
(:mod:`nqcompile.ops.cpu`); the ``gpu`` tests run it as the ops dispatch it on CUDA (the dequant kernel,
FlashAttention, memory-efficient attention).
"""

import pytest
import torch

from nqcompile import ops
from nqcompile.codec.hadamard import hadamard_matrix
from nqcompile.ops import chunk_attention as CA

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _case(batch=2, kv_heads=2, group=3, q_len=24, capacity=80, exact=40, dim=64, code_len=(80, 37), key_bits=4,
          value_bits=2, dtype=torch.bfloat16, seed=0, device="cpu"):
    """Codes of random keys/values (per-channel offsets), a random chunk of queries and an exact segment with a
    random mask in which each query sees itself; the arguments of ``dequant_attention`` as a tuple."""
    g = torch.Generator().manual_seed(seed)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    hadamard = hadamard_matrix(dim)
    norm_mean = torch.randn(2, batch, kv_heads, dim, generator=g) * 0.5
    norm_scale = torch.rand(2, batch, kv_heads, dim, generator=g) + 0.5
    kc = torch.zeros(batch, kv_heads, capacity, key_bits * dim // 8, dtype=torch.uint8)
    vc = torch.zeros(batch, kv_heads, capacity, value_bits * dim // 8, dtype=torch.uint8)
    ks, vs = (torch.zeros(batch, kv_heads, capacity, dtype=torch.uint8) for _ in range(2))
    key = torch.randn(batch, kv_heads, capacity, dim, generator=g) * 2 + torch.randn(dim, generator=g)
    value = torch.randn(batch, kv_heads, capacity, dim, generator=g)
    pos = torch.arange(capacity).expand(batch, kv_heads, capacity).contiguous()
    ops.write_kv(kc, ks, vc, vs, key, value, pos, torch.zeros(batch, dtype=torch.long),
                 torch.full((batch,), capacity), hadamard, inv_freq, norm_mean, norm_scale, "e8", key_bits,
                 value_bits, 1.0, dim, "half")
    query = (torch.randn(batch, kv_heads * group, q_len, dim, generator=g) * 2).to(dtype)
    exact_k = (torch.randn(batch, kv_heads, exact, dim, generator=g) * 2).to(dtype)
    exact_v = torch.randn(batch, kv_heads, exact, dim, generator=g).to(dtype)
    mask = torch.rand(batch, q_len, exact, generator=g) < 0.6
    mask[:, torch.arange(q_len), exact - q_len + torch.arange(q_len)] = True  # each query sees itself
    args = (query, kc, ks, vc, vs, pos, torch.tensor(code_len), exact_k, exact_v, mask, hadamard, inv_freq,
            norm_mean, norm_scale, "e8", key_bits, value_bits, 1.0, dim, "half", dim ** -0.5)
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


def _reference(args):
    """The torch reference in float64 (query and exact segment), on CPU."""
    cpu = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    cpu[0], cpu[7], cpu[8] = cpu[0].double(), cpu[7].double(), cpu[8].double()
    return ops.dequant_attention_lse(*cpu)


def _rel(x, ref):
    """Relative error (Frobenius) of ``x`` against the float64 ``ref``."""
    return ((x.double().cpu() - ref).norm() / ref.norm()).item()


def _lse_close(lse, ref):
    """Log-sum-exps within 0.5% of the largest: keys attended in bfloat16 move scores of about 10 by ~0.01-0.04."""
    return ((lse.double().cpu() - ref).abs().max() / ref.abs().max()).item() < 5e-3


@pytest.mark.parametrize("piece_bytes", [CA.PIECE_BYTES, 2 * 2 * 64 * 4 * 16])  # one piece; pieces of 16 slots
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 1e-2), (torch.float16, 1e-2), (torch.float32, 1e-5)])
def test_chunk_attention_matches_float64_reference(monkeypatch, piece_bytes, dtype, tol):
    monkeypatch.setattr(CA, "PIECE_BYTES", piece_bytes)
    args = _case(dtype=dtype)
    out, lse = CA.chunk_attention(*args)
    ref_out, ref_lse = _reference(args)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert _rel(out, ref_out) < tol
    assert _lse_close(lse, ref_lse)
    if dtype == torch.float32:  # keys attended in float32: the log-sum-exps agree to float32 rounding
        assert torch.allclose(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)


def test_chunk_attention_sequence_without_codes_and_without_exact_tokens():
    args = list(_case(code_len=(0, 80)))
    out, lse = CA.chunk_attention(*args)
    ref_out, ref_lse = _reference(args)
    assert _rel(out, ref_out) < 1e-2 and _lse_close(lse, ref_lse)
    args[7], args[8], args[9] = args[7][:, :, :0], args[8][:, :, :0], args[9][:, :, :0]
    args[6] = torch.tensor([80, 37])
    out, lse = CA.chunk_attention(*args)
    ref_out, ref_lse = _reference(args)
    assert _rel(out, ref_out) < 1e-2 and _lse_close(lse, ref_lse)


@pytest.mark.parametrize("change, reason", [
    (lambda a: a.__setitem__(0, a[0][:, :, :1]), "decode step"),
    (lambda a: a.__setitem__(0, a[0].double()), "float64 query"),
    (lambda a: a.__setitem__(6, a[6][:, None].expand(-1, 24)), "per-query code lengths"),
    (lambda a: a.__setitem__(14, "exact"), "exact storage"),
])
def test_unsupported_calls_are_refused_with_the_reason(change, reason):
    args = list(_case())
    change(args)
    assert reason in CA.unsupported_reason(args[0], args[6], args[14], args[7].shape[2])
    with pytest.raises(ValueError, match=reason):
        CA.chunk_attention(*args)


def test_cpu_mask_budget(monkeypatch):
    """2 sequences x 24 queries x 48 mask columns (40 exact tokens rounded up to 16) x 2 bytes (bf16) = 4,608."""
    args = _case()
    monkeypatch.setattr(CA, "CPU_MASK_BYTES", 4608)
    assert CA.unsupported_reason(args[0], args[6], args[14], args[7].shape[2]) is None
    monkeypatch.setattr(CA, "CPU_MASK_BYTES", 4607)
    assert "exact-segment mask of 24 x 40" in CA.unsupported_reason(args[0], args[6], args[14], args[7].shape[2])


@pytest.mark.parametrize("with_lse", [False, True])
@pytest.mark.parametrize("q_len, dtype, chunk_path", [
    (24, torch.float32, True), (24, torch.bfloat16, True), (1, torch.float32, False), (24, torch.float64, False),
])
def test_attention_ops_take_the_chunk_path_on_cpu(monkeypatch, with_lse, q_len, dtype, chunk_path):
    from nqcompile.ops import cpu as ops_cpu

    calls = []

    def spy(*a):
        calls.append(a[0].shape)
        return CA.chunk_attention(*a)

    monkeypatch.setattr(ops_cpu, "chunk_attention", spy)
    args = list(_case(q_len=q_len, dtype=dtype))
    ref_out, ref_lse = _reference(args)
    out, lse = ops.dequant_attention_lse(*args) if with_lse else (ops.dequant_attention(*args), None)
    assert len(calls) == int(chunk_path)
    assert out.dtype == dtype
    assert _rel(out, ref_out) < (1e-2 if dtype == torch.bfloat16 else 1e-5)
    if lse is not None:
        assert _lse_close(lse, ref_lse)


@pytest.mark.parametrize("op", [ops.dequant_attention, ops.dequant_attention_lse], ids=lambda op: op._name)
def test_opcheck_cpu_chunk_path_with_a_transposed_query(op):
    """The chunk path on the CPU returns what the ops' fake implementations promise: contiguous outputs, also for
    the ``[B, q, Hq, D]`` query an attention module hands over transposed."""
    args = _case(dtype=torch.float32)
    query = args[0].transpose(1, 2).contiguous().transpose(1, 2)
    assert not query.is_contiguous() and CA.unsupported_reason(query, args[6], "e8", args[7].shape[2]) is None
    torch.library.opcheck(op, (query, *args[1:]))


@GPU
@pytest.mark.gpu
@pytest.mark.parametrize("with_lse", [False, True])
def test_attention_ops_take_the_chunk_path_on_cuda(with_lse):
    from nqcompile.ops import cuda as ops_cuda

    args = _case(batch=2, kv_heads=8, group=4, q_len=300, capacity=5000, exact=700, dim=128, code_len=(5000, 3111),
                 device="cuda")
    assert ops_cuda.chunk_reason(args[0], args[1], args[6], "e8", (4, 2), 128, 128, "half", args[11], 700) is None
    ref_out, ref_lse = _reference(args)
    if with_lse:
        out, lse = ops.dequant_attention_lse(*args)
        assert _lse_close(lse, ref_lse)
    else:
        out = ops.dequant_attention(*args)
    assert out.dtype == torch.bfloat16 and _rel(out, ref_out) < 1e-2
