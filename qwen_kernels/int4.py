"""Weight-only int4 matrix multiply (w4a16): a plain-torch reference and a Triton kernel.

    y (M, N) = x (M, K) @ W^T + bias,   W[n, k] = (q[n, k] - 8) * s[n, k // G] + z[n, k // G]

with W stored as quantize.py's Int4Linear stores it:
    qweight:      (N, K/2) uint8, two 4-bit q per byte in llama.cpp's Q4_0 order: inputs 32c .. 32c+31
                  of a row are the 16 bytes 16c .. 16c+15, byte j holding input 32c + j in its low
                  nibble and input 32c + 16 + j in its high one (quantize.pack_int4)
    scales/zeros: (N, K/G) in x's dtype, one scale s and zero point z per group of G inputs

Each program computes a (BLOCK_M, BLOCK_N) tile of y. For each BLOCK_K inputs it reads the bytes that
hold them (a byte twice: once per nibble, from cache the second time), takes the nibble, dequantizes
in float32 and rounds to x's dtype exactly as the reference does, then multiplies on the tensor cores
with float32 sums. The weights cross the memory bus as 4-bit numbers, a quarter of bf16's bytes,
which is what sets the speed of a decode step.
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
def linear_int4_reference(x, qweight, scales, zeros, group_size, bias=None):
    """Dequantize the whole matrix in float32, round it to x's dtype, then F.linear."""
    N, half = qweight.shape
    b = qweight.reshape(N, half // 16, 1, 16)                                  # (N, K/32, 1, j)
    q = torch.cat((b & 15, b >> 4), dim=-2).reshape(N, 2 * half).float()        # (N, K) in [0, 15]
    groups = q.view(N, -1, group_size)                                          # (N, K/G, G)
    w = (groups - 8) * scales.float()[..., None] + zeros.float()[..., None]
    return F.linear(x, w.reshape(N, 2 * half).to(x.dtype), bias)


# ----------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------
@triton.autotune(configs=matmul_configs(), key=["BLOCK_M", "N", "K", "GROUP"])
@triton.jit(do_not_specialize=["M"])  # changes with the batch and prompt: one compiled variant
def _int4_matmul_kernel(
    X, Q, S, Z, Bias, Y,
    M, N, K, sx_m, sy_m,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Y[m, n] = sum_k X[m, k] * W[n, k] (+ Bias[n]) for a (BLOCK_M, BLOCK_N) tile."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) rows of x and y
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output columns = weight rows
    is_row = offs_m < M
    is_col = offs_n < N
    n64 = offs_n.to(tl.int64)

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,) inputs
        in_k = k < K
        xt = tl.load(X + offs_m[:, None] * sx_m + k[None, :], mask=is_row[:, None] & in_k[None, :], other=0.0)
        # Where input k lives: byte 16 (k // 32) + k % 16 of its row, low nibble for k % 32 < 16.
        byte = (k // 32) * 16 + k % 16
        shift = ((k // 16) % 2) * 4
        w_mask = in_k[:, None] & is_col[None, :]
        packed = tl.load(Q + n64[None, :] * (K // 2) + byte[:, None], mask=w_mask, other=0)  # (BK, BN) uint8
        q = ((packed.to(tl.int32) >> shift[:, None]) & 15).to(tl.float32)
        group = n64[None, :] * (K // GROUP) + (k // GROUP)[:, None]
        s = tl.load(S + group, mask=w_mask, other=0.0).to(tl.float32)
        z = tl.load(Z + group, mask=w_mask, other=0.0).to(tl.float32)
        w = ((q - 8.0) * s + z).to(xt.dtype)  # (BLOCK_K, BLOCK_N) W^T, rounded as the reference rounds
        acc = tl.dot(xt, w, acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=is_col, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs_m[:, None] * sy_m + offs_n[None, :], acc.to(Y.dtype.element_ty),
             mask=is_row[:, None] & is_col[None, :])


# ----------------------------------------------------------------------------------------
# Python wrappers
# ----------------------------------------------------------------------------------------
def supports(x, qweight) -> bool:
    """True when linear_int4 can take x (M, K) and this packed weight (else: the reference)."""
    return (device_ok(x) and x.dim() == 2 and x.dtype in DTYPES and qweight.device == x.device
            and qweight.dtype == torch.uint8 and qweight.shape[1] * 2 == x.shape[1] and x.shape[1] % 32 == 0)


def linear_int4(x, qweight, scales, zeros, group_size: int, bias=None):
    """x (M, K) @ W^T (+ bias) -> (M, N) in x's dtype; the same result as linear_int4_reference.
    Inside torch.compile it runs as one custom op (opaque to the compiler, captured by CUDA graphs)."""
    if torch.compiler.is_compiling():
        return _linear_int4_op(x, qweight, scales, zeros, group_size, bias)
    return _linear_int4(x, qweight, scales, zeros, group_size, bias)


def _linear_int4(x, qweight, scales, zeros, group_size, bias=None):
    M, K = x.shape
    N = qweight.shape[0]
    assert qweight.shape == (N, K // 2) and K % group_size == 0 and group_size % 32 == 0
    assert scales.shape == zeros.shape == (N, K // group_size)
    x, qweight, scales, zeros = x.contiguous(), qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    block_m = block_rows(M)
    _int4_matmul_kernel[lambda meta: (triton.cdiv(M, block_m), triton.cdiv(N, meta["BLOCK_N"]))](
        x, qweight, scales, zeros, bias if bias is not None else y, y,
        M, N, K, x.stride(0), y.stride(0),
        GROUP=group_size, HAS_BIAS=bias is not None, DOT_PRECISION=dot_precision(x.dtype), BLOCK_M=block_m,
    )
    return y


@torch.library.custom_op("qwen_kernels::linear_int4", mutates_args=())
def _linear_int4_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _linear_int4(x, qweight, scales, zeros, group_size, bias)


@_linear_int4_op.register_fake
def _(x, qweight, scales, zeros, group_size, bias=None):
    return x.new_empty(x.shape[0], qweight.shape[0])
