"""Shared test helpers: tiny random checkpoints written by transformers, and the real checkpoint."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Without a GPU the Triton kernels run in Triton's CPU interpreter. Triton fixes the mode of every
# @triton.jit function when it is decorated, so the switch is set for the whole session here, before
# anything imports triton (the kernel tests run in this process; the model tests' "auto" paths never
# take Triton on a CPU). Subprocesses inherit it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_TOOL = os.path.join(ROOT, "..", "shared", "tools", "make_real_qwen2.py")


def pytest_configure(config):
    config.addinivalue_line("markers", "hub: downloads a checkpoint by hub id (skipped offline)")
    config.addinivalue_line("markers", "slow: large download or long run")


def save_tiny(tmp_path, config_cls, model_cls, seed=0, **overrides):
    """Build a random transformers model (fp32, eager attention), save_pretrained it; (folder, model)."""
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


def linear(n, k, bias=False, seed=0, dtype=torch.bfloat16):
    """A seeded random nn.Linear (k inputs, n outputs) with weights of a trained layer's size (0.05)."""
    g = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
        if bias:
            layer.bias.copy_(torch.randn(n, generator=g))
    return layer.to(dtype)


def assert_works_copied_alone(tmp_path, model_file, checkpoint, hf_model, input_ids, atol=1e-5):
    """Copy `model_file` alone into an empty folder, load `checkpoint` with it in a fresh Python that
    sees the installed third-party packages but not this project, and compare its logits with
    `hf_model`'s: as if the file had been copied into someone else's project.

    `pip install -e .` puts this project's modules (and its `qwen_kernels` package) on every Python path
    through a .pth hook; `-S` skips those hooks, and site-packages is then added back by hand.
    Inside, the guarded kernel imports must have found nothing (every `triton_*` module is None).
    """
    import shutil
    import sysconfig
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(os.path.join(ROOT, model_file), alone)
    name = model_file.removesuffix(".py")
    paths = sysconfig.get_paths()
    logits = str(alone / "logits.pt")
    script = (f"import sys; sys.path[:0] = [{str(alone)!r}]\n"
              f"sys.path += [{paths['purelib']!r}, {paths['platlib']!r}]\n"
              f"import torch, {name} as m\n"
              "assert 'qwen_kernels' not in sys.modules, 'the qwen_kernels package was imported'\n"
              "assert all(v is None for k, v in vars(m).items() if k.startswith('triton_')), 'triton'\n"
              f"logits = m.from_pretrained({checkpoint!r})(torch.tensor({input_ids.tolist()!r}))\n"
              f"torch.save(logits, {logits!r})\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-S", "-c", script], cwd=alone, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    with torch.no_grad():
        expected = hf_model(input_ids).logits
        torch.testing.assert_close(torch.load(alone / "logits.pt"), expected, atol=atol, rtol=0)


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


QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or "
    "(message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def write_tiny_tokenizer(folder, chat_template=QWEN25_TEMPLATE):
    """A small byte-level BPE with Qwen's special tokens (ids follow the learned vocabulary)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    text = ["Hello world, this is a tiny tokenizer for tests. def main(): print('hi')"] * 20
    tok.train_from_iterator(text, trainer)
    tok.save(os.path.join(folder, "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None}
    if chat_template:
        config["chat_template"] = chat_template
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return tok.get_vocab_size()


@pytest.fixture
def tiny_chat_checkpoint(tmp_path):
    """A tiny random Qwen2 model with a tiny tokenizer and generation_config.json: a complete folder."""
    import json

    from transformers import Qwen2Config, Qwen2ForCausalLM
    folder = tmp_path / "tiny-qwen2"
    folder.mkdir()
    vocab = write_tiny_tokenizer(str(folder))
    save_tiny(folder, Qwen2Config, Qwen2ForCausalLM, vocab_size=vocab, hidden_size=32, intermediate_size=64,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=200)
    with open(folder / "generation_config.json", "w") as f:
        json.dump({"eos_token_id": [2, 0], "do_sample": False}, f)
    return str(folder)


def tiny_qwen3_folder(tmp_path, name, model_class, **overrides):
    """A tiny random dense Qwen3 checkpoint of `model_class` (a transformers class name) with a tiny
    tokenizer, whose <|endoftext|> (id 0) is the padding token."""
    import transformers
    folder = tmp_path / name
    folder.mkdir()
    vocab = write_tiny_tokenizer(str(folder))
    save_tiny(folder, transformers.Qwen3Config, getattr(transformers, model_class), vocab_size=vocab,
              hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=200, pad_token_id=0, **overrides)
    return str(folder)


@pytest.fixture
def tiny_reward_checkpoint(tmp_path):
    """A tiny random reward model: Qwen3ForSequenceClassification with one label."""
    return tiny_qwen3_folder(tmp_path, "tiny-reward", "Qwen3ForSequenceClassification", num_labels=1)


@pytest.fixture
def tiny_embedding_checkpoint(tmp_path):
    """A tiny random embedding model: the bare Qwen3 decoder stack (Qwen3Model), as they are saved."""
    return tiny_qwen3_folder(tmp_path, "tiny-embedding", "Qwen3Model")
