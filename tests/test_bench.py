"""bench.py end to end on a tiny preset, its roofline arithmetic, and the compiled decode path."""
import json

import pytest
import torch

import bench
import generate


def test_tiny_preset_end_to_end(tmp_path, capsys):
    out = tmp_path / "runs.jsonl"
    rows = bench.main(["--preset", "tiny", "--prompt-len", "8", "--new-tokens", "6", "--json", str(out),
                       "--device", "cpu"])
    assert rows[0]["decode_tok_s"] > 0 and rows[0]["prefill_tok_s"] > 0
    table = capsys.readouterr().out
    assert "| implementation | prefill tok/s | decode tok/s | % of roofline" in table
    record = json.loads(out.read_text().splitlines()[0])
    assert record["name"] == "tiny" and record["roofline_tok_s"] > 0


def test_decode_bytes_per_token_known_case():
    """Hand count for the tiny preset (tied embeddings: lm_head reads the table once)."""
    model = bench.random_model(bench.PRESETS["tiny"], torch.device("cpu"), torch.float32)
    V, H, I, L, KVH, D = 256, 64, 128, 2, 2, 16
    per_layer = (H * H + H) + 2 * (KVH * D * H + KVH * D) + H * H + 3 * H * I + 2 * H
    weights = L * per_layer + H + V * H  # + final norm + tied embedding/lm_head
    assert bench.decode_bytes_per_token(model) == 4 * weights
    kv = 2 * L * KVH * D * 10 * 4
    assert bench.decode_bytes_per_token(model, context=10) == 4 * weights + kv
    # untied: the embedding table costs one row per token, lm_head the full matrix
    untied = bench.random_model({**bench.PRESETS["tiny"], "tie_word_embeddings": False}, torch.device("cpu"),
                                torch.float32)
    assert bench.decode_bytes_per_token(untied) == 4 * (weights + H)


def test_copy_bandwidth_is_plausible():
    assert 1e8 < bench.copy_bandwidth(torch.device("cpu"), megabytes=32) < 1e13


def test_compiled_decode_gives_the_same_tokens():
    pytest.importorskip("torch._inductor")
    model = bench.random_model(bench.PRESETS["tiny"], torch.device("cpu"), torch.float32, seed=1)
    prompts = [[5, 17, 99, 3], [8, 8, 1]]
    eager = generate.generate_batch(model, prompts, 6, temperature=0)
    try:
        compiled = generate.generate_batch(model, prompts, 6, temperature=0, compile=True)
    except Exception as e:  # no C++ compiler for inductor on this machine
        pytest.skip(f"torch.compile unavailable on this CPU: {type(e).__name__}: {e}")
    assert compiled == eager
