"""generate.py's library: sampling (against transformers' logits warpers), and the compiled decode
step (qwen_kernels/compiled.py) against eager decoding. The generation loop itself is held to
transformers' generate in each model file's tests (tests/test_qwen2.py, ...), the command line in
tests/test_cli.py."""
import pytest
import torch

import bench
import generate
import qwen_kernels
from qwen_kernels import compiled

# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------

def test_sampling_helpers():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    assert generate.sample(logits, 0).tolist() == [1]
    g = torch.Generator().manual_seed(0)
    # top-k 1 and a tiny top-p are greedy whatever the temperature
    assert all(generate.sample(logits, 5.0, top_k=1, generator=g).item() == 1 for _ in range(20))
    assert all(generate.sample(logits, 5.0, top_p=0.01, generator=g).item() == 1 for _ in range(20))
    # top-p 0.7 keeps tokens 1 and 2 (0.665 + 0.245 > 0.7), never 0 or 3
    picks = {generate.sample(logits, 1.0, top_p=0.7, generator=g).item() for _ in range(200)}
    assert picks == {1, 2}
    seen = torch.tensor([[False, True, False, True]])
    penalised = generate.apply_repetition_penalty(logits, seen, 2.0)
    assert penalised.tolist() == [[1.0, 1.5, 2.0, -2.0]]


def test_sampling_matches_transformers_warpers():
    from transformers.generation import logits_process as lp
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    history = torch.randint(0, 50, (3, 7))
    expected = lp.RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    for warper in (lp.TemperatureLogitsWarper(0.7), lp.TopKLogitsWarper(10), lp.TopPLogitsWarper(0.8)):
        expected = warper(history, expected)
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter(1, history, True)
    ours = generate.apply_repetition_penalty(logits, seen, 1.3)
    # sample() filters then draws; compare the filtered distribution it draws from
    kept = []
    g = torch.Generator().manual_seed(1)
    for _ in range(400):
        kept.append(generate.sample(ours, 0.7, top_k=10, top_p=0.8, generator=g))
    allowed = torch.isfinite(expected)
    picks = torch.stack(kept)  # (400, 3)
    for row in range(3):
        assert allowed[row, picks[:, row]].all()
    assert set(picks[:, 0].tolist()) == set(torch.nonzero(allowed[0]).flatten().tolist())


def test_sampling_draws_transformers_distribution_with_ties():
    """top_k keeps the ties of its k-th logit (as transformers' TopKLogitsWarper does); the draw
    among the kept tokens (sample's CPU path) has the probabilities of transformers' warped logits."""
    from transformers.generation import logits_process as lp
    logits = torch.tensor([[5.0, 4.0, 4.0, 4.0, 1.0, 0.5, 3.0, -2.0] * 3])  # ties, and one vocab of 24
    history = torch.tensor([[0]])
    expected = logits.clone()
    for warper in (lp.TemperatureLogitsWarper(0.8), lp.TopKLogitsWarper(4), lp.TopPLogitsWarper(0.95)):
        expected = warper(history, expected)
    p = expected.softmax(-1)[0]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([generate.sample(logits, 0.8, top_k=4, top_p=0.95, generator=g)
                         for _ in range(20000)])
    freq = torch.bincount(draws.flatten(), minlength=24).float() / len(draws)
    assert set(torch.nonzero(freq).flatten().tolist()) == set(torch.nonzero(p).flatten().tolist())
    assert int((p > 0).sum()) == 12  # the three 5.0s and the nine 4.0 ties of the 4th best
    torch.testing.assert_close(freq, p, atol=0.02, rtol=0)


# ----------------------------------------------------------------------------------------------
# The compiled decode step
# ----------------------------------------------------------------------------------------------

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


def test_compiled_decode_follows_changes_to_the_model():
    """The compiled step skips dynamo's per-call checks of the modules (qwen_kernels.compiled.decode_step),
    so a model changed after a compilation (quantized, other kernels) must get a step of its own,
    never the old one (which read the replaced layers' weights: a KeyError or wrong tokens)."""
    pytest.importorskip("torch._inductor")
    quantize = pytest.importorskip("quantize")
    model = bench.random_model(bench.PRESETS["tiny"], torch.device("cpu"), torch.float32, seed=3)
    prompts = [[5, 17, 99, 3]]
    try:
        compiled = generate.generate_batch(model, prompts, 6, temperature=0, compile=True)
    except Exception as e:  # no C++ compiler for inductor on this machine
        pytest.skip(f"torch.compile unavailable on this CPU: {type(e).__name__}: {e}")
    assert compiled == generate.generate_batch(model, prompts, 6, temperature=0)
    quantize.quantize(model, "int8")
    assert (generate.generate_batch(model, prompts, 6, temperature=0, compile=True)
            == generate.generate_batch(model, prompts, 6, temperature=0))
    qwen_kernels.install(model, "reference")
    assert (generate.generate_batch(model, prompts, 6, temperature=0, compile=True)
            == generate.generate_batch(model, prompts, 6, temperature=0))
    assert len(model._compiled_decode_steps) == 3


def test_static_cache_len_buckets():
    assert compiled.cache_len(5, 64) == 64  # a tiny context: the whole context
    assert compiled.cache_len(100, 32768) == 1024
    assert compiled.cache_len(1024, 32768) == 1024
    assert compiled.cache_len(1025, 32768) == 2048
    assert compiled.cache_len(40000, 40960) == 40960  # never past the context length


def test_compiled_decode_compiles_once_across_prompts():
    """New prompt lengths and numbers of new tokens reuse the compiled step and its cache (same
    memory, as a captured CUDA graph needs); a plain forward still works afterwards."""
    pytest.importorskip("torch._inductor")
    preset = {**bench.PRESETS["tiny"], "max_position_embeddings": 2048}
    model = bench.random_model(preset, torch.device("cpu"), torch.float32, seed=2)
    try:
        first = generate.generate_batch(model, [[5, 17, 99, 3]], 4, temperature=0, compile=True)
    except Exception as e:  # no C++ compiler for inductor on this machine
        pytest.skip(f"torch.compile unavailable on this CPU: {type(e).__name__}: {e}")
    cache = model.model.layers[0].self_attn.cache.k
    assert cache.shape[2] == 1024  # the bucket, not 4 + 4
    with torch._dynamo.config.patch(error_on_recompile=True):
        for prompt, n in [([1, 2, 3, 4, 5, 6, 7], 9), ([9] * 30, 20)]:
            compiled = generate.generate_batch(model, [prompt], n, temperature=0, compile=True)
            assert model.model.layers[0].self_attn.cache.k is cache
            assert compiled == generate.generate_batch(model, [prompt], n, temperature=0)  # eager
            model.setup_cache(1, 1024)  # (the eager run dropped the cache; this allocates it anew)
            cache = model.model.layers[0].self_attn.cache.k
    assert first == generate.generate_batch(model, [[5, 17, 99, 3]], 4, temperature=0)
    ids = torch.tensor([[5, 17, 99, 3]])
    generate.generate_batch(model, [[1, 2]], 2, compile=True)  # leaves its cache set up
    with torch.no_grad():
        logits = model(ids)  # no input_pos: the cache is neither needed nor touched
        model.clear_cache()
        torch.testing.assert_close(logits, model(ids))


# ----------------------------------------------------------------------------------------------
# Long waits: the prefill in chunks, and progress on stderr
# ----------------------------------------------------------------------------------------------

def test_a_long_prompt_is_prefilled_in_chunks_and_reports_its_progress(monkeypatch):
    """Chunks of PREFILL_CHUNK tokens, each on the cache of those before, give the tokens of one
    prefill (padded rows too), and progress hears of each chunk."""
    model = bench.random_model(bench.PRESETS["tiny"], torch.device("cpu"), torch.float32, seed=4)
    prompts = [[5, 17, 99, 3, 8, 8, 1, 40, 2, 77], [9, 4, 1, 200, 31, 6]]
    whole = generate.generate_batch(model, prompts, 6, temperature=0)
    monkeypatch.setattr(generate, "PREFILL_CHUNK", 4)
    told = []
    chunked = [t.tolist() for t in generate.generate_tokens(model, prompts, 6,
                                                            progress=lambda *a: told.append(a))]
    assert [list(row) for row in zip(*chunked)] == whole
    assert told == [(4, 10), (8, 10), (10, 10)]


def test_progress_is_quiet_for_two_seconds_then_a_line_a_tenth(monkeypatch, capsys):
    clock = [0.0]
    monkeypatch.setattr(generate.time, "perf_counter", lambda: clock[0])
    progress = generate.Progress("loading", "MB", 1e-6)
    progress.tty = False                                # stderr is not a terminal (as under pytest)
    for done in range(0, 1_000_000_001, 50_000_000):
        clock[0] = done / 250_000_000                   # 4 s in all
        progress(done, 1_000_000_000)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "[loading: 50% (500 of 1,000 MB)]"   # the first line once 2 s have passed
    assert lines[-1] == "[loading: 100% (1,000 of 1,000 MB)]" and len(lines) == 6
    quick = generate.Progress("prefill", "tokens")
    clock[0] = 0.5
    quick(10, 10)                                       # over within 2 s: nothing at all
    assert capsys.readouterr().err == ""
