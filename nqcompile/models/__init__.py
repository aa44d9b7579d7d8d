"""Everything that knows about HuggingFace models: reading RoPE from configs (:mod:`.rope_spec`), shims over
transformers versions (:mod:`.compat`) and the loader of the converted demo models, SmolLM2 and Gemma 3 270M (:mod:`.demo`)."""

from .compat import cache_kwarg_name
from .demo import (DEFAULT_MODEL, PRETRAINED, SMOLLM2_GGUF_FILE, PretrainedModel, cache_root, convert_pretrained,
                   converted_dir, gemma3_gguf_path, load_pretrained, model_path, smollm2_gguf_path)
from .rope_spec import INTERLEAVED_MODEL_TYPES, RotarySpec

__all__ = ["DEFAULT_MODEL", "PRETRAINED", "PretrainedModel", "SMOLLM2_GGUF_FILE", "cache_root", "smollm2_gguf_path",
           "gemma3_gguf_path", "converted_dir", "convert_pretrained", "model_path", "load_pretrained", "cache_kwarg_name", "RotarySpec", "INTERLEAVED_MODEL_TYPES"]
