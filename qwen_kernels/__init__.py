"""Fast paths for the three model files, each beside the plain-torch reference it must equal, and
`install`, the one call that puts them into a loaded model.

    import qwen_kernels
    qwen_kernels.install(model)            # "auto": what this machine runs fastest

The package is called qwen_kernels, not kernels: Hugging Face's kernel hub owns that import name
(transformers >= 5.25 depends on it and imports it by name), and a folder of ours called kernels/
would shadow it from the repository root.

The model files name their seams once, and each module here fills some of them:
  Attention.attention_function   qwen_kernels.attention (Triton, CUDA), qwen_kernels.cpu (decode on CPU)
  Experts.experts_function       qwen_kernels.moe (Triton, CUDA), qwen_kernels.experts (torch)
  the nn.Linear layers           qwen_kernels.cpu.Linear (bf16 matrix-vector products on CPU);
                                 quantize.py's int8/int4 layers call qwen_kernels.cpu and .int4

Triton (GPU; on CPU through Triton's interpreter, for the tests):
qwen_kernels.attention  causal GQA attention over a KV cache: the semantics, attention_reference,
                        attention (dispatch; custom ops inside torch.compile), supports
qwen_kernels.prefill    prefill_attention, a FlashAttention-style kernel for any number of query rows
qwen_kernels.decode     decode_attention, flash-decoding for one query row over a long cache
qwen_kernels.moe        fused mixture-of-experts feed-forward: fused_moe_reference, fused_moe, supports
qwen_kernels.int4       weight-only int4 matmul (w4a16): linear_int4_reference, linear_int4, supports
qwen_kernels.common     what they share: the interpreter switch, dtypes, device and argument checks
Torch:
qwen_kernels.experts    the routed experts as grouped matmuls (experts_grouped), or gathered for
                        torch.compile (experts_gathered)
C++ (CPU):
qwen_kernels.cpu        matrix-vector products for decoding with bf16, int8 and int4 weights, and a
                        decode attention (cpu_matvec.cpp and cpu_attention.cpp, built on first use)

Importing the package imports none of them (install imports what it uses), so that qwen_kernels.cpu
works without triton installed. Without a GPU the Triton kernels run in Triton's CPU interpreter if
TRITON_INTERPRET=1 is set before they are imported (fp32/fp16 only). The benchmarks of the kernels
against torch are `python bench.py kernels`.
"""
import importlib
import sys

import torch
import torch.nn as nn

KERNELS = ("auto", "triton", "torch", "reference")


def triton_module(name: str):
    """qwen_kernels.<name> when triton is installed, else None (any other error is raised)."""
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ImportError as e:
        if (e.name or "").partition(".")[0] != "triton":
            raise
        return None


def install(model: nn.Module, kernels: str = "auto") -> nn.Module:
    """Put the fast paths into `model` (any class of the three model files; quantized or sharded too),
    in place; returns it. Calling it again with another choice replaces the last one.

    "auto": the Triton kernels on CUDA (attention, fused MoE; quantize.py's int4 layers), the C++
      kernels on the CPU (bf16 matrix-vector products and the decode attention; quantize.py's int8 and
      int4 layers), torch's grouped experts where neither runs.
    "triton": the Triton kernels wherever they take the tensors, Triton's CPU interpreter too (for the
      tests); the C++ kernels for the linear layers on CPU.
    "torch": torch's own paths: SDPA, the grouped (or, compiled, gathered) experts, F.linear.
    "reference": the model files' spelled-out references (reference_attention, experts_reference)
      and quantize.py's dequantize-then-matmul layers.
    """
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be {', '.join(KERNELS[:-1])} or {KERNELS[-1]}, not {kernels!r}")
    from . import cpu, experts
    attention = moe = None
    if kernels == "triton" or (kernels == "auto" and torch.cuda.is_available()):  # (triton's import: 1 s)
        attention, moe = triton_module("attention"), triton_module("moe")
        if kernels == "triton" and attention is None:
            raise ValueError("kernels='triton' needs triton (pip install triton)")
    cuda_only = kernels == "auto"  # "triton": the interpreter on CPU too
    for module in model.modules():
        cls, file = type(module), sys.modules[type(module).__module__]
        if hasattr(cls, "attention_function"):  # the model file's Attention
            fn = file.reference_attention if kernels == "reference" else cls.attention_function  # (SDPA)
            if kernels == "auto":
                fn = cpu.model_attention(fn)
            if attention is not None:
                fn = attention.model_attention(fn, cuda_only)
            module.attention_function = fn
        elif hasattr(cls, "experts_function"):  # the MoE files' Experts
            fn = file.experts_reference if kernels == "reference" else experts.torch_experts
            if moe is not None:
                fn = moe.model_experts(fn, cuda_only)
            module.experts_function = fn
        elif isinstance(module, nn.Linear) and cls in (nn.Linear, cpu.Linear):
            cpu_fast = kernels in ("auto", "triton") and module.weight.dtype == torch.bfloat16
            module.__class__ = cpu.Linear if cpu_fast and module.weight.is_cpu else nn.Linear
        elif isinstance(getattr(module, "kernels", None), str):  # quantize.py's layers choose by this
            module.kernels = kernels
    model.kernels = kernels
    return model
