"""Exercises: write the functions below, one exercise at a time, and check each with its command.

    python docs/exercises/starter.py              # once: copies these stubs to my_answers.py
    pytest tests/exercises/test_rmsnorm.py        # the command is on each exercise's page

Write your answers in my_answers.py at the repository root (git ignores it; this file stays as it
is). The checker imports my_answers.py (or the file named by QWEN_EXERCISE_IMPL) and compares your
function with the code the model files run, on random inputs in several shapes and dtypes. Each
stub raises NotImplementedError until you replace its body; an untouched stub is reported as "not
implemented yet". Only torch is needed; do not import the model files (that would be copying the
answer, and QWEN_EXERCISE_ALONE=1 refuses it).

Shapes use B batch, T new tokens, S key slots, H query heads, KVH key/value heads, D head_dim,
C hidden size, E experts, K experts per token, I expert width, N tokens (B*T), V vocabulary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: F401  (you will want it)


# 1. RMSNorm (easy) -- replaces RMSNorm.forward in qwen2.py
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Root-mean-square normalisation over the last dimension, times `weight`.

    x: (..., dim) in float32, bfloat16 or float16; weight: (dim,) in the same dtype.
    Returns x's shape and dtype, bit for bit what transformers computes in bf16 and fp16.
    """
    raise NotImplementedError("rms_norm")


# 2. Rotary position embeddings (easy) -- replaces RotaryEmbedding.forward, rotate_half, apply_rope
def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos and sin tables of the default RoPE.

    positions: (B, T) integer positions. Returns (cos, sin), each (B, T, head_dim) in `dtype`.
    """
    raise NotImplementedError("rope_cos_sin")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Qwen's (half-split) rotation partner of x, over the last dimension. Same shape as x."""
    raise NotImplementedError("rotate_half")


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys. x: (B, heads, T, D); cos, sin: (B, T, D). Returns x's shape."""
    raise NotImplementedError("apply_rope")


# 3. The attention mask (easy) -- replaces visibility_mask in qwen2.py
def visibility_mask(q_slots: torch.Tensor, S: int, window: int | None, key_mask: torch.Tensor | None = None):
    """Which key slots each query may see, as booleans.

    q_slots: (T,) the cache slot of each query. S: number of key slots (0 .. S-1).
    window: None (causal) or W (sliding: exactly W keys, the query's own slot included).
    key_mask: None, or (B, >= S) with 0 at left padding.
    Returns (1, 1, T, S) without key_mask, (B, 1, T, S) with it.
    """
    raise NotImplementedError("visibility_mask")


# 4. Grouped-query attention (medium) -- replaces reference_attention in qwen2.py
def gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                  scale: float) -> torch.Tensor:
    """Softmax attention where each key/value head serves H // KVH query heads.

    q: (B, H, T, D); k, v: (B, KVH, S, D); mask: (B or 1, 1, T, S) booleans (True = visible) or None.
    Returns (B, H, T, D) in q's dtype.
    """
    raise NotImplementedError("gqa_attention")


# 5. The KV cache (medium) -- replaces KVCache.update in qwen2.py
def kv_cache_update(cache_k: torch.Tensor, cache_v: torch.Tensor, slots: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor):
    """Store this step's keys and values and return the cache for attention to read.

    cache_k, cache_v: (B, KVH, max_len, D), written in place. k, v: (B, KVH, T, D).
    slots: (T,) the cache slots of this step's tokens (a prefill: 0 .. T-1; a decode step: one slot).
    Returns (keys, values): the whole cache, (B, KVH, max_len, D) each.
    """
    raise NotImplementedError("kv_cache_update")


# 6. Sampling (medium) -- replaces the filtering in sample() in generate.py
def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int = 0,
                   top_p: float = 1.0) -> torch.Tensor:
    """The distribution the next token is drawn from, after temperature, top-k and top-p.

    logits: (B, V); temperature > 0; top_k 0 = off; top_p 1.0 = off.
    Returns (B, V) float32 probabilities (rows sum to 1; filtered tokens exactly 0).
    """
    raise NotImplementedError("sampling_probs")


# 7. Top-k routing (medium) -- replaces route in qwen2_moe.py
def route(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool):
    """Each token's experts and their weights.

    router_logits: (N, E) in the model dtype. Returns (weights, ids), each (N, K): weights in the
    logits' dtype, ids int64.
    """
    raise NotImplementedError("route")


# 8. The MoE block with its shared expert (medium) -- replaces SparseMoeBlock.forward in qwen2_moe.py
def moe_block(x: torch.Tensor, router_weight: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
              shared_gate_proj: torch.Tensor, shared_up_proj: torch.Tensor, shared_down_proj: torch.Tensor,
              shared_expert_gate: torch.Tensor, top_k: int, norm_topk_prob: bool) -> torch.Tensor:
    """Qwen2-MoE's feed-forward: routed experts plus the gated shared expert.

    x: (B, T, C). router_weight: (E, C). w_gate_up: (E, 2I, C), rows [0, I) gate, [I, 2I) up.
    w_down: (E, C, I). shared_gate_proj, shared_up_proj: (Is, C); shared_down_proj: (C, Is).
    shared_expert_gate: (1, C). Returns (B, T, C).
    """
    raise NotImplementedError("moe_block")


# 9. The load-balancing loss (medium) -- replaces load_balancing_loss in qwen2_moe.py
def load_balancing_loss(router_logits: tuple, num_experts: int, top_k: int,
                        token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The auxiliary loss that keeps the router from overusing a few experts.

    router_logits: one (N, E) tensor per sparse layer, N = B*T. token_mask: None or (B, T), 0 for
    padding. Returns a scalar tensor.
    """
    raise NotImplementedError("load_balancing_loss")


# 10. Streaming detokenizer (medium) -- replaces StreamDecoder in tokenizer.py
class StreamDecoder:
    """Turn token ids into text as they arrive, never showing half a character.

    tokenizer: anything with decode(ids, skip_special_tokens=...) -> str (tokenizer.Tokenizer).
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now complete ("" if none)."""
        raise NotImplementedError("StreamDecoder.push")

    def flush(self) -> str:
        """Return whatever is still held back."""
        raise NotImplementedError("StreamDecoder.flush")


# 11. YaRN (hard) -- replaces the "yarn" branch of rope_frequencies in qwen2.py
def yarn_frequencies(head_dim: int, theta: float, factor: float, original_max_position_embeddings: int,
                     beta_fast: float = 32.0, beta_slow: float = 1.0):
    """YaRN's inverse frequencies and cos/sin scale.

    Returns (inv_freq, attention_scaling): inv_freq (head_dim // 2,) float32, attention_scaling a float.
    """
    raise NotImplementedError("yarn_frequencies")


# 13. Weight-only int8 (medium) -- replaces quantize_int8 and dequantize_int8 in quantize.py
def quantize_int8(w: torch.Tensor, dtype: torch.dtype):
    """Symmetric int8 quantization of a weight matrix, one scale per output channel (row).

    w: (N, K) any float dtype. Returns (q, s): q (N, K) int8 in [-127, 127]; s (N,) in `dtype`, the
    scale as stored, with w[n, k] ~ q[n, k] * s[n].
    """
    raise NotImplementedError("quantize_int8")


def dequantize_int8(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q (N, K) int8 and s (N,) -> the approximate weights (N, K) in `dtype`."""
    raise NotImplementedError("dequantize_int8")


if __name__ == "__main__":  # python docs/exercises/starter.py [PATH]: copy these stubs to your answer file
    import os
    import shutil
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    in_repo = os.path.isfile(os.path.join(root, "qwen2.py"))
    target = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root if in_repo else ".", "my_answers.py")
    if os.path.exists(target):
        sys.exit(f"{target} already exists: it holds your answers (delete it to start over)")
    shutil.copy(__file__, target)
    print(f"wrote {target}: write your answers there; each exercise page has its check command")
