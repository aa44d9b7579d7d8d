"""Eviction policy: top-k selection, budgets, scorers against brute-force references."""

from unittest import mock

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

from nqcompile.eval.allocations import peak_allocated_bytes
from nqcompile.ops import blockwise
from nqcompile.policy import KeyDiffScorer, KeyNormScorer, ObservationScorer, layer_eviction_ratios, select_kept
from nqcompile.policy.key_bits import attention_kl
from nqcompile.policy.reconstruction import (allocate_across_layers, mass_budget, max_attention_probability,
                                             reconstruction_scores)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 40), st.data())
def test_select_kept_equals_brute_force(batch, heads, length, data):
    seed = data.draw(st.integers(0, 10_000))
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, heads, length, generator=g)
    candidate = torch.rand(batch, length, generator=g) < 0.7
    budget = torch.randint(0, length + 1, (batch,), generator=g)
    index, count = select_kept(scores, candidate, budget)
    for b in range(batch):
        cand = candidate[b].nonzero().flatten().tolist()
        assert count[b] == min(int(budget[b]), len(cand))
        for h in range(heads):
            best = sorted(sorted(cand, key=lambda i: -float(scores[b, h, i]))[: int(count[b])])
            assert index[b, h, : int(count[b])].tolist() == best


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 3), st.integers(2, 60), st.sampled_from([3, 5, 7]), st.data())
def test_pooled_selection_keeps_only_candidates(batch, length, kernel, data):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 10_000)))
    scores = torch.randn(batch, 2, length, generator=g)
    candidate = torch.rand(batch, length, generator=g) < 0.5
    budget = torch.full((batch,), length)
    index, count = select_kept(scores, candidate, budget, pooling_kernel=kernel)
    for b in range(batch):
        assert count[b] == int(candidate[b].sum())
        for h in range(2):
            chosen = index[b, h, : int(count[b])]
            assert candidate[b, chosen].all() and len(set(chosen.tolist())) == int(count[b])


def test_pyramid_budget_keeps_mean_ratio():
    ratios = layer_eviction_ratios(0.5, 30, "pyramid")
    assert abs(sum(ratios) / 30 - 0.5) < 1e-9
    assert ratios[0] < ratios[-1] and all(0 <= r < 1 for r in ratios)
    assert layer_eviction_ratios(0.5, 4, "uniform") == [0.5] * 4


def test_observation_scorer_matches_explicit_softmax():
    g = torch.Generator().manual_seed(0)
    b, hq, hkv, lq, lk, d = 2, 4, 2, 10, 14, 8
    q, k = torch.randn(b, hq, lq, d, generator=g), torch.randn(b, hkv, lk, d, generator=g)
    key_time = torch.arange(lk)[None].expand(b, lk)
    query_time = torch.arange(4, 14)[None].repeat(b, 1)
    query_time[1, :3] = -1  # padding queries of sequence 1
    valid = torch.ones(b, lk, dtype=torch.bool)
    valid[1, :2] = False
    got = ObservationScorer(observation_window=3).score(query=q, key=k, query_time=query_time, key_time=key_time,
                                                        key_valid=valid, scaling=0.3)
    for bi in range(b):
        for h in range(hkv):
            acc = torch.zeros(lk)
            for g_ in range(2):
                for qi in range(lq - 3, lq):  # the three latest queries are real in both sequences
                    vis = valid[bi] & (key_time[bi] <= query_time[bi, qi])
                    logits = (k[bi, h] @ q[bi, h * 2 + g_, qi]) * 0.3
                    acc += torch.softmax(logits.masked_fill(~vis, float("-inf")), -1)
            torch.testing.assert_close(got[bi, h], acc / 6)
    norms = KeyNormScorer().score(query=q, key=k, query_time=query_time, key_time=key_time, key_valid=valid,
                                  scaling=1.0)
    torch.testing.assert_close(norms, -k.norm(dim=-1))


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), heads=st.integers(1, 3), length=st.integers(2, 40), seed=st.integers(0, 2**16))
def test_key_diff_scorer_matches_cosine_to_mean_of_valid_keys(batch, heads, length, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, heads, length, 8, generator=g, dtype=torch.float64) + 0.5
    valid = torch.rand(batch, length, generator=g) < 0.7
    valid[:, 0] = True
    got = KeyDiffScorer().score(query=None, key=k, query_time=None, key_time=None, key_valid=valid, scaling=1.0)
    for b in range(batch):
        for h in range(heads):
            mean = k[b, h][valid[b]].mean(0)
            for t in range(length):
                want = -(k[b, h, t] @ mean) / (k[b, h, t].norm() * mean.norm())
                torch.testing.assert_close(got[b, h, t], want)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.sampled_from([(2, 1), (4, 2), (3, 3)]), st.integers(1, 12), st.integers(1, 6), st.data())
def test_attention_kl_equals_brute_force(batch, heads, q_len, window, data):
    """Per sequence, the mean KL over its last `window` real queries and every query head (padding, causality)."""
    n_q, n_kv = heads
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 10_000)))
    past = data.draw(st.integers(0, 4))
    k_len = past + q_len
    query = torch.randn(batch, n_q, q_len, 8, generator=g, dtype=torch.float64)
    key = torch.randn(batch, n_kv, k_len, 8, generator=g, dtype=torch.float64)
    key_hat = key + 0.3 * torch.randn(key.shape, generator=g, dtype=torch.float64)
    pad = torch.randint(0, q_len, (batch,), generator=g)  # left padding of each sequence's queries and keys
    query_time = torch.where(torch.arange(q_len)[None] >= pad[:, None], past + torch.arange(q_len)[None], -1)
    key_time = torch.arange(k_len)[None].expand(batch, -1)
    key_valid = (torch.arange(k_len)[None] < past) | (torch.arange(k_len)[None] >= past + pad[:, None])
    got = attention_kl(query, key, key_hat, query_time=query_time, key_time=key_time, key_valid=key_valid,
                       window=window, scaling=0.5)
    assert got.shape == (batch,)
    for b in range(batch):
        terms = []
        real = [i for i in range(q_len) if query_time[b, i] >= 0][-window:]
        for i in real:
            visible = key_valid[b] & (key_time[b] <= query_time[b, i])
            for h in range(n_q):
                kv = h // (n_q // n_kv)
                p = torch.softmax(0.5 * key[b, kv, visible] @ query[b, h, i], 0)
                p_hat = torch.softmax(0.5 * key_hat[b, kv, visible] @ query[b, h, i], 0)
                terms.append(float((p * (p / p_hat).log()).sum()))
        assert abs(float(got[b]) - sum(terms) / len(terms)) < 1e-9


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 2), st.sampled_from([(2, 1), (4, 2), (3, 3)]), st.integers(1, 300), st.integers(1, 12),
       st.data())
def test_reconstruction_scores_equal_a_loop_over_queries_and_heads(batch, heads, n_keys, n_queries, data):
    n_q, n_kv = heads
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 10_000)))
    query = torch.randn(batch, n_q, n_queries, 8, generator=g, dtype=torch.float64)
    key = torch.randn(batch, n_kv, n_keys, 8, generator=g, dtype=torch.float64)
    visible = torch.rand(batch, n_queries, n_keys, generator=g) < 0.8
    lo = data.draw(st.integers(0, n_keys - 1))
    target = slice(lo, data.draw(st.integers(lo + 1, n_keys)))
    got = reconstruction_scores(query, key, visible, scaling=0.3, target=target)
    group = n_q // n_kv
    want = torch.zeros(batch, n_kv, target.stop - target.start, dtype=torch.float64)
    for b in range(batch):
        for h in range(n_q):
            for t in range(n_queries):
                seen = visible[b, t].nonzero().flatten()
                if len(seen) == 0:
                    continue
                p = torch.zeros(n_keys, dtype=torch.float64)
                p[seen] = torch.softmax(key[b, h // group, seen] @ query[b, h, t] * 0.3, 0)
                want[b, h // group] = torch.maximum(want[b, h // group], p[target])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 2), st.integers(1, 3), st.lists(st.integers(0, 12), min_size=1, max_size=4), st.data())
def test_allocate_across_layers_takes_the_best_slots_of_each_layers_best_head(batch, heads, lengths, data):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 10_000)))
    scores = []
    for n in lengths:
        s = torch.rand(batch, heads, n, generator=g)
        scores.append(s.masked_fill(torch.rand(batch, 1, n, generator=g) < 0.3, float("-inf")))
    total = torch.tensor([data.draw(st.integers(0, sum(lengths) + 2)) for _ in range(batch)])
    counts = allocate_across_layers(scores, total)
    for b in range(batch):
        # Brute force: slot j of layer l is worth the j-th best score of its best head.
        slots = []
        for layer, s in enumerate(scores):
            ranked = [sorted(s[b, h].tolist(), reverse=True) for h in range(heads)]
            slots += [(max(r[j] for r in ranked), layer) for j in range(s.shape[2])]
        slots = [x for x in slots if x[0] > float("-inf")]
        taken = sorted(slots, key=lambda x: -x[0])[: int(total[b])]
        want = [sum(1 for _, layer in taken if layer == i) for i in range(len(scores))]
        assert [int(c[b]) for c in counts] == want
        # Every head keeps at least its own tokens above the last slot taken (KVzip's threshold).
        if taken:
            cut = taken[-1][0]
            for layer, s in enumerate(scores):
                assert all(int((s[b, h] > cut).sum()) <= int(counts[layer][b]) for h in range(heads))


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 2), st.integers(1, 3), st.lists(st.integers(0, 12), min_size=1, max_size=4),
       st.sampled_from([0.0, 0.3, 0.5, 0.9, 0.99, 1.0]), st.data())
def test_keep_mass_keeps_the_fewest_best_slots_carrying_the_mass_and_at_least_the_floor(batch, heads, lengths, mass,
                                                                                         data):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 10_000)))
    scores = []
    for n in lengths:  # probabilities, some sharp, some zero (a key no query saw), some not candidates
        s = torch.rand(batch, heads, n, generator=g) ** data.draw(st.sampled_from([1, 4, 16]))
        s = s.masked_fill(torch.rand(batch, heads, n, generator=g) < 0.1, 0.0)
        scores.append(s.masked_fill(torch.rand(batch, 1, n, generator=g) < 0.3, float("-inf")))
    floor = torch.tensor([data.draw(st.integers(0, sum(lengths) + 2)) for _ in range(batch)])
    counts = allocate_across_layers(scores, floor, keep_mass=mass)
    for b in range(batch):
        # Brute force: the slot values (j-th best score of a layer's best head), best first; the smallest prefix
        # whose sum reaches the share of all of them.
        slots = sorted((max(sorted(s[b, h].tolist(), reverse=True)[j] for h in range(heads))
                        for s in scores for j in range(s.shape[2])), reverse=True)
        slots = [x for x in slots if x > float("-inf")]
        need = next(k for k in range(len(slots) + 1) if sum(slots[:k]) >= mass * sum(slots))
        assert int(mass_budget(torch.tensor([slots + [float("-inf")]], dtype=torch.float64), mass)) == need
        kept = sum(int(c[b]) for c in counts)
        assert kept == min(max(int(floor[b]), need), len(slots))
        # The same slots as the fraction-only rule given that total.
        assert [int(c[b]) for c in counts] == [int(c[b]) for c in allocate_across_layers(
            scores, torch.full_like(floor, max(int(floor[b]), need)))]


def _dense_reconstruction_scores(query, key, visible, scaling, target):
    """The scores with every logit at once, in float64: ``[B, Hq, q, N]`` logits, log-sum-exp, max over the group."""
    n_q, n_kv = query.shape[1], key.shape[1]
    logits = query.double() @ key.double().repeat_interleave(n_q // n_kv, 1).transpose(-1, -2) * scaling
    logits = logits.masked_fill(~visible[:, None], float("-inf"))
    lse = logits.logsumexp(-1, keepdim=True)
    p = (logits[..., target] - lse.masked_fill(lse == float("-inf"), float("inf"))).exp()
    return p.unflatten(1, (n_kv, n_q // n_kv)).amax(dim=(2, 3))


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([torch.float32, torch.float64]), st.sampled_from([(2, 1), (6, 2), (3, 3)]),
       st.integers(1, 40), st.integers(1, 12), st.integers(1, 5), st.integers(1, 9), st.data())
def test_blockwise_reconstruction_scores_equal_the_dense_scores(dtype, heads, n_keys, n_queries, query_tile,
                                                                key_block, data):
    """Tiles of a few queries and keys (remainders included) give the scores of one dense softmax."""
    n_q, n_kv = heads
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 10_000)))
    query = (torch.randn(2, n_q, n_queries, 8, generator=g, dtype=torch.float64) * 2).to(dtype)
    key = torch.randn(2, n_kv, n_keys, 8, generator=g, dtype=torch.float64).to(dtype)
    visible = torch.rand(2, n_queries, n_keys, generator=g) < 0.7
    lo = data.draw(st.integers(0, n_keys - 1))
    target = slice(lo, data.draw(st.integers(lo + 1, n_keys)))
    item = dtype.itemsize
    with mock.patch.object(blockwise, "SCORE_TILE_BYTES", 2 * n_q * query_tile * key_block * item), \
            mock.patch.object(blockwise, "KEY_BLOCK_BYTES", 2 * n_kv * key_block * 8 * item):
        assert blockwise.tile_sizes(2, n_q, n_kv, 8, n_queries, n_keys, dtype)[1] == min(key_block, n_keys)
        got = reconstruction_scores(query, key, visible, scaling=0.3, target=target)
    tol = dict(atol=1e-12, rtol=0) if dtype == torch.float64 else dict(atol=2e-6, rtol=0)
    torch.testing.assert_close(got.double(), _dense_reconstruction_scores(query, key, visible, 0.3, target), **tol,
                               msg=lambda m: f"dtype={dtype} heads={heads} tiles={query_tile}x{key_block} "
                                             f"target={target}\n{m}")


def test_reconstruction_scores_transient_memory_does_not_grow_with_the_keys():
    """Peak allocations over 4,096 keys equal those over 512 (the dense logits alone grow 8x)."""
    g = torch.Generator().manual_seed(0)
    query = torch.randn(1, 4, 64, 16, generator=g)
    peaks = {}
    with mock.patch.object(blockwise, "SCORE_TILE_BYTES", 4 * 8 * 64 * 4), \
            mock.patch.object(blockwise, "KEY_BLOCK_BYTES", 2 * 64 * 16 * 4):
        for n in (512, 4096):
            key = torch.randn(1, 2, n, 16, generator=g)
            visible = torch.rand(1, 64, n, generator=g) < 0.9
            peaks[n] = peak_allocated_bytes(
                lambda: reconstruction_scores(query, key, visible, scaling=0.25, target=slice(n - 64, n)))
    dense_logits = 4 * 64 * 4096 * 4
    assert peaks[4096] <= peaks[512] * 1.05, peaks
    assert peaks[4096] < dense_logits / 8, (peaks, dense_logits)


def test_reconstruction_scores_never_read_a_value_on_the_host():
    """CUDA-graph capturable: both scorers run on fake tensors, where every data-dependent step raises."""
    with FakeTensorMode() as mode, mock.patch.object(blockwise, "SCORE_TILE_BYTES", 4 * 3 * 5 * 4):
        query, key = mode.from_tensor(torch.randn(1, 4, 7, 8)), mode.from_tensor(torch.randn(1, 2, 11, 8))
        visible = mode.from_tensor(torch.ones(1, 7, 11, dtype=torch.bool))
        scores = reconstruction_scores(query, key, visible, scaling=0.3, target=slice(2, 9))
        lse = mode.from_tensor(torch.zeros(1, 4, 7))
        probabilities = max_attention_probability(query, key, visible, lse, scaling=0.3)
    assert scores.shape == (1, 2, 7) and probabilities.shape == (1, 2, 11)
