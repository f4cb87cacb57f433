"""Flash-decoding kernels: one new query row per sequence attending over a long KV cache.

The semantics are in attention.py; the result equals attention.attention_reference with T == 1.

The algorithm. One query row gives too little work for one program per (batch, head), so the
cache is split into chunks of CHUNK slots:
  1. _decode_chunk_kernel: one program per (chunk, batch, KV head) runs the online softmax of
     prefill.py over its chunk for all G = H // KVH query heads of that KV group at once (a
     (G, D) tile, so K/V are read once per group), and writes the unnormalised partials m, l, acc;
  2. _decode_merge_kernel: one program per (batch, query head) merges the chunks by log-sum-exp:
     chunk c counts with weight 2^(m_c - max_c m_c).
Chunks past the query's slot load nothing, so a cache allocated longer than the text costs no
reads. The slot can be read from a (1,) device tensor, so that a CUDA graph replays at a new slot.
"""
import functools

import torch
import triton
import triton.language as tl

from .common import INTERPRET, attention_args, dot_precision


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
    pad, window, qk_scale = attention_args(q, k, v, pad, window, scale)
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
        START_IN_MEMORY=in_memory, HAS_PAD=pad is not None, HEAD_DIM=D,
        DOT_PRECISION=dot_precision(q.dtype),
        BLOCK_G=max(16, triton.next_power_of_2(G)),  # tl.dot needs at least 16 rows
        BLOCK_N=block_n, num_warps=4, num_stages=2,
    )
    _decode_merge_kernel[(B * H,)](
        m_part, l_part, o_part, out,
        H, out.stride(0), out.stride(1), out.stride(3), num_chunks,
        HEAD_DIM=D, BLOCK_C=min(block_c, triton.next_power_of_2(num_chunks)), num_warps=4,
    )
    return out
