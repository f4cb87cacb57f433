"""Whole models with the Triton kernels swapped in equal the torch path, for each architecture,
eager and inside the compiled decode step (torch.compile; a CUDA graph on CUDA).

On CPU this runs Triton's interpreter in a fresh process (Triton picks interpreter or GPU mode when
it is first imported), in float32; on CUDA the same script runs in float32 (tokens must be equal)
and in bfloat16 (logits within bf16 tolerance).
"""
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
pytest.importorskip("transformers")

SCRIPT = r'''
import importlib, json, pathlib, sys, tempfile
import torch
ROOT, MODULE, HF_CLASSES, CONFIG = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
sys.path[:0] = [ROOT, ROOT + "/tests"]
from conftest import save_tiny
import generate
import qwen_kernels
import transformers
torch.set_num_threads(1)
module = importlib.import_module(MODULE)
device = "cuda" if torch.cuda.is_available() else "cpu"
from qwen_kernels import attention as attn
moe = None
if MODULE != "qwen2":
    from qwen_kernels import moe

# Count the kernel launches (the custom ops used under torch.compile call these same functions).
calls = {"prefill": 0, "decode": 0, "moe": 0}
def counting(name, fn):
    def wrapper(*args, **kwargs):
        calls[name] += 1
        return fn(*args, **kwargs)
    return wrapper
attn.prefill_attention = counting("prefill", attn.prefill_attention)
attn.decode_attention = counting("decode", attn.decode_attention)
if moe is not None:
    moe._fused_moe = counting("moe", moe._fused_moe)

hf_config_cls, hf_model_cls = (getattr(transformers, n) for n in HF_CLASSES)
folder, _ = save_tiny(pathlib.Path(tempfile.mkdtemp()), hf_config_cls, hf_model_cls, **CONFIG)
x = torch.randint(0, CONFIG["vocab_size"], (2, 21), generator=torch.Generator().manual_seed(0)).to(device)
mask = torch.ones_like(x); mask[1, :6] = 0
prompts = [x[0, :9].tolist(), x[1, 6:15].tolist()]
report = {}
for dtype in ([torch.float32, torch.bfloat16] if device == "cuda" else [torch.float32]):
    model = module.from_pretrained(folder, device=device, dtype=dtype)
    # 1. A padded prefill: logits of every real position.
    with torch.no_grad():
        qwen_kernels.install(model, "torch"); ref = model(x, attention_mask=mask).float()
        qwen_kernels.install(model, "triton"); got = model(x, attention_mask=mask).float()
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    err = max((got[0] - ref[0]).abs().max().item(), (got[1, 6:] - ref[1, 6:]).abs().max().item())
    assert err < tol, f"{dtype}: prefill logits differ by {err}"
    report[str(dtype)] = err
    if dtype == torch.bfloat16:
        continue  # greedy tokens of a random model may part ways in bf16; float32 checks them
    # 2. Generation, eager and compiled: the same greedy tokens.
    qwen_kernels.install(model, "torch"); expected = generate.generate_batch(model, prompts, 6)
    qwen_kernels.install(model, "triton"); before = dict(calls)
    tokens = generate.generate_batch(model, prompts, 6)
    assert tokens == expected, ("eager", tokens, expected)
    assert calls["prefill"] > before["prefill"] and calls["decode"] > before["decode"], calls
    before = dict(calls)
    compiled = generate.generate_batch(model, prompts, 6, compile=True)
    assert compiled == expected, ("compiled", compiled, expected)
    layers = CONFIG["num_hidden_layers"]
    assert calls["decode"] - before["decode"] >= 5 * layers, "the compiled step did not use the decode kernel"
    if moe is not None:
        assert calls["moe"] - before["moe"] >= 6, "the compiled step did not use the fused MoE kernel"
print("ok", json.dumps(report))
'''

SMALL = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64)
CASES = {
    "qwen2": ("qwen2", ("Qwen2Config", "Qwen2ForCausalLM"),
              dict(SMALL, intermediate_size=96, use_sliding_window=True, sliding_window=7,
                   max_window_layers=1)),
    "qwen2_moe": ("qwen2_moe", ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
                  dict(SMALL, intermediate_size=96, num_experts=8, num_experts_per_tok=2,
                       moe_intermediate_size=32, shared_expert_intermediate_size=48, initializer_range=0.15)),
    "qwen3_moe": ("qwen3_moe", ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
                  dict(SMALL, intermediate_size=96, head_dim=32, num_experts=8, num_experts_per_tok=4,
                       moe_intermediate_size=32, norm_topk_prob=True, use_sliding_window=True,
                       sliding_window=9)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_model_with_triton_kernels_equals_torch_path(name):
    module, hf_classes, config = CASES[name]
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    argv = [sys.executable, "-c", SCRIPT, ROOT, module, json.dumps(hf_classes), json.dumps(config)]
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert out.stdout.startswith("ok"), out.stdout


def test_kernel_microbench_smoke(tmp_path):
    """`bench.py kernels` end to end on tiny shapes (the interpreter on CPU): every row, every
    baseline, the same outputs."""
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    result = tmp_path / "rows.json"
    out = subprocess.run([sys.executable, "bench.py", "kernels", "--tiny", "--json", str(result)], cwd=ROOT,
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    rows = json.loads(result.read_text())["rows"]
    assert [r["bench"] for r in rows] == ["prefill", "decode", "moe", "moe", "int4", "int4"]
    assert all(r["max_diff"] < 1e-4 for r in rows), rows
    assert "transformers grouped_mm" in rows[3]["baselines"]
    assert "| moe | tiny N=1" in out.stdout
