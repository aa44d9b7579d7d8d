"""NexusCache with compression disabled must reproduce DynamicCache exactly."""

import pytest
import torch
from transformers import DynamicCache

import nqcompile
from tiny_models import MODEL_KINDS, prefill_and_decode, tiny_model

EXACT = dict(key_bits=None, value_bits=None, relax_key_kl=0.0, eviction_ratio=0.0, sink_tokens=4, recent_window=16)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_exact_storage_matches_dynamic_cache(kind):
    model = tiny_model(kind)
    ids = torch.randint(1, 256, (1, 45), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = prefill_and_decode(model, ids, DynamicCache(), 20)
        nqcompile.optimize(model, **EXACT)
        cache = nqcompile.NexusCache(model.config, "balanced", max_cache_len=45 + 21, **EXACT)
        got = prefill_and_decode(model, ids, cache, 20)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0, msg=f"{kind}: exact NexusCache differs from DynamicCache")
    assert cache.get_seq_length() == 45 + 20
