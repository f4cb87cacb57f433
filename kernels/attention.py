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
    prefill_attention     FlashAttention-style kernel, any T
    decode_attention      flash-decoding kernel for T == 1
    attention             picks one of the two (inside torch.compile: as opaque custom ops)
    supports              can the kernels take these tensors?
"""

import functools
import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

# Triton decides at decoration time whether a kernel is compiled for the GPU or run by its
# CPU interpreter (TRITON_INTERPRET=1). Remember which one this module was built for.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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
# Prefill kernel: one program = BLOCK_M query rows of one (batch, head)
# ----------------------------------------------------------------------------------------
def _prefill_configs():
    if INTERPRET:  # the interpreter cannot benchmark: one small config, many blocks in tests
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=4),
    ]


# Lengths and positions change from call to call: do not compile a variant per value class.
@triton.autotune(configs=_prefill_configs(), key=["HEAD_DIM", "T_BUCKET"])
@triton.jit(do_not_specialize=["T", "S", "start", "window", "T_BUCKET"])
def _prefill_kernel(
    Q, K, V, O, PAD,
    sq_b, sq_h, sq_t, sq_d,
    sk_b, sk_h, sk_s, sk_d,
    sv_b, sv_h, sv_s, sv_d,
    so_b, so_h, so_t, so_d,
    H, GROUP, T, S, start, window, qk_scale,
    T_BUCKET,  # autotune key only: the best tile size depends on the query length
    HAS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)  # which block of query rows
    pid_bh = tl.program_id(1)  # which (batch, query head)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    kvh = h // GROUP  # GQA: the KV head this query head reads (no repeated K/V in memory)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query rows
    offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,) key offsets inside a key block
    offs_d = tl.arange(0, HEAD_DIM)  # (D,)
    pos = start + offs_m  # (BLOCK_M,) cache slot of each query row

    # 1. Load the query tile once.
    q_ptrs = Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :] * sq_d
    q = tl.load(q_ptrs, mask=offs_m[:, None] < T, other=0.0)  # (BLOCK_M, D)

    # 2. The key range any row of this tile can see; blocks outside it are never loaded.
    #    The first row's window start bounds it below, the last row's causal limit above.
    lo = tl.maximum(start + pid_m * BLOCK_M - window + 1, 0)
    if HAS_PAD:
        pad = tl.load(PAD + b).to(tl.int32)
        lo = tl.maximum(lo, pad)
    hi = tl.minimum(S, start + tl.minimum((pid_m + 1) * BLOCK_M, T))
    lo = (lo // BLOCK_N) * BLOCK_N  # align the first key block

    k_base = K + b * sk_b + kvh * sk_h
    v_base = V + b * sv_b + kvh * sv_h

    # 3. Online softmax over key blocks (scores in log2 units: exp2 is the cheap exponential).
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)  # running sum of p @ V
    for n0 in range(lo, hi, BLOCK_N):
        slot = n0 + offs_n  # (BLOCK_N,) key slots of this block
        in_cache = slot < S
        # K^T tile is loaded transposed directly: (D, BLOCK_N)
        k = tl.load(k_base + offs_d[:, None] * sk_d + slot[None, :] * sk_s,
                    mask=in_cache[None, :], other=0.0)
        qk = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)

        visible = (slot[None, :] <= pos[:, None]) & (slot[None, :] > pos[:, None] - window)
        visible = visible & in_cache[None, :]
        if HAS_PAD:
            visible = visible & (slot[None, :] >= pad)
        qk = tl.where(visible, qk, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(qk, 1))  # (BLOCK_M,)
        # A row that has seen no visible key yet keeps m = -inf: subtract 0 instead, so that
        # exp2(-inf - (-inf)) = NaN never happens (its p and alpha are then exactly 0).
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_sub[:, None])  # (BLOCK_M, BLOCK_N), 0 where masked
        alpha = tl.math.exp2(m_i - m_sub)  # (BLOCK_M,) rescales the old statistics
        l_i = l_i * alpha + tl.sum(p, 1)

        v = tl.load(v_base + slot[:, None] * sv_s + offs_d[None, :] * sv_d,
                    mask=in_cache[:, None], other=0.0)  # (BLOCK_N, D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # 4. Normalise; rows that saw no key at all (left padding) have l = 0 and acc = 0 -> zeros.
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = O + b * so_b + h * so_h + offs_m[:, None] * so_t + offs_d[None, :] * so_d
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < T)


# ----------------------------------------------------------------------------------------
# Decode kernels (flash-decoding): one program = one key chunk of one (batch, KV head),
# for all query heads of that KV group at once; a second kernel merges the chunks.
# ----------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["S", "Start", "window", "NUM_CHUNKS"])
def _decode_chunk_kernel(
    Q, K, V, PAD, M_part, L_part, O_part,
    sq_b, sq_h, sq_d,
    sk_b, sk_h, sk_s, sk_d,
    sv_b, sv_h, sv_s, sv_d,
    KVH, GROUP, S, Start, window, qk_scale, CHUNK, NUM_CHUNKS,
    START_IN_MEMORY: tl.constexpr,  # Start is a pointer to the slot (CUDA graphs), else the slot itself
    HAS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
):
    c = tl.program_id(0)  # which key chunk
    pid = tl.program_id(1)  # which (batch, KV head)
    b = (pid // KVH).to(tl.int64)
    kvh = pid % KVH

    offs_g = tl.arange(0, BLOCK_G)  # (BLOCK_G,) query heads of the group; rows >= GROUP are filler
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    head = kvh * GROUP + offs_g  # (BLOCK_G,) query head index
    is_head = offs_g < GROUP

    # 1. The group's queries as one (BLOCK_G, D) tile: K/V are read once for all of them.
    q = tl.load(Q + b * sq_b + head[:, None] * sq_h + offs_d[None, :] * sq_d,
                mask=is_head[:, None], other=0.0)

    # 2. The single query sits at slot `start`: every head sees the same key range [lo, hi),
    #    clipped to this program's chunk. Chunks past `start` load nothing, so a cache allocated
    #    longer than the text (static shapes) costs no reads.
    if START_IN_MEMORY:
        start = tl.load(Start).to(tl.int32)
    else:
        start = Start
    lo = tl.maximum(start - window + 1, c * CHUNK)
    if HAS_PAD:
        lo = tl.maximum(lo, tl.load(PAD + b).to(tl.int32))
    hi = tl.minimum(tl.minimum(start + 1, S), (c + 1) * CHUNK)

    k_base = K + b * sk_b + kvh * sk_h
    v_base = V + b * sv_b + kvh * sv_h

    # 3. Online softmax over the chunk, exactly as in the prefill kernel.
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    for n0 in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        slot = n0 + offs_n  # (BLOCK_N,)
        visible = (slot >= lo) & (slot < hi)
        k = tl.load(k_base + offs_d[:, None] * sk_d + slot[None, :] * sk_s,
                    mask=visible[None, :], other=0.0)  # (D, BLOCK_N)
        qk = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_G, BLOCK_N)
        qk = tl.where(visible[None, :], qk, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + slot[:, None] * sv_s + offs_d[None, :] * sv_d,
                    mask=visible[:, None], other=0.0)  # (BLOCK_N, D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # 4. Write the unnormalised partials; an empty chunk writes m = -inf, l = 0, acc = 0.
    #    Partials are contiguous: M/L (B, H, NUM_CHUNKS), O (B, H, NUM_CHUNKS, D), float32.
    row = (b * KVH * GROUP + head) * NUM_CHUNKS + c  # (BLOCK_G,) index into (B*H, NUM_CHUNKS)
    tl.store(M_part + row, m_i, mask=is_head)
    tl.store(L_part + row, l_i, mask=is_head)
    tl.store(O_part + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=is_head[:, None])


@triton.jit(do_not_specialize=["NUM_CHUNKS"])
def _decode_merge_kernel(
    M_part, L_part, O_part, O,
    H, so_b, so_h, so_d, NUM_CHUNKS,
    HEAD_DIM: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)  # which (batch, query head)
    b = pid // H
    h = pid % H
    offs_c = tl.arange(0, BLOCK_C)  # (BLOCK_C,) a block of chunks
    offs_d = tl.arange(0, HEAD_DIM)
    first = pid.to(tl.int64) * NUM_CHUNKS  # row of chunk 0 in the (B*H, NUM_CHUNKS) partials

    # 1. The largest chunk max (log2 units).
    m_max = tl.full([BLOCK_C], float("-inf"), tl.float32)
    for c0 in range(0, NUM_CHUNKS, BLOCK_C):
        m = tl.load(M_part + first + c0 + offs_c, mask=c0 + offs_c < NUM_CHUNKS, other=float("-inf"))
        m_max = tl.maximum(m_max, m)
    m_max = tl.max(m_max, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # no key anywhere: all weights 0

    # 2. Log-sum-exp merge: chunk c counts with weight 2^(m_c - m_max).
    num = tl.zeros([HEAD_DIM], tl.float32)  # sum_c w_c * acc_c
    den = tl.zeros([BLOCK_C], tl.float32)  # sum_c w_c * l_c, per lane
    for c0 in range(0, NUM_CHUNKS, BLOCK_C):
        row = first + c0 + offs_c  # (BLOCK_C,)
        is_chunk = c0 + offs_c < NUM_CHUNKS
        m = tl.load(M_part + row, mask=is_chunk, other=float("-inf"))
        l = tl.load(L_part + row, mask=is_chunk, other=0.0)
        o = tl.load(O_part + row[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=is_chunk[:, None], other=0.0)  # (BLOCK_C, D)
        w = tl.math.exp2(m - m_max)  # (BLOCK_C,)
        num += tl.sum(w[:, None] * o, 0)
        den += w * l
    den = tl.sum(den, 0)
    out = num / tl.where(den == 0.0, 1.0, den)  # padding row -> zeros
    tl.store(O + b * so_b + h * so_h + offs_d * so_d, out.to(O.dtype.element_ty))


# ----------------------------------------------------------------------------------------
# Python wrappers
# ----------------------------------------------------------------------------------------
_BF16_TENSOR_CORES = None  # asked once (supports() runs on every call of a layer)


@torch.compiler.assume_constant_result  # torch.compile: run while tracing, kept as a constant
def _gpu_has_bf16() -> bool:
    """bf16 tensor cores need compute capability 8.0 (Ampere) or newer."""
    global _BF16_TENSOR_CORES
    if _BF16_TENSOR_CORES is None:
        _BF16_TENSOR_CORES = torch.cuda.get_device_capability() >= (8, 0)
    return _BF16_TENSOR_CORES


def supports(q, k):
    """True when the Triton kernels can take these tensors (else use attention_reference)."""
    if INTERPRET:
        # CPU interpreter: only while it is switched on, and it computes bf16 wrongly.
        device_ok = os.environ.get("TRITON_INTERPRET") == "1" and q.dtype != torch.bfloat16
    else:
        # float32 tiles with head_dim 256 do not fit in shared memory.
        device_ok = (q.is_cuda and (q.dtype != torch.bfloat16 or _gpu_has_bf16())
                     and (q.dtype != torch.float32 or q.shape[-1] <= 128))
    D = q.shape[-1]
    return (
        device_ok
        and q.dim() == 4
        and k.dim() == 4
        and q.dtype in _DTYPES
        and k.dtype == q.dtype
        and k.device == q.device
        and k.shape[-1] == D
        and q.shape[1] % k.shape[1] == 0
        and 16 <= D <= 256
        and D & (D - 1) == 0
    )


def _prepare(q, k, v, pad, window, scale):
    """Shared argument checks; returns (pad, window, qk_scale, dot precision)."""
    B, H, T, D = q.shape
    assert k.shape == v.shape and k.shape[0] == B and k.shape[3] == D, (q.shape, k.shape, v.shape)
    assert H % k.shape[1] == 0, "H must be a multiple of KVH"
    assert 16 <= D <= 256 and D & (D - 1) == 0, "head_dim must be a power of two in [16, 256]"
    assert k.dtype == q.dtype and v.dtype == q.dtype
    if pad is not None:
        pad = pad.to(q.device).contiguous()
    S = k.shape[2]
    # window None -> a window wider than any possible distance (no restriction)
    window = S + T + 1 if window is None else int(window)
    assert window >= 1
    scale = D**-0.5 if scale is None else scale
    qk_scale = scale * math.log2(math.e)  # kernels use exp2
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 stays exact
    return pad, window, qk_scale, precision


def prefill_attention(q, k, v, start, pad=None, window=None, scale=None):
    """FlashAttention-style kernel for any T. Same semantics and result as attention_reference."""
    B, H, T, D = q.shape
    KVH, S = k.shape[1], k.shape[2]
    pad, window, qk_scale, precision = _prepare(q, k, v, pad, window, scale)
    out = torch.empty(B, H, T, D, dtype=q.dtype, device=q.device)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)
    _prefill_kernel[grid](
        q, k, v, out, pad if pad is not None else q,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, H // KVH, T, S, int(start), window, qk_scale,
        min(triton.next_power_of_2(T), 4096),
        HAS_PAD=pad is not None, HEAD_DIM=D, DOT_PRECISION=precision,
    )
    return out


@functools.lru_cache(maxsize=None)
def _num_sms(device):
    return torch.cuda.get_device_properties(device).multi_processor_count


def _decode_split(S, B, KVH, device):
    """Decode tiling: (keys per chunk program, BLOCK_N, chunks per merge step)."""
    if INTERPRET:
        return 32, 16, 4  # small tiles, so that tests span several chunks and merge steps
    sms = _num_sms(device)
    want_chunks = max(1, 2 * sms // (B * KVH))  # ~2 programs per SM
    chunk = triton.next_power_of_2(triton.cdiv(S, want_chunks))
    return max(chunk, 64), 64, 32


def decode_attention(q, k, v, start, pad=None, window=None, scale=None):
    """Flash-decoding for T == 1: split the cache into chunks, then merge the chunks.

    start: the new token's slot, an int or a (1,) integer tensor on q's device (read by the kernel)."""
    B, H, T, D = q.shape
    KVH, S = k.shape[1], k.shape[2]
    assert T == 1, "decode_attention takes one query row per sequence"
    pad, window, qk_scale, precision = _prepare(q, k, v, pad, window, scale)
    G = H // KVH
    in_memory = torch.is_tensor(start)
    if in_memory:
        assert start.numel() == 1 and start.device == q.device and not start.is_floating_point(), start

    chunk, block_n, block_c = _decode_split(S, B, KVH, q.device)
    num_chunks = triton.cdiv(S, chunk)
    m_part = torch.empty(B, H, num_chunks, dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    o_part = torch.empty(B, H, num_chunks, D, dtype=torch.float32, device=q.device)
    out = torch.empty(B, H, 1, D, dtype=q.dtype, device=q.device)

    _decode_chunk_kernel[(num_chunks, B * KVH)](
        q, k, v, pad if pad is not None else q, m_part, l_part, o_part,
        q.stride(0), q.stride(1), q.stride(3), *k.stride(), *v.stride(),
        KVH, G, S, start if in_memory else int(start), window, qk_scale, chunk, num_chunks,
        START_IN_MEMORY=in_memory, HAS_PAD=pad is not None, HEAD_DIM=D, DOT_PRECISION=precision,
        BLOCK_G=max(16, triton.next_power_of_2(G)),  # tl.dot needs at least 16 rows
        BLOCK_N=block_n, num_warps=4, num_stages=2,
    )
    _decode_merge_kernel[(B * H,)](
        m_part, l_part, o_part, out,
        H, out.stride(0), out.stride(1), out.stride(3), num_chunks,
        HEAD_DIM=D, BLOCK_C=min(block_c, triton.next_power_of_2(num_chunks)), num_warps=4,
    )
    return out


# Inside torch.compile the kernels run as custom ops: opaque to the compiler (which would otherwise
# trace the Python launch code above), and captured whole by a CUDA graph. A window of 0 means none.
@torch.library.custom_op("qwen_kernels::prefill_attention", mutates_args=())
def _prefill_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, pad: Optional[torch.Tensor],
                window: int, scale: float) -> torch.Tensor:
    return prefill_attention(q, k, v, start, pad, window or None, scale)


@torch.library.custom_op("qwen_kernels::decode_attention", mutates_args=())
def _decode_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor, pad: Optional[torch.Tensor],
               window: int, scale: float) -> torch.Tensor:
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
