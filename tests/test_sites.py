"""find_sites on Dynamo graphs: one attention site per layer (SDPA or the eager matmul-softmax-matmul form, with
its GQA repeat_kv, mask and scale) and the cache updates that feed it (index_copy_, cat, slice assignment), and
nothing else (a cat inside RoPE, an index assignment into a mask)."""

from collections import Counter

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from transformers import DynamicCache, StaticCache

from nqcompile.compile.sites import find_sites
from nqcompile.models import cache_kwarg_name
from tiny_models import MODEL_KINDS, tiny_model


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _graphs(fn, *args, **kwargs) -> list[torch.fx.GraphModule]:
    """The graphs Dynamo captures from ``fn(*args, **kwargs)`` (fullgraph, run uncompiled)."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        torch.compile(fn, backend=capture, fullgraph=True)(*args, **kwargs)
    return graphs


def _decode_step_sites(model, cache):
    """Sites of a one-token decode step after an eager 8-token prefill into ``cache``."""
    ids = torch.randint(1, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    kw = {cache_kwarg_name(model): cache}
    with torch.no_grad():
        model(ids[:, :8], **kw)
    (graph,) = _graphs(model, ids[:, 8:], **kw)
    return find_sites(graph)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_one_attention_site_per_layer_and_its_two_cache_updates(attention, cache):
    model = tiny_model("llama", attention=attention)  # GQA: 2 query heads share 1 KV head
    layers = model.config.num_hidden_layers
    made = StaticCache(config=model.config, max_cache_len=32) if cache == "static" else DynamicCache()
    sites = _decode_step_sites(model, made)
    kind = "sdpa" if attention == "sdpa" else "eager_attention"
    assert Counter(s.kind for s in sites) == {kind: layers, "cache_update": 2 * layers}
    update = "index_copy_" if cache == "static" else "cat"
    assert {s.target for s in sites if s.kind == "cache_update"} == {update}
    for site in (s for s in sites if s.kind == kind):
        assert site.scale == pytest.approx(64 ** -0.5)
        assert site.node in site.nodes and set(site.repeat_kv) <= set(site.nodes)
        # index with None, expand, reshape for keys and values; transformers' SDPA path may let SDPA repeat the
        # heads itself (enable_gqa: 5.24 does when there is no mask to pass)
        assert len(site.repeat_kv) == 6 or (attention == "sdpa" and cache == "dynamic" and not site.repeat_kv)
        assert site.mask is not None or (attention == "sdpa" and cache == "dynamic")
    if attention == "eager":  # the repeat, then transpose, matmul, scale, mask add, softmax, cast, dropout, matmul
        site = next(s for s in sites if s.kind == kind)
        assert site.target == "matmul" and len(site.nodes) == 6 + 8


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_eager_attention_of_every_model_kind(kind):
    model = tiny_model(kind, attention="eager")
    sites = _decode_step_sites(model, DynamicCache(config=model.config))
    layers = model.config.num_hidden_layers
    assert Counter(s.kind for s in sites) == {"eager_attention": layers, "cache_update": 2 * layers}
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    scale = (getattr(config, "query_pre_attn_scalar", None) or head_dim) ** -0.5  # Gemma scales by its own
    assert all(s.scale == pytest.approx(scale) for s in sites if s.kind == "eager_attention")


class _SliceAssignedCache(torch.nn.Module):
    """One attention layer over a preallocated cache written by slice assignment, with a RoPE-like cat on the
    query and a mask built by index assignment (neither is a cache update)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("keys", torch.zeros(1, 2, 16, 8))
        self.register_buffer("values", torch.zeros(1, 2, 16, 8))

    def forward(self, query, key, value, pos: int):
        self.keys[:, :, pos:pos + 1] = key
        self.values[:, :, pos:pos + 1] = value
        query = torch.cat([-query[..., 4:], query[..., :4]], -1)
        mask = torch.zeros(1, 1, 1, pos + 1, dtype=torch.bool)
        mask[..., :pos + 1] = True
        return F.scaled_dot_product_attention(query, self.keys[:, :, :pos + 1], self.values[:, :, :pos + 1],
                                              attn_mask=mask)


def test_slice_assignment_into_a_cache_is_a_cache_update():
    q, k, v = (torch.randn(1, 2, 1, 8) for _ in range(3))
    (graph,) = _graphs(_SliceAssignedCache(), q, k, v, 3)
    sites = find_sites(graph)
    assert [(s.kind, s.target) for s in sites] == [("cache_update", "setitem"), ("cache_update", "setitem"),
                                                   ("sdpa", "scaled_dot_product_attention")]
    assert sites[2].mask is not None and sites[2].scale is None and sites[2].repeat_kv == ()

