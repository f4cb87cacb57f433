"""qwen2_moe.py against transformers' Qwen2MoeForCausalLM on tiny random checkpoints (fp32, eager)."""
import gc
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, assert_works_copied_alone, hub_available, save_tiny

transformers = pytest.importorskip("transformers")
HFConfig, HFModel = transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM

import checkpoint  # noqa: E402
import generate  # noqa: E402
import qwen2_moe  # noqa: E402
import qwen_kernels  # noqa: E402
from qwen_kernels.experts import experts_gathered, experts_grouped  # noqa: E402

# initializer_range 0.15 (not 0.02): the experts' share of the output and the router's preferences
# must be large enough that a wrong expert, weight or routing rule moves the logits well past ATOL.
TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0,
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=48, initializer_range=0.15)
ATOL = 1e-5
KERNELS = ["torch", "reference"]  # the batched expert path + SDPA, and the spelled-out loop + eager attention


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine small multi-threaded ops can
    stall: run this module single-threaded (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(tmp_path, **overrides):
    folder, hf = save_tiny(tmp_path, HFConfig, HFModel, **{**TINY, **overrides})
    return folder, hf, qwen2_moe.from_pretrained(folder)


def ids(batch, length, vocab=TINY["vocab_size"], seed=1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_logits_match(hf, ours, x, **kw):
    with torch.no_grad():
        expected = hf(x, **kw).logits
        for kernels in KERNELS:
            qwen_kernels.install(ours, kernels)
            got = ours(x)
            assert got.shape == expected.shape
            torch.testing.assert_close(got, expected, atol=ATOL, rtol=0,
                                       msg=lambda m: f"kernels={kernels}: {m}")
    qwen_kernels.install(ours, "auto")


# ----------------------------------------------------------------------------------------------
# Logits against transformers
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [
    {},                                                                    # every layer sparse, top-2
    {"norm_topk_prob": True, "num_experts_per_tok": 3},                    # renormalised top-3
    {"num_hidden_layers": 4, "decoder_sparse_step": 2, "mlp_only_layers": [3]},  # only layer 1 sparse
    {"qkv_bias": False, "tie_word_embeddings": True, "num_experts_per_tok": 1},  # no q/k/v bias, tied, top-1
    {"num_experts": 4, "num_experts_per_tok": 4, "norm_topk_prob": True,
     "num_key_value_heads": 4},                                            # every expert chosen, MHA
], ids=["base", "norm-top3", "sparse-step-mlp-only", "nobias-tied-top1", "top4-of-4"])
def test_logits_match_transformers(tmp_path, overrides):
    folder, hf, ours = build(tmp_path, **overrides)
    sparse = [type(layer.mlp).__name__ == "Qwen2MoeSparseMoeBlock" for layer in hf.model.layers]
    assert [layer.sparse for layer in ours.model.layers] == sparse
    if overrides.get("decoder_sparse_step"):
        assert sparse == [False, True, False, False]
    if overrides.get("tie_word_embeddings"):
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    if overrides.get("qkv_bias") is False:
        assert ours.model.layers[0].self_attn.q_proj.bias is None
    assert_logits_match(hf, ours, ids(2, 19))


@pytest.mark.parametrize("hf_kw", [
    dict(num_hidden_layers=4, use_sliding_window=True, sliding_window=8, max_window_layers=3),
    dict(num_hidden_layers=6, use_sliding_window=True, sliding_window=8, max_window_layers=28),
    dict(num_hidden_layers=5, use_sliding_window=True, sliding_window=8, max_window_layers=0),
    dict(num_hidden_layers=4, use_sliding_window=False, sliding_window=8, max_window_layers=1),
])
def test_sliding_layer_rule_is_qwen2_moes(hf_kw):
    """Without layer_types: layer i slides iff use_sliding_window, i even and i < max_window_layers."""
    expected = HFConfig(**hf_kw).layer_types
    assert qwen2_moe.Qwen2MoeConfig.from_dict(hf_kw).layer_types == expected
    if hf_kw["max_window_layers"] == 3:  # Qwen2's rule (i >= max_window_layers) would say layer 3 only
        assert expected == ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def test_sliding_window_from_legacy_config(tmp_path):
    """A config.json without layer_types (as on the hub): Qwen2's rule and Qwen2-MoE's disagree here
    (Qwen2 would slide layers 2 and 3; Qwen2-MoE slides layer 0 only)."""
    folder, hf, _ = build(tmp_path, num_hidden_layers=4, use_sliding_window=True, sliding_window=4,
                          max_window_layers=2)
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        raw = json.load(f)
    del raw["layer_types"]
    with open(path, "w") as f:
        json.dump(raw, f)
    ours = qwen2_moe.from_pretrained(folder)
    assert [layer.self_attn.window for layer in ours.model.layers] == [4, None, None, None]
    assert hf.config.layer_types[0] == "sliding_attention"
    assert hf.config.layer_types[1:].count("full_attention") == 3
    assert_logits_match(hf, ours, ids(2, 17))
    # the window must matter here: without it the logits move
    ours.model.layers[0].self_attn.window = None
    with torch.no_grad():
        assert (ours(ids(2, 17)) - hf(ids(2, 17)).logits).abs().max() > 1e-3


def test_sliding_window_zero_in_config(tmp_path):
    """transformers 5 writes "sliding_window": 0 when use_sliding_window is off."""
    folder, hf, ours = build(tmp_path, use_sliding_window=False, sliding_window=16)
    with open(os.path.join(folder, "config.json")) as f:
        assert json.load(f)["sliding_window"] == 0
    assert all(layer.self_attn.window is None for layer in ours.model.layers)
    assert_logits_match(hf, ours, ids(1, 12))


def test_rope_parameters_and_legacy_rope_scaling(tmp_path):
    folder, hf, ours = build(tmp_path, max_position_embeddings=16,
                             rope_parameters={"rope_theta": 5e5, "rope_type": "yarn", "factor": 4.0,
                                              "original_max_position_embeddings": 16})
    assert (ours.config.rope_theta, ours.config.rope_type) == (5e5, "yarn")
    assert_logits_match(hf, ours, ids(1, 24))
    cfg = qwen2_moe.Qwen2MoeConfig.from_dict({"rope_theta": 1e6,
                                              "rope_scaling": {"type": "linear", "factor": 2.0},
                                              "num_hidden_layers": 2, "unknown_key": 1})
    assert (cfg.rope_theta, cfg.rope_type, cfg.rope_scaling) == (1e6, "linear", {"factor": 2.0})


def test_bfloat16_is_bit_exact(tmp_path):
    """In bf16 every rounding step counts: the fast path (SDPA + grouped experts) reproduces
    transformers' default sdpa + grouped_mm bit for bit, the reference path its eager + eager."""
    folder, _, _ = build(tmp_path, num_experts_per_tok=4)  # K > 2: the order of the K-sum shows
    x = ids(2, 19)
    ours = qwen2_moe.from_pretrained(folder, dtype="bfloat16")
    with torch.no_grad():
        for kernels, attn, experts in (("torch", "sdpa", "grouped_mm"), ("reference", "eager", "eager")):
            hf = HFModel.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation=attn,
                                         experts_implementation=experts).eval()
            qwen_kernels.install(ours, kernels)
            got, expected = ours(x), hf(x).logits
            assert got.dtype == torch.bfloat16
            assert torch.equal(got, expected), f"{kernels}: max diff {(got - expected).abs().max()}"


# ----------------------------------------------------------------------------------------------
# The expert paths
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("N,E,K", [(1, 8, 2), (3, 16, 4), (40, 8, 2), (50, 6, 6)])
def test_expert_paths_agree(N, E, K):
    """experts_grouped (and the static experts_gathered) equal a plain per-pair computation."""
    g = torch.Generator().manual_seed(N * 100 + E)
    H, I = 24, 20
    x = torch.randn(N, H, generator=g)
    w_gate_up, w_down = torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g)
    probs = torch.randn(N, E, generator=g).softmax(-1)
    weights, ids_ = probs.topk(K)
    expected = torch.zeros(N, H)
    for n in range(N):
        for k in range(K):
            e = int(ids_[n, k])
            h = torch.nn.functional.silu(w_gate_up[e, :I] @ x[n]) * (w_gate_up[e, I:] @ x[n])
            expected[n] += weights[n, k] * (w_down[e] @ h)
    for path in (qwen2_moe.experts_reference, experts_grouped, experts_gathered):
        torch.testing.assert_close(path(x, w_gate_up, w_down, ids_, weights), expected, atol=1e-4, rtol=1e-5,
                                   msg=lambda m: f"{path.__name__}: {m}")


def test_idle_experts_are_never_read():
    """A decode step touches only its K experts: NaN weights in every other expert change nothing."""
    E, H, I = 8, 16, 12
    x = torch.randn(1, H)
    ids_ = torch.tensor([[5, 2]])
    weights = torch.tensor([[0.7, 0.3]])
    w_gate_up, w_down = torch.randn(E, 2 * I, H), torch.randn(E, H, I)
    clean = qwen2_moe.experts_reference(x, w_gate_up, w_down, ids_, weights)
    idle = torch.ones(E, dtype=torch.bool)
    idle[[5, 2]] = False
    w_gate_up[idle], w_down[idle] = float("nan"), float("nan")
    for path in (qwen2_moe.experts_reference, experts_grouped):
        torch.testing.assert_close(path(x, w_gate_up, w_down, ids_, weights), clean)


def test_router_matches_transformers(tmp_path):
    """Router logits, top-k choices and weights equal transformers' router, norm_topk_prob on and off."""
    for norm in (False, True):
        folder, hf, ours = build(tmp_path / str(norm), norm_topk_prob=norm, num_experts_per_tok=3)
        h = torch.randn(11, TINY["hidden_size"])
        with torch.no_grad():
            hf_logits, hf_weights, hf_ids = hf.model.layers[1].mlp.gate(h)
            block = ours.model.layers[1].mlp
            logits = block.gate(h)
            weights, ids_ = qwen2_moe.route(logits, block.top_k, block.norm_topk_prob)
        torch.testing.assert_close(logits, hf_logits, atol=1e-6, rtol=0)
        assert torch.equal(ids_, hf_ids)
        torch.testing.assert_close(weights, hf_weights, atol=1e-6, rtol=0)
        assert torch.allclose(weights.sum(-1), torch.ones(11)) == norm


# ----------------------------------------------------------------------------------------------
# Loss, router logits, load-balancing loss
# ----------------------------------------------------------------------------------------------

def test_loss_matches_transformers(tmp_path):
    folder, hf, ours = build(tmp_path, router_aux_loss_coef=0.5)  # a large coefficient: aux must count
    x = ids(2, 15)
    labels = x.clone()
    labels[0, :4] = -100
    with torch.no_grad():
        plain = hf(x, labels=labels)
        with_aux = hf(x, labels=labels, output_router_logits=True)
        _, loss = ours(x, labels=labels)
        assert ours.router_logits is None and ours.aux_loss is None
        torch.testing.assert_close(loss, plain.loss, atol=ATOL, rtol=0)
        for kernels in KERNELS:
            qwen_kernels.install(ours, kernels)
            logits, loss = ours(x, labels=labels, output_router_logits=True)
            torch.testing.assert_close(loss, with_aux.loss, atol=ATOL, rtol=0)
            torch.testing.assert_close(ours.aux_loss, with_aux.aux_loss, atol=ATOL, rtol=0)
    assert with_aux.loss - plain.loss > 0.1  # the aux term is really in there
    assert len(ours.router_logits) == len(with_aux.router_logits) == 3
    for got, expected in zip(ours.router_logits, with_aux.router_logits):
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    # without labels: a plain logits tensor (what generate.py expects), aux still kept
    with torch.no_grad():
        out = ours(x, output_router_logits=True)
    assert torch.is_tensor(out) and ours.aux_loss is not None
    # and it trains: gradients reach the experts and the router
    ours.requires_grad_(True)
    _, loss = ours(x, labels=labels, output_router_logits=True)
    loss.backward()
    mlp = ours.model.layers[0].mlp
    assert mlp.experts.gate_up_proj.grad.abs().sum() > 0 and mlp.gate.weight.grad.abs().sum() > 0


def test_output_router_logits_from_config_and_sparse_layers_only(tmp_path):
    folder, hf, ours = build(tmp_path, num_hidden_layers=4, decoder_sparse_step=2, output_router_logits=True,
                             router_aux_loss_coef=0.3)
    x = ids(1, 13)
    with torch.no_grad():
        expected = hf(x, labels=x)
        _, loss = ours(x, labels=x)
    assert ours.config.output_router_logits and len(ours.router_logits) == len(expected.router_logits) == 2
    torch.testing.assert_close(loss, expected.loss, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.aux_loss, expected.aux_loss, atol=ATOL, rtol=0)
    with torch.no_grad():
        _, loss = ours(x, labels=x, output_router_logits=False)  # the keyword wins over the config
    assert ours.aux_loss is None and loss < expected.loss - 0.1


def test_aux_loss_leaves_padding_out(tmp_path):
    folder, hf, ours = build(tmp_path)
    x = ids(2, 12)
    mask = torch.ones_like(x)
    mask[1, :5] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf(x, attention_mask=mask, position_ids=position_ids, output_router_logits=True)
        unmasked = hf(x, position_ids=position_ids, output_router_logits=True)
        ours(x, attention_mask=mask, output_router_logits=True)
    torch.testing.assert_close(ours.aux_loss, expected.aux_loss, atol=ATOL, rtol=0)
    assert (expected.aux_loss - unmasked.aux_loss).abs() > 1e-4  # the mask matters here


# ----------------------------------------------------------------------------------------------
# KV cache, padding, generation
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("static", [False, True], ids=["int-pos", "tensor-pos"])
def test_kv_cache_decode_equals_full_forward(tmp_path, static):
    folder, hf, ours = build(tmp_path, use_sliding_window=True, sliding_window=6, max_window_layers=2)
    x = ids(2, 20)
    with torch.no_grad():
        full = hf(x).logits
        for kernels in KERNELS:
            qwen_kernels.install(ours, kernels)
            ours.setup_cache(2, 24)
            steps = [ours(x[:, :12], input_pos=torch.arange(12) if static else 0)]
            for t in range(12, 20):
                pos = torch.tensor([t]) if static else t
                steps.append(ours(x[:, t:t + 1], input_pos=pos))
            ours.clear_cache()
            torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)


def test_left_padded_batch(tmp_path):
    folder, hf, ours = build(tmp_path, use_sliding_window=True, sliding_window=4, max_window_layers=2)
    a, b = ids(1, 13, seed=2)[0], ids(1, 8, seed=3)[0]
    batch = torch.stack([a, torch.cat([torch.zeros(5, dtype=torch.long), b])])
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    with torch.no_grad():
        alone_a, alone_b = hf(a[None]).logits[0], hf(b[None]).logits[0]
        for kernels in KERNELS:
            qwen_kernels.install(ours, kernels)
            got = ours(batch, attention_mask=mask)
            torch.testing.assert_close(got[0], alone_a, atol=ATOL, rtol=0)
            torch.testing.assert_close(got[1, 5:], alone_b, atol=ATOL, rtol=0)
            assert torch.isfinite(got).all()  # padding rows stay finite
            # the same through the KV cache: prefill 10 slots, then one token at a time
            ours.setup_cache(2, 13)
            steps = [ours(batch[:, :10], attention_mask=mask[:, :10], input_pos=0)]
            for t in range(10, 13):
                steps.append(ours(batch[:, t:t + 1], attention_mask=mask[:, :t + 1], input_pos=t))
            ours.clear_cache()
            torch.testing.assert_close(torch.cat(steps, 1)[1, 5:], alone_b, atol=ATOL, rtol=0)


def test_greedy_generate_matches_transformers(tmp_path):
    folder, hf, ours = build(tmp_path)
    prompt = ids(1, 7)[0].tolist()
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, min_new_tokens=12,
                           pad_token_id=0)[0, len(prompt):].tolist()
    assert list(generate.generate(ours, prompt, 12, temperature=0)) == expected
    qwen_kernels.install(ours, "reference")
    assert list(generate.generate(ours, prompt, 12, temperature=0)) == expected


def test_batched_greedy_generate_matches_transformers(tmp_path):
    folder, hf, ours = build(tmp_path)
    prompts = [ids(1, 9, seed=4)[0].tolist(), ids(1, 4, seed=5)[0].tolist()]
    batch = torch.tensor([[0] * (9 - len(p)) + p for p in prompts])
    mask = (torch.arange(9)[None] >= torch.tensor([[0], [5]])).long()
    expected = hf.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, min_new_tokens=8,
                           pad_token_id=0)[:, 9:].tolist()
    assert generate.generate_batch(ours, prompts, 8, pad_id=0, temperature=0) == expected


def test_compiled_static_decode_matches_transformers(tmp_path):
    """generate(compile=True): static shapes (tensor input_pos), fullgraph torch.compile, which
    takes the experts_gathered path."""
    folder, hf, ours = build(tmp_path, num_hidden_layers=2)
    prompt = ids(1, 6)[0].tolist()
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, min_new_tokens=6,
                           pad_token_id=0)[0, len(prompt):].tolist()
    assert list(generate.generate(ours, prompt, 6, temperature=0, compile=True)) == expected


def test_triton_kernels_in_the_interpreter(tmp_path):
    """kernels='triton' routes the experts through qwen_kernels.moe.fused_moe (and attention through
    qwen_kernels.attention); on CPU Triton's interpreter runs them (TRITON_INTERPRET=1 before import)."""
    pytest.importorskip("triton")
    folder, hf, _ = build(tmp_path, num_hidden_layers=2)
    x = ids(2, 9)
    out = str(tmp_path / "logits.pt")
    code = (f"import sys, torch; sys.path.insert(0, {ROOT!r}); import qwen2_moe, qwen_kernels\n"
            f"from qwen_kernels import moe\n"
            f"m = qwen2_moe.from_pretrained({folder!r}); qwen_kernels.install(m, 'triton')\n"
            f"calls = []; fused = moe.fused_moe\n"
            f"moe.fused_moe = lambda *a: calls.append(1) or fused(*a)\n"
            f"x = torch.tensor({x.tolist()})\n"
            f"with torch.no_grad():\n"
            f"    full = m(x); m.setup_cache(2, 9)\n"
            f"    steps = [m(x[:, :6], input_pos=0)] + [m(x[:, t:t + 1], input_pos=t) for t in range(6, 9)]\n"
            f"assert len(calls) == 2 * 5, calls  # 2 sparse layers x 5 forwards\n"
            f"torch.save((full, torch.cat(steps, 1)), {out!r})\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    full, cached = torch.load(out)
    with torch.no_grad():
        expected = hf(x).logits
    torch.testing.assert_close(full, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(cached, expected, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

def test_per_expert_tensors_are_stacked(tmp_path):
    """The on-disk per-expert tensors land in their slots: gate rows first, then up."""
    folder, hf, ours = build(tmp_path)
    from safetensors import safe_open
    with safe_open(os.path.join(folder, "model.safetensors"), framework="pt") as f:
        assert "model.layers.1.mlp.experts.5.up_proj.weight" in f.keys()  # the hub layout, not fused
        gate, up = f.get_tensor("model.layers.1.mlp.experts.5.gate_proj.weight"), \
            f.get_tensor("model.layers.1.mlp.experts.5.up_proj.weight")
        down = f.get_tensor("model.layers.1.mlp.experts.5.down_proj.weight")
    experts = ours.model.layers[1].mlp.experts
    I = TINY["moe_intermediate_size"]
    assert torch.equal(experts.gate_up_proj[5, :I], gate) and torch.equal(experts.gate_up_proj[5, I:], up)
    assert torch.equal(experts.down_proj[5], down)
    assert torch.equal(experts.gate_up_proj, hf.model.layers[1].mlp.experts.gate_up_proj)
    assert not experts.gate_up_proj.requires_grad


def test_fused_expert_keys_load(tmp_path):
    """Some tools write transformers 5's in-memory layout: mlp.experts.gate_up_proj / down_proj."""
    from safetensors.torch import save_file
    folder, hf, _ = build(tmp_path / "src", tie_word_embeddings=True)
    fused = tmp_path / "fused"
    fused.mkdir()
    shutil.copy(os.path.join(folder, "config.json"), fused / "config.json")
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, str(fused / "model.safetensors"))
    ours = qwen2_moe.from_pretrained(str(fused))
    assert_logits_match(hf, ours, ids(1, 9))


def test_sharded_checkpoint_and_dtype(tmp_path):
    torch.manual_seed(0)
    hf = HFModel(HFConfig(**TINY)).eval()
    hf.save_pretrained(str(tmp_path), max_shard_size="100KB")
    assert len([n for n in os.listdir(tmp_path) if n.endswith(".safetensors")]) > 1
    ours = qwen2_moe.from_pretrained(str(tmp_path))
    assert_logits_match(hf, ours, ids(1, 8))
    m = qwen2_moe.from_pretrained(str(tmp_path), dtype="bfloat16")
    full = dict(ours.named_parameters())
    for name, p in m.named_parameters():  # each tensor is the float32 one rounded to bfloat16
        assert p.dtype == torch.bfloat16, name
        assert torch.equal(p, full[name].to(torch.bfloat16)), name


def test_bad_checkpoints_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    folder, hf, _ = build(tmp_path / "ok")
    tensors = load_file(os.path.join(folder, "model.safetensors"))

    def variant(name, mutate, config=None):
        path = tmp_path / name
        shutil.copytree(folder, path)
        t = dict(tensors)
        mutate(t)
        save_file(t, str(path / "model.safetensors"))
        if config:
            with open(path / "config.json") as f:
                raw = json.load(f)
            raw.update(config)
            with open(path / "config.json", "w") as f:
                json.dump(raw, f)
        return str(path)

    wrong = variant("wrong", lambda t: t.update({"model.layers.1.mlp.experts.3.up_proj.weight":
                                                 torch.zeros(16, 64)}))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight has shape "
                                         r"\(16, 64\), the config expects \(32, 64\)"):
        qwen2_moe.from_pretrained(wrong)
    # The full reader (generate.py's, checkpoint.py) counts the experts before it reads any tensor; the
    # model file's own loader finds an expert the config does not have, or one missing, as it reads.
    fewer = variant("fewer", lambda t: None, config={"num_experts": 6})  # 8 experts on disk
    with pytest.raises(ValueError, match=r"experts\.7\.\w+_proj\.weight makes 8 experts: "
                                         r"model\.layers\.0\.mlp\.experts\.gate_up_proj would have shape "
                                         r"\(8, 64, 64\), the config expects \(6, 64, 64\)"):
        checkpoint.from_pretrained(fewer)
    with pytest.raises(ValueError, match=r"unexpected tensor model\.layers\.0\.mlp\.experts\.6\."):
        qwen2_moe.from_pretrained(fewer)
    more = variant("more", lambda t: None, config={"num_experts": 10})
    with pytest.raises(ValueError,
                       match=r"makes 8 experts: .* shape \(8, 64, 64\), the config expects \(10, 64, 64\)"):
        checkpoint.from_pretrained(more)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate\.weight has shape \(8, 64\), the "
                                         r"config expects \(10, 64\)"):  # the router, read first
        qwen2_moe.from_pretrained(more)
    missing = variant("missing", lambda t: t.pop("model.layers.2.mlp.experts.4.down_proj.weight"))
    for load in (qwen2_moe.from_pretrained, checkpoint.from_pretrained):
        with pytest.raises(ValueError,
                           match=r"tensor model\.layers\.2\.mlp\.experts\.4\.down_proj\.weight is missing"):
            load(missing)
    bad_size = variant("bad_size", lambda t: None, config={"moe_intermediate_size": 40})
    dense = variant("dense", lambda t: None, config={"mlp_only_layers": [1]})
    for load in (qwen2_moe.from_pretrained, checkpoint.from_pretrained):
        with pytest.raises(ValueError, match=r"experts\.0\.down_proj\.weight has shape \(64, 32\), "
                                             r"the config expects \(64, 40\)"):
            load(bad_size)
        with pytest.raises(ValueError, match=r"unexpected tensor model\.layers\.1\.mlp\.experts\.0\."):
            load(dense)
    qwen2 = variant("qwen2", lambda t: None, config={"model_type": "qwen2"})
    with pytest.raises(ValueError, match="model_type 'qwen2'"):
        qwen2_moe.from_pretrained(qwen2)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        qwen2_moe.from_pretrained(str(tmp_path))


def test_model_file_works_copied_alone(tmp_path):
    folder, hf, _ = build(tmp_path / "ckpt")
    assert_works_copied_alone(tmp_path, "qwen2_moe.py", folder, hf, ids(1, 6), atol=ATOL)


# ----------------------------------------------------------------------------------------------
# The real checkpoint
# ----------------------------------------------------------------------------------------------

@pytest.mark.hub
@pytest.mark.slow
def test_hub_qwen1_5_moe_chat_greedy_tokens():
    """Qwen/Qwen1.5-MoE-A2.7B-Chat (~29 GB in bf16): a few greedy tokens equal transformers'.
    The two models are loaded one after the other, so about 30 GB of memory suffices."""
    if not hub_available():
        pytest.skip("the Hugging Face hub is unreachable")
    from transformers import AutoTokenizer
    name = "Qwen/Qwen1.5-MoE-A2.7B-Chat"
    tok = AutoTokenizer.from_pretrained(name)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    prompt_ids = tok(prompt)["input_ids"]
    ours = qwen2_moe.from_pretrained(name, dtype="bfloat16")
    got = list(generate.generate(ours, prompt_ids, 8, temperature=0))
    del ours
    gc.collect()
    hf = HFModel.from_pretrained(name, dtype=torch.bfloat16).eval()
    expected = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=8, do_sample=False, min_new_tokens=8,
                           pad_token_id=tok.pad_token_id)[0, len(prompt_ids):].tolist()
    assert got == expected
    assert "Paris" in tok.decode(got)
