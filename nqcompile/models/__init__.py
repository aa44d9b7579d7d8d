"""Everything that knows about HuggingFace models: reading RoPE from configs (:mod:`.rope_spec`), shims over
transformers versions (:mod:`.compat`) and the demo-model loader (:mod:`.demo`)."""

from .compat import cache_kwarg_name
from .demo import (DEFAULT_MODEL, SMOLLM2_GGUF_FILE, cache_root, convert_smollm2, converted_smollm2_dir,
                   load_pretrained, model_path, smollm2_gguf_path)
from .rope_spec import INTERLEAVED_MODEL_TYPES, RotarySpec

__all__ = ["DEFAULT_MODEL", "SMOLLM2_GGUF_FILE", "cache_root", "smollm2_gguf_path", "converted_smollm2_dir",
           "convert_smollm2", "model_path", "load_pretrained", "cache_kwarg_name", "RotarySpec", "INTERLEAVED_MODEL_TYPES"]
