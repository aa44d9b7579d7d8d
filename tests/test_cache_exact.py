"""NexusCache with compression disabled must reproduce DynamicCache exactly."""

import pytest
import torch
from transformers import DynamicCache

import nqcompile
from tiny_models import MODEL_KINDS, tiny_model

EXACT = dict(key_bits=None, value_bits=None, eviction_ratio=0.0, sink_tokens=4, recent_window=16)


def _run(model, ids, cache, steps):
    """Prefill ``ids`` then ``steps`` greedy decode steps; returns the stacked last-token logits."""
    out = model(ids, past_key_values=cache, use_cache=True)
    logits = [out.logits[:, -1]]
    token = out.logits[:, -1:].argmax(-1)
    for _ in range(steps):
        out = model(token, past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1])
        token = out.logits[:, -1:].argmax(-1)
    return torch.stack(logits, 1)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_exact_storage_matches_dynamic_cache(kind):
    model = tiny_model(kind)
    ids = torch.randint(1, 256, (1, 45), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = _run(model, ids, DynamicCache(), 20)
        nqcompile.optimize(model, **EXACT)
        cache = nqcompile.NexusCache(model.config, "balanced", max_cache_len=45 + 21, **EXACT)
        got = _run(model, ids, cache, 20)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0, msg=f"{kind}: exact NexusCache differs from DynamicCache")
    assert cache.get_seq_length() == 45 + 20
