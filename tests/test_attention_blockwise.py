"""Blockwise dequant_attention / dequant_attention_lse and their online-softmax engine against dense float64
references (everything decoded, one softmax over all held tokens), with tiles forced tiny.

On the CPU the ops run a chunk of queries through the chunk path (:mod:`nqcompile.ops.cpu`, tested in
``test_chunk_attention.py``); here every call is left to the torch reference, the subject of this file."""

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

from nqcompile.eval.allocations import peak_allocated_bytes
from nqcompile import ops
from nqcompile.codec.hadamard import hadamard_matrix
from nqcompile.codec.kv import KVTransform, decode_values, encode_values, fold_values, value_rows
from nqcompile.ops import blockwise
from nqcompile.ops import cpu as ops_cpu
from nqcompile.ops.reference import _attention
from nqcompile.policy.reconstruction import max_attention_probability, reconstruction_scores

#: (key_bits, value_bits) per codec kind (ignored by ``exact``, whose codes are float tensors).
KINDS = {"exact": (16, 16), "e8": (4, 2), "lloyd_max": (3, 2), "uniform": (4, 3)}
DTYPES = [torch.bfloat16, torch.float32, torch.float64]
#: Output tolerances against the float64 reference, per query dtype: float32 accumulation, then the output's
#: rounding (bfloat16: half an ulp, 2**-9 relative). The log-sum-exp is float32 for all but float64 queries.
OUT_TOL = {torch.float64: dict(atol=1e-12, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-5),
           torch.bfloat16: dict(atol=1e-4, rtol=4e-3)}
LSE_TOL = {torch.float64: dict(atol=1e-12, rtol=1e-12), torch.float32: dict(atol=1e-5, rtol=1e-6),
           torch.bfloat16: dict(atol=1e-5, rtol=1e-6)}
#: Codes decode to float32, and the codec's float32 matmuls round a block of tokens differently from all of them
#: at once (the reference), by about 1e-6 relative: the floor of every tolerance for the coded kinds.
DECODE_TOL = dict(atol=5e-6, rtol=1e-5)
# Sizes: batch, KV heads, GQA group, queries, code slots, exact tokens, head_dim; tiles of 3 queries x 5 keys
# leave remainders (7 = 3 + 3 + 1 queries; 21 = 4 * 5 + 1 code slots, 9 = 5 + 4 exact tokens).
B, H, G, Q, C, E, D = 2, 2, 3, 7, 21, 9, 16
QUERY_TILE, KEY_BLOCK = 3, 5


@pytest.fixture(autouse=True)
def reference_on_cpu(monkeypatch):
    """The CPU implementations of the ops run the torch reference for every call of this file."""
    monkeypatch.setattr(ops_cpu, "unsupported_reason", lambda *args: "the torch reference under test")


def tolerance(tol, kind):
    """``tol`` raised to :data:`DECODE_TOL` for the coded kinds."""
    return tol if kind == "exact" else {k: max(v, DECODE_TOL[k]) for k, v in tol.items()}


def force_tiles(monkeypatch, query_tile, key_block, *, batch, q_heads, kv_heads, head_dim, dtype):
    """Set the budgets of :mod:`nqcompile.ops.blockwise` so that calls of this shape get exactly these tiles."""
    item = blockwise.compute_dtype(dtype).itemsize
    monkeypatch.setattr(blockwise, "SCORE_TILE_BYTES", batch * q_heads * query_tile * key_block * item)
    monkeypatch.setattr(blockwise, "KEY_BLOCK_BYTES", batch * kv_heads * key_block * head_dim * item)


def held(kind, dtype, per_query, seed, *, capacity=C, n_exact=E, q_len=Q):
    """Random op inputs (``dequant_attention``'s argument order); every code slot holds a written token."""
    g = torch.Generator().manual_seed(seed)
    key_bits, value_bits = KINDS[kind]
    codec = (hadamard_matrix(D), 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D)),
             torch.randn(2, B, H, D, generator=g) * 0.1, torch.rand(2, B, H, D, generator=g) + 0.5,
             kind, key_bits, value_bits, 1.0, D, "half")
    keys, values = torch.randn(B, H, capacity, D, generator=g) * 2, torch.randn(B, H, capacity, D, generator=g)
    code_pos = (torch.arange(capacity) * 3 + 5).expand(B, 1, capacity)
    if kind == "exact":
        store = (keys.to(dtype), torch.zeros(B, H, 0, dtype=torch.uint8), values.to(dtype),
                 torch.zeros(B, H, 0, dtype=torch.uint8))
    else:
        store = (torch.zeros(B, H, capacity, key_bits * D // 8, dtype=torch.uint8),
                 torch.zeros(B, H, capacity, dtype=torch.uint8),
                 torch.zeros(B, H, capacity, value_bits * D // 8, dtype=torch.uint8),
                 torch.zeros(B, H, capacity, dtype=torch.uint8))
        positions = code_pos.expand(B, H, capacity).contiguous()
        ops.write_kv(*store, keys, values, positions, torch.zeros(B, dtype=torch.long), torch.full((B,), capacity),
                     *codec)
    code_len = (torch.randint(0, capacity + 1, (B, q_len), generator=g) if per_query
                else torch.tensor([capacity - 4, capacity // 2]))
    exact_mask = torch.rand(B, q_len, n_exact, generator=g) < 0.6
    exact_mask[:, torch.arange(q_len), torch.arange(q_len) % n_exact] = True  # each query sees one exact token
    query = torch.randn(B, H * G, q_len, D, generator=g).to(dtype)
    exact_k = torch.randn(B, H, n_exact, D, generator=g).to(dtype)
    exact_v = torch.randn(B, H, n_exact, D, generator=g).to(dtype)
    return (query, *store, code_pos, code_len, exact_k, exact_v, exact_mask, *codec, D ** -0.5)


def dense_reference(query, k_codes, k_scales, v_codes, v_scales, code_pos, code_len, exact_k, exact_v, exact_mask,
                    *codec_and_scaling):
    """The old way, in float64: decode every code, one masked softmax over all ``C + E`` held tokens.

    Returns ``(out, lse)`` float64 ``[B, Hq, q, D]`` and ``[B, Hq, q]``; a query that sees nothing: 0 and -inf.
    """
    *codec, scaling = codec_and_scaling
    if codec[4] == "exact":
        kc, vc = k_codes, v_codes
    else:
        kc, vc = ops.dequant_kv(k_codes, k_scales, v_codes, v_scales, code_pos, *codec)
    batch, q_heads, q_len, _ = query.shape
    groups = q_heads // kc.shape[1]
    limit = code_len[:, None] if code_len.dim() == 1 else code_len
    code_mask = torch.arange(kc.shape[2])[None, None, :] < limit[:, :, None]
    mask = torch.cat([code_mask.expand(batch, q_len, -1), exact_mask], -1)
    keys = torch.cat([kc, exact_k], 2).double().repeat_interleave(groups, 1)
    values = torch.cat([vc, exact_v], 2).double().repeat_interleave(groups, 1)
    scores = (query.double() @ keys.transpose(-1, -2) * scaling).masked_fill(~mask[:, None], float("-inf"))
    return torch.softmax(scores, -1).nan_to_num(0.0) @ values, scores.logsumexp(-1)


@pytest.mark.parametrize("per_query", [False, True], ids=["code_len[B]", "code_len[B,q]"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_blockwise_attention_equals_the_dense_float64_reference(kind, dtype, per_query, monkeypatch):
    force_tiles(monkeypatch, QUERY_TILE, KEY_BLOCK, batch=B, q_heads=H * G, kv_heads=H, head_dim=D, dtype=dtype)
    assert blockwise.tile_sizes(B, H * G, H, D, Q, C + E, blockwise.compute_dtype(dtype)) == (QUERY_TILE, KEY_BLOCK)
    args = held(kind, dtype, per_query, seed=len(kind) + 7 * per_query)
    params = f"kind={kind} dtype={dtype} code_len={'[B, q]' if per_query else '[B]'} tiles={QUERY_TILE}x{KEY_BLOCK}"
    out = ops.dequant_attention(*args)
    out_lse, lse = ops.dequant_attention_lse(*args)
    ref_out, ref_lse = dense_reference(*args)
    assert out.dtype == dtype and lse.dtype == blockwise.compute_dtype(dtype), params
    assert torch.equal(out, out_lse), params
    out_tol, lse_tol = tolerance(OUT_TOL[dtype], kind), tolerance(LSE_TOL[dtype], kind)
    torch.testing.assert_close(out.double(), ref_out, **out_tol, msg=lambda m: f"{params} tol={out_tol}: output\n{m}")
    torch.testing.assert_close(lse.double(), ref_lse, **lse_tol, msg=lambda m: f"{params} tol={lse_tol}: lse\n{m}")


def test_a_query_that_sees_nothing_gets_zeros_and_minus_infinite_lse(monkeypatch):
    force_tiles(monkeypatch, QUERY_TILE, KEY_BLOCK, batch=B, q_heads=H * G, kv_heads=H, head_dim=D,
                dtype=torch.float32)
    args = list(held("e8", torch.float32, False, seed=3))
    args[6] = torch.tensor([0, 5])  # sequence 0 holds no codes
    args[9] = args[9].clone()
    args[9][0, 4] = False  # and its query 4 no exact token
    out, lse = ops.dequant_attention_lse(*args)
    ref_out, ref_lse = dense_reference(*args)
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.equal(out[0, :, 4], torch.zeros_like(out[0, :, 4]))
    assert (lse[0, :, 4] == float("-inf")).all()
    torch.testing.assert_close(out.double(), ref_out, **tolerance(OUT_TOL[torch.float32], "e8"))
    torch.testing.assert_close(lse.double(), ref_lse, **tolerance(LSE_TOL[torch.float32], "e8"))


@pytest.mark.parametrize("per_query", [False, True], ids=["code_len[B]", "code_len[B,q]"])
@pytest.mark.parametrize("op", [ops.dequant_attention, ops.dequant_attention_lse], ids=lambda op: op._name)
@pytest.mark.parametrize("kind", KINDS)
def test_opcheck_blockwise_attention(kind, op, per_query, monkeypatch):
    force_tiles(monkeypatch, QUERY_TILE, KEY_BLOCK, batch=B, q_heads=H * G, kv_heads=H, head_dim=D,
                dtype=torch.float32)
    torch.library.opcheck(op, held(kind, torch.float32, per_query, seed=11))


@pytest.mark.parametrize("op", [ops.dequant_attention, ops.dequant_attention_lse], ids=lambda op: op._name)
def test_opcheck_with_a_transposed_query(op, monkeypatch):
    """Attention modules hand over ``[B, q, Hq, D]`` transposed to ``[B, Hq, q, D]``: the fake output must have the
    real output's (contiguous) strides, not the query's, or a compiled call with several queries fails."""
    force_tiles(monkeypatch, QUERY_TILE, KEY_BLOCK, batch=B, q_heads=H * G, kv_heads=H, head_dim=D,
                dtype=torch.float32)
    args = held("e8", torch.float32, False, seed=12)
    query = args[0].transpose(1, 2).contiguous().transpose(1, 2)
    assert not query.is_contiguous()
    torch.library.opcheck(op, (query, *args[1:]))


@pytest.mark.parametrize("per_query", [False, True], ids=["code_len[B]", "code_len[B,q]"])
@pytest.mark.parametrize("kind", KINDS)
def test_the_reference_never_reads_a_value_on_the_host(kind, per_query, monkeypatch):
    """CUDA-graph capturable: the torch reference runs on fake tensors, where ``.item()``, ``nonzero`` and every
    other data-dependent step raise."""
    force_tiles(monkeypatch, QUERY_TILE, KEY_BLOCK, batch=B, q_heads=H * G, kv_heads=H, head_dim=D,
                dtype=torch.float32)
    args = held(kind, torch.float32, per_query, seed=17)
    ops.dequant_attention(*args)  # builds the codebook tables for real
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        out, lse = _attention(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    assert out.shape == args[0].shape and lse.shape == args[0].shape[:3]


def test_transient_memory_does_not_grow_with_the_held_tokens(monkeypatch):
    """Peak allocations of one call over 4,096 code slots equal those over 512, and stay under what decoding all
    the keys alone took before (the dense way also held [B, Hq, q, C + E] scores)."""
    force_tiles(monkeypatch, 4, 64, batch=B, q_heads=H * G, kv_heads=H, head_dim=D, dtype=torch.float32)
    peaks = {}
    for capacity in (512, 4096):
        args = held("e8", torch.float32, False, seed=5, capacity=capacity, q_len=8)
        ops.dequant_attention(*args)  # warm caches (codebook tables)
        peaks[capacity] = peak_allocated_bytes(lambda: ops.dequant_attention(*args))
    decoded_keys = B * H * 4096 * D * 4
    assert peaks[4096] <= peaks[512] * 1.05, peaks
    assert peaks[4096] < decoded_keys / 2, (peaks, decoded_keys)


@pytest.mark.parametrize("kind", KINDS)
def test_scores_from_the_ops_lse_equal_reconstruction_scores_over_decoded_keys(kind):
    """The re-reading's scores two ways: the op's log-sum-exp and the exact target keys alone, or every code
    decoded (dequant_kv) and concatenated with the exact keys; padding queries excluded in both."""
    args = held(kind, torch.float64, False, seed=13)
    query, k_codes, k_scales, v_codes, v_scales, code_pos, code_len, exact_k, exact_v, exact_mask = args[:10]
    *codec, scaling = args[10:]
    real = torch.tensor([[True] * Q, [False, False] + [True] * (Q - 2)])
    target = slice(2, E - 1)  # exact tokens 2..7: the window and chunk of the layer
    _, lse = ops.dequant_attention_lse(*args)
    got = max_attention_probability(query, exact_k[:, :, target], exact_mask[:, :, target] & real[:, :, None], lse,
                                    scaling=scaling)
    ck = k_codes if kind == "exact" else ops.dequant_kv(k_codes, k_scales, v_codes, v_scales, code_pos, *codec)[0]
    coded = (torch.arange(C)[None] < code_len[:, None])[:, None, :].expand(-1, Q, -1)
    want = reconstruction_scores(query, torch.cat([ck.to(exact_k.dtype), exact_k], 2),
                                 torch.cat([coded, exact_mask], -1) & real[:, :, None], scaling=scaling,
                                 target=slice(C + target.start, C + target.stop))
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0, msg=lambda m: f"kind={kind}\n{m}")


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 2), st.sampled_from([(1, 1), (2, 1), (3, 3), (6, 2)]), st.integers(1, 13),
       st.lists(st.integers(1, 9), min_size=1, max_size=4), st.integers(1, 6), st.booleans(), st.data())
def test_attention_blocks_equal_a_dense_softmax(batch, heads, q_len, block_sizes, query_tile, shared_mask, data):
    """Any split of the keys into blocks and of the queries into tiles gives the dense softmax and log-sum-exp."""
    q_heads, kv_heads = heads
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 10_000)))
    n = sum(block_sizes)
    query = torch.randn(batch, q_heads, q_len, 8, generator=g, dtype=torch.float64) * 2
    key = torch.randn(batch, kv_heads, n, 8, generator=g, dtype=torch.float64)
    value = torch.randn(batch, kv_heads, n, 8, generator=g, dtype=torch.float64)
    visible = torch.rand(batch, 1 if shared_mask else q_len, n, generator=g) < 0.7
    bounds = torch.tensor([0, *block_sizes]).cumsum(0).tolist()
    blocks = [(key[:, :, a:b], value[:, :, a:b], visible[:, :, a:b]) for a, b in zip(bounds, bounds[1:])]
    out, lse = blockwise.attention_blocks(query, blocks, scaling=0.4, query_tile=query_tile)
    lse_only = blockwise.logsumexp_blocks(query, [(k, m) for k, _, m in blocks], scaling=0.4, query_tile=query_tile)
    group = q_heads // kv_heads
    scores = (query @ key.repeat_interleave(group, 1).transpose(-1, -2) * 0.4).masked_fill(~visible[:, None],
                                                                                           float("-inf"))
    want = torch.softmax(scores, -1).nan_to_num(0.0) @ value.repeat_interleave(group, 1)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(lse, scores.logsumexp(-1), atol=1e-12, rtol=1e-12)
    assert torch.equal(lse, lse_only)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([(1, 1), (4, 2), (6, 3)]), st.integers(1, 9),
       st.lists(st.tuples(st.integers(1, 9), st.booleans()), min_size=1, max_size=5), st.integers(1, 6), st.data())
def test_coded_value_blocks_equal_attention_over_mapped_values(heads, q_len, blocks_spec, query_tile, data):
    """Blocks whose values are coded (rows x, scales s; value f(s x) = (s x) @ A * c + b per KV head) mixed with exact
    blocks in any order give the dense softmax over the mapped values, with f applied once to the weighted sum."""
    q_heads, kv_heads = heads
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 10_000)))
    n = sum(size for size, _ in blocks_spec)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    query, key, x, s = r(2, q_heads, q_len, 8) * 2, r(2, kv_heads, n, 8), r(2, kv_heads, n, 8), r(2, kv_heads, n).exp()
    a, mean, scale = r(8, 8), r(2, kv_heads, 8), r(2, kv_heads, 8).exp()
    visible = torch.rand(2, q_len, n, generator=g) < 0.7
    value = (s[..., None] * x) @ a * scale[:, :, None] + mean[:, :, None]  # every token mapped
    bounds = torch.tensor([0, *[size for size, _ in blocks_spec]]).cumsum(0).tolist()
    blocks = [(key[:, :, i:j], x[:, :, i:j], visible[:, :, i:j], s[:, :, i:j]) if coded else
              (key[:, :, i:j], value[:, :, i:j], visible[:, :, i:j])
              for (i, j), (_, coded) in zip(zip(bounds, bounds[1:]), blocks_spec)]
    group = q_heads // kv_heads

    def value_map(weighted, weight):
        grouped = weighted.view(2, kv_heads, group, q_len, 8)
        mapped = grouped @ a * scale[:, :, None, None] + mean[:, :, None, None] * weight.view(grouped.shape[:-1])[..., None]
        return mapped.view(weighted.shape)

    out, lse = blockwise.attention_blocks(query, blocks, scaling=0.4, query_tile=query_tile, value_map=value_map)
    scores = (query @ key.repeat_interleave(group, 1).transpose(-1, -2) * 0.4).masked_fill(~visible[:, None],
                                                                                           float("-inf"))
    want = torch.softmax(scores, -1).nan_to_num(0.0) @ value.repeat_interleave(group, 1)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, scores.logsumexp(-1), atol=1e-12, rtol=1e-12)


def test_coded_value_blocks_need_a_value_map():
    k = torch.randn(1, 1, 3, 8)
    with pytest.raises(ValueError, match="value_map"):
        blockwise.attention_blocks(torch.randn(1, 1, 1, 8), [(k, k, torch.ones(1, 1, 3, dtype=torch.bool),
                                                              torch.ones(1, 1, 3))], scaling=1.0, query_tile=1)


def test_fold_values_of_a_weighted_sum_is_the_weighted_sum_of_decoded_values():
    """fold_values(sum_t w_t s_t x_t, sum_t w_t) = sum_t w_t decode_values(code_t), from the same codes."""
    g = torch.Generator().manual_seed(3)
    t = KVTransform("e8", 4, 3, 1.0, D, "half")
    hadamard, mean, scale = hadamard_matrix(D), torch.randn(B, H, D, generator=g), torch.rand(B, H, D, generator=g) + 0.5
    codes, scale_codes = encode_values(torch.randn(B, H, 11, D, generator=g), hadamard, mean, scale, t)
    w = torch.rand(B, H, 4, 11, generator=g, dtype=torch.float64)  # 4 weightings of the 11 tokens
    x, s = value_rows(codes, scale_codes, D, t)
    got = fold_values(w @ (s[..., None] * x).double(), w.sum(-1), hadamard, mean, scale)
    want = w @ decode_values(codes, scale_codes, hadamard, mean, scale, t).double()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_tile_sizes_fit_the_budgets():
    with mock.patch.object(blockwise, "SCORE_TILE_BYTES", 64 * 2**20), \
            mock.patch.object(blockwise, "KEY_BLOCK_BYTES", 16 * 2**20):
        # Llama-3.1-8B: 32 query / 8 KV heads of 128, float32; a prefill chunk of 8,192 over 131,072 tokens.
        query_tile, key_block = blockwise.tile_sizes(1, 32, 8, 128, 8192, 131072, torch.float32)
        assert (query_tile, key_block) == (128, 4096)
        assert blockwise.tile_sizes(1, 32, 8, 128, 1, 131072, torch.float32) == (1, 4096)
        assert blockwise.tile_sizes(1, 32, 8, 128, 8192, 100, torch.float32) == (4096, 100)  # two even tiles
        assert blockwise.tile_sizes(1, 32, 8, 128, 8192, 131072, torch.float64) == (128, 2048)
        assert blockwise.tile_sizes(1, 2**30, 1, 1, 5, 7, torch.float32) == (1, 1)  # budget below one token
        assert blockwise.tile_sizes(1, 32, 8, 128, 0, 0, torch.float32) == (1, 1)  # nothing to attend
