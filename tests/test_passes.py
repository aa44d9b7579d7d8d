"""The nexusquant backend's FX passes: the fused op equals the ops it replaces, every compressed layer's decode step
becomes one nqcompile::cache_attention node, and what the passes leave alone is reported with the reason."""

import pytest
import torch
import torch._dynamo
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

import nqcompile
from nqcompile import ops
from nqcompile.codec.hadamard import hadamard_matrix
from nqcompile.compile import report as nexus_report
from nqcompile.compile.passes import build_passes
from nqcompile.compile.passes.fuse_flush_attention import CUDAGRAPH_REASON
from nqcompile.ops.fused import cache_attention
from tiny_models import greedy_tokens, tiny_model

SMALL = dict(recent_window=16, warm_tokens=32, min_evict_tokens=32, relax_key_kl=0, keep_line_breaks=False)
STEPS = 24


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _codec(head_dim: int, batch: int, heads: int, key_bits: int, value_bits: int):
    g = torch.Generator().manual_seed(1)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    mean = torch.randn(2, batch, heads, head_dim, generator=g) * 0.1
    scale = torch.rand(2, batch, heads, head_dim, generator=g) + 0.5
    return (hadamard_matrix(head_dim), inv_freq, mean, scale, "e8", key_bits, value_bits, 1.0, head_dim, "half")


def _codes(n: int, batch: int, heads: int, head_dim: int, bits: tuple[int, int], codec, seed: int):
    """Empty code buffers of ``n`` slots with the first ``n // 2`` of each sequence written from random tokens."""
    g = torch.Generator().manual_seed(seed)
    kb, vb = bits
    bufs = [torch.zeros(batch, heads, n, kb * head_dim // 8, dtype=torch.uint8), torch.zeros(batch, heads, n, dtype=torch.uint8),
            torch.zeros(batch, heads, n, vb * head_dim // 8, dtype=torch.uint8), torch.zeros(batch, heads, n, dtype=torch.uint8)]
    k, v = torch.randn(2, batch, heads, n // 2, head_dim, generator=g)
    pos = torch.arange(n // 2)[None, None].expand(batch, heads, -1)
    zero = torch.zeros(batch, dtype=torch.int64)
    ops.write_kv(*bufs, k, v, pos, zero, torch.full((batch,), n // 2), *codec[:4], codec[4], kb, vb, *codec[7:])
    return bufs, torch.arange(n)[None, None].expand(batch, heads, -1)


@settings(max_examples=12, deadline=None)
@given(batch=st.integers(1, 2), heads=st.sampled_from([1, 2]), group=st.sampled_from([1, 2]), q=st.integers(1, 3),
       write=st.booleans(), warm=st.booleans(), seed=st.integers(0, 2**16))
def test_cache_attention_equals_write_then_dequant_then_attention(batch, heads, group, q, write, warm, seed):
    """The fused op against the three reference ops it replaces, in the eager order: identical output and codes."""
    d, cap, wcap = 64, 64, 32
    codec = _codec(d, batch, heads, 4, 2)
    g = torch.Generator().manual_seed(seed)
    (kc, ks, vc, vs), code_pos = _codes(cap, batch, heads, d, (4, 2), codec, seed)
    query = torch.randn(batch, heads * group, q, d, generator=g)
    sinks, stream = 4, 8
    exact_k, exact_v = torch.randn(2, batch, heads, sinks + stream, d, generator=g)
    exact_mask = torch.rand(batch, q, sinks + stream, generator=g) < 0.8
    code_len = torch.randint(cap // 4, cap // 2, (batch,), generator=g)
    if write:  # 16 more tokens coded at each sequence's end, visible to the attention
        new_k, new_v = torch.randn(2, batch, heads, 16, d, generator=g)
        new_pos = (code_len[:, None, None] + torch.arange(16)).expand(batch, heads, 16)
        new = [new_k, new_v, new_pos, code_len.clone(), torch.randint(1, 17, (batch,), generator=g)]
        seen = code_len + new[4]
    else:
        new, seen = [None] * 5, code_len
    seen = seen[:, None].expand(-1, q)  # per query, as a decode step passes it (tiers.decode_steps)
    if warm:
        warm_codes, warm_pos = _codes(wcap, batch, heads, d, (4, 4), _codec(d, batch, heads, 4, 4), seed + 1)
        warm_mask = torch.rand(batch, q, wcap, generator=g) < 0.5
        warm_args = [*warm_codes, warm_pos, warm_mask, sinks, 4]
    else:
        warm_args = [None] * 6 + [0, 0]
    fused_bufs = [t.clone() for t in (kc, ks, vc, vs)]
    got = cache_attention(query, *fused_bufs, code_pos, seen, *warm_args, exact_k, exact_v, exact_mask, *new, *codec,
                          d**-0.5)

    if write:
        ops.write_kv(kc, ks, vc, vs, *new, *codec)
    ek, ev, em = exact_k, exact_v, exact_mask
    if warm:
        wk, wv = ops.dequant_kv(*warm_codes, warm_pos, *codec[:4], "e8", 4, 4, *codec[7:])
        ek = torch.cat([exact_k[:, :, :sinks], wk, exact_k[:, :, sinks:]], 2)
        ev = torch.cat([exact_v[:, :, :sinks], wv, exact_v[:, :, sinks:]], 2)
        em = torch.cat([exact_mask[:, :, :sinks], warm_mask, exact_mask[:, :, sinks:]], 2)
    want = ops.dequant_attention(query, kc, ks, vc, vs, code_pos, seen, ek, ev, em, *codec, d**-0.5)
    assert torch.equal(got, want)
    for fused_buf, buf in zip(fused_bufs, (kc, ks, vc, vs)):
        assert torch.equal(fused_buf, buf)


@pytest.mark.parametrize("kind, preset", [("llama", "balanced"), ("qwen2", "quant_only"), ("phi3", "asym")])
def test_every_compressed_layer_decodes_through_one_fused_node(kind, preset):
    model = nqcompile.optimize(tiny_model(kind), preset, **SMALL)
    ids = torch.randint(1, 256, (1, 90), generator=torch.Generator().manual_seed(2))
    eager = greedy_tokens(model, ids, model.forward, STEPS)
    compiled = greedy_tokens(model, ids, torch.compile(model.forward, backend="nexusquant", fullgraph=True), STEPS)
    assert compiled == eager
    (report,) = nexus_report.last_reports()
    layers = model.config.num_hidden_layers
    assert report.pass_counts == {"fuse_warm_attention": layers, "fuse_flush_attention": layers}
    assert dict(counters["nqcompile"]) == report.pass_counts
    # One fused node per layer and nothing of the three ops it replaced, but the warm tier's own writes.
    assert report.code_after.count("nqcompile.cache_attention.default(") == layers
    assert "nqcompile.dequant_attention.default(" not in report.code_after
    assert report.code_after.count("nqcompile.write_kv.default(") == layers
    assert report.code_before.count("nqcompile.write_kv.default(") == 2 * layers
    attention_sites = [s.node for s in report.sites if s.kind == "dequant_attention"]
    assert sorted(r.site for r in report.rewrites if r.pass_name == "fuse_flush_attention") == sorted(attention_sites)
    # The flush decodes only its own block from the warm tier now.
    assert all("decodes only the 16 tokens" in r.note for r in report.rewrites if r.pass_name == "fuse_warm_attention")
    left = {la.kind for la in report.left_alone}
    assert left == {"cache_write"} and len(report.left_alone) == layers  # the warm tier's writes, with a reason
    assert all("warm tier" in la.reason for la in report.left_alone)


def test_a_read_of_the_code_buffers_between_write_and_attention_stops_the_fusion():
    """A graph in a form the flush pass does not know (something reads the codes between the write and the
    attention) compiles unfused, gives the same result, and the report says why."""
    d, b, h, cap = 64, 1, 1, 32
    codec = _codec(d, b, h, 4, 2)
    (kc, ks, vc, vs), code_pos = _codes(cap, b, h, d, (4, 2), codec, 0)
    g = torch.Generator().manual_seed(3)
    query = torch.randn(b, h, 1, d, generator=g)
    new_k, new_v = torch.randn(2, b, h, 16, d, generator=g)
    exact_mask = torch.ones(b, 1, 16, dtype=torch.bool)
    pos = torch.arange(16)[None, None] + 16

    def step(kc, ks, vc, vs):
        dest, count = torch.full((b,), 16), torch.full((b,), 16)
        ops.write_kv(kc, ks, vc, vs, new_k, new_v, pos, dest, count, *codec)
        checksum = kc.float().sum()
        out = ops.dequant_attention(query, kc, ks, vc, vs, code_pos, dest + count, new_k, new_v, exact_mask, *codec,
                                    d**-0.5)
        return out, checksum

    bufs = [t.clone() for t in (kc, ks, vc, vs)]
    want = step(*bufs)
    got = torch.compile(step, backend="nexusquant", fullgraph=True)(kc, ks, vc, vs)
    torch.testing.assert_close(got, want)
    (report,) = nexus_report.last_reports()
    assert report.pass_counts == {"fuse_warm_attention": 0, "fuse_flush_attention": 0}
    (attention,) = [la for la in report.left_alone if la.kind == "dequant_attention"]
    assert "uses the code buffers between the write and the attention" in attention.reason


def test_for_cuda_graphs_the_flush_write_stays_apart_and_the_report_says_why():
    model = nqcompile.optimize(tiny_model("llama"), "balanced", **SMALL)
    (flush,) = [p for p in build_passes(cudagraphs=True) if p.name == "fuse_flush_attention"]
    ids = torch.randint(1, 256, (1, 90), generator=torch.Generator().manual_seed(4))
    gm = None

    def capture(graph_module, example_inputs):
        nonlocal gm
        gm = graph_module
        return graph_module.forward

    greedy_tokens(model, ids, torch.compile(model.forward, backend=capture, fullgraph=True), 1)
    flush(gm.graph)
    layers = model.config.num_hidden_layers
    why = CUDAGRAPH_REASON.format(why="the step does not run on CUDA")
    assert flush.rewrites == [] and list(flush.left_alone.values()) == [why] * layers


def test_pass_uuids_identify_each_pass():
    uuids = [p.uuid() for p in build_passes(cudagraphs=False)]
    assert len(set(uuids)) == len(uuids) and all(isinstance(u, str) and len(u) >= 32 for u in uuids)
    assert uuids == [p.uuid() for p in build_passes(cudagraphs=True)]
