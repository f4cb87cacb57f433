"""Measure generation speed: prefill and decode tokens/s, memory, and decode against the roofline.

    python bench.py --preset qwen2-0.5b --device cuda --compile
    python bench.py --preset cpu-qwen2 --compare transformers
    python bench.py --model ~/.cache/qwen-testdata/qwen2.5-coder-0.5b-instruct --compare transformers
    python bench.py --plot runs.jsonl        # runs.svg: decode speed of --json records against their roofline
    python bench.py kernels                  # the Triton kernels against torch (see KERNELS_DOC below)

Presets use the published shapes on random weights (no download); the cpu-* presets keep the real
widths with fewer layers so they fit a laptop. Batch-1 decoding reads every weight once per token,
so its speed limit is memory bandwidth:

    roofline tokens/s = copy bandwidth (bytes/s) / bytes read per decoded token

where the bytes read are all weights except the embedding table (one row is looked up; tied
embeddings are read in full by lm_head), only the K active experts of each MoE layer at batch 1,
plus the KV cache. The copy bandwidth is measured in the same run (read + write of a large buffer).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import checkpoint
import generate
import qwen_kernels
import tokenizer

# Published shapes (config.json of each checkpoint), random weights.
PRESETS = {
    "qwen2-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                       num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                       max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True),
    "qwen2-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                     num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                     max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=False),
    "qwen1.5-moe-a2.7b": dict(model_type="qwen2_moe", vocab_size=151936, hidden_size=2048,
                              intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
                              num_key_value_heads=16, num_experts=60, num_experts_per_tok=4,
                              moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
                              norm_topk_prob=False, max_position_embeddings=8192, rope_theta=1e6,
                              tie_word_embeddings=False),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                          norm_topk_prob=True, max_position_embeddings=40960, rope_theta=1e6,
                          tie_word_embeddings=False),
}
CPU_LAYERS = {"cpu-qwen2": ("qwen2-0.5b", 4), "cpu-qwen1.5-moe": ("qwen1.5-moe-a2.7b", 2),
              "cpu-qwen3-moe": ("qwen3-30b-a3b", 2)}
for _name, (_base, _layers) in CPU_LAYERS.items():
    PRESETS[_name] = {**PRESETS[_base], "num_hidden_layers": _layers}
PRESETS["tiny"] = dict(model_type="qwen2", vocab_size=256, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=1024, tie_word_embeddings=True)

# transformers' classes for --compare, by model_type
HF_CLASSES = {"qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
              "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
              "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
              "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------

def model_class(module):
    """The causal-LM class and config class a model file defines."""
    lm = [v for k, v in vars(module).items() if k.endswith("ForCausalLM") and isinstance(v, type)]
    cfg = [v for k, v in vars(module).items() if k.endswith("Config") and isinstance(v, type)
           and hasattr(v, "from_dict")]
    return lm[0], cfg[0]


def random_model(preset: dict, device, dtype, seed=0):
    """Our model with random weights of the preset's shapes (std 0.02, norms 1), on device."""
    module = checkpoint.model_module(preset["model_type"])
    lm_cls, cfg_cls = model_class(module)
    config = cfg_cls.from_dict(preset)
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = lm_cls(config).to(dtype)  # cast while empty: qwen3-30b-a3b is 61 GB in bf16, 122 in fp32
    model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dtype.is_floating_point:
                if "norm" in name:
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02)
        if getattr(config, "tie_word_embeddings", False):
            model.lm_head.weight = model.model.embed_tokens.weight
    # The RoPE inverse frequencies are a buffer, not a weight: recompute them.
    model.model.rotary_emb.inv_freq = module.rope_frequencies(config)[0].to(device)
    return model.eval()


def transformers_twin(model, preset: dict | None, folder: str | None, device, dtype):
    """The same weights in transformers, SDPA attention. For a preset the two models share the
    weight tensors, so a preset that fills most of a GPU still fits once."""
    import transformers
    if folder is not None:
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype,
                                                               attn_implementation="sdpa")
        return hf.to(device).eval()
    cfg_name, lm_name = HF_CLASSES[preset["model_type"]]
    config = getattr(transformers, cfg_name)(**{k: v for k, v in preset.items() if k != "model_type"})
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = getattr(transformers, lm_name)(config).to(dtype)
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False, assign=True)  # shares storage
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise SystemExit(f"cannot share the weights with transformers: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    if config.tie_word_embeddings:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    rotary = hf.model.rotary_emb  # its buffers are not weights: recompute them (presets use plain RoPE)
    rotary.inv_freq = type(rotary).compute_default_rope_parameters(config)[0].to(device)
    rotary.original_inv_freq = rotary.inv_freq.clone()
    return hf.eval()


# ----------------------------------------------------------------------------------------------
# Roofline
# ----------------------------------------------------------------------------------------------

def copy_bandwidth(device, megabytes: int = 512) -> float:
    """Bytes per second moved (read + write) by a large tensor copy on device: the practical limit."""
    n = megabytes * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * src.element_size() / best


def decode_bytes_per_token(model, batch_size: int = 1, context: int = 0) -> int:
    """Bytes read from memory for one decode step: weights, in their stored size (quantized ones as
    int8 / int4 plus their scales), the embedding table excluded unless lm_head reads it (tied), MoE
    experts: only the active ones; plus the KV cache of `context` tokens.

    Active experts: K at batch 1; for a batch, the expected number of distinct experts when each
    row picks K of E at random, E * (1 - (1 - K/E) ** batch_size)."""
    config = model.config
    def tensors(module):
        return list(module.parameters()) + list(module.buffers())
    head = {id(t) for t in tensors(model.lm_head)}
    # the embedding table (float or quantized), unless lm_head reads it whole: one row per token
    rows_only = {id(t) for t in tensors(model.model.embed_tokens) if id(t) not in head}
    seen, total = set(), 0
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if id(p) in seen or name.endswith("inv_freq") or ".cache." in name or not p.numel():
            continue
        seen.add(id(p))
        nbytes = p.numel() * p.element_size()
        if id(p) in rows_only:  # (quantized or not) one row per token
            nbytes = nbytes // p.shape[0] * batch_size
        elif ".mlp.experts." in name:
            experts, k = p.shape[0], config.num_experts_per_tok
            active = experts * (1 - (1 - k / experts) ** batch_size)
            nbytes = round(nbytes * active / experts)
        total += nbytes
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * context * batch_size
    return total + kv * model.dtype.itemsize


# ----------------------------------------------------------------------------------------------
# Timed runs
# ----------------------------------------------------------------------------------------------

def reset_peak_memory(device):
    """Start generate.peak_memory_gb's count again from what is held now (on a CPU: Linux only)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the resident high-water mark to the current resident size
    except OSError:
        pass


def mean_of_runs(runs: list[dict]) -> dict:
    """The mean of each speed over the timed runs (llama-bench reports the mean of its -r runs too),
    with the decode speeds of every run kept beside it."""
    return {"prefill_tok_s": sum(r["prefill_tok_s"] for r in runs) / len(runs),
            "decode_tok_s": sum(r["decode_tok_s"] for r in runs) / len(runs),
            "decode_runs": [round(r["decode_tok_s"], 2) for r in runs]}


def run_ours(model, prompts, new_tokens, compile: bool, repeats: int = 3):
    device = model.device
    # Warm-up: a short generation with the same shapes. Compiled, a whole one: it compiles the
    # step and captures its CUDA graph for the timed run's cache length.
    t0 = time.perf_counter()
    for _ in generate.generate_tokens(model, prompts, new_tokens if compile else min(new_tokens, 8),
                                      compile=compile):
        pass
    synchronize(device)
    warmup_s = time.perf_counter() - t0
    reset_peak_memory(device)  # the timed runs' peak (not the loading's, nor the copy probe's)
    runs = []
    for _ in range(repeats):
        stats = {}
        for _ in generate.generate_tokens(model, prompts, new_tokens, compile=compile, stats=stats):
            pass
        synchronize(device)
        runs.append({"prefill_tok_s": stats["prompt_tokens"] / stats["prefill_s"],
                     "decode_tok_s": len(prompts) * (stats["new_tokens"] - 1) / stats["decode_s"]})
    return {**mean_of_runs(runs), "peak_memory_gb": generate.peak_memory_gb(device), "warmup_s": warmup_s}


def communication_share(model, prompts, new_tokens: int, compile: bool) -> float:
    """Under torchrun: the share of the decode steps' time that this rank spends in collectives
    (launching them and waiting for them: all-reduces, the logits' all-gather, the token's broadcast)."""
    from torch.profiler import ProfilerActivity, profile
    steps = generate.generate_tokens(model, prompts, new_tokens, compile=compile)
    next(steps)                                                       # prefill, then profile the decode
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in steps:
            pass
        synchronize(model.device)
        wall = time.perf_counter() - t0
    waiting = sum(e.self_cpu_time_total for e in prof.key_averages()
                  if e.key.startswith(("c10d::", "_c10d_functional::")))  # microseconds
    return waiting / 1e6 / wall


def run_transformers(hf, prompts, new_tokens, repeats: int = 3):
    device = next(hf.parameters()).device
    x = torch.tensor(prompts, device=device)
    runs = []
    with torch.inference_mode():
        hf.generate(x, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
        synchronize(device)
        for _ in range(repeats):
            t = time.perf_counter()
            hf.generate(x, max_new_tokens=1, do_sample=False, pad_token_id=0)
            synchronize(device)
            first = time.perf_counter() - t
            t = time.perf_counter()
            hf.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                        pad_token_id=0)
            synchronize(device)
            total = time.perf_counter() - t
            runs.append({"prefill_tok_s": x.numel() / first,
                         "decode_tok_s": len(prompts) * (new_tokens - 1) / max(total - first, 1e-9)})
    return mean_of_runs(runs)


# llama.cpp as a peer: ../shared/tools/llama_cpp_peer.sh builds llama-bench and writes these GGUFs of
# the real checkpoint (LLAMA_BENCH and --gguf point elsewhere).
LLAMA_DIR = os.path.join(os.path.expanduser("~"), ".cache", "qwen-testdata", "llama.cpp")
GGUF_TYPES = {None: "BF16", "int8": "Q8_0", "int4": "Q4_0"}  # ours -> llama.cpp's matching type


def llama_cpp_peer(quantization: str | None, gguf: str | None) -> tuple[str, str]:
    """(llama-bench, the GGUF to run) for --compare llama.cpp, or one line saying how to get them."""
    binary = os.environ.get("LLAMA_BENCH", os.path.join(LLAMA_DIR, "bin", "llama-bench"))
    gguf = gguf or os.path.join(LLAMA_DIR, f"model-{GGUF_TYPES[quantization]}.gguf")
    for path, what in ((binary, "llama-bench"), (gguf, "the GGUF")):
        if not os.path.isfile(path):
            raise SystemExit(f"--compare llama.cpp: {what} is not at {path}; build both with "
                             f"bash ../shared/tools/llama_cpp_peer.sh (or set LLAMA_BENCH and --gguf)")
    return binary, gguf


def run_llama_cpp(binary: str, gguf: str, prompt_len: int, new_tokens: int, repeats: int = 3) -> dict:
    """llama.cpp's llama-bench on the GGUF, with as many threads as torch uses: its prompt and
    generation speeds, each the mean of `repeats` runs."""
    libraries = os.path.dirname(binary) + ":" + os.environ.get("LD_LIBRARY_PATH", "")
    command = [binary, "-m", gguf, "-t", str(torch.get_num_threads()), "-p", str(prompt_len),
               "-n", str(new_tokens), "-r", str(repeats), "-o", "json"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=1800,
                         env={**os.environ, "LD_LIBRARY_PATH": libraries})
    if out.returncode != 0:
        raise SystemExit(f"llama-bench failed: {(out.stderr.strip().splitlines() or ['no output'])[-1]}")
    runs = json.loads(out.stdout)
    prefill = next(r["avg_ts"] for r in runs if r["n_prompt"] and not r["n_gen"])
    decode = next(r["avg_ts"] for r in runs if r["n_gen"] and not r["n_prompt"])
    return {"impl": f"llama.cpp ({os.path.basename(gguf)})", "prefill_tok_s": prefill, "decode_tok_s": decode}


# ----------------------------------------------------------------------------------------------
# Plot
# ----------------------------------------------------------------------------------------------

def plot_svg(records: list[dict]) -> str:
    """An SVG bar chart of `--json` records: decode tok/s of each implementation as a share of its
    run's roofline (the dashed line at 100%), one group of bars per preset, device and batch size."""
    from html import escape
    groups = {}
    for r in records:
        key = f"{r['name']} | {r['device']} {r['dtype'].removeprefix('torch.')} | batch {r['batch_size']}"
        groups.setdefault(key, []).append(r)
    left, width, bar, gap = 200, 420, 18, 12  # label column, 100% of the roofline, bar height, group gap
    y, body = 62, []
    for key, runs in groups.items():
        rooflines = sorted({f"{r['roofline_tok_s']:,.1f}" for r in runs})
        body.append(f'<text x="8" y="{y + 12}"><tspan class="g">{escape(key)}</tspan><tspan class="n" dx="6">'
                    f'(roofline {" / ".join(rooflines)} tok/s)</tspan></text>')
        y += 20
        for r in runs:
            share = r["decode_tok_s"] / r["roofline_tok_s"]  # each run against its own measured roofline
            w = max(1.0, min(share, 1.25) * width)
            body.append(f'<text x="{left - 6}" y="{y + 13}" class="i">{escape(r["impl"])}</text>'
                        f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar}" class="b"/>'
                        f'<text x="{left + w + 5}" y="{y + 13}" class="n">{r["decode_tok_s"]:,.1f} tok/s '
                        f'({100 * share:.0f}%)</text>')
            y += bar + 4
        y += gap
    height = y + 10
    line = left + width
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width * 1.25 + 150:.0f}" '
            f'height="{height}" font-family="sans-serif" font-size="12">'
            '<style>.g{font-weight:bold}.n{fill:#555}.i{text-anchor:end}.b{fill:#4a7fb5}</style>'
            '<text x="8" y="22" font-size="15" font-weight="bold">Decode speed against the memory-bandwidth '
            'roofline (bench.py)</text>'
            f'<line x1="{line}" y1="42" x2="{line}" y2="{height - 6}" stroke="#c33" stroke-dasharray="4 3"/>'
            f'<text x="{line}" y="52" fill="#c33" text-anchor="middle">100% of roofline</text>'
            + "".join(body) + "</svg>\n")


# --suite: the runs of the GPU table on one model, built once:
# (batch size, prompt length, new tokens, compiled, kernels, transformers too)
SUITE = [
    (1, 128, 256, False, "auto", True),   # eager; transformers' generate on the same weights
    (1, 128, 256, True, "torch", False),  # compiled + CUDA graph: SDPA, gathered experts
    (1, 128, 256, True, "auto", False),   # compiled + CUDA graph with the Triton kernels
    (8, 128, 256, True, "auto", True),    # batch 8
    (1, 2048, 8, False, "auto", True),    # a prefill of 2,048 tokens
]


def measure(model, peer, name: str, device, bandwidth: float, batch_size: int, prompt_len: int,
            new_tokens: int, compile: bool, kernels: str, json_path: str | None,
            repeats: int = 3) -> list[dict]:
    """Time one workload: our model, and `peer` (None: none), a function (prompts, new_tokens) -> its
    row, on the same random prompts, each the mean of `repeats` timed runs. Prints a header and a
    Markdown table, appends one JSON line per implementation; returns the rows."""
    qwen_kernels.install(model, kernels)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.config.vocab_size, (batch_size, prompt_len), generator=gen).tolist()
    bytes_per_token = decode_bytes_per_token(model, batch_size, prompt_len + new_tokens // 2)
    roofline = bandwidth / bytes_per_token * batch_size
    rows = [{"impl": "ours" + (" compiled" if compile else "") + f" ({kernels})",
             **run_ours(model, prompts, new_tokens, compile, repeats)}]
    profiled = min(new_tokens, 32)  # tokens of the profiled generation under torchrun
    if generate.distributed():
        rows[0]["communication_share"] = communication_share(model, prompts, profiled, compile)
    if peer is not None:
        rows.append(peer(prompts, new_tokens))

    print(f"{name} | {device} {torch.cuda.get_device_name(device) if device.type == 'cuda' else ''} | "
          f"{model.dtype} | batch {batch_size} | prompt {prompt_len} | new {new_tokens} | "
          f"copy bandwidth {bandwidth / 1e9:.0f} GB/s | {bytes_per_token / 1e9:.3f} GB read per decode step "
          f"| roofline {roofline:.1f} tok/s | torch {torch.__version__}")
    print()
    print("| implementation | prefill tok/s | decode tok/s | % of roofline | peak memory GB | warm-up s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['impl']} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} | "
              f"{100 * r['decode_tok_s'] / roofline:.0f}% | {r.get('peak_memory_gb', float('nan')):.2f} | "
              f"{r.get('warmup_s', float('nan')):.1f} |")
    if "communication_share" in rows[0]:
        print(f"\ncommunication: {100 * rows[0]['communication_share']:.0f}% of a decode step on rank 0 "
              f"(time in collectives, from torch.profiler over {profiled - 1} steps)")
    print(flush=True)
    if json_path:
        with open(json_path, "a") as f:
            for r in rows:
                f.write(json.dumps({"name": name, "device": str(device), "dtype": str(model.dtype),
                                    "batch_size": batch_size, "prompt_len": prompt_len,
                                    "new_tokens": new_tokens, "bandwidth_gb_s": bandwidth / 1e9,
                                    "bytes_per_token": bytes_per_token, "roofline_tok_s": roofline,
                                    "torch": torch.__version__, **r}) + "\n")
    return rows


# ----------------------------------------------------------------------------------------------
# Kernel micro-benchmarks: python bench.py kernels
# ----------------------------------------------------------------------------------------------

KERNELS_DOC = """GPU micro-benchmark of the Triton kernels against torch, bf16, real Qwen shapes.

    python bench.py kernels [--json results.json] [--only prefill|decode|moe|int4]
    TRITON_INTERPRET=1 python bench.py kernels --tiny      # smoke test on CPU, tiny shapes

Rows (each with its goal beside it):
  prefill  prefill_attention vs SDPA (flash backend, enable_gqa), causal, 2K and 8K tokens
           (goal: at least 0.8x SDPA's speed)
  decode   decode_attention vs SDPA, batch 1, 4K and 32K cached tokens (goal: at least equal);
           GB/s = K/V bytes / time, beside the device copy bandwidth measured on a large buffer
  moe      fused_moe vs the torch fast path (qwen_kernels.experts.experts_grouped) and vs transformers'
           default experts implementation (grouped_mm), 1 / 16 / 512 tokens, Qwen1.5-MoE and
           Qwen3-30B-A3B (goal: 2x the torch fast path at 1 token, 1.5x at 512);
           GB/s = bytes of the routed experts' weights / time
  int4     linear_int4 (weight-only int4, group 32, quantize.py's layout) vs the bf16 matmul of the
           same layer, Qwen2-7B's MLP shapes, 1 / 16 / 512 rows (goal: 2.5x bf16 at 1 row, where the
           weights' bytes decide: int4 with its scales and zero points is 0.31 of bf16's);
           GB/s = int4 bytes / time
Times are medians of triton.testing.do_bench (L2 flushed between runs). "max diff" is the largest
absolute difference between the kernel's output and the baselines' (a sanity check, not a
precision test).
"""

# (name -> shape) and the lengths / token counts of the real benchmark, and of the --tiny smoke test.
KERNEL_SHAPES = dict(
    attn={"qwen2-0.5b": (14, 2, 64), "qwen2-7b": (28, 4, 128)},  # H, KVH, D
    moe={"qwen1.5-moe-a2.7b": (60, 4, 2048, 1408), "qwen3-30b-a3b": (128, 8, 2048, 768)},  # E, K, Hd, I
    prefill_lens=(2048, 8192), decode_lens=(4096, 32768), moe_tokens=(1, 16, 512),
    int4={"qwen2-7b gate": (18944, 3584), "qwen2-7b down": (3584, 18944)}, int4_rows=(1, 16, 512),  # N, K
)
KERNEL_SHAPES_TINY = dict(attn={"tiny": (4, 2, 64)}, moe={"tiny": (8, 2, 64, 48)},
            prefill_lens=(40,), decode_lens=(100,), moe_tokens=(1, 5), int4={"tiny": (48, 128)},
            int4_rows=(1, 5))


def bench_ms(fn):
    """Median milliseconds per call (compile and autotune happen before the measurement)."""
    fn()
    if not torch.cuda.is_available():  # --tiny on CPU: a plain timer
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    from triton.testing import do_bench
    torch.cuda.synchronize()
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def sdpa(q, k, v, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backends = [SDPBackend.FLASH_ATTENTION] if q.is_cuda else [SDPBackend.MATH]
    with sdpa_kernel(backends):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def bench_prefill(rows, cfg, device, dtype):
    from qwen_kernels import attention
    for name, (H, KVH, D) in cfg["attn"].items():
        for T in cfg["prefill_lens"]:
            q = torch.randn(1, H, T, D, device=device, dtype=dtype)
            k = torch.randn(1, KVH, T, D, device=device, dtype=dtype)
            v = torch.randn_like(k)
            ours = lambda: attention.prefill_attention(q, k, v, 0)  # noqa: E731
            theirs = lambda: sdpa(q, k, v, causal=True)  # noqa: E731
            t_ours, t_theirs = bench_ms(ours), bench_ms(theirs)
            flops = 4 * H * T * T * D / 2  # QK^T and PV, half of the square is masked
            rows.append(dict(
                bench="prefill", shape=f"{name} T={T}", triton_ms=t_ours, baselines={"SDPA flash": t_theirs},
                goal=("SDPA flash", 0.8),
                metric=f"{flops / t_ours / 1e9:.0f} vs {flops / t_theirs / 1e9:.0f} TFLOP/s",
                max_diff=max_diff(ours(), theirs())))


def bench_decode(rows, cfg, device, dtype, copy_gbs):
    from qwen_kernels import attention
    for name, (H, KVH, D) in cfg["attn"].items():
        for S in cfg["decode_lens"]:
            q = torch.randn(1, H, 1, D, device=device, dtype=dtype)
            cache = torch.randn(2, 1, KVH, S + 1024, D, device=device, dtype=dtype)
            k, v = cache[0, :, :, :S], cache[1, :, :, :S]  # strided views, as in the model
            ours = lambda: attention.decode_attention(q, k, v, S - 1)  # noqa: E731
            theirs = lambda: sdpa(q, k, v, causal=False)  # noqa: E731  one query sees all keys
            t_ours, t_theirs = bench_ms(ours), bench_ms(theirs)
            kv_bytes = 2 * KVH * S * D * k.element_size()
            rows.append(dict(
                bench="decode", shape=f"{name} S={S}", triton_ms=t_ours, baselines={"SDPA": t_theirs},
                goal=("SDPA", 1.0),
                metric=(f"{kv_bytes / t_ours / 1e6:.0f} vs {kv_bytes / t_theirs / 1e6:.0f} GB/s "
                        f"(copy {copy_gbs:.0f})"),
                max_diff=max_diff(ours(), theirs())))


def transformers_experts(w_gate_up, w_down, top_k):
    """transformers' Qwen3-MoE experts module on the same weights, with its default implementation
    (grouped_mm); None when transformers is not installed."""
    try:
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts
    except ImportError:
        return None
    E, Hd, I = w_down.shape
    config = Qwen3MoeConfig(num_experts=E, num_experts_per_tok=top_k, hidden_size=Hd, moe_intermediate_size=I)
    config._experts_implementation = "grouped_mm"
    with torch.device("meta"):
        experts = Qwen3MoeExperts(config)
    experts.gate_up_proj = torch.nn.Parameter(w_gate_up, requires_grad=False)
    experts.down_proj = torch.nn.Parameter(w_down, requires_grad=False)
    return experts


def bench_moe(rows, cfg, device, dtype):
    from qwen_kernels import moe
    from qwen_kernels.experts import experts_grouped  # the torch fast path
    for name, (E, K, Hd, I) in cfg["moe"].items():
        w_gate_up = (torch.randn(E, 2 * I, Hd, device=device) / Hd**0.5).to(dtype)
        w_down = (torch.randn(E, Hd, I, device=device) / I**0.5).to(dtype)
        hf_experts = transformers_experts(w_gate_up, w_down, K)
        for N in cfg["moe_tokens"]:
            x = torch.randn(N, Hd, device=device, dtype=dtype)
            logits = torch.randn(N, E, device=device)
            topk_weights, topk_ids = torch.softmax(logits, dim=-1).topk(K, dim=-1)
            topk_weights = topk_weights.to(dtype)  # as the model files pass them
            args = (x, w_gate_up, w_down, topk_ids, topk_weights)
            ours = lambda: moe.fused_moe(*args)  # noqa: E731
            fast_path = lambda: experts_grouped(*args)  # noqa: E731
            t_ours = bench_ms(ours)
            baselines = {"torch fast path": bench_ms(fast_path)}
            diff = max_diff(ours(), fast_path())
            if hf_experts is not None:
                with torch.no_grad():
                    hf = lambda: hf_experts(x, topk_ids, topk_weights)  # noqa: E731
                    baselines["transformers grouped_mm"] = bench_ms(hf)
                    diff = max(diff, max_diff(ours(), hf()))
            used = topk_ids.unique().numel()
            w_bytes = used * 3 * I * Hd * w_down.element_size()
            rows.append(dict(
                bench="moe", shape=f"{name} N={N} ({used} experts)", triton_ms=t_ours, baselines=baselines,
                goal=("torch fast path", 2.0 if N == 1 else 1.5 if N >= 512 else None),
                metric=f"{w_bytes / t_ours / 1e6:.0f} GB/s weights", max_diff=diff))


def bench_int4(rows, cfg, device, dtype):
    import quantize
    from qwen_kernels import int4
    for name, (N, K) in cfg["int4"].items():
        linear = torch.nn.Linear(K, N, bias=False, device=device, dtype=dtype)
        layer = quantize.Int4Linear(linear, dtype, 32)
        args = (layer.qweight, layer.scales, layer.zeros, 32, None)
        for M in cfg["int4_rows"]:
            x = torch.randn(M, K, device=device, dtype=dtype)
            ours = lambda: int4.linear_int4(x, *args)  # noqa: E731
            theirs = lambda: F.linear(x, linear.weight)  # noqa: E731
            t_ours = bench_ms(ours)
            w_bytes = sum(t.numel() * t.element_size() for t in (layer.qweight, layer.scales, layer.zeros))
            rows.append(dict(
                bench="int4", shape=f"{name} M={M}", triton_ms=t_ours,
                baselines={"bf16 matmul": bench_ms(theirs)}, goal=("bf16 matmul", 2.5 if M == 1 else None),
                metric=f"{w_bytes / t_ours / 1e6:.0f} GB/s weights",
                max_diff=max_diff(ours(), int4.linear_int4_reference(x, *args))))


def kernel_table(rows):
    """Markdown: one row per shape, speed-up against each baseline, and the goal where there is one."""
    lines = ["| bench | shape | triton ms | baseline ms | speed-up | goal | triton | max diff |",
             "|---|---|---:|---|---|---|---|---:|"]
    for r in rows:
        speedups = {name: ms / r["triton_ms"] for name, ms in r["baselines"].items()}
        goal_name, goal = r["goal"]
        verdict = "" if goal is None else (
            f"{goal:g}x {goal_name}: {'met' if speedups[goal_name] >= goal else 'not met'}")
        lines.append(
            f"| {r['bench']} | {r['shape']} | {r['triton_ms']:.4f} | "
            + ", ".join(f"{n} {ms:.4f}" for n, ms in r["baselines"].items()) + " | "
            + ", ".join(f"{s:.2f}x" for s in speedups.values()) + f" | {verdict} | {r['metric']} | "
            f"{r['max_diff']:.3g} |")
    return "\n".join(lines)


def kernels_main(argv=None):
    parser = argparse.ArgumentParser(prog="bench.py kernels", description=KERNELS_DOC,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--only", choices=["prefill", "decode", "moe", "int4"], help="run one group")
    parser.add_argument("--tiny", action="store_true",
                        help="smoke test: tiny shapes, float32; on CPU needs TRITON_INTERPRET=1")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        raise SystemExit("bench.py kernels needs a CUDA GPU "
                         "(or --tiny with TRITON_INTERPRET=1 for a smoke test)")
    cfg, dtype = (KERNEL_SHAPES_TINY, torch.float32) if args.tiny else (KERNEL_SHAPES, torch.bfloat16)
    device = "cuda" if cuda else "cpu"
    torch.manual_seed(0)

    copy_gbs = copy_bandwidth(torch.device(device), megabytes=1024 if cuda else 64) / 1e9
    rows = []
    if args.only in (None, "prefill"):
        bench_prefill(rows, cfg, device, dtype)
    if args.only in (None, "decode"):
        bench_decode(rows, cfg, device, dtype, copy_gbs)
    if args.only in (None, "moe"):
        bench_moe(rows, cfg, device, dtype)
    if args.only in (None, "int4"):
        bench_int4(rows, cfg, device, dtype)

    name = torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)"
    print(f"{name}, {dtype}, device copy bandwidth {copy_gbs:.0f} GB/s, torch {torch.__version__}\n")
    print(kernel_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            record = {"device": name, "copy_gbs": copy_gbs, "torch": torch.__version__, "rows": rows}
            json.dump(record, f, indent=1)
    return rows


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["kernels"]:
        return kernels_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted(PRESETS), help="published shapes, random weights")
    src.add_argument("--model", help="a real checkpoint: hub id or local folder")
    src.add_argument("--plot", metavar="JSONL",
                     help="no run: draw the records of a --json file as JSONL's name .svg")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on cuda, the checkpoint's own for --model, else float32")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--compile", action="store_true", help="compiled decode step (CUDA graphs on cuda)")
    p.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantization (quantize.py)")
    p.add_argument("--group-size", type=int, choices=[32, 64, 128], default=32, help="int4's group size")
    p.add_argument("--quantize-embeddings", choices=["int8", "int4"],
                   help="with --quantize: the embedding table too (default: kept in the activation dtype)")
    p.add_argument("--kernels", choices=["auto", "triton", "torch", "reference"], default="auto",
                   help="reference: the spelled-out attention and expert loop")
    p.add_argument("--compare", choices=["transformers", "llama.cpp"],
                   help="also run the same weights through transformers, or llama.cpp's llama-bench on "
                        "their GGUF (BF16, Q8_0 with --quantize int8, Q4_0 with int4)")
    p.add_argument("--gguf", help="the GGUF for --compare llama.cpp (default: llama_cpp_peer.sh's)")
    p.add_argument("--suite", action="store_true",
                   help="every run of the GPU table (bench.SUITE) on one model; replaces the workload flags")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs per implementation, their mean reported (llama-bench's -r)")
    p.add_argument("--json", help="append one JSON line per run to this file")
    args = p.parse_args(argv)
    if args.plot:
        with open(args.plot) as f:
            records = [json.loads(line) for line in f if line.strip()]
        out = os.path.splitext(args.plot)[0] + ".svg"
        with open(out, "w") as f:
            f.write(plot_svg(records))
        print(out)
        return records
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be at least 1, got {args.repeats}")
    if args.preset is None and args.model is None:
        args.preset = "cpu-qwen2"

    if args.quantize and args.compare == "transformers":
        raise SystemExit("--compare transformers runs the same weights unquantized: not with --quantize")
    if args.quantize_embeddings and not args.quantize:
        raise SystemExit("--quantize-embeddings goes with --quantize int8|int4")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if generate.parallel_run():  # torchrun: the model sharded over the ranks (parallel.py); rank 0 reports
        import parallel
        if args.compare:
            raise SystemExit("--compare runs its peer in one process: run it without torchrun")
        device = parallel.init(args.device)
        if torch.distributed.get_rank() != 0:  # one report: rank 0's
            sys.stdout, args.json = open(os.devnull, "w"), None
    folder = None
    if args.model:
        model, _, _ = generate.load(args.model, device=device, dtype=args.dtype, quantization=args.quantize,
                                    group_size=args.group_size,
                                    embeddings=args.quantize_embeddings)  # quantized while it loads
        folder, name = tokenizer.resolve_checkpoint(args.model), args.model
        preset = None
    else:
        dtype = getattr(torch, args.dtype) if args.dtype else (
            torch.bfloat16 if device.type == "cuda" else torch.float32)
        preset, name = PRESETS[args.preset], args.preset
        model = random_model(preset, device, dtype)
        if generate.distributed():  # the same random weights on every rank, then each keeps its share
            parallel.shard(model, parallel.plan(model.config, torch.distributed.get_rank(),
                                                torch.distributed.get_world_size()))
    if args.quantize:
        if args.model is None:
            import quantize
            quantize.quantize(model, args.quantize, group_size=args.group_size,
                              embeddings=args.quantize_embeddings)
        name += f" {args.quantize}" + (f" g{args.group_size}" if args.quantize == "int4" else "")
        name += f" embeddings {args.quantize_embeddings}" if args.quantize_embeddings else ""
    if generate.distributed():
        name += f" on {torch.distributed.get_world_size()} ranks"
    bandwidth = copy_bandwidth(device)
    workloads = SUITE if args.suite else [(args.batch_size, args.prompt_len, args.new_tokens, args.compile,
                                           args.kernels, bool(args.compare))]
    peer = None
    if args.compare == "llama.cpp":
        if args.model is None:
            raise SystemExit("--compare llama.cpp needs --model: llama.cpp runs the checkpoint's own GGUF")
        binary, gguf = llama_cpp_peer(args.quantize, args.gguf)

        def peer(prompts, new_tokens):
            return run_llama_cpp(binary, gguf, len(prompts[0]), new_tokens, args.repeats)
    elif any(compare for *_, compare in workloads):
        hf = transformers_twin(model, preset, folder, device, model.dtype)

        def peer(prompts, new_tokens):
            return {"impl": "transformers (sdpa)", **run_transformers(hf, prompts, new_tokens, args.repeats)}
    rows = []
    for batch_size, prompt_len, new_tokens, compile, kernels, compare in workloads:
        rows += measure(model, peer if compare else None, name, device, bandwidth, batch_size, prompt_len,
                        new_tokens, compile, kernels, args.json, args.repeats)
    return rows


if __name__ == "__main__":
    main()
