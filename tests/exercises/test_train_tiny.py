"""Exercise 12, the capstone (docs/exercises/train_tiny.md): docs/exercises/train_tiny.py trains a tiny
Qwen2 on the repository's source; a short run with small settings must make the loss fall."""
import math
import os
import statistics

import torch

from ._harness import ROOT, load

SCRIPT = os.path.join(ROOT, "docs", "exercises", "train_tiny.py")
TINY = ["--steps", "24", "--batch-size", "8", "--context", "32", "--hidden", "32", "--layers", "1",
        "--heads", "2", "--kv-heads", "1", "--warmup", "4", "--lr", "1e-2", "--log-every", "8",
        "--eval-every", "24", "--sample-tokens", "12"]


def test_train_tiny_loss_falls(capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster, and robust on a busy machine
    try:
        result = load(SCRIPT).main(TINY)
    finally:
        torch.set_num_threads(threads)
    losses = result["losses"]
    assert len(losses) == 24 and all(math.isfinite(x) for x in losses)
    first, last = losses[0], statistics.mean(losses[-4:])
    assert abs(first - math.log(256)) < 0.5, \
        f"the first loss {first:.2f} should be near ln(256) = 5.55 (a uniform guess)"
    assert last < first - 1.0, \
        f"the training loss did not fall: {first:.2f} at the start, {last:.2f} at the end"
    step, val = result["val_losses"][-1]
    assert step == 24 and val < math.log(256) - 1.0, f"validation loss {val:.2f} after 24 steps"
    assert result["sample"].startswith("def ") and len(result["sample"].encode("utf-8", "replace")) >= 4
    out = capsys.readouterr().out
    assert "validation loss" in out and "sample:" in out
