"""Kernels for the Qwen reference model, each beside the plain-torch reference it must equal.

The package is called qwen_kernels, not kernels: Hugging Face's kernel hub owns that import name
(transformers >= 5.25 depends on it and imports it by name), and a folder of ours called kernels/
would shadow it from the repository root.

Triton (GPU; on CPU through Triton's interpreter, for the tests):
qwen_kernels.attention  causal GQA attention over a KV cache: the semantics, attention_reference,
                        attention (dispatch; custom ops inside torch.compile), supports
qwen_kernels.prefill    prefill_attention, a FlashAttention-style kernel for any number of query rows
qwen_kernels.decode     decode_attention, flash-decoding for one query row over a long cache
qwen_kernels.moe        fused mixture-of-experts feed-forward: fused_moe_reference, fused_moe, supports
qwen_kernels.int4       weight-only int4 matmul (w4a16): linear_int4_reference, linear_int4, supports
qwen_kernels.common     what they share: the interpreter switch, dtypes, device and argument checks

C++ (CPU):
qwen_kernels.cpu        matrix-vector products for decoding with bf16, int8 and int4 weights
                        (qwen_kernels/cpu.cpp, built on first use; used by quantize.py and generate.py)

Import the module you need (`from qwen_kernels import attention`): this package imports none of
them, so that qwen_kernels.cpu works without triton installed. The model files call `supports(...)`
first and, when it says False, take their own torch path (SDPA for attention, experts_grouped or
experts_gathered for the experts). Without a GPU the Triton kernels run in Triton's CPU interpreter
if TRITON_INTERPRET=1 is set before they are imported (fp32/fp16 only). The benchmarks of the
kernels against torch are `python bench.py kernels`.
"""
