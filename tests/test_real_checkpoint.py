"""The real Qwen2.5-Coder-0.5B-Instruct weights (built offline by ../shared/tools/make_real_qwen2.py)
and, when the hub is reachable, published checkpoints by id."""
import os
import shlex
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, hub_available

import generate
import qwen2
from tokenizer import Tokenizer

PROMPTS = ["Write a Python function that returns the n-th Fibonacci number.",
           "用一句话解释什么是递归。"]


@pytest.fixture(scope="module")
def pair(real_ckpt):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(real_ckpt, dtype=torch.float32, attn_implementation="eager")
    hf = hf.eval()
    ours = qwen2.from_pretrained(real_ckpt, dtype=torch.float32)
    return hf, ours, Tokenizer(real_ckpt)


def test_real_logits_match_transformers_fp32(pair):
    hf, ours, tok = pair
    for text in PROMPTS:
        x = torch.tensor([tok.encode_chat([{"role": "user", "content": text}])])
        with torch.no_grad():
            expected, got = hf(x).logits, ours(x)
        # 24 layers of float32 accumulate ~1e-5 relative differences; logits reach |30|
        torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-5)
        assert (got[0, -1].argmax() == expected[0, -1].argmax()).item()


def test_real_greedy_generation_matches_transformers(pair):
    hf, ours, tok = pair
    prompt = tok.encode_chat([{"role": "user", "content": PROMPTS[0]}])
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                           pad_token_id=151643)[0, len(prompt):].tolist()
    got = list(generate.generate(ours, prompt, 24, temperature=0, stop_ids={151645, 151643}))
    assert got == expected
    assert "def" in tok.decode(got)  # a real model writes real code


def test_real_bf16_close_to_fp32(real_ckpt, pair):
    hf, ours, tok = pair
    bf16 = qwen2.from_pretrained(real_ckpt)  # the checkpoint's own dtype
    assert bf16.dtype == torch.bfloat16
    x = torch.tensor([tok.encode_chat([{"role": "user", "content": PROMPTS[0]}])])
    with torch.no_grad():
        a, b = bf16(x).float(), ours(x)
    top = b[0, -1].topk(5).indices
    assert a[0, -1].argmax() in top


def test_cli_on_real_checkpoint(real_ckpt):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), "--model", real_ckpt, "--prompt",
                          "Reply with the single word: yes", "--temperature", "0", "--max-new-tokens", "8"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip(), out.stderr
    assert "tok/s" in out.stderr


@pytest.mark.hub
@pytest.mark.slow
@pytest.mark.skipif(not hub_available(), reason="the Hugging Face hub is unreachable")
def test_hub_qwen25_instruct_matches_transformers():
    from transformers import AutoModelForCausalLM
    name = "Qwen/Qwen2.5-0.5B-Instruct"
    ours = qwen2.from_pretrained(name, dtype=torch.float32)
    assert ours.config.tie_word_embeddings
    tok = Tokenizer.from_pretrained(name)
    hf = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, attn_implementation="eager")
    prompt = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)
    expected = expected[0, len(prompt):].tolist()
    got = list(generate.generate(ours, prompt, 16, stop_ids={151645}))
    assert got == expected[:len(got)]
    assert "Paris" in tok.decode(got)


def test_the_readme_python_example_prints_what_the_cli_prints(real_ckpt):
    """README.md's "Use from Python" example, run as written (the hub id made the real checkpoint's
    folder), against the command line it names: the same text, stop token left out."""
    import re
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    section = readme.split("## Use from Python", 1)[1]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 'generate.load("Qwen/Qwen2.5-0.5B-Instruct"' in example
    example = example.replace('"Qwen/Qwen2.5-0.5B-Instruct"', repr(real_ckpt))
    command = re.search(r"`python generate.py (--prompt .*?)` prints", section).group(1)
    cli_args = shlex.split(command)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    python = subprocess.run([sys.executable, "-c", example], cwd=ROOT, capture_output=True, text=True,
                            env=env, timeout=600)
    assert python.returncode == 0, python.stderr[-3000:]
    cli = subprocess.run([sys.executable, "generate.py", "--model", real_ckpt, *cli_args], cwd=ROOT,
                         capture_output=True, text=True, env=env, timeout=600)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert python.stdout == cli.stdout and len(cli.stdout.strip()) > 10, (python.stdout, cli.stdout)
    assert "<|im_end|>" not in python.stdout
