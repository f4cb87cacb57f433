"""Triton kernels for the Qwen reference model, each beside the plain-torch reference it must equal.

kernels.attention  causal GQA attention over a KV cache: attention_reference, prefill_attention
                   (FlashAttention), decode_attention (flash-decoding), attention (dispatch), supports
kernels.moe        fused mixture-of-experts feed-forward: fused_moe_reference, fused_moe, supports
kernels.microbench GPU micro-benchmark against torch (python -m kernels.microbench)

Call `supports(...)` first and fall back to the reference when it says False. Without a GPU the
kernels run in Triton's CPU interpreter if TRITON_INTERPRET=1 is set before this package is
imported (fp32/fp16 only). The function `attention` is reached as `kernels.attention.attention`:
re-exporting it here would hide the submodule of the same name.
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
