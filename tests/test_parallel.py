"""parallel.py: tensor and expert parallelism on CPU with gloo, in processes started by torchrun.

Tiny checkpoints written by transformers' save_pretrained, chosen to reach the odd corners: a
vocabulary that does not divide by the ranks (97), fewer key/value heads than ranks, experts that do
not divide evenly (7), a shared expert, a dense layer in a MoE model, sliding-window layers, a tied
lm_head, and an o_proj bias (added once, not once per rank). Each rank's logits are compared with
one process running the model file alone.
"""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, save_tiny, write_tiny_tokenizer
from safetensors import safe_open

transformers = pytest.importorskip("transformers")

from parallel_worker import PROMPTS, padded_steps  # noqa: E402

import checkpoint  # noqa: E402
import generate  # noqa: E402
import parallel  # noqa: E402
import quantize  # noqa: E402
from tokenizer import read_json  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or sys.platform != "linux",
                                reason="needs torch.distributed (gloo) on Linux")

COMMON = dict(num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=128)
MODELS = {
    # sliding window from layer 1 on (window 5 < the 19-token prompt); 97 rows of lm_head
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(COMMON, vocab_size=97, hidden_size=64, intermediate_size=112, num_key_value_heads=2,
                   use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    # 7 experts (4 + 3 over 2 ranks, 2 + 2 + 2 + 1 over 4), a shared expert, layer 1 dense
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM,
                  dict(COMMON, vocab_size=97, hidden_size=64, intermediate_size=112, num_key_value_heads=2,
                       num_experts=7, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=48, mlp_only_layers=[1], initializer_range=0.15)),
    # head_dim 16 != hidden / heads; attention biases, o_proj's included
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  dict(COMMON, vocab_size=128, hidden_size=32, intermediate_size=48, num_key_value_heads=2,
                       head_dim=16, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                       attention_bias=True)),
    # one key/value head for 2 or 4 ranks; tied lm_head
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              dict(COMMON, vocab_size=100, hidden_size=32, intermediate_size=48, num_key_value_heads=1,
                   head_dim=16, tie_word_embeddings=True)),
}
ATOL = 1e-5


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("parallel")
    out = {}
    for name, (config_cls, model_cls, kwargs) in MODELS.items():
        folder, _ = save_tiny(base / name, config_cls, model_cls, **kwargs)
        out[name] = folder
    return out


def torchrun(n: int, *args, timeout=300, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QWEN_DIST_TIMEOUT": "60"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
           "--master-port", str(free_port()), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **kwargs)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(tmp_path, n, checks, folders):
    out = tmp_path / f"results-{n}.pt"
    proc = torchrun(n, "tests/parallel_worker.py", str(out), ",".join(checks), *folders)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    return torch.load(out, weights_only=False)


def one_process(folder):
    """The model file alone, and what the worker computes with it."""
    module = checkpoint.model_module(read_json(os.path.join(folder, "config.json"))["model_type"])
    model = module.from_pretrained(folder, dtype=torch.float32)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, padded = model(ids), padded_steps(model, vocab)
    greedy = generate.generate_batch(model, [[p % vocab for p in q] for q in PROMPTS], 8)
    return model, ids, {"logits": logits, "padded": padded, "greedy": greedy}


def file_bytes(folder, n_ranks, kv_heads):
    """(all tensor bytes, bytes of the tensors every rank reads whole) from the checkpoint's header:
    the embedding, norms, router and shared-expert gate, and k/v when there are fewer heads than ranks."""
    replicated = r"embed_tokens|norm|mlp\.gate\.|shared_expert_gate"
    if kv_heads < n_ranks:
        replicated += r"|k_proj|v_proj"
    total = whole = 0
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        for name in f.keys():
            t = f.get_slice(name)
            size = torch.Size(t.get_shape()).numel() * 4
            total += size
            whole += size if re.search(replicated, name) else 0
    return total, whole


@pytest.mark.parametrize("n", [2, 4])
def test_ranks_give_the_logits_and_generations_of_one_process(tmp_path, folders, n):
    checks = ["logits", "padded", "greedy"] + (["int8"] if n == 2 else [])
    results = run_worker(tmp_path, n, checks, list(folders.values()))
    for name, folder in folders.items():
        got = results[folder]
        model, ids, expected = one_process(folder)
        torch.testing.assert_close(got["logits"], expected["logits"], atol=ATOL, rtol=0, msg=name)
        torch.testing.assert_close(got["padded"], expected["padded"], atol=ATOL, rtol=0, msg=name)
        assert got["greedy"] == expected["greedy"], name
        # each rank read about its share of the sharded tensors, plus what every rank holds whole
        total, whole = file_bytes(folder, n, MODELS[name][2]["num_key_value_heads"])
        share = {2: 0.6, 4: 0.3}[n]  # 1/n, and the uneven expert split (4 of 7, 2 of 7)
        assert all(b <= whole + share * (total - whole) for b in got["bytes_read"]), (name, got["bytes_read"])
        assert sum(got["bytes_read"]) >= total, name
        if "int8" in got:  # quantized after sharding: as close to full precision as one process's int8
            with torch.no_grad():
                alone = quantize.quantize(model, "int8")(ids)
            error_alone = (alone - expected["logits"]).abs().max()
            error_sharded = (got["int8"] - expected["logits"]).abs().max()
            assert 0 < error_sharded < 2 * error_alone + 1e-3, (name, error_sharded, error_alone)


def test_compiled_decode_gives_the_generations_of_one_process(tmp_path, folders):
    chosen = [folders["qwen2"], folders["qwen3_moe"]]
    out = tmp_path / "compiled.pt"
    proc = torchrun(2, "tests/parallel_worker.py", str(out), "compiled", *chosen, timeout=600)
    if proc.returncode != 0 and "compile" in proc.stderr.lower() and "InductorError" in proc.stderr:
        pytest.skip("torch.compile unavailable on this CPU")
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = torch.load(out, weights_only=False)
    for folder in chosen:
        assert results[folder]["compiled"] == one_process(folder)[2]["greedy"], folder


def test_each_rank_loads_its_slice(folders):
    """In one process, rank by rank (no process group needed to load): each parameter is the slice
    of the whole model's the layout names."""
    whole = checkpoint.model_module("qwen2_moe").from_pretrained(folders["qwen2_moe"], dtype=torch.float32)
    full = dict(whole.named_parameters())
    for rank, experts, rows in ((0, slice(0, 4), slice(0, 49)), (1, slice(4, 7), slice(49, 97))):
        part = parallel.from_pretrained(folders["qwen2_moe"], dtype=torch.float32, rank=rank, world=2)
        local = {k.removeprefix("model.layers.0."): v for k, v in part.named_parameters()}
        ref = {k.removeprefix("model.layers.0."): v for k, v in full.items()}
        assert torch.equal(local["mlp.experts.gate_up_proj"], ref["mlp.experts.gate_up_proj"][experts])
        q = slice(rank * 32, (rank + 1) * 32)                           # heads 2r, 2r+1 of 16 dims
        assert torch.equal(local["self_attn.q_proj.weight"], ref["self_attn.q_proj.weight"][q])
        kv = slice(rank * 16, (rank + 1) * 16)                          # key/value head r
        assert torch.equal(local["self_attn.k_proj.weight"], ref["self_attn.k_proj.weight"][kv])
        assert torch.equal(local["self_attn.o_proj.weight"], ref["self_attn.o_proj.weight"][:, q])
        shared = slice(rank * 24, (rank + 1) * 24)
        assert torch.equal(local["mlp.shared_expert.down_proj.weight"],
                           ref["mlp.shared_expert.down_proj.weight"][:, shared])
        assert torch.equal(local["mlp.gate.weight"], ref["mlp.gate.weight"])   # the router
        head = local["lm_head.weight"]                                   # 49 rows each, the last padded
        assert head.shape == (49, 64)
        assert torch.equal(head[:rows.stop - rows.start], full["lm_head.weight"][rows])
        assert not head[rows.stop - rows.start:].any()
        assert part.model.layers[0].self_attn.n_heads == 2 and part.model.layers[0].self_attn.n_kv_heads == 1


def test_stacked_expert_checkpoints_are_sliced_too(tmp_path, folders):
    """transformers 5 can save the experts stacked (E, 2I, C): the slice is read from the stack."""
    from safetensors.torch import save_file
    folder, hf = save_tiny(tmp_path / "hf", *MODELS["qwen3_moe"][:2], **MODELS["qwen3_moe"][2])
    stacked = tmp_path / "stacked"
    stacked.mkdir()
    os.link(os.path.join(folder, "config.json"), stacked / "config.json")
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, str(stacked / "model.safetensors"))
    part = parallel.from_pretrained(str(stacked), dtype=torch.float32, rank=1, world=2)
    name = "model.layers.2.mlp.experts.down_proj"
    assert torch.equal(dict(part.named_parameters())[name], state[name][4:8])
    per_expert = parallel.from_pretrained(folder, dtype=torch.float32, rank=1, world=2)
    assert per_expert.bytes_read == part.bytes_read  # the same bytes, whichever layout


@pytest.mark.parametrize("heads, kv, experts, world, message", [
    (14, 2, 0, 4, r"14 query heads do not divide by 4.*use 1, 2, 14 ranks"),  # Qwen2.5-0.5B
    (12, 3, 0, 2, r"3 key/value heads and 2 ranks: neither divides the other.*use 1, 3, 6, 12 ranks"),
    (16, 4, 4, 8, r"4 experts cannot give each of 8 ranks one"),
])
def test_layouts_that_cannot_work_are_refused_before_loading(heads, kv, experts, world, message):
    config = type("C", (), dict(num_attention_heads=heads, num_key_value_heads=kv, num_experts=experts,
                                head_dim=8, vocab_size=100))
    with pytest.raises(ValueError, match=message):
        parallel.plan(config, 0, world)


@pytest.mark.parametrize("heads, kv, world", [(64, 4, 8), (28, 4, 4), (14, 2, 14), (40, 8, 8), (16, 16, 2)])
def test_each_rank_holds_the_key_value_heads_its_query_heads_use(heads, kv, world):
    """Qwen3-235B-A22B (64 query heads, 4 key/value heads at 8 ranks) and others: query head h uses
    key/value head h // (heads / kv) in transformers' repeat_kv."""
    config = type("C", (), dict(num_attention_heads=heads, num_key_value_heads=kv, head_dim=8, vocab_size=10))
    for rank in range(world):
        layout = parallel.plan(config, rank, world)
        used = {h // (heads // kv) for h in range(*layout.heads)}
        assert used == set(range(*layout.kv_heads)), (rank, layout)
    assert sum(len(range(*parallel.plan(config, r, world).heads)) for r in range(world)) == heads


# ----------------------------------------------------------------------------------------------
# The command line under torchrun
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    import json
    folder = tmp_path_factory.mktemp("chat") / "tiny"
    folder.mkdir()
    vocab = write_tiny_tokenizer(str(folder))
    save_tiny(folder, transformers.Qwen2Config, transformers.Qwen2ForCausalLM, vocab_size=vocab,
              hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=200)
    with open(folder / "generation_config.json", "w") as f:
        json.dump({"eos_token_id": [2, 0], "do_sample": False}, f)
    return str(folder)


@pytest.mark.parametrize("mode", [["--raw", "--prompt", "def main(): print('hi')"], ["--chat"]])
def test_the_cli_under_torchrun_prints_what_one_process_prints(chat_folder, mode):
    args = ["generate.py", "--model", chat_folder, "--dtype", "float32", "--max-new-tokens", "12", *mode]
    stdin = "Hello world\nthis is a tiny tokenizer\n" if "--chat" in mode else None
    alone = subprocess.run([sys.executable, *args], cwd=ROOT, input=stdin, capture_output=True, text=True,
                           timeout=120)
    assert alone.returncode == 0, alone.stderr
    two = torchrun(2, *args, input=stdin)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout == alone.stdout and two.stdout.strip()
    assert two.stderr.count("loading ") == 1  # rank 0 alone speaks
    assert two.stderr.count("new tokens") == alone.stderr.count("new tokens")


def test_the_cli_refuses_a_layout_with_one_line(chat_folder):
    proc = torchrun(3, "generate.py", "--model", chat_folder, "--prompt", "hi")
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert errors == ["error: cannot split this model over 3 ranks (4 query heads do not divide by 3; "
                      "num_attention_heads=4, num_key_value_heads=2); use 1, 2, 4 ranks"], proc.stderr[-2000:]


def worker_pids(launcher_pid: int) -> dict:
    """{local rank: pid} of the processes torchrun started (read from /proc)."""
    ranks = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != launcher_pid:
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            ranks[int(env[b"LOCAL_RANK"])] = int(pid)
        except (OSError, KeyError, ValueError, IndexError):
            continue
    return ranks


@pytest.mark.parametrize("how", ["a rank dies", "ctrl-c"])
def test_a_stopped_rank_or_ctrl_c_ends_every_process_with_one_line(chat_folder, how):
    import threading
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(free_port()), "generate.py", "--model", chat_folder, "--chat"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 120
        while not any(line.startswith("chat:") for line in lines):  # every rank waits for the first line
            assert time.time() < deadline and proc.poll() is None, "".join(lines)[-3000:]
            time.sleep(0.2)
        time.sleep(0.5)
        workers, stopped = worker_pids(proc.pid), time.time()
        if how == "a rank dies":
            os.kill(workers[1], signal.SIGKILL)
        else:  # what a terminal does on Ctrl-C: SIGINT to the whole foreground process group
            os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert time.time() - stopped < 45  # torchrun's grace period is 30 s; here it takes about one
    ours = [line for line in lines if line.startswith(("error", "interrupted"))]
    expected = "interrupted" if how == "ctrl-c" else "error: another process of the group stopped"
    assert len(ours) == 1 and ours[0].startswith(expected), "".join(lines)[-3000:]
    assert not any(os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z"
                   for pid in workers.values())


def test_bench_under_torchrun_reports_once_with_the_communication_share():
    proc = torchrun(2, "bench.py", "--preset", "tiny", "--prompt-len", "16", "--new-tokens", "8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("| ours") == 1 and "tiny on 2 ranks" in proc.stdout, proc.stdout
    share = re.search(r"communication: (\d+)% of a decode step", proc.stdout)
    assert share and 0 < int(share[1]) < 100, proc.stdout


def test_the_real_checkpoint_answers_the_same_on_two_ranks(real_ckpt):
    """Qwen2.5-Coder-0.5B-Instruct (14 query heads, 2 key/value heads, 151,936 vocabulary rows) in
    float32: two ranks print the greedy answer one process prints."""
    args = ["generate.py", "--model", real_ckpt, "--dtype", "float32", "--temperature", "0",
            "--max-new-tokens", "24", "--prompt", "Write a Python function that reverses a string."]
    alone = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0, alone.stderr[-2000:]
    two = torchrun(2, *args)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout == alone.stdout and "def" in two.stdout, (alone.stdout, two.stdout)
