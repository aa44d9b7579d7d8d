"""``generate`` on an optimized model: every argument transformers resolves is honoured exactly as by the model
without nqcompile (exact storage: the same tokens), with a ``NexusCache`` sized as transformers sizes a static cache;
what a compressed cache cannot honour is refused before the prefill, naming the argument."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import CompileConfig, GenerationConfig
from transformers.generation.streamers import BaseStreamer

import nqcompile
from tiny_models import tiny_model

EXACT = dict(key_bits=None, value_bits=None, eviction_ratio=0.0, relax_key_kl=0.0, warm_tokens=0)
PROMPT = 40


class Collect(BaseStreamer):
    """A streamer that keeps what ``generate`` puts: the prompt, then each new token."""

    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.chunks.append(None)


def _ids(batch=1, seed=0):
    return torch.randint(1, 256, (batch, PROMPT), generator=torch.Generator().manual_seed(seed))


def _embeds(model, ids):
    return model.get_input_embeddings()(ids).detach()


def _padded():
    ids = _ids(batch=2, seed=3)
    mask = torch.ones_like(ids)
    mask[0, :9] = 0
    return dict(input_ids=ids, attention_mask=mask, pad_token_id=0)


#: name -> (model -> (positional args, keyword args) for generate, new tokens transformers resolves).
CALLS = {
    "max_new_tokens": (lambda m: ((_ids(),), dict(max_new_tokens=10)), 10),
    "input_ids keyword": (lambda m: ((), dict(input_ids=_ids(), max_new_tokens=10)), 10),
    "max_length": (lambda m: ((_ids(),), dict(max_length=60)), 20),
    "no length (generation config default)": (lambda m: ((_ids(),), {}), 20),
    "max_length and max_new_tokens": (lambda m: ((_ids(),), dict(max_length=45, max_new_tokens=12)), 12),
    "min_new_tokens with eos": (lambda m: ((_ids(),), dict(max_new_tokens=15, min_new_tokens=12, eos_token_id=7)),
                                15),
    "generation_config": (lambda m: ((_ids(),), dict(generation_config=GenerationConfig(max_new_tokens=8))), 8),
    "inputs_embeds": (lambda m: ((), dict(inputs_embeds=_embeds(m, _ids()), max_new_tokens=10)), 10),
    "inputs_embeds and input_ids": (lambda m: ((), dict(input_ids=_ids(), inputs_embeds=_embeds(m, _ids()),
                                                        max_new_tokens=10)), 10),
    "cache_implementation dynamic": (lambda m: ((_ids(),), dict(max_new_tokens=10, cache_implementation="dynamic")),
                                     10),
    "cache_implementation static": (lambda m: ((_ids(),), dict(max_new_tokens=10, cache_implementation="static")),
                                    10),
    "static with compile_config": (lambda m: ((_ids(),), dict(max_new_tokens=10, cache_implementation="static",
                                                              compile_config=CompileConfig(fullgraph=True))), 10),
    "sampling, num_return_sequences": (lambda m: ((_ids(),), dict(max_new_tokens=10, do_sample=True, top_k=20,
                                                                  num_return_sequences=3)), 10),
    "streamer": (lambda m: ((_ids(),), dict(max_new_tokens=10, streamer=Collect())), 10),
    "left-padded batch": (lambda m: ((), dict(**_padded(), max_new_tokens=10)), 10),
    "prefill_chunk_size": (lambda m: ((_ids(),), dict(max_new_tokens=10, prefill_chunk_size=16)), 10),
    "use_cache=False": (lambda m: ((_ids(),), dict(max_new_tokens=6, use_cache=False)), 6),
    "output_scores and output_logits": (lambda m: ((_ids(),), dict(max_new_tokens=6, output_scores=True,
                                                                   output_logits=True)), 6),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_generate_gives_the_unoptimized_model_s_tokens(name):
    plain, optimized = tiny_model("llama"), nqcompile.optimize(tiny_model("llama"), "balanced", **EXACT)
    make, new_tokens = CALLS[name]
    outs, streamers = [], []
    for model in (plain, optimized):
        args, kwargs = make(plain)
        torch.manual_seed(5)
        outs.append(model.generate(*args, **kwargs, return_dict_in_generate=True))
        streamers.append(kwargs.get("streamer"))
    want, got = outs
    assert torch.equal(got.sequences, want.sequences)
    if streamers[0] is not None:
        assert [c is None or c.tolist() for c in streamers[1].chunks] == \
            [c is None or c.tolist() for c in streamers[0].chunks]
    cache = got.past_key_values
    if kwargs.get("use_cache") is False:
        assert cache is None
        return
    # Sized as transformers sizes a static cache: max_length - 1 tokens (the last one is never fed).
    assert isinstance(cache, nqcompile.NexusCache) and cache.max_cache_len == PROMPT + new_tokens - 1
    if "output_logits" in kwargs:
        torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), atol=1e-5, rtol=0)


def test_generate_continues_a_nexus_cache_with_room_for_the_new_turn():
    plain, optimized = tiny_model("llama"), nqcompile.optimize(tiny_model("llama"), "balanced", **EXACT)
    ids = _ids()
    first = optimized.generate(ids, max_length=50, return_dict_in_generate=True)
    turn2 = torch.cat([first.sequences, _ids(seed=4)[:, :12]], 1)
    got = optimized.generate(turn2, max_new_tokens=9, past_key_values=first.past_key_values)
    assert torch.equal(got, plain.generate(turn2, max_new_tokens=9))
    assert first.past_key_values.max_cache_len == turn2.shape[1] + 9 - 1


def _assisted(model):
    return dict(assistant_model=tiny_model("llama"))


#: argument -> (generate keyword arguments, the message's pattern)
REFUSED = {
    "num_beams": (lambda m: dict(num_beams=2), r"beam_search \(num_beams=2"),
    "assistant_model": (_assisted, r"assisted_generation"),
    "prompt_lookup_num_tokens": (lambda m: dict(prompt_lookup_num_tokens=3), r"assisted_generation"),
    "penalty_alpha": (lambda m: dict(penalty_alpha=0.6, top_k=4), r"contrastive_search"),
    "cache_implementation": (lambda m: dict(cache_implementation="offloaded"), r"cache_implementation='offloaded'"),
    "cache_implementation quantized": (lambda m: dict(cache_implementation="quantized"),
                                       r"cache_implementation='quantized'"),
    "output_attentions": (lambda m: dict(output_attentions=True, return_dict_in_generate=True),
                          r"output_attentions=True"),
    "custom_generate": (lambda m: dict(custom_generate=lambda **kw: None), r"custom_generate"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_generate_refuses_before_the_prefill(name):
    model = nqcompile.optimize(tiny_model("llama"), "balanced", **EXACT)
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    make, match = REFUSED[name]
    with pytest.raises(ValueError, match=match):
        model.generate(_ids(), max_new_tokens=4, **make(model))
    assert not calls, "the prefill ran before the refusal"


def _mistral(window: int, *, seed: int = 0):
    """Issue 11's model: a 2-layer Mistral whose every layer slides over ``window`` tokens (layer_types unset)."""
    torch.manual_seed(seed)
    config = transformers.MistralConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                                        max_position_embeddings=1024, sliding_window=window)
    config._attn_implementation = "sdpa"
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def test_a_sliding_window_is_honoured_within_it_past_it_and_over_a_second_turn():
    """Issue 11, item 1: the window used to be ignored (logits off by 0.62 after a 200-token prefill). Each layer
    now holds its window (a SlidingLayer): with exact storage, generate gives the plain model's tokens within the
    window, past it, over a second turn of the same conversation, and with compress_layers='global_only'
    (transformers' windowed layers)."""
    plain = _mistral(64)
    optimized = nqcompile.optimize(_mistral(64), "balanced", **EXACT)
    short = torch.randint(1, 256, (1, 44), generator=torch.Generator().manual_seed(1))
    out = optimized.generate(short, max_new_tokens=20, return_dict_in_generate=True)  # 63 tokens held: the window
    assert torch.equal(out.sequences, plain.generate(short, max_new_tokens=20))
    assert isinstance(out.past_key_values, nqcompile.NexusCache)
    long = torch.randint(1, 256, (1, 200), generator=torch.Generator().manual_seed(2))
    assert torch.equal(optimized.generate(long, max_new_tokens=8), plain.generate(long, max_new_tokens=8))
    turn = torch.cat([out.sequences, long[:, :60]], 1)  # the second turn passes the window
    again = optimized.generate(turn, max_new_tokens=8, past_key_values=out.past_key_values)
    assert torch.equal(again, plain.generate(turn, max_new_tokens=8))
    windowed = nqcompile.optimize(_mistral(64), "balanced", compress_layers="global_only", **EXACT)
    assert torch.equal(windowed.generate(long, max_new_tokens=8), plain.generate(long, max_new_tokens=8))
