"""Tiny config-built causal LMs (random weights, seeded) for fast CPU tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import transformers

_BENCHMARK_HELPERS = Path(__file__).resolve().parents[1] / "benchmarks" / "_common.py"

_CONFIGS = {
    # Llama: GQA 2 query / 1 KV head, head_dim 64.
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, max_position_embeddings=1024, rope_theta=10000.0),
    # Qwen2: q/k/v biases, GQA, head_dim 64.
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, rope_theta=1e6),
    # Phi-3 style: fused qkv, head_dim 96.
    "phi3": lambda: transformers.Phi3Config(
        vocab_size=256, hidden_size=192, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=1024, original_max_position_embeddings=1024,
        pad_token_id=0),
    # Mistral without a sliding window (windows: tests/test_model_features.py), GQA 4 query / 1 KV head.
    "mistral": lambda: transformers.MistralConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=1024, sliding_window=None),
    # Qwen3: RMS norm of each query and key head before RoPE (QK-norm), GQA, head_dim 64.
    "qwen3": lambda: transformers.Qwen3Config(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=1024),
    # Gemma 3 text: sliding-window (32 tokens, RoPE theta 1e4) and global (theta 1e6) layers, QK-norm,
    # query_pre_attn_scalar scaling, GQA. NexusCache holds the sliding-window layers' window as codes (SlidingLayer).
    "gemma3": lambda: transformers.Gemma3TextConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64, max_position_embeddings=1024,
        sliding_window=32, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        pad_token_id=0),
}

#: Kinds a NexusCache compresses in every layer (preset defaults apply); gemma3 has sliding-window layers.
MODEL_KINDS = ("llama", "qwen2", "phi3", "mistral", "qwen3", "gemma3")


def tiny_model(kind: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0, attention: str = "sdpa"):
    """A small random-weight causal LM of the given family (``MODEL_KINDS``), in eval mode,
    with transformers' attention implementation ``attention`` (``"sdpa"`` or ``"eager"``)."""
    torch.manual_seed(seed)
    config = _CONFIGS[kind]()
    config._attn_implementation = attention
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Random weights give flat attention; sharpen it so eviction decisions matter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "k_proj" in name or "q_proj" in name or "qkv_proj" in name:
                p.mul_(4.0)
    return model.eval()


def prefill_and_decode(model, ids: torch.Tensor, cache, steps: int, *,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """Prefill ``ids`` ``[B, L]`` (left-padded where ``mask`` ``[B, L]`` is 0) then ``steps`` greedy decode
    steps through ``cache``; returns the last-token logits of every call, ``[B, steps + 1, V]``."""
    mask = torch.ones_like(ids) if mask is None else mask
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
    logits = [out.logits[:, -1]]
    for _ in range(steps):
        token = logits[-1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(token)], 1)
        positions = positions[:, -1:] + 1
        out = model(token, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


#: A minimal chat template for the tiny tokenizer (examples and needle cases apply one).
TINY_CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                      "{% if add_generation_prompt %}<assistant>{% endif %}")


def byte_tokenizer(*, bos: bool = False, chat_template: str | None = None):
    """A byte-level tokenizer (one token per byte, ids 0-255 in the sorted order of the byte-level alphabet, the same
    in every build; no download); with ``bos`` it has a
    ``<bos>`` special token (id 256) that it puts before every text when it adds special tokens, as Gemma's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}  # alphabet(): a set
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if not bos:
        return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=chat_template)
    tok.add_special_tokens(["<bos>"])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 256)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", chat_template=chat_template)


def save_tiny_model_with_tokenizer(folder, kind: str = "llama") -> str:
    """Save :func:`tiny_model` with :func:`byte_tokenizer` (its 256-token vocabulary) and :data:`TINY_CHAT_TEMPLATE`
    in ``folder``, a HuggingFace model folder that ``load_pretrained(folder)`` and ``nqcompile generate --model
    folder`` load; returns the folder as a string."""
    tiny_model(kind).save_pretrained(folder)
    byte_tokenizer(chat_template=TINY_CHAT_TEMPLATE).save_pretrained(folder)
    return str(folder)


def greedy_tokens(model, ids: torch.Tensor, step, steps: int) -> list[int]:
    """Prefill ``ids`` ``[1, L]`` eagerly through ``model`` (an optimized model: its hook re-reads the chunk when the
    preset asks for it) into a fresh ``NexusCache`` of its preset sized for the steps, then ``steps`` greedy decode
    steps through ``step`` (``model.forward`` or a compiled version of it); the tokens chosen."""
    import nqcompile
    from nqcompile.models import cache_kwarg_name

    cache = nqcompile.NexusCache(model.config, model.nqcompile_preset, max_cache_len=ids.shape[1] + steps + 1)
    kw = {cache_kwarg_name(model): cache}
    with torch.no_grad():
        token, tokens = model(ids, **kw).logits[:, -1:].argmax(-1), []
        for _ in range(steps):
            token = step(token, **kw).logits[:, -1:].argmax(-1)
            tokens.append(int(token))
    return tokens


def byte_level_tokenizer():
    """The benchmarks' 256-id byte-level tokenizer (one token per byte, built offline): the tokenizer of every tiny
    model here (their vocabularies have 256 ids), for presets that keep line breaks."""
    spec = importlib.util.spec_from_file_location("_common", _BENCHMARK_HELPERS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.byte_level_tokenizer()
