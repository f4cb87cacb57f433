"""Whole models with the Triton kernels swapped in equal the torch path.

On CPU this runs Triton's interpreter in a fresh process (Triton picks interpreter or GPU mode when
it is first imported); on CUDA the same script runs in bf16 at the real shapes' head sizes.
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytest.importorskip("triton")
pytest.importorskip("transformers")

SCRIPT = r'''
import importlib, json, pathlib, sys, tempfile
import torch
ROOT, MODULE, HF_CLASSES, CONFIG = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
sys.path[:0] = [ROOT, ROOT + "/tests"]
from conftest import save_tiny
import generate
import transformers
module = importlib.import_module(MODULE)
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
assert module.triton_attention is not None, "kernels.attention did not import"
calls = []
kernel = module.triton_attention.attention
module.triton_attention.attention = lambda *a, **kw: calls.append(a[0].shape[2]) or kernel(*a, **kw)
hf_config_cls, hf_model_cls = (getattr(transformers, n) for n in HF_CLASSES)
folder, _ = save_tiny(pathlib.Path(tempfile.mkdtemp()), hf_config_cls, hf_model_cls, **CONFIG)
model = module.from_pretrained(folder, device=device, dtype=dtype)
x = torch.randint(0, CONFIG["vocab_size"], (2, 21), generator=torch.Generator().manual_seed(0)).to(device)
mask = torch.ones_like(x); mask[1, :6] = 0
with torch.no_grad():
    model.set_kernels("torch"); ref = model(x, attention_mask=mask).float()
    model.set_kernels("triton"); got = model(x, attention_mask=mask).float()
tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
err = max((got[0] - ref[0]).abs().max().item(), (got[1, 6:] - ref[1, 6:]).abs().max().item())
assert err < tol, f"prefill logits differ by {err}"
prompts = [x[0, :9].tolist(), x[1, 6:15].tolist()]
model.set_kernels("torch"); expected = generate.generate_batch(model, prompts, 6)
model.set_kernels("triton"); tokens = generate.generate_batch(model, prompts, 6)
if dtype == torch.float32:
    assert tokens == expected, (tokens, expected)
assert 1 in calls and 21 in calls, "the Triton kernels were not used for both prefill and decode"
print("ok", err)
'''

CASES = {
    "qwen2": ("qwen2", ("Qwen2Config", "Qwen2ForCausalLM"),
              dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, use_sliding_window=True, sliding_window=7, max_window_layers=1,
                   max_position_embeddings=64)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_model_with_triton_kernels_equals_torch_path(name):
    module, hf_classes, config = CASES[name]
    if not os.path.exists(os.path.join(ROOT, module + ".py")):
        pytest.skip(f"{module}.py not present")
    env = dict(os.environ)
    try:
        import torch
        on_cuda = torch.cuda.is_available()
    except ImportError:
        on_cuda = False
    if not on_cuda:
        env["TRITON_INTERPRET"] = "1"
    out = subprocess.run([sys.executable, "-c", SCRIPT, ROOT, module, json.dumps(hf_classes), json.dumps(config)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert out.stdout.startswith("ok")
