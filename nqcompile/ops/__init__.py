"""The ops every step that touches compressed storage goes through (:mod:`.reference`: ``torch.library``
custom ops with their torch reference and fake implementations), the fused op the ``nexusquant`` backend's passes
rewrite a decode step into (:mod:`.fused`), the storage contract they share (:mod:`.layout`), and the CUDA
implementations of the attention ops, which run the Triton decode kernel where it applies (:mod:`.cuda`), and
their CPU implementations, which run prefill chunks through torch's fused CPU kernel (:mod:`.cpu`)."""

from . import cpu as _cpu  # noqa: F401  (registers the CPU implementations)
from . import cuda as _cuda  # noqa: F401  (registers the CUDA implementations)
from .fused import cache_attention
from .layout import BLOCK_TOKENS, round_up_to_block
from .reference import dequant_attention, dequant_attention_lse, dequant_kv, gather_tokens, write_kv

__all__ = ["BLOCK_TOKENS", "round_up_to_block", "write_kv", "gather_tokens", "dequant_kv", "dequant_attention",
           "dequant_attention_lse", "cache_attention"]
