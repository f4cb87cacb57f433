"""Mixture-of-experts feed-forward: a plain-torch reference and a fused Triton version.

Shapes
    x:            (N, C)       N tokens of hidden size C
    w_gate_up:    (E, 2*I, C)  rows [0, I) gate projection, rows [I, 2I) up projection
    w_down:       (E, C, I)
    topk_ids:     (N, K)       the K experts each token is routed to
    topk_weights: (N, K)       their routing weights, as the model's router gives them
    out:          (N, C)       x.dtype

    out[n] = sum_k topk_weights[n, k] * w_down[e] @ (silu(w_gate[e] @ x[n]) * (w_up[e] @ x[n])),
    with e = topk_ids[n, k], accumulated in float32.

The Triton version works on the N*K (token, expert) "pairs" (pair p = n*K + k):
    1. bookkeeping (torch): sort pairs by expert and pad each expert's group to whole blocks of
       BLOCK_M pairs, so every block of rows belongs to one expert (vLLM's moe_align_block_size);
    2. kernel 1: grouped matmul x @ [gate|up]^T with silu(gate) * up fused -> (N*K, I);
    3. kernel 2: grouped matmul of that with w_down^T, times the routing weight -> (N*K, C);
    4. sum each token's K rows.
Experts that receive no token get no block, so their weights are never read.

Weight-only int8: instead of float stacks, fused_moe also takes stacks quantized per output channel
(any object with an int8 `qweight` (E, N, K) and `scales` (E, N), as quantize.QuantizedStack has).
The kernels then read int8 tiles, widen them to the activation dtype for the matmul, and multiply
each output column by its scale once, after the sum over K: x @ (q * s)^T = (x @ q^T) * s.
"""

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .common import DTYPES, block_rows, device_ok, dot_precision, matmul_configs


# ----------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------
def fused_moe_reference(x, w_gate_up, w_down, topk_ids, topk_weights):
    """Plain-torch loop over the experts that received tokens (int8 stacks: dequantized first)."""
    w_gate_up, w_down = dequantized(w_gate_up), dequantized(w_down)
    I = w_down.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # (N, C)
    for e in topk_ids.unique().tolist():
        token, slot = torch.where(topk_ids == e)  # tokens routed to e, and in which of their K slots
        xe = x[token].float()  # (n_e, C)
        gate_up = xe @ w_gate_up[e].float().T  # (n_e, 2I)
        h = F.silu(gate_up[:, :I]) * gate_up[:, I:]  # (n_e, I)
        y = h @ w_down[e].float().T  # (n_e, C)
        out.index_add_(0, token, y * topk_weights[token, slot, None].float())
    return out.to(x.dtype)


def int8_stack(w) -> bool:
    """Is `w` a stack quantized per output channel (int8 qweight (E, N, K), scales (E, N))?"""
    return getattr(w, "qweight", None) is not None and w.qweight.dtype == torch.int8 and w.scales.dim() == 2


def dequantized(w):
    return w.qweight.float() * w.scales.float()[..., None] if int8_stack(w) else w


# ----------------------------------------------------------------------------------------
# Bookkeeping: group the (token, expert) pairs by expert, in blocks of BLOCK_M
# ----------------------------------------------------------------------------------------
def _group_pairs_by_expert(topk_ids, num_experts, block_m):
    """Returns (pair_ids, block_expert).

    pair_ids: (num_blocks * block_m,) int32, the pairs sorted by expert, each expert's group
        padded to a multiple of block_m with the filler value N*K.
    block_expert: (num_blocks,) int32, the expert of each block; -1 for unused trailing blocks.
    num_blocks is an upper bound computed on the host without reading the GPU (no sync).
    """
    ids = topk_ids.flatten().long()  # (P,) expert of each pair, P = N*K
    P, E, device = ids.numel(), num_experts, ids.device
    # (E,) pairs per expert (not torch.bincount: on CUDA it reads the max back to the host)
    counts = torch.zeros(E, dtype=torch.long, device=device).index_add_(0, ids, torch.ones_like(ids))
    padded = (counts + block_m - 1) // block_m * block_m  # (E,) rounded up to whole blocks
    padded_end = torch.cumsum(padded, 0)  # (E,) end of each expert's padded group
    padded_begin = padded_end - padded  # (E,)
    group_begin = torch.cumsum(counts, 0) - counts  # (E,) same, without padding

    order = torch.argsort(ids, stable=True)  # (P,) pair ids sorted by expert
    expert = ids[order]  # (P,)
    rank = torch.arange(P, device=device) - group_begin[expert]  # (P,) position inside its group

    # At most min(E, P) experts are used, each wasting fewer than block_m slots.
    num_blocks = triton.cdiv(P + min(E, P) * (block_m - 1), block_m)
    pair_ids = torch.full((num_blocks * block_m,), P, dtype=torch.int32, device=device)
    pair_ids[padded_begin[expert] + rank] = order.to(torch.int32)

    # Block b covers slots [b*block_m, (b+1)*block_m): its expert is the first whose padded
    # group ends after the block's first slot; past the last group there is none (-1).
    block_first = torch.arange(num_blocks, device=device) * block_m
    block_expert = torch.searchsorted(padded_end, block_first, right=True)
    block_expert = torch.where(block_expert < E, block_expert, -1).to(torch.int32)
    return pair_ids, block_expert


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------
@triton.autotune(configs=matmul_configs(), key=["BLOCK_M", "HIDDEN", "INTER"])
@triton.jit(do_not_specialize=["num_pairs"])  # changes with the batch: one compiled variant
def _gate_up_kernel(
    X, W, Inter, PairIds, BlockExpert, Scales,
    num_pairs, TOPK, HIDDEN, INTER,
    sx_n, sx_h, sw_e, sw_r, sw_h, si_p, si_i, ss_e,
    DOT_PRECISION: tl.constexpr, W_INT8: tl.constexpr,  # W_INT8: int8 weights, Scales (E, 2I)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Inter[p, :] = silu(x[n] @ w_gate[e]^T) * (x[n] @ w_up[e]^T) for a block of pairs of expert e."""
    pid_m = tl.program_id(0)  # block of BLOCK_M pairs, all routed to one expert
    pid_n = tl.program_id(1)  # block of BLOCK_N intermediate columns
    e = tl.load(BlockExpert + pid_m).to(tl.int64)
    if e < 0:  # unused trailing block
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(PairIds + offs_m)  # (BLOCK_M,) pair ids; num_pairs marks filler rows
    is_pair = pair < num_pairs
    token = pair // TOPK  # (BLOCK_M,) the token row of each pair
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) intermediate columns
    is_col = offs_n < INTER
    offs_k = tl.arange(0, BLOCK_K)

    # x rows (BLOCK_M, BLOCK_K) and the gate / up weights, read transposed (BLOCK_K, BLOCK_N);
    # the up rows sit INTER rows below the gate rows.
    x_ptrs = X + token[:, None] * sx_n + offs_k[None, :] * sx_h
    g_ptrs = W + e * sw_e + offs_n[None, :] * sw_r + offs_k[:, None] * sw_h
    u_ptrs = g_ptrs + INTER * sw_r

    gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, HIDDEN, BLOCK_K):
        in_k = offs_k + k0 < HIDDEN
        xt = tl.load(x_ptrs, mask=is_pair[:, None] & in_k[None, :], other=0.0)
        wg = tl.load(g_ptrs, mask=in_k[:, None] & is_col[None, :], other=0.0).to(xt.dtype)
        wu = tl.load(u_ptrs, mask=in_k[:, None] & is_col[None, :], other=0.0).to(xt.dtype)
        gate = tl.dot(xt, wg, gate, input_precision=DOT_PRECISION)
        up = tl.dot(xt, wu, up, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * sx_h
        g_ptrs += BLOCK_K * sw_h
        u_ptrs += BLOCK_K * sw_h

    if W_INT8:  # one scale per output row of w_gate_up: the gate's, then the up's
        gate *= tl.load(Scales + e * ss_e + offs_n, mask=is_col, other=0.0).to(tl.float32)[None, :]
        up *= tl.load(Scales + e * ss_e + INTER + offs_n, mask=is_col, other=0.0).to(tl.float32)[None, :]

    # Epilogue: SiLU(gate) * up, stored at the pair's own row.
    h = gate / (1.0 + tl.exp(-gate)) * up  # (BLOCK_M, BLOCK_N)
    i_ptrs = Inter + pair[:, None].to(tl.int64) * si_p + offs_n[None, :] * si_i
    tl.store(i_ptrs, h.to(Inter.dtype.element_ty), mask=is_pair[:, None] & is_col[None, :])


@triton.autotune(configs=matmul_configs(), key=["BLOCK_M", "HIDDEN", "INTER"])
@triton.jit(do_not_specialize=["num_pairs"])  # changes with the batch: one compiled variant
def _down_kernel(
    Inter, W, Out, PairIds, BlockExpert, RouteWeight, Scales,
    num_pairs, HIDDEN, INTER,
    si_p, si_i, sw_e, sw_h, sw_i, so_p, so_h, ss_e,
    DOT_PRECISION: tl.constexpr, W_INT8: tl.constexpr,  # W_INT8: int8 weights, Scales (E, C)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Out[p, :] = route_weight[p] * Inter[p] @ w_down[e]^T for a block of pairs of expert e."""
    pid_m = tl.program_id(0)  # block of BLOCK_M pairs, all routed to one expert
    pid_n = tl.program_id(1)  # block of BLOCK_N hidden columns
    e = tl.load(BlockExpert + pid_m).to(tl.int64)
    if e < 0:
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(PairIds + offs_m)  # (BLOCK_M,)
    is_pair = pair < num_pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) hidden columns
    is_col = offs_n < HIDDEN
    offs_k = tl.arange(0, BLOCK_K)

    a_ptrs = Inter + pair[:, None].to(tl.int64) * si_p + offs_k[None, :] * si_i  # (BLOCK_M, BLOCK_K)
    w_ptrs = W + e * sw_e + offs_n[None, :] * sw_h + offs_k[:, None] * sw_i  # (BLOCK_K, BLOCK_N)

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, INTER, BLOCK_K):
        in_k = offs_k + k0 < INTER
        a = tl.load(a_ptrs, mask=is_pair[:, None] & in_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=in_k[:, None] & is_col[None, :], other=0.0).to(a.dtype)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * si_i
        w_ptrs += BLOCK_K * sw_i

    if W_INT8:  # one scale per output column (a row of w_down)
        acc *= tl.load(Scales + e * ss_e + offs_n, mask=is_col, other=0.0).to(tl.float32)[None, :]

    # Epilogue: scale by the routing weight of each pair (float32 output, summed later).
    route = tl.load(RouteWeight + pair, mask=is_pair, other=0.0).to(tl.float32)  # (BLOCK_M,)
    o_ptrs = Out + pair[:, None].to(tl.int64) * so_p + offs_n[None, :] * so_h
    tl.store(o_ptrs, acc * route[:, None], mask=is_pair[:, None] & is_col[None, :])


# ----------------------------------------------------------------------------------------
# Python wrappers
# ----------------------------------------------------------------------------------------
def supports(x, w_gate_up):
    """True when fused_moe can take these tensors (else the caller uses its torch path): float
    stacks in x's dtype, or stacks quantized per output channel to int8."""
    if int8_stack(w_gate_up):
        w_gate_up = w_gate_up.qweight
    elif getattr(w_gate_up, "qweight", None) is not None:  # quantized otherwise (int4): not here
        return False
    return (
        device_ok(x)
        and x.dim() == 2
        and w_gate_up.dim() == 3
        and x.dtype in DTYPES
        and w_gate_up.dtype in (x.dtype, torch.int8)
        and w_gate_up.device == x.device
        and w_gate_up.shape[2] == x.shape[1]
        and w_gate_up.shape[1] % 2 == 0
    )


def fused_moe(x, w_gate_up, w_down, topk_ids, topk_weights):
    """Fused MoE feed-forward; same result as fused_moe_reference. Returns (N, C) in x.dtype.

    Inside torch.compile it runs as one custom op, opaque to the compiler and captured whole by a
    CUDA graph (it has no host synchronisation and no data-dependent shapes)."""
    scales = (w_gate_up.scales, w_down.scales) if int8_stack(w_gate_up) else (None, None)
    if int8_stack(w_gate_up):
        w_gate_up, w_down = w_gate_up.qweight, w_down.qweight
    if torch.compiler.is_compiling():
        return _fused_moe_op(x, w_gate_up, w_down, topk_ids, topk_weights, *scales)
    return _fused_moe(x, w_gate_up, w_down, topk_ids, topk_weights, *scales)


def _fused_moe(x, w_gate_up, w_down, topk_ids, topk_weights, gate_up_scales=None, down_scales=None):
    N, C = x.shape
    E, I = w_down.shape[0], w_down.shape[2]
    K = topk_ids.shape[1]
    assert w_gate_up.shape == (E, 2 * I, C) and w_down.shape == (E, C, I)
    assert topk_ids.shape == topk_weights.shape == (N, K)
    w_int8 = gate_up_scales is not None
    assert (w_gate_up.dtype, w_down.dtype) == ((torch.int8,) * 2 if w_int8 else (x.dtype,) * 2)
    if w_int8:
        assert gate_up_scales.shape == (E, 2 * I) and down_scales.shape == (E, C)
    else:
        gate_up_scales = down_scales = x.new_empty(1, 1)  # not read
    P = N * K  # number of (token, expert) pairs
    if P == 0:
        return torch.zeros_like(x)

    # 1. Group the pairs by expert in blocks of BLOCK_M rows.
    block_m = block_rows(P / E)  # the pairs per expert: few in a decode step
    pair_ids, block_expert = _group_pairs_by_expert(topk_ids, E, block_m)
    num_blocks = block_expert.numel()
    route = topk_weights.contiguous().view(-1)  # (P,) routing weight of each pair

    # 2. gate/up matmul + SiLU(gate) * up  ->  (P, I), in the activation dtype.
    inter = torch.empty(P, I, dtype=x.dtype, device=x.device)
    _gate_up_kernel[lambda meta: (num_blocks, triton.cdiv(I, meta["BLOCK_N"]))](
        x, w_gate_up, inter, pair_ids, block_expert, gate_up_scales,
        P, K, C, I,
        *x.stride(), *w_gate_up.stride(), *inter.stride(), gate_up_scales.stride(0),
        DOT_PRECISION=dot_precision(x.dtype), W_INT8=w_int8, BLOCK_M=block_m,
    )

    # 3. down matmul, times the routing weight  ->  (P, C), float32.
    out_pairs = torch.empty(P, C, dtype=torch.float32, device=x.device)
    _down_kernel[lambda meta: (num_blocks, triton.cdiv(C, meta["BLOCK_N"]))](
        inter, w_down, out_pairs, pair_ids, block_expert, route, down_scales,
        P, C, I,
        *inter.stride(), *w_down.stride(), *out_pairs.stride(), down_scales.stride(0),
        DOT_PRECISION=dot_precision(x.dtype), W_INT8=w_int8, BLOCK_M=block_m,
    )

    # 4. Each token sums its K expert outputs.
    return out_pairs.view(N, K, C).sum(dim=1).to(x.dtype)


@torch.library.custom_op("qwen_kernels::fused_moe", mutates_args=())
def _fused_moe_op(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, topk_ids: torch.Tensor,
                  topk_weights: torch.Tensor, gate_up_scales: Optional[torch.Tensor] = None,
                  down_scales: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _fused_moe(x, w_gate_up, w_down, topk_ids, topk_weights, gate_up_scales, down_scales)


@_fused_moe_op.register_fake
def _(x, w_gate_up, w_down, topk_ids, topk_weights, gate_up_scales=None, down_scales=None):
    return x.new_empty(x.shape)


# ----------------------------------------------------------------------------------------
# The model files' seam
# ----------------------------------------------------------------------------------------
def model_experts(fallback, cuda_only: bool = True):
    """A function for the MoE files' `Experts.experts_function`: fused_moe where it takes the tensors
    (on CUDA only, unless cuda_only is False: then also Triton's CPU interpreter), else `fallback`."""
    def experts_function(x, w_gate_up, w_down, topk_ids, topk_weights):
        if (cuda_only and not x.is_cuda) or not supports(x, w_gate_up):
            return fallback(x, w_gate_up, w_down, topk_ids, topk_weights)
        return fused_moe(x, w_gate_up, w_down, topk_ids, topk_weights)
    return experts_function
