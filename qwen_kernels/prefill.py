"""FlashAttention-style prefill kernel: causal GQA attention of T query rows over a KV cache.

The semantics (which keys a query sees, the layout) are in attention.py; the result equals
attention.attention_reference.

The algorithm. One program computes BLOCK_M query rows of one (batch, query head):
  1. load the query tile once;
  2. work out the key range any row of the tile can see (causal limit above, sliding window and
     left padding below) and never load key blocks outside it;
  3. walk that range BLOCK_N keys at a time with the online softmax: keep each row's running max
     m, running sum l of exp(score - m) and running sum acc of exp(score - m) @ V, rescaling l and
     acc by exp(m_old - m_new) whenever the max grows (scores in log2 units, exp2 is cheaper);
  4. divide acc by l. A row that sees no key (it is left padding itself) writes zeros.
A GQA query head reads KV head h // (H // KVH) directly: the repeated K/V never exist in memory.
"""
import torch
import triton
import triton.language as tl

from .common import INTERPRET, attention_args, dot_precision


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


def prefill_attention(q, k, v, start, pad=None, window=None, scale=None):
    """FlashAttention-style kernel for any T. Same semantics and result as attention_reference."""
    B, H, T, D = q.shape
    KVH, S = k.shape[1], k.shape[2]
    pad, window, qk_scale = attention_args(q, k, v, pad, window, scale)
    out = torch.empty(B, H, T, D, dtype=q.dtype, device=q.device)
    def grid(meta):  # query blocks x (batch, head): the block size is the autotuner's choice
        return (triton.cdiv(T, meta["BLOCK_M"]), B * H)

    _prefill_kernel[grid](
        q, k, v, out, pad if pad is not None else q,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, H // KVH, T, S, int(start), window, qk_scale,
        min(triton.next_power_of_2(T), 4096),
        HAS_PAD=pad is not None, HEAD_DIM=D, DOT_PRECISION=dot_precision(q.dtype),
    )
    return out
