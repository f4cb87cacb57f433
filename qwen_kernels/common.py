"""What the kernel files share: the interpreter switch, the dtypes, the device check, argument checks,
the tiles of the matrix-multiply kernels.

Each name here is written once and used by attention.py, prefill.py, decode.py, moe.py and int4.py.
"""
import math
import os

import torch
import triton

# Triton decides at decoration time whether a kernel is compiled for the GPU or run by its CPU
# interpreter (TRITON_INTERPRET=1). Remember which one the kernel modules were built for.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the kernels take

_BF16_TENSOR_CORES = None  # asked once (supports() runs on every call of a layer)


@torch.compiler.assume_constant_result  # torch.compile: run while tracing, kept as a constant
def gpu_has_bf16() -> bool:
    """bf16 tensor cores need compute capability 8.0 (Ampere) or newer."""
    global _BF16_TENSOR_CORES
    if _BF16_TENSOR_CORES is None:
        _BF16_TENSOR_CORES = torch.cuda.get_device_capability() >= (8, 0)
    return _BF16_TENSOR_CORES


def device_ok(x: torch.Tensor) -> bool:
    """Can a kernel run on x's device in x's dtype? On CUDA (bf16 from compute capability 8.0 on), or
    in the CPU interpreter while it is switched on (not bf16: the interpreter computes it wrongly)."""
    if INTERPRET:
        return os.environ.get("TRITON_INTERPRET") == "1" and x.dtype != torch.bfloat16
    return x.is_cuda and (x.dtype != torch.bfloat16 or gpu_has_bf16())


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: float32 stays exact (IEEE), 16-bit inputs use the tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


def attention_args(q, k, v, pad, window, scale):
    """Argument checks shared by the attention kernels; returns (pad, window, qk_scale)."""
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
    qk_scale = scale * math.log2(math.e)  # the kernels use exp2
    return pad, window, qk_scale


def block_rows(rows: float) -> int:
    """BLOCK_M of the matrix-multiply kernels (moe.py's grouped matmuls, int4.py) for `rows` rows per
    group of them: small for a decode step, larger for a prompt; tl.dot needs at least 16."""
    return 16 if rows <= 16 else 32 if rows <= 32 else 64


def matmul_configs():
    """The autotuned tiles (BLOCK_N outputs, BLOCK_K inputs) of those kernels, BLOCK_M being chosen
    by block_rows on the host; one small tile in the interpreter, which cannot benchmark."""
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_N": 32, "BLOCK_K": 128}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 128, "BLOCK_K": 128}, num_warps=8, num_stages=3),
    ]
