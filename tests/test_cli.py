"""generate.py's command line: end to end on a tiny checkpoint, and one clear line for bad input."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import generate
import qwen2
from tokenizer import Tokenizer


def run_cli(*argv):
    """Run generate.py in a subprocess as a user would."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), *argv], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)


def test_end_to_end_greedy_matches_generate(tiny_chat_checkpoint):
    out = run_cli("--model", tiny_chat_checkpoint, "--prompt", "Hello world", "--temperature", "0",
                  "--max-new-tokens", "12", "--device", "cpu", "--dtype", "float32")
    assert out.returncode == 0, out.stderr
    # stdout is exactly the greedy continuation of the chat prompt (stop tokens not printed)
    model = qwen2.from_pretrained(tiny_chat_checkpoint)
    tok = Tokenizer(tiny_chat_checkpoint)
    prompt = tok.encode_chat([{"role": "user", "content": "Hello world"}])
    stops = {tok.token_id("<|im_end|>"), tok.token_id("<|endoftext|>")}
    expected = []
    for t in generate.generate(model, prompt, 12, temperature=0, stop_ids=stops):
        if t in stops:
            break
        expected.append(t)
    assert out.stdout == tok.decode(expected) + "\n"
    # the closing line goes to stderr with the numbers
    last = out.stderr.strip().splitlines()[-1]
    assert "prompt tokens" in last and "tok/s" in last and "peak memory" in last
    assert "Traceback" not in out.stderr


def test_cpu_default_dtype_is_bfloat16(tiny_chat_checkpoint, capsys):
    """The checkpoint is float32; on CPU generate.py still runs bfloat16 (measured fastest there)."""
    assert generate.main(["--model", tiny_chat_checkpoint, "--prompt", "hi", "--max-new-tokens", "2",
                          "--device", "cpu"]) == 0
    assert "(bfloat16)" in capsys.readouterr().err


def test_the_load_line_names_dtype_and_quantization(tiny_chat_checkpoint, capsys):
    assert generate.main(["--model", tiny_chat_checkpoint, "--prompt", "hi", "--max-new-tokens", "2",
                          "--quantize", "int4", "--quantize-embeddings", "int8"]) == 0
    line = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("loaded in"))
    assert line.endswith("(bfloat16, int4 weights in groups of 32, int8 embeddings)"), line


def test_raw_mode_and_sampling_flags(tiny_chat_checkpoint, capsys):
    args = ["--model", tiny_chat_checkpoint, "--raw", "--prompt", "def main", "--temperature", "0.8",
            "--top-k", "20", "--top-p", "0.9", "--repetition-penalty", "1.2", "--seed", "3",
            "--max-new-tokens", "6", "--dtype", "float32"]
    assert generate.main(args) == 0
    first = capsys.readouterr().out
    assert generate.main(args) == 0
    assert capsys.readouterr().out == first  # same seed, same text


def test_system_prompt_reaches_the_model(tiny_chat_checkpoint, monkeypatch):
    seen = {}
    real_generate = generate.generate

    def spy(model, prompt_ids, *a, **kw):
        seen["prompt"] = prompt_ids
        return real_generate(model, prompt_ids, *a, **kw)

    monkeypatch.setattr(generate, "generate", spy)
    assert generate.main(["--model", tiny_chat_checkpoint, "--prompt", "hi", "--system", "Be brief.",
                          "--max-new-tokens", "2"]) == 0
    tok = Tokenizer(tiny_chat_checkpoint)
    assert tok.decode(seen["prompt"]) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi"
                                          "<|im_end|>\n<|im_start|>assistant\n")


def test_chat_session_keeps_history(tiny_chat_checkpoint):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), "--model", tiny_chat_checkpoint,
                          "--chat", "--max-new-tokens", "4", "--temperature", "0"],
                         input="hello\nworld\n", capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("prompt tokens") == 2  # two answers
    # the second prompt carried the first exchange: more prompt tokens
    counts = [int(line.split()[0].strip("[")) for line in out.stderr.splitlines() if "prompt tokens" in line]
    assert counts[1] > counts[0] + 4


def test_context_limit_is_reported_not_an_error(tiny_chat_checkpoint, capsys):
    assert generate.main(["--model", tiny_chat_checkpoint, "--raw", "--prompt", "Hello world " * 20,
                          "--max-new-tokens", "500", "--temperature", "0"]) == 0
    assert "stopped at the context length of 200 tokens" in capsys.readouterr().err


def one_error_line(capsys, argv, code=2):
    assert generate.main(argv) == code
    captured = capsys.readouterr()
    lines = [line for line in captured.err.strip().splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--top-k", "-3"], "--top-k must be >= 0"),
    (["--repetition-penalty", "0"], "--repetition-penalty must be > 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--temperature", "hot"], "invalid float value"),
    (["--dtype", "int4"], "invalid choice"),
    (["--no-such-flag"], "unrecognized arguments"),
])
def test_invalid_flags(capsys, flags, message):
    line = one_error_line(capsys, ["--prompt", "hi", *flags])
    assert message in line


def test_empty_prompt(capsys, tiny_chat_checkpoint):
    assert "empty prompt" in one_error_line(capsys, ["--model", tiny_chat_checkpoint, "--prompt", "   "])
    assert "empty prompt" in one_error_line(capsys, ["--model", tiny_chat_checkpoint])


def test_prompt_longer_than_context(capsys, tiny_chat_checkpoint):
    argv = ["--model", tiny_chat_checkpoint, "--raw", "--prompt", "Hello world " * 150]
    line = one_error_line(capsys, argv)
    assert "context length is 200" in line


def test_bad_checkpoints(capsys, tmp_path, tiny_chat_checkpoint):
    assert "does not exist" in one_error_line(capsys, ["--model", str(tmp_path / "nope"), "--prompt", "hi"])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no config.json" in one_error_line(capsys, ["--model", str(empty), "--prompt", "hi"])
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_chat_checkpoint, no_weights)
    os.remove(no_weights / "model.safetensors")
    line = one_error_line(capsys, ["--model", str(no_weights), "--prompt", "hi"])
    assert "no *.safetensors weights" in line
    other = tmp_path / "llama"
    shutil.copytree(tiny_chat_checkpoint, other)
    config = json.loads((other / "config.json").read_text())
    config["model_type"] = "llama"
    (other / "config.json").write_text(json.dumps(config))
    line = one_error_line(capsys, ["--model", str(other), "--prompt", "hi"])
    assert "unsupported model_type 'llama'" in line and "qwen2" in line


def test_wrong_tensor_shape_names_both_shapes(capsys, tmp_path, tiny_chat_checkpoint):
    from safetensors.torch import load_file, save_file
    bad = tmp_path / "bad"
    shutil.copytree(tiny_chat_checkpoint, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["model.layers.0.mlp.down_proj.weight"] = torch.zeros(32, 60)
    save_file(tensors, str(bad / "model.safetensors"))
    line = one_error_line(capsys, ["--model", str(bad), "--prompt", "hi"])
    assert "model.layers.0.mlp.down_proj.weight has shape (32, 60), the config expects (32, 64)" in line


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_weight_file_is_bad_input(tmp_path, tiny_chat_checkpoint, damage):
    """A truncated or corrupt .safetensors file: one line naming the file and what to do, exit code 2."""
    bad = tmp_path / "bad"
    shutil.copytree(tiny_chat_checkpoint, bad)
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2] if damage == "truncated" else b"not a safetensors file" * 10)
    out = run_cli("--model", str(bad), "--prompt", "hi")
    assert out.returncode == 2, out.stderr
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {weights} is damaged or incomplete")
    assert "download or copy it again" in line
    assert "Traceback" not in out.stderr and "SafetensorError" not in line


def test_hub_id_offline_is_one_line():
    out = run_cli("--model", "Qwen/No-Such-Model-Here", "--prompt", "hi")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: cannot reach the Hugging Face hub")
    assert "Traceback" not in out.stderr


def test_compile_flag_gives_the_same_answer_and_says_it_compiles(tiny_chat_checkpoint, capsys):
    pytest.importorskip("torch._inductor")
    args = ["--model", tiny_chat_checkpoint, "--prompt", "Hello world", "--temperature", "0",
            "--max-new-tokens", "6", "--dtype", "float32"]
    assert generate.main(args) == 0
    eager = capsys.readouterr().out
    assert generate.main(args + ["--compile"]) == 0
    out = capsys.readouterr()
    assert out.out == eager
    assert "[--compile: the first decode step compiles the step" in out.err
