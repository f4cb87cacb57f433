"""bench.py end to end on a tiny preset, its roofline arithmetic, and the compiled decode path."""
import json
import os

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
    bench.main(["--plot", str(out)])  # the SVG chart of those records, beside them
    svg = (tmp_path / "runs.svg").read_text()
    assert svg.startswith("<svg") and "ours (auto)" in svg
    share = 100 * record["decode_tok_s"] / record["roofline_tok_s"]
    assert f"{record['decode_tok_s']:,.1f} tok/s ({share:.0f}%)" in svg


def test_speeds_are_the_mean_of_the_timed_runs(monkeypatch):
    """--repeats N: N timed runs after the warm-up, each speed their mean (as llama-bench's -r),
    every run's decode speed kept in the record."""
    calls = []
    real = generate.generate_tokens
    monkeypatch.setattr(generate, "generate_tokens", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    rows = bench.main(["--preset", "tiny", "--prompt-len", "8", "--new-tokens", "6", "--device", "cpu",
                       "--repeats", "2"])
    assert len(calls) == 1 + 2  # the warm-up, then two timed runs
    runs = rows[0]["decode_runs"]
    assert len(runs) == 2 and rows[0]["decode_tok_s"] == pytest.approx(sum(runs) / 2, rel=1e-3)
    with pytest.raises(SystemExit, match="--repeats must be at least 1, got 0"):
        bench.main(["--preset", "tiny", "--repeats", "0"])


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


def test_decode_bytes_per_token_counts_quantized_weights():
    """int8: one byte per weight plus a scale per output channel; the tied lm_head becomes an int8
    copy, so the float embedding is read one row per token."""
    import quantize
    model = bench.random_model(bench.PRESETS["tiny"], torch.device("cpu"), torch.float32)
    quantize.quantize(model, "int8")
    V, H, I, L, KVH, D = 256, 64, 128, 2, 2, 16
    linears = [(H, H), (KVH * D, H), (KVH * D, H), (H, H), (I, H), (I, H), (H, I)]  # (N, K) of each layer
    per_layer = sum(N * K + 4 * N for N, K in linears) + 4 * (H + 2 * KVH * D) + 4 * 2 * H  # biases, norms
    weights = L * per_layer + 4 * H + (V * H + 4 * V) + 4 * H  # + final norm + int8 lm_head + one row
    assert bench.decode_bytes_per_token(model) == weights


def test_decode_bytes_per_token_counts_a_quantized_embedding():
    """A quantized table shared with the tied lm_head is read whole (by the head) and once; an untied
    quantized table is read one row (int8: H bytes and a scale) per token."""
    import quantize
    H = 64
    tied = quantize.quantize(bench.random_model(bench.PRESETS["tiny"], torch.device("cpu"), torch.float32),
                             "int8", embeddings="int8")
    plain = quantize.quantize(bench.random_model(bench.PRESETS["tiny"], torch.device("cpu"), torch.float32),
                              "int8")
    # plain: float row (4 H) + int8 head copy; tied: the int8 table once, no float row
    assert bench.decode_bytes_per_token(tied) == bench.decode_bytes_per_token(plain) - 4 * H
    untied_preset = {**bench.PRESETS["tiny"], "tie_word_embeddings": False}
    untied = quantize.quantize(bench.random_model(untied_preset, torch.device("cpu"), torch.float32),
                               "int8", embeddings="int8")
    assert bench.decode_bytes_per_token(untied) == bench.decode_bytes_per_token(plain) - 4 * H + H + 4


def test_decode_bytes_per_token_counts_active_experts():
    """MoE: K of E experts at batch 1; at batch b the expected distinct experts E (1 - (1 - K/E)^b)."""
    preset = dict(model_type="qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, tie_word_embeddings=False)
    model = bench.random_model(preset, torch.device("cpu"), torch.float32)
    L, E, H, I, V = 2, 8, 32, 16, 64
    experts = L * E * 3 * I * H * 4  # every expert's gate, up and down, float32
    others = 4 * sum(p.numel() for n, p in model.named_parameters() if ".experts." not in n) - V * H * 4
    assert bench.decode_bytes_per_token(model) == others + H * 4 + experts * 2 // 8
    expected = others + 4 * H * 4 + experts * (1 - (1 - 2 / 8) ** 4)
    assert bench.decode_bytes_per_token(model, batch_size=4) == pytest.approx(expected, abs=L * 2)


def test_copy_bandwidth_is_plausible():
    assert 1e8 < bench.copy_bandwidth(torch.device("cpu"), megabytes=32) < 1e13


TINY_MOE = {
    "qwen2_moe": dict(model_type="qwen2_moe", vocab_size=64, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=8,
                      num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                      tie_word_embeddings=False),
    "qwen3_moe": dict(model_type="qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True,
                      tie_word_embeddings=False),
}


@pytest.mark.parametrize("preset", [bench.PRESETS["tiny"], *TINY_MOE.values()], ids=["qwen2", *TINY_MOE])
def test_transformers_twin_shares_the_weights(preset):
    """--compare transformers: the same weights (the same memory, not a copy), the same logits."""
    pytest.importorskip("transformers")
    model = bench.random_model(preset, torch.device("cpu"), torch.float32, seed=3)
    hf = bench.transformers_twin(model, preset, None, torch.device("cpu"), torch.float32)
    ours = dict(model.named_parameters())
    for name, p in hf.named_parameters():
        assert p.data_ptr() == ours[name].data_ptr(), name
    ids = torch.randint(0, preset["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=0)


def test_suite_runs_every_workload_on_one_model(tmp_path, monkeypatch, capsys):
    """--suite: the workloads of bench.SUITE on one model (here a short stand-in list)."""
    pytest.importorskip("transformers")
    suite = [(1, 8, 4, False, "auto", True), (2, 6, 3, False, "reference", False)]
    monkeypatch.setattr(bench, "SUITE", suite)
    built = []
    real_random_model = bench.random_model
    monkeypatch.setattr(bench, "random_model",
                        lambda *a, **kw: built.append(1) or real_random_model(*a, **kw))
    out = tmp_path / "suite.jsonl"
    rows = bench.main(["--preset", "tiny", "--device", "cpu", "--suite", "--json", str(out)])
    assert built == [1]
    assert [r["impl"] for r in rows] == ["ours (auto)", "transformers (sdpa)", "ours (reference)"]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    workloads = [(r["batch_size"], r["prompt_len"], r["new_tokens"]) for r in records]
    assert workloads == [(1, 8, 4), (1, 8, 4), (2, 6, 3)]
    assert capsys.readouterr().out.count("| implementation |") == 2


def test_compare_llama_cpp_runs_llama_bench(tmp_path, monkeypatch, tiny_chat_checkpoint):
    """--compare llama.cpp runs llama-bench on the GGUF with our prompt length, token count and
    threads, and reports its speeds as a row; without the peer, one line says how to build it."""
    fake = tmp_path / "llama-bench"
    fake.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/args.txt"\n'
                    'echo \'[{"n_prompt": 8, "n_gen": 0, "avg_ts": 123.5}, {"n_prompt": 0, "n_gen": 4, '
                    '"avg_ts": 45.25}]\'\n')
    fake.chmod(0o755)
    gguf = tmp_path / "model-Q8_0.gguf"
    gguf.write_bytes(b"")
    monkeypatch.setenv("LLAMA_BENCH", str(fake))
    rows = bench.main(["--model", tiny_chat_checkpoint, "--dtype", "float32", "--compare", "llama.cpp",
                       "--gguf", str(gguf), "--prompt-len", "8", "--new-tokens", "4", "--quantize", "int8"])
    assert rows[1] == {"impl": "llama.cpp (model-Q8_0.gguf)", "prefill_tok_s": 123.5, "decode_tok_s": 45.25}
    args = (tmp_path / "args.txt").read_text().split()
    assert args[args.index("-m") + 1] == str(gguf) and args[args.index("-p") + 1] == "8"
    assert args[args.index("-n") + 1] == "4" and args[args.index("-t") + 1] == str(torch.get_num_threads())
    assert args[args.index("-r") + 1] == "3"  # as many runs as ours (--repeats)
    monkeypatch.setenv("LLAMA_BENCH", str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit, match="llama-bench is not at .*nowhere; build both with bash "):
        bench.main(["--model", tiny_chat_checkpoint, "--compare", "llama.cpp", "--gguf", str(gguf)])


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK),
                    reason="needs Linux's resettable high-water mark")
def test_peak_memory_can_be_reset_on_the_cpu():
    """bench.py's peak memory is the timed run's: reset_peak_memory forgets the loading's peak."""
    cpu = torch.device("cpu")
    big = torch.ones(96 * 2**20 // 4)  # 96 MB, every page touched
    with_big = generate.peak_memory_gb(cpu)
    del big
    bench.reset_peak_memory(cpu)
    assert generate.peak_memory_gb(cpu) < with_big - 0.05
