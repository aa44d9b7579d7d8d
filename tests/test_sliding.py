"""Sliding-window layers of hybrid models held as codes (``nqcompile.cache.sliding``): exact storage gives the logits
of a ``DynamicCache`` and holds exactly the tokens the model's sliding mask shows the next query; every preset runs
on a hybrid model by default; the bf16 reference of ``memory_report()`` is what transformers' own cache holds."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import DynamicCache

import nqcompile
from nqcompile import ops
from nqcompile.cache import NexusLayer, SlidingLayer
from nqcompile.cache.sliding import ring_capacity
from nqcompile.codec.registry import CODECS
from nqcompile.models import cache_kwarg_name
from tiny_models import byte_level_tokenizer

EXACT = dict(key_bits=None, value_bits=None, eviction_ratio=0.0, relax_key_kl=0.0, warm_tokens=0)
WINDOW = 24
PREFILL, STEPS = 70, 40


def _gemma(dtype=torch.float32, window: int = WINDOW):
    """Gemma-3-270M in miniature: one KV head, 5 of 6 layers sliding-window, RoPE theta 1e4 (sliding) and 1e6
    (global), QK-norm; random weights, sharpened so that a wrong mask shows in the logits."""
    config = transformers.Gemma3TextConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=6, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, query_pre_attn_scalar=64, max_position_embeddings=1024,
        sliding_window=window, layer_types=["sliding_attention"] * 5 + ["full_attention"], pad_token_id=0)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    return model.eval()


def _ids(n: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(1, 256, (batch, n), generator=torch.Generator().manual_seed(1))


def _held(layer: SlidingLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys a sliding layer's next query sees (exact storage), in time order, ``[H, n, D]``, and their positions:
    ring slots and window tokens within the window of the position after the newest."""
    st = layer.storage
    ring_pos, win_pos = st.code_pos[0, 0].long(), st.win_pos[0, :int(st.win_len[0])]
    next_pos = int(win_pos.max()) + 1
    in_ring = (ring_pos >= 0) & (next_pos - ring_pos < layer.window)
    pos = torch.cat([ring_pos[in_ring], win_pos])
    keys = torch.cat([st.k_codes[0][:, in_ring], st.win_k[0, :, :int(st.win_len[0])]], 1)
    order = pos.argsort()
    return keys[:, order], pos[order]


def test_exact_sliding_layers_match_a_dynamic_cache_and_hold_what_the_mask_shows():
    """A prefill longer than the window and 40 decode steps (16-token exact window, so blocks flush into the ring and
    the ring wraps): the logits of a DynamicCache, and after every step each sliding layer's visible tokens are the
    keys transformers' sliding layer holds (its last window - 1), position for position."""
    model = _gemma()
    ids = _ids(PREFILL)
    ref_cache = DynamicCache(config=model.config)
    nqcompile.optimize(model, "balanced", **EXACT, recent_window=16)
    cache = nqcompile.NexusCache(model.config, "balanced", max_cache_len=PREFILL + STEPS + 1, **EXACT,
                                 recent_window=16)
    sliding = [i for i, layer in enumerate(cache.layers) if isinstance(layer, SlidingLayer)]
    assert sliding == [0, 1, 2, 3, 4]
    kw = cache_kwarg_name(model)
    token, positions = ids, torch.arange(PREFILL)[None]
    with torch.no_grad():
        for step in range(STEPS + 1):
            ref = model(token, position_ids=positions, **{kw: ref_cache}).logits[:, -1]
            got = model(token, position_ids=positions, **{kw: cache}).logits[:, -1]
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=0, msg=f"step {step}")
            seen = PREFILL + step
            for i in sliding:
                keys, pos = _held(cache.layers[i])
                assert pos.tolist() == list(range(seen - WINDOW + 1, seen)), f"layer {i}, step {step}"
                torch.testing.assert_close(keys, ref_cache.layers[i].keys[0], atol=1e-5, rtol=0)
            token, positions = ref.argmax(-1, keepdim=True), positions[:, -1:] + 1
    assert cache.get_seq_length() == PREFILL + STEPS


def test_a_replayed_continuation_equals_its_decode_steps_through_the_ring():
    """``replay_as_decode`` over a quantized ring (the blocks a call flushes are attended from their codes, then
    written): the logits and the ring's bytes of 40 single decode steps."""
    # The window in the model's float32: in bf16, the float rounding between the two runs' keys would flip the
    # window's last bits (test_window_dtype.py covers the bf16 window).
    opts = dict(recent_window=16, window_dtype="model")
    model = nqcompile.optimize(_gemma(), "asym", **opts)
    ids = _ids(PREFILL + STEPS)
    kw = cache_kwarg_name(model)
    caches = [nqcompile.NexusCache(model.config, "asym", max_cache_len=PREFILL + STEPS, **opts) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            model(ids[:, :PREFILL], **{kw: cache})
        steps = torch.cat([model(ids[:, t:t + 1], **{kw: caches[0]}).logits for t in range(PREFILL, PREFILL + STEPS)],
                          1)
        with caches[1].replay_as_decode():
            replayed = model(ids[:, PREFILL:], **{kw: caches[1]}).logits
    torch.testing.assert_close(replayed, steps, atol=1e-4, rtol=0)
    for one, other in zip(caches[0].layers[:5], caches[1].layers[:5]):
        for name in ("code_pos", "ring_head", "code_len", "win_len", "win_pos"):  # the same tokens in the same slots
            assert torch.equal(getattr(one.storage, name), getattr(other.storage, name)), name
        # ... coded alike (the model's keys differ by float rounding between the two runs, so a few codes may too)
        for name in ("k_codes", "v_codes", "k_scales", "v_scales"):
            same = (getattr(one.storage, name) == getattr(other.storage, name)).float().mean()
            assert same > 0.99, (name, float(same))
        held = int(one.storage.win_len[0])  # the window's slots past its tokens hold no token
        torch.testing.assert_close(one.storage.win_k[:, :, :held], other.storage.win_k[:, :, :held], atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", list(nqcompile.PRESETS))
def test_every_preset_runs_a_hybrid_model_by_default(preset):
    """No option needed: generate through every preset; each sliding layer holds (ring slots filled plus window) the
    tokens its window shows, quantized when the preset quantizes, never evicted."""
    model = nqcompile.optimize(_gemma(), preset, tokenizer=byte_level_tokenizer())
    out = model.generate(_ids(300), max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values
    assert out.sequences.shape[1] == 308
    for layer in cache.layers[:5]:
        st = layer.storage
        assert isinstance(layer, SlidingLayer) and layer.key_bits in (2, 3, 4)
        window_pos = st.win_pos[0, :int(st.win_len[0])]
        held = torch.cat([st.code_pos[0, 0].long(), window_pos])
        visible = (held >= 0) & (int(window_pos.max()) + 1 - held < WINDOW)
        assert int(visible.sum()) == WINDOW - 1
    assert type(cache.layers[5]) is NexusLayer


def _ring_value_error(cache, ref_cache, layer: int) -> float:
    """Relative RMS error of a sliding layer's ring values (decoded) against the exact values a DynamicCache holds
    at the same positions."""
    st = cache.layers[layer].storage
    pos = st.code_pos[0, 0].long()
    held = pos >= 0
    _, values = ops.dequant_kv(st.k_codes, st.k_scales, st.v_codes, st.v_scales, st.code_pos.long(),
                               *st.codec.as_op_args())
    ref = ref_cache.layers[layer].values[0]  # [H, window - 1, D], the last window - 1 positions
    first = PREFILL - ref.shape[1]
    got, want = values[0][:, held].double(), ref[:, pos[held] - first].double()
    return float((got - want).norm() / want.norm())


def test_sliding_bits_set_the_sliding_layers_bits_only():
    """``sliding_bits=4``: the sliding layers hold keys and values at 4 bits (their ring's values within a 4-bit
    code's error of the exact ones, where the preset's 2-bit values are not), the full-attention layer at the
    preset's bits; a preset that leaves sliding layers to transformers refuses it."""
    model = _gemma()
    ids = _ids(PREFILL)
    ref_cache = DynamicCache(config=model.config)
    kw = cache_kwarg_name(model)
    opts = dict(recent_window=16, relax_key_kl=0.0)
    nqcompile.optimize(model, "quant_only", **opts)
    caches = {bits: nqcompile.NexusCache(model.config, "quant_only", sliding_bits=bits, **opts) for bits in (None, 4)}
    with torch.no_grad():
        model(ids, **{kw: ref_cache})
        for cache in caches.values():
            model(ids, **{kw: cache})
    for i in range(5):
        assert (caches[4].layers[i].key_bits, caches[4].layers[i].value_bits) == (4, 4)
        assert (caches[None].layers[i].key_bits, caches[None].layers[i].value_bits) == (4, 2)
        assert _ring_value_error(caches[4], ref_cache, i) < 0.15 < _ring_value_error(caches[None], ref_cache, i)
    assert (caches[4].layers[5].key_bits, caches[4].layers[5].value_bits) == (4, 2)
    # the same ring slots, each value 4 bits instead of 2 (one KV head of 64)
    ring_slots = sum(caches[4].layers[i].storage.capacity for i in range(5))
    assert ring_slots == sum(caches[None].layers[i].storage.capacity for i in range(5))
    added = caches[4].memory_report().allocated_bytes - caches[None].memory_report().allocated_bytes
    assert added == ring_slots * (CODECS["e8"].bytes_per_vector(4, 64) - CODECS["e8"].bytes_per_vector(2, 64))
    with pytest.raises(ValueError, match="compress_layers='all' or sliding_bits=None"):
        nqcompile.get_preset("quant_only", sliding_bits=4, compress_layers="global_only")


def test_ring_capacity_holds_the_window_and_shrinks_with_the_tokens_to_come():
    # Gemma 3: a 512-token window, a 32-token exact window that keeps >= 17 tokens once it flushes: 495 coded tokens
    assert ring_capacity(512, 32, 479, 32, None) == 496
    assert ring_capacity(512, 32, 479, 32, 10_000) == 496
    assert ring_capacity(512, 32, 100, 32, 0) == 112      # no token to come: the held codes, rounded to a block
    assert ring_capacity(512, 32, 100, 20, 40) == 112 + 32  # 20 + 40 tokens pass the 32-token window: 2 blocks
    assert ring_capacity(16, 32, 0, 15, None) == 16        # a window inside the exact one: one block for the flush


@pytest.mark.parametrize("compress_layers", ["all", "global_only"])
def test_the_bf16_reference_is_what_a_bf16_dynamic_cache_holds(compress_layers):
    """A bf16 model: ``memory_report().bf16_bytes`` equals the bytes of the tensors transformers' DynamicCache holds
    after the same prefill (longer than the window) and decode steps."""
    model = nqcompile.optimize(_gemma(torch.bfloat16), "quant_only", compress_layers=compress_layers)
    ids = _ids(PREFILL, batch=2)
    kw = cache_kwarg_name(model)
    ref = DynamicCache(config=model.config)
    cache = nqcompile.NexusCache(model.config, "quant_only", max_cache_len=PREFILL + 3,
                                 compress_layers=compress_layers)
    with torch.no_grad():
        for c in (ref, cache):
            model(ids, **{kw: c})
            for t in range(3):
                model(ids[:, t:t + 1], **{kw: c})
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in ref.layers)
    window_layer = (WINDOW - 1) * 2 * 1 * 64 * 2 * 2  # tokens x batch x KV heads x head_dim x bf16 x (keys, values)
    assert held == 5 * window_layer + (PREFILL + 3) * 2 * 64 * 2 * 2
    report = cache.memory_report()
    assert report.bf16_bytes == held
    by_type = {kind: sum(layer.keys.nbytes + layer.values.nbytes for layer in ref.layers if layer.is_sliding == sliding)
               for kind, sliding in (("sliding_attention", True), ("full_attention", False))}
    assert {k: v["bf16_bytes"] for k, v in report.by_layer_type.items()} == by_type
    assert {k: v["layers"] for k, v in report.by_layer_type.items()} == {"sliding_attention": 5, "full_attention": 1}
    assert sum(v["allocated_bytes"] for v in report.by_layer_type.values()) == report.allocated_bytes
    full = report.by_layer_type["full_attention"]
    assert report.layer_type_ratio("full_attention") == full["bf16_bytes"] / full["allocated_bytes"]
    with pytest.raises(KeyError, match="no 'chunked_attention' layers"):
        report.layer_type_ratio("chunked_attention")
    assert "sliding-window layers (5)" in str(report) and "full-attention layers (1)" in str(report)


def test_compress_kv_cache_of_a_hybrid_dynamic_cache_continues_as_it():
    """``compress_kv_cache`` takes a hybrid DynamicCache's sliding layers (their last window - 1 tokens) and full
    layers; with exact storage, decode steps from it give the DynamicCache's logits."""
    model = nqcompile.optimize(_gemma(), "asym", **EXACT, recent_window=16)
    ids = _ids(PREFILL + 10)
    kw = cache_kwarg_name(model)
    dyn = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :PREFILL], **{kw: dyn})
        cache = nqcompile.compress_kv_cache(dyn, "asym", config=model.config, max_cache_len=PREFILL + 10, **EXACT,
                                            recent_window=16)
        assert [layer.physical_tokens() for layer in cache.layers] == \
            [WINDOW - 1] * 5 + [PREFILL]
        for t in range(PREFILL, PREFILL + 10):
            position = torch.tensor([[t]])
            ref = model(ids[:, t:t + 1], position_ids=position, **{kw: dyn}).logits
            got = model(ids[:, t:t + 1], position_ids=position, **{kw: cache}).logits
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_the_decode_kernel_takes_a_sliding_decode_step(monkeypatch):
    """The attention call of a sliding layer's decode step (no code slot; the ring decoded into the exact segment)
    is one the Triton decode kernel runs (on CPU under Triton's interpreter), with the torch reference's output."""
    pytest.importorskip("triton")
    from nqcompile.ops import cuda as ops_cuda
    from nqcompile.cache import sliding

    small = dict(recent_window=16, warm_tokens=16)  # the full-attention layer then passes code slots
    model = nqcompile.optimize(_gemma(), "asym", **small)
    kw = cache_kwarg_name(model)
    cache = nqcompile.NexusCache(model.config, "asym", max_cache_len=PREFILL + 1, **small)
    calls = []
    original = sliding.ops.dequant_attention
    with torch.no_grad():
        model(_ids(PREFILL), **{kw: cache})
        monkeypatch.setattr(sliding.ops, "dequant_attention", lambda *a: calls.append(a) or original(*a))  # every layer
        model(_ids(1), position_ids=torch.tensor([[PREFILL]]), **{kw: cache})
    calls = [args for args in calls if args[1].shape[2] == 0]
    assert len(calls) == 5
    for args in calls:
        query, k_codes, code_len, exact_mask = args[0], args[1], args[6], args[9]
        kind, bits, rotary_dim, layout, inv_freq = args[14], args[15:17], args[18], args[19], args[11]
        assert ops_cuda.decode_kernel_reason(query, k_codes.shape[1], code_len, exact_mask, kind, bits, rotary_dim,
                                             layout, inv_freq) is None
        torch.testing.assert_close(ops_cuda.dequant_attention_cuda(*args), original(*args), atol=1e-4, rtol=0)


def test_a_left_padded_batch_matches_a_dynamic_cache():
    """Rows of 70 and 45 real tokens (the second left-padded), both past the window, then 20 decode steps: exact
    storage gives the DynamicCache's logits row by row (the window counted in positions equals the model's mask,
    counted in slots, when padding precedes the tokens)."""
    from tiny_models import prefill_and_decode

    model = nqcompile.optimize(_gemma(), "balanced", **EXACT, recent_window=16)
    ids = _ids(PREFILL, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :PREFILL - 45] = 0
    with torch.no_grad():
        ref = prefill_and_decode(model, ids, DynamicCache(config=model.config), 20, mask=mask)
        cache = nqcompile.NexusCache(model.config, "balanced", max_cache_len=PREFILL + 21, **EXACT, recent_window=16)
        got = prefill_and_decode(model, ids, cache, 20, mask=mask)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
