"""GPU micro-benchmark of the Triton kernels against torch, bf16, real Qwen shapes.

    python -m kernels.microbench [--json results.json]

Rows:
  prefill  prefill_attention vs SDPA (flash backend, enable_gqa), causal, 2K and 8K tokens
  decode   decode_attention vs SDPA, batch 1, 4K and 32K cached tokens; GB/s = K/V bytes / time,
           beside the device copy bandwidth measured on a large buffer
  moe      fused_moe vs a torch loop over experts, 1 / 16 / 512 tokens, Qwen1.5-MoE and Qwen3-30B-A3B;
           GB/s = bytes of the routed experts' weights / time
Times are medians of triton.testing.do_bench (L2 flushed between runs). "max diff" is the largest
absolute difference between the two outputs (a sanity check, not a precision test).
"""

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from kernels import attention as attn
from kernels import moe

DTYPE = torch.bfloat16
ATTN_MODELS = {"qwen2-0.5b": (14, 2, 64), "qwen2-7b": (28, 4, 128)}  # H, KVH, D
MOE_MODELS = {"qwen1.5-moe-a2.7b": (60, 4, 2048, 1408), "qwen3-30b-a3b": (128, 8, 2048, 768)}  # E, K, Hd, I


def bench_ms(fn):
    fn()  # compile and autotune outside the measurement
    torch.cuda.synchronize()
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def copy_bandwidth_gbs(nbytes=1 << 30):
    """Device copy bandwidth: bytes read + written per second by a torch copy of a large buffer."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def sdpa(q, k, v, causal):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)


def bench_prefill(rows):
    for name, (H, KVH, D) in ATTN_MODELS.items():
        for T in (2048, 8192):
            q = torch.randn(1, H, T, D, device="cuda", dtype=DTYPE)
            k = torch.randn(1, KVH, T, D, device="cuda", dtype=DTYPE)
            v = torch.randn_like(k)
            ours = lambda: attn.prefill_attention(q, k, v, 0)  # noqa: E731
            theirs = lambda: sdpa(q, k, v, causal=True)  # noqa: E731
            t_ours, t_theirs = bench_ms(ours), bench_ms(theirs)
            flops = 4 * H * T * T * D / 2  # QK^T and PV, half of the square is masked
            rows.append(dict(
                bench="prefill", shape=f"{name} T={T}", triton_ms=t_ours, torch_ms=t_theirs,
                metric=f"{flops / t_ours / 1e9:.0f} vs {flops / t_theirs / 1e9:.0f} TFLOP/s",
                max_diff=(ours().float() - theirs().float()).abs().max().item()))


def bench_decode(rows, copy_gbs):
    for name, (H, KVH, D) in ATTN_MODELS.items():
        for S in (4096, 32768):
            q = torch.randn(1, H, 1, D, device="cuda", dtype=DTYPE)
            cache = torch.randn(2, 1, KVH, S + 1024, D, device="cuda", dtype=DTYPE)
            k, v = cache[0, :, :, :S], cache[1, :, :, :S]  # strided views, as in the model
            ours = lambda: attn.decode_attention(q, k, v, S - 1)  # noqa: E731
            theirs = lambda: sdpa(q, k, v, causal=False)  # noqa: E731  one query sees all keys
            t_ours, t_theirs = bench_ms(ours), bench_ms(theirs)
            kv_bytes = 2 * KVH * S * D * k.element_size()
            rows.append(dict(
                bench="decode", shape=f"{name} S={S}", triton_ms=t_ours, torch_ms=t_theirs,
                metric=(f"{kv_bytes / t_ours / 1e6:.0f} vs {kv_bytes / t_theirs / 1e6:.0f} GB/s "
                        f"(copy {copy_gbs:.0f})"),
                max_diff=(ours().float() - theirs().float()).abs().max().item()))


def torch_moe(x, w_gate_up, w_down, topk_ids, topk_weights):
    """Baseline: sort the (token, expert) pairs by expert and loop over the experts in torch."""
    N, K = topk_ids.shape
    I = w_down.shape[2]
    flat = topk_ids.flatten()
    order = flat.argsort()
    counts = torch.bincount(flat, minlength=w_down.shape[0]).tolist()  # host sync, like eager code
    xs = x[order // K]  # (N*K, Hd) token rows grouped by expert
    ys = torch.empty_like(xs)
    begin = 0
    for e, n in enumerate(counts):
        if n:
            gate, up = (xs[begin:begin + n] @ w_gate_up[e].T).split(I, dim=-1)
            ys[begin:begin + n] = (F.silu(gate) * up) @ w_down[e].T
            begin += n
    out = torch.zeros(N, x.shape[1], device=x.device, dtype=torch.float32)
    out.index_add_(0, order // K, ys.float() * topk_weights.flatten()[order, None].float())
    return out.to(x.dtype)


def bench_moe(rows):
    for name, (E, K, Hd, I) in MOE_MODELS.items():
        w_gate_up = torch.randn(E, 2 * I, Hd, device="cuda", dtype=DTYPE) / Hd**0.5
        w_down = torch.randn(E, Hd, I, device="cuda", dtype=DTYPE) / I**0.5
        for N in (1, 16, 512):
            x = torch.randn(N, Hd, device="cuda", dtype=DTYPE)
            logits = torch.randn(N, E, device="cuda")
            topk_weights, topk_ids = torch.softmax(logits, dim=-1).topk(K, dim=-1)
            args = (x, w_gate_up, w_down, topk_ids, topk_weights)
            ours = lambda: moe.fused_moe(*args)  # noqa: E731
            theirs = lambda: torch_moe(*args)  # noqa: E731
            t_ours, t_theirs = bench_ms(ours), bench_ms(theirs)
            used = topk_ids.unique().numel()
            w_bytes = used * 3 * I * Hd * w_down.element_size()
            rows.append(dict(
                bench="moe", shape=f"{name} N={N} ({used} experts)", triton_ms=t_ours,
                torch_ms=t_theirs,
                metric=f"{w_bytes / t_ours / 1e6:.0f} vs {w_bytes / t_theirs / 1e6:.0f} GB/s weights",
                max_diff=(ours().float() - theirs().float()).abs().max().item()))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--only", choices=["prefill", "decode", "moe"], help="run one group")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("microbench needs a CUDA GPU")
    torch.manual_seed(0)

    copy_gbs = copy_bandwidth_gbs()
    rows = []
    if args.only in (None, "prefill"):
        bench_prefill(rows)
    if args.only in (None, "decode"):
        bench_decode(rows, copy_gbs)
    if args.only in (None, "moe"):
        bench_moe(rows)

    print(f"{torch.cuda.get_device_name()}, bf16, device copy bandwidth {copy_gbs:.0f} GB/s\n")
    print("| bench | shape | triton ms | torch ms | speedup | triton vs torch | max diff |")
    print("|---|---|---:|---:|---:|---|---:|")
    for r in rows:
        print(f"| {r['bench']} | {r['shape']} | {r['triton_ms']:.4f} | {r['torch_ms']:.4f} | "
              f"{r['torch_ms'] / r['triton_ms']:.2f}x | {r['metric']} | {r['max_diff']:.3g} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_gbs": copy_gbs, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
