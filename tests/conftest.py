"""Shared test helpers: tiny random checkpoints written by transformers, and the real checkpoint."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SHARED_TOOL = os.path.join(ROOT, "..", "shared", "tools", "make_real_qwen2.py")


def pytest_configure(config):
    config.addinivalue_line("markers", "hub: downloads a checkpoint by hub id (skipped offline)")
    config.addinivalue_line("markers", "slow: large download or long run")


def save_tiny(tmp_path, config_cls, model_cls, seed=0, **overrides):
    """Build a random transformers model (fp32, eager attention), save_pretrained it, return (folder, model)."""
    torch.manual_seed(seed)
    config = config_cls(**overrides)
    config._attn_implementation = "eager"
    model = model_cls(config).eval()
    with torch.no_grad():  # random norms too, so a wrong norm cannot hide behind weight == 1
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    folder = str(tmp_path)
    model.save_pretrained(folder)
    return folder, model


def real_checkpoint_dir():
    """The real Qwen2.5-Coder-0.5B-Instruct folder if it has been built, else None."""
    path = os.environ.get("QWEN_REAL_CHECKPOINT") or os.path.join(
        os.path.expanduser("~"), ".cache", "qwen-testdata", "qwen2.5-coder-0.5b-instruct")
    return path if os.path.isfile(os.path.join(path, "model.safetensors")) else None


@pytest.fixture(scope="session")
def real_ckpt():
    path = real_checkpoint_dir()
    if path is None:
        pytest.skip("real checkpoint absent: run python ../shared/tools/make_real_qwen2.py (CI builds it)")
    return path


def hub_available():
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    import socket
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False
