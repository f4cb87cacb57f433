"""Causal attention over a KV cache: a plain-torch reference and two Triton kernels.

Layout
    q: (B, H, T, D)      the T new query rows of each sequence
    k, v: (B, KVH, S, D) the first S slots of the KV cache (may be a strided view of a
                         bigger (B, KVH, S_max, D) buffer)
    out: (B, H, T, D)    same dtype as q

Grouped-query attention: H % KVH == 0 and query head h reads KV head h // (H // KVH),
i.e. consecutive query heads share a KV head (transformers' `repeat_kv`).

Which keys a query sees. Query row i sits at cache slot `start + i` (`start` an int; for one-row
decode also a (1,) integer tensor on the device, read by the kernel, so that a step captured in a
CUDA graph can be replayed at a new slot). Key slot j is visible iff
    j <= start + i                                     (causal)
    window is None or j > start + i - window           (sliding window: `window` keys, itself included)
    j >= pad[b]                                        (slots before pad[b] are left padding of row b)
A query row with no visible key (start + i < pad[b]: it is padding itself) outputs zeros.
Scores are scaled by `scale` (default D ** -0.5); the softmax runs in float32.

Functions
    attention_reference   the spec, in plain torch
    prefill_attention     FlashAttention-style kernel, any T (prefill.py)
    decode_attention      flash-decoding kernel for T == 1 (decode.py)
    attention             picks one of the two (inside torch.compile: as opaque custom ops)
    supports              can the kernels take these tensors?
    model_attention       the model files' attention seam (`Attention.attention_function`) filled by
                          `attention`, for qwen_kernels.install
"""

from typing import Optional

import torch

from .common import DTYPES, device_ok
from .decode import decode_attention
from .prefill import prefill_attention


# ----------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------
def attention_reference(q, k, v, start, pad=None, window=None, scale=None):
    """Plain-torch attention with the semantics above. Returns (B, H, T, D) in q.dtype."""
    B, H, T, D = q.shape
    KVH, S = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale

    # GQA: repeat each KV head for the H // KVH query heads that read it.
    k = k.float().repeat_interleave(H // KVH, dim=1)  # (B, H, S, D)
    v = v.float().repeat_interleave(H // KVH, dim=1)  # (B, H, S, D)
    scores = q.float() @ k.transpose(-1, -2) * scale  # (B, H, T, S)

    # visible[b, i, j]: may query row i of sequence b look at key slot j?
    pos = start + torch.arange(T, device=q.device)[:, None]  # (T, 1) cache slot of each query
    slot = torch.arange(S, device=q.device)[None, :]  # (1, S)
    visible = slot <= pos  # (T, S) causal
    if window is not None:
        visible = visible & (slot > pos - window)  # sliding window
    if pad is None:
        pad = torch.zeros(B, dtype=torch.long, device=q.device)
    visible = visible[None] & (slot[None] >= pad.to(q.device).view(B, 1, 1))  # (B, T, S)

    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # (B, H, T, S); NaN on rows with nothing visible
    has_key = visible.any(dim=-1)[:, None, :, None]  # (B, 1, T, 1)
    probs = torch.where(has_key, probs, 0.0)  # padding rows -> all-zero weights
    return (probs @ v).to(q.dtype)  # (B, H, T, D)


# ----------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------
def supports(q, k):
    """True when the Triton kernels can take these tensors (else the caller uses its torch path)."""
    D = q.shape[-1]
    return (
        device_ok(q)
        and not (q.is_cuda and q.dtype == torch.float32 and D > 128)  # fp32 tiles of 256 overflow SRAM
        and q.dim() == 4
        and k.dim() == 4
        and q.dtype in DTYPES
        and k.dtype == q.dtype
        and k.device == q.device
        and k.shape[-1] == D
        and q.shape[1] % k.shape[1] == 0
        and 16 <= D <= 256
        and D & (D - 1) == 0
    )


# Inside torch.compile the kernels run as custom ops: opaque to the compiler (which would otherwise
# trace the Python launch code above), and captured whole by a CUDA graph. A window of 0 means none.
@torch.library.custom_op("qwen_kernels::prefill_attention", mutates_args=())
def _prefill_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, pad: Optional[torch.Tensor],
                window: int, scale: float) -> torch.Tensor:
    return prefill_attention(q, k, v, start, pad, window or None, scale)


@torch.library.custom_op("qwen_kernels::decode_attention", mutates_args=())
def _decode_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor,
               pad: Optional[torch.Tensor], window: int, scale: float) -> torch.Tensor:
    return decode_attention(q, k, v, start, pad, window or None, scale)


@_prefill_op.register_fake
@_decode_op.register_fake
def _(q, k, v, start, pad, window, scale):
    return q.new_empty(q.shape)  # contiguous (B, H, T, D), as the kernels write it


def attention(q, k, v, start, pad=None, window=None, scale=None):
    """Dispatch: one query row -> decode kernel, otherwise the prefill kernel (which takes an int start)."""
    T = q.shape[2]
    if T > 1 and torch.is_tensor(start):
        raise ValueError("prefill_attention takes an int start; a tensor start is for one-row decode")
    if torch.compiler.is_compiling():  # the custom ops take plain values: a float scale, window 0 = none
        scale = q.shape[3] ** -0.5 if scale is None else scale
        if T == 1:
            start = start if torch.is_tensor(start) else torch.full((1,), start, device=q.device)
            return _decode_op(q, k, v, start, pad, window or 0, scale)
        return _prefill_op(q, k, v, start, pad, window or 0, scale)
    if T == 1:
        return decode_attention(q, k, v, start, pad, window, scale)
    return prefill_attention(q, k, v, start, pad, window, scale)


# ----------------------------------------------------------------------------------------
# The model files' seam
# ----------------------------------------------------------------------------------------
def model_attention(fallback, cuda_only: bool = True):
    """A function for the model files' `Attention.attention_function`, (q, k, v, step, window) -> out:
    these kernels where they take the tensors (on CUDA only, unless cuda_only is False: then also
    Triton's CPU interpreter), else `fallback`. The kernels read the visibility from numbers, not
    from the step's masks: the first query's slot (`start`), the window, and each row's left padding
    (`pad`, the zeros of the padding mask, which generation puts first). So a forward without a cache
    and with a padding mask (the task heads: right padding too) takes `fallback`, and so does a
    multi-token step whose keys are not the slots up to its own (tensor slots: fixed shapes)."""
    def attention_function(q, k, v, step, window):
        T = q.shape[2]
        padded_without_cache = step.slots is None and step.key_mask is not None  # (right padding too)
        if ((cuda_only and not q.is_cuda) or not supports(q, k) or padded_without_cache
                or (T > 1 and torch.compiler.is_compiling())):
            return fallback(q, k, v, step, window)
        if step.slots is None:                          # no cache: the queries start at slot 0
            start = 0
        elif T == 1:                                    # (1,) on the device, read by the decode kernel
            start = step.slots
        else:                                           # the prefill kernel takes an int
            start = int(step.slots[0])
            if k.shape[2] != start + T:                 # slots given as a tensor: not this kernel's case
                return fallback(q, k, v, step, window)
        pad = None if step.key_mask is None else (step.key_mask[:, :k.shape[2]] == 0).sum(-1)  # (B,)
        return attention(q, k, v, start, pad=pad, window=window)
    return attention_function
