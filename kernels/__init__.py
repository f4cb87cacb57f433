"""Triton kernels for the Qwen reference model, each beside the plain-torch reference it must equal.

kernels.attention  causal GQA attention over a KV cache: the semantics, attention_reference,
                   attention (dispatch; custom ops inside torch.compile), supports
kernels.prefill    prefill_attention, a FlashAttention-style kernel for any number of query rows
kernels.decode     decode_attention, flash-decoding for one query row over a long cache
kernels.moe        fused mixture-of-experts feed-forward: fused_moe_reference, fused_moe, supports
kernels.common     what they share: the interpreter switch, dtypes, device and argument checks

The model files call `supports(...)` first and, when it says False, take their own torch path
(SDPA for attention, experts_grouped or experts_gathered for the experts). Without a GPU the
kernels run in Triton's CPU interpreter if TRITON_INTERPRET=1 is set before this package is
imported (fp32/fp16 only). The function `attention` is reached as `kernels.attention.attention`:
re-exporting it here would hide the submodule of the same name. The benchmarks of the kernels
against torch are `python bench.py kernels`.
"""

from . import attention, moe
from .attention import attention_reference, decode_attention, prefill_attention
from .moe import fused_moe, fused_moe_reference

__all__ = [
    "attention",
    "moe",
    "attention_reference",
    "decode_attention",
    "prefill_attention",
    "fused_moe",
    "fused_moe_reference",
]
