"""The names this project installs at the top level live beside the packages a Qwen user has.

transformers 5.25 depends on Hugging Face's kernel hub, imported as `kernels`, and imports it by
name; our kernels package was once called `kernels/` too, and from the repository root it shadowed
theirs, so transformers failed at import. These tests hold the fix in place: our kernel modules are
the ones found, transformers' own model still builds and generates in the same process, and no
installed distribution shares a top-level name with ours.
"""
import importlib.metadata
import os
import re
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def our_top_level_names() -> set[str]:
    """The modules and packages pyproject.toml installs (py-modules and packages)."""
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        text = f.read()
    names = set()
    for key in ("py-modules", "packages"):
        match = re.search(rf"^{key}\s*=\s*\[(.*?)\]", text, re.M | re.S)
        assert match, f"pyproject.toml has no {key} list"
        names |= set(re.findall(r'"([\w.]+)"', match.group(1)))
    return {n.partition(".")[0] for n in names}


def test_transformers_and_our_kernels_in_one_process_from_the_root():
    """From the repository root (where a folder shadows an installed package of its name): build and
    run transformers' Qwen2, then import our model files and kernels, and check that the kernel
    modules are this repository's, not absent, and that install() puts them into a model; Hugging
    Face's `kernels`, where installed, stays theirs."""
    script = f"""
import importlib.metadata, importlib.util, os, sys
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
config = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1)
hf = Qwen2ForCausalLM(config).eval()
ids = torch.tensor([[1, 2, 3]])
hf(ids)
hf.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)   # transformers' hub-kernel checks
root = {ROOT!r}
import qwen2, qwen2_moe, qwen3_moe, quantize, qwen_kernels
from qwen_kernels import cpu, experts
ours = os.path.join(root, "qwen_kernels") + os.sep
for m in (qwen_kernels, cpu, experts, quantize.cpu_kernels):
    assert m.__file__.startswith(ours), m.__file__
triton = importlib.util.find_spec("triton") is not None
if triton:
    for name in ("attention", "moe", "int4"):
        m = qwen_kernels.triton_module(name)
        assert m is not None and m.__file__.startswith(ours), (name, m)
ours_model = qwen2.Qwen2ForCausalLM(qwen2.Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=64,
                                                      num_hidden_layers=1, num_attention_heads=4,
                                                      num_key_value_heads=2))
qwen_kernels.install(ours_model)
fn = ours_model.model.layers[0].self_attn.attention_function
cuda = torch.cuda.is_available()
assert fn.__module__ == ("qwen_kernels.attention" if triton and cuda else "qwen_kernels.cpu"), fn.__module__
if triton:  # and where Triton runs (the interpreter, here), "triton" installs it
    fn = qwen_kernels.install(ours_model, "triton").model.layers[0].self_attn.attention_function
    assert fn.__module__ == "qwen_kernels.attention", fn.__module__
assert sys.modules[fn.__module__].__file__.startswith(ours)
try:
    importlib.metadata.distribution("kernels")
except importlib.metadata.PackageNotFoundError:
    print("no Hugging Face kernels installed")
else:
    import kernels
    assert not os.path.abspath(kernels.__file__).startswith(root + os.sep), kernels.__file__
    print("Hugging Face kernels", importlib.metadata.version("kernels"), "at", kernels.__file__)
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"  # (for "triton" on a CPU)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr[-3000:]


def test_install_falls_back_only_when_triton_is_absent(tmp_path):
    """install() takes torch's paths when triton is absent ("triton" then says so in one line), and
    raises any other error of the Triton kernels' modules (a bug there must not silently become the
    slow path)."""
    import shutil
    for case, body in {"no triton": "raise ModuleNotFoundError(\"No module named 'triton'\", name='triton')",
                       "a bug": "raise RuntimeError('a bug inside the kernels')"}.items():
        folder = tmp_path / case.replace(" ", "_")
        shutil.copytree(os.path.join(ROOT, "qwen_kernels"), folder / "qwen_kernels",
                        ignore=shutil.ignore_patterns("__pycache__"))
        for kernel in ("attention", "moe"):
            (folder / "qwen_kernels" / f"{kernel}.py").write_text(body + "\n")
        shutil.copy(os.path.join(ROOT, "qwen3_moe.py"), folder)
        script = ("import sys, torch, qwen3_moe, qwen_kernels\n"
                  "config = qwen3_moe.Qwen3MoeConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, "
                  "num_attention_heads=2, num_key_value_heads=1, num_experts=4, num_experts_per_tok=2, "
                  "moe_intermediate_size=16)\n"
                  "model = qwen_kernels.install(qwen3_moe.Qwen3MoeForCausalLM(config), sys.argv[1])\n"
                  "print(model.model.layers[0].mlp.experts.experts_function.__module__)\n")

        def run(kernels):
            return subprocess.run([sys.executable, "-c", script, kernels], cwd=folder, capture_output=True,
                                  text=True, timeout=120,
                                  env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
        out = run("triton")
        if case == "no triton":
            assert out.returncode != 0 and "ValueError: kernels='triton' needs triton" in out.stderr, out
            auto = run("auto")
            assert auto.returncode == 0 and auto.stdout.strip() == "qwen_kernels.experts", auto.stderr[-2000:]
        else:
            assert out.returncode != 0 and "RuntimeError: a bug inside the kernels" in out.stderr, out


def test_no_installed_distribution_owns_one_of_our_top_level_names():
    """Every top-level name we install (qwen2, tokenizer, generate, qwen_kernels, ...) belongs to no
    other distribution in this environment: a second owner means one of the two is shadowed."""
    owners = importlib.metadata.packages_distributions()
    ours = our_top_level_names()
    assert {"qwen2", "generate"} <= ours, ours  # the list was read
    clashes = {name: sorted(set(owners[name]) - {"qwen-reference", "qwen_reference"})
               for name in ours if name in owners}
    clashes = {name: dists for name, dists in clashes.items() if dists}
    assert not clashes, f"installed distributions that own our top-level names: {clashes}"
