"""GPU micro-benchmark of the Triton kernels against torch, bf16, real Qwen shapes.

    python -m kernels.microbench [--json results.json] [--only prefill|decode|moe]
    TRITON_INTERPRET=1 python -m kernels.microbench --tiny      # smoke test on CPU, tiny shapes

Rows (each with the goal of issue 5 beside it):
  prefill  prefill_attention vs SDPA (flash backend, enable_gqa), causal, 2K and 8K tokens
           (goal: at least 0.8x SDPA's speed)
  decode   decode_attention vs SDPA, batch 1, 4K and 32K cached tokens (goal: at least equal);
           GB/s = K/V bytes / time, beside the device copy bandwidth measured on a large buffer
  moe      fused_moe vs the model files' torch fast path (qwen3_moe.moe_grouped) and vs transformers'
           default experts implementation (grouped_mm), 1 / 16 / 512 tokens, Qwen1.5-MoE and
           Qwen3-30B-A3B (goal: 2x the torch fast path at 1 token, 1.5x at 512);
           GB/s = bytes of the routed experts' weights / time
Times are medians of triton.testing.do_bench (L2 flushed between runs). "max diff" is the largest
absolute difference between the kernel's output and the baselines' (a sanity check, not a
precision test).
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels import attention as attn
from kernels import moe

# (name -> shape) and the lengths / token counts of the real benchmark, and of the --tiny smoke test.
REAL = dict(
    attn={"qwen2-0.5b": (14, 2, 64), "qwen2-7b": (28, 4, 128)},  # H, KVH, D
    moe={"qwen1.5-moe-a2.7b": (60, 4, 2048, 1408), "qwen3-30b-a3b": (128, 8, 2048, 768)},  # E, K, Hd, I
    prefill_lens=(2048, 8192), decode_lens=(4096, 32768), moe_tokens=(1, 16, 512),
)
TINY = dict(attn={"tiny": (4, 2, 64)}, moe={"tiny": (8, 2, 64, 48)},
            prefill_lens=(40,), decode_lens=(100,), moe_tokens=(1, 5))


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


def copy_bandwidth_gbs(device, nbytes=1 << 30):
    """Device copy bandwidth: bytes read + written per second by a torch copy of a large buffer."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def sdpa(q, k, v, causal):
    backends = [SDPBackend.FLASH_ATTENTION] if q.is_cuda else [SDPBackend.MATH]
    with sdpa_kernel(backends):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def bench_prefill(rows, cfg, device, dtype):
    for name, (H, KVH, D) in cfg["attn"].items():
        for T in cfg["prefill_lens"]:
            q = torch.randn(1, H, T, D, device=device, dtype=dtype)
            k = torch.randn(1, KVH, T, D, device=device, dtype=dtype)
            v = torch.randn_like(k)
            ours = lambda: attn.prefill_attention(q, k, v, 0)  # noqa: E731
            theirs = lambda: sdpa(q, k, v, causal=True)  # noqa: E731
            t_ours, t_theirs = bench_ms(ours), bench_ms(theirs)
            flops = 4 * H * T * T * D / 2  # QK^T and PV, half of the square is masked
            rows.append(dict(
                bench="prefill", shape=f"{name} T={T}", triton_ms=t_ours, baselines={"SDPA flash": t_theirs},
                goal=("SDPA flash", 0.8),
                metric=f"{flops / t_ours / 1e9:.0f} vs {flops / t_theirs / 1e9:.0f} TFLOP/s",
                max_diff=max_diff(ours(), theirs())))


def bench_decode(rows, cfg, device, dtype, copy_gbs):
    for name, (H, KVH, D) in cfg["attn"].items():
        for S in cfg["decode_lens"]:
            q = torch.randn(1, H, 1, D, device=device, dtype=dtype)
            cache = torch.randn(2, 1, KVH, S + 1024, D, device=device, dtype=dtype)
            k, v = cache[0, :, :, :S], cache[1, :, :, :S]  # strided views, as in the model
            ours = lambda: attn.decode_attention(q, k, v, S - 1)  # noqa: E731
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
    import qwen3_moe  # the model files' torch fast path (run from the repository root)
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
            fast_path = lambda: qwen3_moe.moe_grouped(*args)  # noqa: E731
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


def table(rows):
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--only", choices=["prefill", "decode", "moe"], help="run one group")
    parser.add_argument("--tiny", action="store_true",
                        help="smoke test: tiny shapes, float32; on CPU needs TRITON_INTERPRET=1")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        raise SystemExit("microbench needs a CUDA GPU (or --tiny with TRITON_INTERPRET=1 for a smoke test)")
    cfg, dtype = (TINY, torch.float32) if args.tiny else (REAL, torch.bfloat16)
    device = "cuda" if cuda else "cpu"
    torch.manual_seed(0)

    copy_gbs = copy_bandwidth_gbs(device, nbytes=(1 << 30) if cuda else (64 << 20))
    rows = []
    if args.only in (None, "prefill"):
        bench_prefill(rows, cfg, device, dtype)
    if args.only in (None, "decode"):
        bench_decode(rows, cfg, device, dtype, copy_gbs)
    if args.only in (None, "moe"):
        bench_moe(rows, cfg, device, dtype)

    name = torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)"
    print(f"{name}, {dtype}, device copy bandwidth {copy_gbs:.0f} GB/s, torch {torch.__version__}\n")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "copy_gbs": copy_gbs, "torch": torch.__version__, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
