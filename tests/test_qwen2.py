"""qwen2.py against transformers' Qwen2ForCausalLM on tiny random checkpoints (fp32, eager)."""
import os
import shutil

import pytest
import torch
from conftest import assert_works_copied_alone, save_tiny

transformers = pytest.importorskip("transformers")
HFConfig, HFModel = transformers.Qwen2Config, transformers.Qwen2ForCausalLM

import checkpoint  # noqa: E402
import generate  # noqa: E402
import qwen2  # noqa: E402
import qwen_kernels  # noqa: E402

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0)
ATOL = 1e-5


def build(tmp_path, **overrides):
    folder, hf = save_tiny(tmp_path, HFConfig, HFModel, **{**TINY, **overrides})
    return folder, hf, qwen2.from_pretrained(folder)


def ids(batch, length, vocab=TINY["vocab_size"], seed=1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_logits_match(hf, ours, x, **kw):
    with torch.no_grad():
        expected = hf(x, **kw).logits
        got = ours(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("overrides", [
    {},                                                            # GQA, untied
    {"num_key_value_heads": 4},                                    # plain multi-head attention
    {"num_key_value_heads": 1, "tie_word_embeddings": True},       # multi-query, tied embeddings
    {"head_dim": 32},                                              # explicit head_dim != hidden / heads
], ids=["gqa", "mha", "mqa-tied", "head_dim"])
def test_logits_match_transformers(tmp_path, overrides):
    folder, hf, ours = build(tmp_path, **overrides)
    if overrides.get("tie_word_embeddings"):
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert_logits_match(hf, ours, ids(2, 19))


@pytest.mark.parametrize("overrides", [
    {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1},   # layers 1, 2 slide
    {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 0,
     "layer_types": ["full_attention", "sliding_attention", "full_attention"]},   # layer_types wins
], ids=["max_window_layers", "layer_types"])
def test_sliding_window_layers(tmp_path, overrides):
    folder, hf, ours = build(tmp_path, **overrides)
    expected = [t == "sliding_attention" for t in hf.config.layer_types]
    assert [layer.self_attn.window is not None for layer in ours.model.layers] == expected
    assert_logits_match(hf, ours, ids(2, 17))
    # the window must matter here: without it the logits move
    for layer in ours.model.layers:
        layer.self_attn.window = None
    with torch.no_grad():
        assert (ours(ids(2, 17)) - hf(ids(2, 17)).logits).abs().max() > 1e-3


def test_sliding_window_rule_is_qwen2s(tmp_path):
    """Qwen2 slides layers i >= max_window_layers (Qwen2-MoE's rule differs)."""
    cfg = qwen2.Qwen2Config(num_hidden_layers=6, use_sliding_window=True, sliding_window=8,
                            max_window_layers=4)
    hf_cfg = HFConfig(num_hidden_layers=6, use_sliding_window=True, sliding_window=8, max_window_layers=4)
    assert cfg.layer_types == hf_cfg.layer_types == ["full_attention"] * 4 + ["sliding_attention"] * 2


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16, "beta_fast": 16,
     "beta_slow": 2, "attention_factor": 1.3},
], ids=["linear", "dynamic", "yarn", "yarn-params"])
def test_rope_scaling(tmp_path, rope):
    # max_position_embeddings 16 < 24 tokens, so dynamic NTK actually rescales
    folder, hf, ours = build(tmp_path, max_position_embeddings=16,
                             rope_parameters={"rope_theta": 10000.0, **rope})
    assert ours.config.rope_type == rope["rope_type"]
    assert_logits_match(hf, ours, ids(1, 24))


def test_legacy_rope_scaling_keys():
    """Older config.json files say rope_theta + rope_scaling {"type": ...}."""
    cfg = qwen2.Qwen2Config.from_dict({"rope_theta": 1e6, "rope_scaling": {"type": "yarn", "factor": 4.0,
                                       "original_max_position_embeddings": 32768}, "num_hidden_layers": 2,
                                       "some_unknown_key": 1})
    assert (cfg.rope_theta, cfg.rope_type, cfg.rope_scaling["factor"]) == (1e6, "yarn", 4.0)
    hf_cfg = HFConfig(rope_theta=1e6, rope_scaling={"type": "yarn", "factor": 4.0,
                                                    "original_max_position_embeddings": 32768})
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hf_cfg.head_dim = 64
    expected_inv_freq, expected_scale = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg, "cpu")
    cfg.head_dim = 64
    inv_freq, scale = qwen2.rope_frequencies(cfg)
    torch.testing.assert_close(inv_freq, expected_inv_freq)
    assert scale == pytest.approx(expected_scale)


def test_loss_matches_transformers(tmp_path):
    folder, hf, ours = build(tmp_path)
    x = ids(2, 15)
    labels = x.clone()
    labels[0, :4] = -100
    with torch.no_grad():
        expected = hf(x, labels=labels).loss
        logits, loss = ours(x, labels=labels)
    torch.testing.assert_close(loss, expected, atol=ATOL, rtol=0)
    # and it trains: gradients flow once requires_grad is on
    ours.requires_grad_(True)
    _, loss = ours(x, labels=labels)
    loss.backward()
    assert ours.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_left_padded_batch(tmp_path):
    folder, hf, ours = build(tmp_path, use_sliding_window=True, sliding_window=4, max_window_layers=2)
    a, b = ids(1, 13, seed=2)[0], ids(1, 8, seed=3)[0]
    batch = torch.stack([a, torch.cat([torch.zeros(5, dtype=torch.long), b])])
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = ours(batch, attention_mask=mask)
        alone = ours(b[None])
        expected = hf(batch, attention_mask=mask, position_ids=position_ids).logits
    torch.testing.assert_close(got[1, 5:], alone[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(got[0], expected[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(got[1, 5:], expected[1, 5:], atol=ATOL, rtol=0)
    assert torch.isfinite(got).all()  # padding rows stay finite


@pytest.mark.parametrize("static", [False, True], ids=["int-pos", "tensor-pos"])
def test_kv_cache_decode_equals_full_forward(tmp_path, static):
    folder, hf, ours = build(tmp_path, use_sliding_window=True, sliding_window=6, max_window_layers=1)
    x = ids(2, 20)
    with torch.no_grad():
        full = ours(x)
        ours.setup_cache(2, 24)
        steps = [ours(x[:, :12], input_pos=torch.arange(12) if static else 0)]
        for t in range(12, 20):
            pos = torch.tensor([t]) if static else t
            steps.append(ours(x[:, t:t + 1], input_pos=pos))
        ours.clear_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)


def test_chunked_prefill_with_padding(tmp_path):
    """A second multi-token chunk on top of a cache, with left padding, equals one full pass."""
    folder, hf, ours = build(tmp_path)
    x = ids(2, 16)
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    with torch.no_grad():
        full = ours(x, attention_mask=mask)
        ours.setup_cache(2, 16)
        first = ours(x[:, :9], attention_mask=mask[:, :9], input_pos=0)
        second = ours(x[:, 9:], attention_mask=mask, input_pos=9)
        ours.clear_cache()
    torch.testing.assert_close(torch.cat([first, second], 1)[0, 3:], full[0, 3:], atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.cat([first, second], 1)[1], full[1], atol=ATOL, rtol=0)


def test_reference_attention_equals_sdpa(tmp_path):
    folder, hf, ours = build(tmp_path, use_sliding_window=True, sliding_window=5, max_window_layers=1)
    x = ids(2, 14)
    mask = torch.ones_like(x)
    mask[1, :4] = 0
    with torch.no_grad():
        fast = ours(x, attention_mask=mask)
        qwen_kernels.install(ours, "reference")
        ref = ours(x, attention_mask=mask)
    torch.testing.assert_close(fast[0], ref[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(fast[1, 4:], ref[1, 4:], atol=ATOL, rtol=0)


def test_greedy_generate_matches_transformers(tmp_path):
    folder, hf, ours = build(tmp_path)
    prompt = ids(1, 7)[0].tolist()
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, min_new_tokens=12,
                           pad_token_id=0)[0, len(prompt):].tolist()
    got = list(generate.generate(ours, prompt, 12, temperature=0))
    assert got == expected


def test_batched_greedy_generate_matches_transformers(tmp_path):
    folder, hf, ours = build(tmp_path)
    prompts = [ids(1, 9, seed=4)[0].tolist(), ids(1, 4, seed=5)[0].tolist()]
    batch = torch.tensor([[0] * (9 - len(p)) + p for p in prompts])
    mask = (torch.arange(9)[None] >= torch.tensor([[0], [5]])).long()
    expected = hf.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, min_new_tokens=8,
                           pad_token_id=0)[:, 9:].tolist()
    assert generate.generate_batch(ours, prompts, 8, pad_id=0, temperature=0) == expected
    # each row equals that prompt generated alone
    assert [list(generate.generate(ours, p, 8)) for p in prompts] == expected


def test_context_limit_stops_generation(tmp_path):
    folder, hf, ours = build(tmp_path, max_position_embeddings=12)
    stats = {}
    out = list(generate.generate(ours, ids(1, 9)[0].tolist(), 50, stats=stats))
    assert len(out) == 3 and stats["context_limit"]
    with pytest.raises(generate.UsageError, match="context length"):
        list(generate.generate(ours, ids(1, 12)[0].tolist(), 5))


def test_dtype_and_device_arguments(tmp_path):
    folder, hf, ours = build(tmp_path)
    m = qwen2.from_pretrained(folder, dtype="bfloat16", device="cpu")
    assert m.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in m.parameters())
    with torch.no_grad():
        diff = (m(ids(1, 10)).float() - ours(ids(1, 10))).abs().max()
    assert diff < 0.1  # bf16 rounding, not a different model
    with pytest.raises(ValueError, match="unknown dtype"):
        qwen2.from_pretrained(folder, dtype="int8")


def test_sharded_checkpoint(tmp_path):
    torch.manual_seed(0)
    hf = HFModel(HFConfig(**TINY)).eval()
    hf.save_pretrained(str(tmp_path), max_shard_size="100KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert len([n for n in os.listdir(tmp_path) if n.endswith(".safetensors")]) > 1
    assert_logits_match(hf, qwen2.from_pretrained(str(tmp_path)), ids(1, 8))


def test_hub_download_path_is_mocked(tmp_path, monkeypatch):
    """A hub id goes through huggingface_hub.snapshot_download, asking only for json/safetensors."""
    folder, hf, _ = build(tmp_path)
    import huggingface_hub
    calls = {}

    def fake_snapshot_download(repo_id, allow_patterns=None, **kw):
        calls.update(repo_id=repo_id, allow_patterns=allow_patterns)
        return folder

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = qwen2.from_pretrained("Qwen/Qwen2.5-0.5B-Instruct")
    assert calls["repo_id"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert set(calls["allow_patterns"]) == {"*.json", "*.safetensors", "*.jinja"}
    assert_logits_match(hf, model, ids(1, 6))

    from huggingface_hub.errors import RepositoryNotFoundError

    def not_found(repo_id, **kw):
        error = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # as raised on a 404
        Exception.__init__(error, "404 Repository Not Found")
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_found)
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a model on the Hugging Face hub"):
        checkpoint.from_pretrained("Qwen/NoSuchModel")  # the full reader (generate.py's) says it in one line
    with pytest.raises(RepositoryNotFoundError):
        qwen2.from_pretrained("Qwen/NoSuchModel")       # the model file's own loader: the hub's error


def test_bad_checkpoints_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    folder, hf, _ = build(tmp_path / "ok")
    tensors = load_file(os.path.join(folder, "model.safetensors"))

    def variant(name, mutate):
        path = tmp_path / name
        shutil.copytree(folder, path)
        t = dict(tensors)
        mutate(t)
        save_file(t, str(path / "model.safetensors"))
        return str(path)

    missing = variant("missing", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight is missing"):
        qwen2.from_pretrained(missing)
    wrong = variant("wrong", lambda t: t.update({"model.layers.0.self_attn.k_proj.weight":
                                                 torch.zeros(16, 64)}))
    with pytest.raises(ValueError,
                       match=r"k_proj\.weight has shape \(16, 64\), the config expects \(32, 64\)"):
        qwen2.from_pretrained(wrong)
    extra = variant("extra", lambda t: t.update({"model.layers.7.mlp.up_proj.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match="unexpected tensor model.layers.7"):
        qwen2.from_pretrained(extra)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        qwen2.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        qwen2.from_pretrained(str(tmp_path / "nowhere"))


def test_model_file_works_copied_alone(tmp_path):
    folder, hf, _ = build(tmp_path / "ckpt")
    assert_works_copied_alone(tmp_path, "qwen2.py", folder, hf, torch.tensor([[1, 2, 3, 4, 5]]))
