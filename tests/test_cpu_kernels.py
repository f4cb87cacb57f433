"""qwen_kernels/cpu_matvec.cpp and cpu_attention.cpp: every op against a float64 computation of the
same formula, on shapes with tails (K not a multiple of 16, N not a multiple of the tile, more rows
of x than one pass takes), in each activation dtype; the layers and the model files that call the
ops; and the fallbacks.

Where a C++ compiler is present the kernels must build (a failed build fails here, it is not
skipped); without one these tests skip and the callers' torch paths serve."""
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

import generate
import quantize
import qwen2
import qwen_kernels
from qwen_kernels import cpu

if shutil.which("c++") is None and shutil.which("g++") is None:
    pytest.skip("no C++ compiler: the CPU kernels cannot be built here (the torch paths serve)",
                allow_module_level=True)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def test_the_kernels_build():
    assert cpu.available(), cpu.unavailable_reason


def test_the_build_is_named_after_the_cpu(monkeypatch):
    """-march=native code must not be loaded on another CPU from a shared cache."""
    import platform
    here = cpu.build_name()
    assert here.startswith("qwen_cpu_kernels_") and here == cpu.build_name()
    monkeypatch.setattr(platform, "machine", lambda: "another-machine")
    assert cpu.build_name() != here


# The build: a dead process's lock never makes a run wait; a half-written build is started again.
PROBE = ("import sys, time; t = time.perf_counter()\n"
         "from qwen_kernels import cpu\n"
         "print(cpu.available(), cpu.unavailable_reason, round(time.perf_counter() - t, 1))\n")


def probe_env(extensions) -> dict:
    """The environment of a fresh Python with torch's extension folder at `extensions`."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(cpu.__file__)))
    return {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions), "PYTHONPATH": root}


def probe(extensions, timeout=600):
    """A fresh Python loading the kernels with torch's extension folder at `extensions`."""
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-c", PROBE], env=probe_env(extensions), capture_output=True,
                          text=True, timeout=timeout)


def built_folder():
    """This session's build of the kernels (built first if need be)."""
    from torch.utils.cpp_extension import _get_build_directory
    assert cpu.available(), cpu.unavailable_reason
    return _get_build_directory(cpu.build_name(), verbose=False)


def test_a_dead_processs_lock_does_not_hang_the_next_run(tmp_path):
    """torch's lock file and a half-written build left by a process that was killed (a closed terminal
    during the first build): the next run finishes, building what is missing, and says so."""
    folder = tmp_path / cpu.build_name()  # (with TORCH_EXTENSIONS_DIR set, torch builds right under it)
    shutil.copytree(built_folder(), folder)
    (folder / "lock").write_text("")                       # torch's FileBaton, its owner gone
    out = probe(tmp_path, timeout=120)
    assert out.stdout.startswith("True"), out.stdout + out.stderr[-2000:]
    assert "building" not in out.stderr                    # complete: loaded as it is
    (folder / "lock").write_text("")
    (folder / f"{cpu.build_name()}.so").unlink()           # half-written: objects, no library yet
    out = probe(tmp_path, timeout=600)
    assert out.stdout.startswith("True"), out.stdout + out.stderr[-2000:]
    assert "[building the CPU kernels (about 30 s, once per machine)...]" in out.stderr, out.stderr
    assert "[CPU kernels built in" in out.stderr, out.stderr


def test_a_build_killed_midway_is_built_again_by_the_next_run(tmp_path):
    """SIGKILL while compiling (the lock files stay, objects half written); the next run completes the
    build, and while one process builds, another waits for it rather than building beside it."""
    import signal
    import subprocess
    import sys
    import time
    env = probe_env(tmp_path)
    first = subprocess.Popen([sys.executable, "-c", PROBE], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.rglob("*.o*")) and not list(tmp_path.rglob("build.ninja")):
        assert time.monotonic() < deadline and first.poll() is None, "the build never started"
        time.sleep(0.2)
    time.sleep(3)                                          # midway through compiling
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    second = subprocess.Popen([sys.executable, "-c", PROBE], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    time.sleep(1)
    third = probe(tmp_path, timeout=600)                   # meanwhile: waits for the second's build
    out, err = second.communicate(timeout=600)
    assert out.startswith("True"), out + err[-2000:]
    assert "building the CPU kernels" in err, err
    assert third.stdout.startswith("True"), third.stdout + third.stderr[-2000:]


def tolerance(dtype, y):
    """float32 sums in another order; 16-bit outputs are rounded once (half an ulp, 2^-9 for bf16)."""
    return (1e-5 if dtype == torch.float32 else 2 ** -8) * y.abs().max().item() + 1e-6


def cases():
    g = torch.Generator().manual_seed(0)
    for M, N, K in [(1, 64, 64), (1, 131, 200), (3, 67, 96), (5, 9, 4864 // 16), (9, 130, 64)]:
        yield M, N, K, g


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_bf16(dtype):
    for M, N, K, g in cases():
        x = torch.randn(M, K, generator=g).to(dtype)
        w = torch.randn(N, K, generator=g).to(torch.bfloat16)
        bias = torch.randn(N, generator=g).to(dtype)
        want = x.double() @ w.double().T + bias.double()
        for b in (None, bias):
            got = torch.ops.qwen_cpu.linear_bf16(x, w, b)
            assert got.dtype == dtype and got.shape == (M, N)
            torch.testing.assert_close(got.double(), want - (0 if b is not None else bias.double()),
                                       atol=tolerance(dtype, want), rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_int8(dtype):
    for M, N, K, g in cases():
        x = torch.randn(M, K, generator=g).to(dtype)
        q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
        s = (torch.rand(N, generator=g) + 0.5).to(dtype)
        bias = torch.randn(N, generator=g).to(dtype)
        want = x.double() @ (q.double() * s.double()[:, None]).T + bias.double()
        got = torch.ops.qwen_cpu.linear_int8(x, q, s, bias)
        torch.testing.assert_close(got.double(), want, atol=tolerance(dtype, want), rtol=0)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_int4(dtype, group_size):
    """w = (q - 8) * s + z per group, with q in pack_int4's layout."""
    g = torch.Generator().manual_seed(group_size)
    for M, N in [(1, 64), (3, 67), (6, 5)]:
        K = 2 * group_size + (128 if group_size < 128 else 0)
        x = torch.randn(M, K, generator=g).to(dtype)
        q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
        s = (torch.rand(N, K // group_size, generator=g) / 8).to(dtype)
        z = torch.randn(N, K // group_size, generator=g).to(dtype)
        w = (q.double().view(N, -1, group_size) - 8) * s.double()[..., None] + z.double()[..., None]
        want = x.double() @ w.view(N, K).T
        got = torch.ops.qwen_cpu.linear_int4(x, quantize.pack_int4(q), s, z, group_size, None)
        torch.testing.assert_close(got.double(), want, atol=tolerance(dtype, want), rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_int4_is_quantizes(dtype):
    """The prompt path's dequantization gives quantize.dequantize_int4's matrix."""
    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 16, (10, 128), generator=g, dtype=torch.uint8)
    s, z = (torch.rand(10, 4, generator=g) / 8).to(dtype), torch.randn(10, 4, generator=g).to(dtype)
    got = torch.ops.qwen_cpu.dequantize_int4(quantize.pack_int4(q), s, z, 32)
    torch.testing.assert_close(got, quantize.dequantize_int4(q, s, z, dtype), atol=0, rtol=2 ** -8)


def test_int4_layer_without_the_kernels_takes_torchs_int4_kernel(monkeypatch):
    """No kernels (no compiler, or --kernels torch): torch's own int4 kernel on the weights repacked
    in its layout once, still equal to the reference."""
    layer = quantize.Int4Linear(torch.nn.Linear(256, 128, bias=True).to(torch.bfloat16), torch.bfloat16, 32)
    layer.kernels = "torch"  # (qwen_kernels.install(model, "torch") sets it)
    x = torch.randn(1, 2, 256, dtype=torch.bfloat16)
    got, want = layer(x), layer.reference(x)
    assert layer._torch_layout is not None
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2 * want.abs().max().item(), rtol=0)


def test_bad_arguments_are_refused():
    x = torch.randn(1, 64)
    with pytest.raises(RuntimeError, match="the weight has 32 columns, expected 64"):
        torch.ops.qwen_cpu.linear_bf16(x, torch.zeros(8, 32, dtype=torch.bfloat16), None)
    with pytest.raises(RuntimeError, match="group size must be a multiple of 32"):
        torch.ops.qwen_cpu.linear_int4(x, torch.zeros(8, 32, dtype=torch.uint8), torch.ones(8, 4),
                                       torch.ones(8, 4), 16, None)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.qwen_cpu.linear_int8(torch.randn(64, 2).T, torch.zeros(8, 64, dtype=torch.int8),
                                       torch.ones(8), None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, H, KVH, S, D", [
    (1, 14, 2, 160, 64), (2, 8, 8, 7, 128), (3, 4, 1, 1, 16),
    (1, 16, 1, 700, 128),  # 16 query heads per key/value head (two units of 8), the cache split in two
    (2, 18, 2, 300, 48),   # 9 heads per key/value head (units of 5 and 4), head_dim 48 (no fixed loop)
])
def test_decode_attention_is_sdpa(dtype, B, H, KVH, S, D):
    """One query row over the first S slots of a longer cache (a strided view), grouped heads."""
    g = torch.Generator().manual_seed(S)
    cache_k = torch.randn(B, KVH, S + 5, D, generator=g).to(dtype)
    cache_v = torch.randn(B, KVH, S + 5, D, generator=g).to(dtype)
    k, v = cache_k[:, :, :S], cache_v[:, :, :S]
    q = torch.randn(B, 1, H, D, generator=g).to(dtype).transpose(1, 2)             # (B, H, 1, D), strided
    assert cpu.use_attention(q, k)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=D ** -0.5,
                                          enable_gqa=True)
    got = cpu.decode_attention(q, k, v, None, D ** -0.5)
    assert got.shape == (B, H, 1, D) and got.dtype == dtype
    torch.testing.assert_close(got.double(), want, atol=tolerance(dtype, want), rtol=0)
    # a mask per row (left padding, a window, unused slots of a static cache), and one for all rows
    for mask in (torch.rand(B, 1, 1, S, generator=g) < 0.6, torch.rand(1, 1, 1, S, generator=g) < 0.6):
        mask[..., -1] = True  # every row sees at least one key (the model's masks guarantee it)
        want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask,
                                              scale=D ** -0.5, enable_gqa=True)
        got = cpu.decode_attention(q, k, v, mask, D ** -0.5)
        torch.testing.assert_close(got.double(), want, atol=tolerance(dtype, want), rtol=0)


def test_decode_attention_rows_see_different_ranges():
    """Rows whose visible keys end at different slots (a static cache, left padding), over a cache
    long enough to be split between threads; a row that sees no key gets zeros."""
    g = torch.Generator().manual_seed(0)
    B, H, KVH, S, D = 3, 8, 1, 1024, 64  # 3 units of work for 8 threads: the keys are split in 3
    q, k, v = (torch.randn(B, n, t, D, generator=g) for n, t in ((H, 1), (KVH, S), (KVH, S)))
    mask = torch.zeros(B, 1, 1, S, dtype=torch.bool)
    mask[0, ..., :300] = True        # the first 300 slots filled
    mask[1, ..., 40:900] = True      # 40 slots of left padding, then 860 keys
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        got = cpu.decode_attention(q, k, v, mask, 0.125)
    finally:
        torch.set_num_threads(threads)
    for b in (0, 1):
        want = F.scaled_dot_product_attention(q[b:b + 1].double(), k[b:b + 1].double(), v[b:b + 1].double(),
                                              attn_mask=mask[b:b + 1], scale=0.125, enable_gqa=True)
        torch.testing.assert_close(got[b:b + 1].double(), want, atol=1e-5, rtol=0)
    assert torch.equal(got[2], torch.zeros_like(got[2]))


def test_decode_attention_declines_what_it_does_not_do():
    q, k = torch.randn(1, 4, 2, 64), torch.randn(1, 2, 9, 64)
    assert not cpu.use_attention(q, k)                                               # two query rows
    assert not cpu.use_attention(torch.randn(1, 4, 1, 24), torch.randn(1, 2, 9, 24))  # head_dim 24
    assert cpu.use_attention(q[:, :, :1], k)


def tiny_bf16_model(seed=0, **extra):
    torch.manual_seed(seed)
    config = qwen2.Qwen2Config(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, **extra)
    return qwen2.Qwen2ForCausalLM(config).to(torch.bfloat16).eval()


def test_model_with_the_kernels_matches_torchs_paths(monkeypatch):
    """A bf16 model whose linear layers were given the kernels (qwen_kernels.install), decoding
    through its KV cache, gives torch's logits within bf16 rounding and the same greedy tokens."""
    model = tiny_bf16_model()
    prompt = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        qwen_kernels.install(model, "torch")
        want = [t.tolist() for t in generate.generate_tokens(model, prompt.tolist(), 12)]
        want_logits = model(prompt)
        qwen_kernels.install(model)
        assert all(type(m) is cpu.Linear for m in model.modules() if isinstance(m, torch.nn.Linear))
        calls = []
        real = cpu.decode_attention
        monkeypatch.setattr(cpu, "decode_attention", lambda *a: calls.append(1) or real(*a))
        got = [t.tolist() for t in generate.generate_tokens(model, prompt.tolist(), 12)]
        assert calls, "the decode steps did not take the CPU attention"
        model.clear_cache()
        got_logits = model(prompt[:, :1])
    assert got == want
    torch.testing.assert_close(got_logits.float(), want_logits[:, :1].float(), atol=0.05, rtol=0)


def test_kernels_torch_leaves_torchs_paths():
    """install(model, "torch") after "auto" (generate.py --kernels torch): F.linear and SDPA, bit for bit."""
    plain, kerneled = tiny_bf16_model(), tiny_bf16_model()
    qwen_kernels.install(kerneled)
    qwen_kernels.install(kerneled, "torch")
    assert not any(type(m) is cpu.Linear for m in kerneled.modules())
    x = torch.randint(0, 256, (1, 1))
    with torch.no_grad():
        plain.setup_cache(1, 4)
        kerneled.setup_cache(1, 4)
        assert torch.equal(plain(x, input_pos=0), kerneled(x, input_pos=0))


def test_real_checkpoint_answers_the_same_with_the_kernels(real_ckpt, monkeypatch):
    """The real 0.5B in bf16 (generate.load: the kernels on): the greedy answers of torch's paths."""
    model, tok, _ = generate.load(real_ckpt, device="cpu", dtype="bfloat16")
    stop = {tok.token_id("<|im_end|>")}
    for question in ("Write a Python function that adds two numbers.", "What is a hash table?",
                     "Name three prime numbers."):
        prompt = tok.encode_chat([{"role": "user", "content": question}])
        qwen_kernels.install(model, "auto")
        got = list(generate.generate(model, prompt, 32, stop_ids=stop))
        qwen_kernels.install(model, "torch")
        want = list(generate.generate(model, prompt, 32, stop_ids=stop))
        assert got == want, question


def test_a_failed_build_is_one_line_and_torchs_kernels_serve(tmp_path, tiny_chat_checkpoint):
    """A compiler that fails (here CXX=false): the run goes on with torch's kernels, says why in one
    line, and a later run tries again (nothing of the failure is kept)."""
    import subprocess
    import sys
    env = {**probe_env(tmp_path), "CXX": "false"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.startswith("False ") and "'false'" in out.stdout, out.stdout + out.stderr[-2000:]
    assert "again" not in out.stderr, out.stderr  # a first build's failure is the compiler's, not retried
    root = os.path.dirname(os.path.dirname(os.path.abspath(cpu.__file__)))
    cli = subprocess.run([sys.executable, os.path.join(root, "generate.py"), "--model", tiny_chat_checkpoint,
                          "--prompt", "hi", "--max-new-tokens", "3"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert cli.returncode == 0, cli.stderr[-2000:]
    said = [line for line in cli.stderr.splitlines() if "CPU kernels unavailable" in line]
    assert len(said) == 1 and said[0].startswith("[CPU kernels unavailable, torch's kernels serve (slower): ")
    assert "Traceback" not in cli.stderr
