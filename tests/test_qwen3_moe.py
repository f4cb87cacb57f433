"""qwen3_moe.py against transformers' Qwen3MoeForCausalLM and Qwen3ForCausalLM (the oracles), on tiny
random checkpoints written by transformers' own save_pretrained (fp32, eager attention)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, assert_works_copied_alone, hub_available, save_tiny
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

import checkpoint
import generate
import qwen3_moe
import qwen_kernels
from qwen_kernels.experts import experts_gathered, experts_grouped

# head_dim 16 != hidden / heads = 8, so q_proj (64 wide) is wider than hidden (32).
MOE = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
           num_key_value_heads=2, head_dim=16, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
           max_position_embeddings=256)
DENSE = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
ATOL = 1e-5
DROP = "drop"  # an override value that removes the key (the config class default applies)


def tiny(tmp_path, dense=False, seed=0, **overrides):
    """(our model, transformers' model) on the same random weights, via save_pretrained + from_pretrained."""
    if dense:
        base, classes = DENSE, (Qwen3Config, Qwen3ForCausalLM)
    else:
        base, classes = MOE, (Qwen3MoeConfig, Qwen3MoeForCausalLM)
    kwargs = {k: v for k, v in {**base, **overrides}.items() if v != DROP}
    folder, hf = save_tiny(tmp_path, *classes, seed=seed, **kwargs)
    return qwen3_moe.from_pretrained(folder), hf


def tokens(B, T, seed=1, vocab=128):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def assert_close(a, b, atol=ATOL):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a.float() - b.float()).abs().max().item()
    assert err <= atol, f"max abs difference {err:.3g} > {atol}"


# ----------------------------------------------------------------------------------------------
# Logits against transformers
# ----------------------------------------------------------------------------------------------

MOE_CASES = {
    "base": {},
    "head_dim_default": {"head_dim": DROP},  # hidden / heads = 8
    "norm_topk_prob": {"norm_topk_prob": True},
    "attention_bias": {"attention_bias": True},
    "mlp_only_layers": {"mlp_only_layers": [0, 2]},
    "decoder_sparse_step": {"decoder_sparse_step": 2},
    "tied": {"tie_word_embeddings": True},
    "top1": {"num_experts_per_tok": 1},
    "top4_norm": {"num_experts_per_tok": 4, "norm_topk_prob": True},
    "top_all": {"num_experts_per_tok": 8},
    "mha": {"num_key_value_heads": 4},
    "yarn": {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                 "original_max_position_embeddings": 16}},
    # every layer slides (max_window_layers is ignored by Qwen3-MoE)
    "sliding": {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 2},
}


@pytest.mark.parametrize("case", MOE_CASES)
def test_moe_logits_match_transformers(tmp_path, case):
    ours, hf = tiny(tmp_path, **MOE_CASES[case])
    assert ours.config.head_dim == (8 if case == "head_dim_default" else 16)
    ids = tokens(2, 24)
    with torch.no_grad():
        assert_close(ours(ids), hf(ids).logits)


DENSE_CASES = {
    "base": {},
    "tied": {"tie_word_embeddings": True},
    "attention_bias": {"attention_bias": True},
    # dense Qwen3 keeps Qwen2's rule: only layers i >= max_window_layers slide
    "sliding": {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1},
}


def test_bf16_reference_path_is_bit_exact(tmp_path):
    """In bfloat16 the reference path repeats transformers' eager casts and op order exactly (RMSNorm
    cast before the weight, router weights cast to the model dtype, expert loop with index_add_)."""
    folder, _ = save_tiny(tmp_path, Qwen3MoeConfig, Qwen3MoeForCausalLM, **MOE, norm_topk_prob=True)
    hf = Qwen3MoeForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="eager",
                                             experts_implementation="eager").eval()
    ours = qwen3_moe.from_pretrained(folder, dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    ids = tokens(2, 24)
    with torch.no_grad():
        want = hf(ids).logits
        qwen_kernels.install(ours, "reference")
        assert torch.equal(ours(ids), want)
        qwen_kernels.install(ours, "torch")  # SDPA and the expert-sorted path: within bf16 rounding
        assert_close(ours(ids), want, atol=2e-2)


@pytest.mark.parametrize("case", DENSE_CASES)
def test_dense_qwen3_logits_match_transformers(tmp_path, case):
    ours, hf = tiny(tmp_path, dense=True, **DENSE_CASES[case])
    assert ours.config.model_type == "qwen3" and ours.config.num_experts == 0
    assert not any(isinstance(layer.mlp, qwen3_moe.SparseMoeBlock) for layer in ours.model.layers)
    ids = tokens(2, 24)
    with torch.no_grad():
        assert_close(ours(ids), hf(ids).logits)


def test_sliding_window_layer_rules(tmp_path):
    """Pin each model type's rule, and that the window changes the logits (so the sliding cases
    above test something)."""
    ours, hf = tiny(tmp_path / "moe", use_sliding_window=True, sliding_window=5, max_window_layers=2)
    assert ours.config.layer_types == ["sliding_attention"] * 3
    assert [layer.self_attn.window for layer in ours.model.layers] == [5, 5, 5]
    dense, hf_dense = tiny(tmp_path / "dense", dense=True, use_sliding_window=True, sliding_window=5,
                           max_window_layers=1)
    assert dense.config.layer_types == hf_dense.config.layer_types == ["full_attention", "sliding_attention",
                                                                       "sliding_attention"]
    assert [layer.self_attn.window for layer in dense.model.layers] == [None, 5, 5]
    unslid, _ = tiny(tmp_path / "plain")
    ids = tokens(1, 24)
    with torch.no_grad():
        assert (ours(ids) - unslid(ids)).abs().max() > 1e-3


def test_config_keys():
    """num_experts (hub config.json) or num_local_experts (transformers 5); norm_topk_prob from the
    file; legacy rope_theta / rope_scaling; dense defaults."""
    hub = {"model_type": "qwen3_moe", "num_experts": 128, "norm_topk_prob": True, "rope_theta": 1e6,
           "head_dim": 128, "num_attention_heads": 32, "num_key_value_heads": 4, "hidden_size": 2048,
           "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}
    c = qwen3_moe.Qwen3MoeConfig.from_dict(hub)
    assert (c.num_experts, c.norm_topk_prob, c.rope_theta, c.rope_type) == (128, True, 1e6, "yarn")
    assert c.rope_scaling == {"factor": 4.0, "original_max_position_embeddings": 32768}
    c = qwen3_moe.Qwen3MoeConfig.from_dict({"model_type": "qwen3_moe", "num_local_experts": 60})
    assert c.num_experts == 60 and c.norm_topk_prob is False  # Qwen3MoeConfig's default
    c = qwen3_moe.Qwen3MoeConfig.from_dict({"model_type": "qwen3", "num_attention_heads": 16,
                                             "num_key_value_heads": 8, "hidden_size": 1024})
    assert (c.head_dim, c.num_experts) == (128, 0)  # Qwen3Config's head_dim default, every layer dense


# ----------------------------------------------------------------------------------------------
# Expert paths
# ----------------------------------------------------------------------------------------------

def test_expert_paths_agree():
    torch.manual_seed(0)
    E, H, I, N, K = 8, 32, 24, 37, 3
    x = torch.randn(N, H)
    w_gate_up, w_down = torch.randn(E, 2 * I, H) * 0.2, torch.randn(E, H, I) * 0.2
    ids = torch.stack([torch.randperm(E - 1)[:K] for _ in range(N)])  # expert E-1 receives nothing
    weights = torch.rand(N, K)
    # spelled-out definition
    want = torch.zeros(N, H)
    for n in range(N):
        for k in range(K):
            e = ids[n, k]
            h = torch.nn.functional.silu(w_gate_up[e, :I] @ x[n]) * (w_gate_up[e, I:] @ x[n])
            want[n] += weights[n, k] * (w_down[e] @ h)
    for fn in (qwen3_moe.experts_reference, experts_grouped, experts_gathered):
        assert_close(fn(x, w_gate_up, w_down, ids, weights), want, atol=1e-4)
    assert_close(experts_grouped(x, w_gate_up, w_down, ids, weights),
                 qwen3_moe.experts_reference(x, w_gate_up, w_down, ids, weights))
    one = experts_grouped(x[:1], w_gate_up, w_down, ids[:1], weights[:1])  # batch-1 decode shape
    assert_close(one, want[:1], atol=1e-4)


def test_reference_kernels_equal_fast_path_with_gradients(tmp_path):
    ours, _ = tiny(tmp_path, norm_topk_prob=True)
    ours.requires_grad_(True)
    ids = tokens(2, 24)
    grads, outs = [], []
    for kernels in ("reference", "torch"):
        qwen_kernels.install(ours, kernels)
        ours.zero_grad()
        logits, loss = ours(ids, labels=ids, output_router_logits=True)
        loss.backward()
        outs.append(logits.detach())
        grads.append({n: p.grad.clone() for n, p in ours.named_parameters()
                      if "experts" in n or "gate." in n})
    assert_close(outs[0], outs[1])
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 9
    for name in grads[0]:
        assert_close(grads[0][name], grads[1][name], atol=1e-6)


TRITON_SCRIPT = r"""
import sys, torch
sys.path[:0] = [sys.argv[1]]
import qwen3_moe
import qwen_kernels
from qwen_kernels import moe
calls = []
kernel = moe.fused_moe
moe.fused_moe = lambda *a: calls.append(a[0].shape[0]) or kernel(*a)
model = qwen3_moe.from_pretrained(sys.argv[2])
x = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    qwen_kernels.install(model, "torch"); want = model(x)
    qwen_kernels.install(model, "triton"); got = model(x)
err = (got - want).abs().max().item()
assert calls == [18, 18, 18] and err < 1e-4, (calls, err)
print("ok", err)
"""


def test_fused_moe_kernel_wiring_in_interpreter(tmp_path):
    """qwen_kernels.moe.fused_moe (Triton's CPU interpreter here) takes the place of the torch path."""
    pytest.importorskip("triton")
    folder, _ = save_tiny(tmp_path, Qwen3MoeConfig, Qwen3MoeForCausalLM, **MOE)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", TRITON_SCRIPT, ROOT, folder], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stdout + out.stderr[-3000:]


def test_install_rejects_unknown_kernels(tmp_path):
    ours, _ = tiny(tmp_path)
    with pytest.raises(ValueError, match="kernels must be"):
        qwen_kernels.install(ours, "cuda")


# ----------------------------------------------------------------------------------------------
# Router logits and the load-balancing loss
# ----------------------------------------------------------------------------------------------

def test_loss_with_aux_matches_transformers(tmp_path):
    ours, hf = tiny(tmp_path, norm_topk_prob=True, mlp_only_layers=[1], router_aux_loss_coef=0.25)
    ids, labels = tokens(2, 16), tokens(2, 16, seed=2)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, :5] = 0                                            # left padding on row 1
    labels[1, :6] = -100                                       # (the logits at pad slot 4 predict label 5)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, position_ids=positions, labels=labels, output_router_logits=True)
        logits, loss = ours(ids, labels=labels, attention_mask=mask, output_router_logits=True)
        router_logits, aux_loss = ours.router_logits, ours.aux_loss
        plain_logits, plain_loss = ours(ids, labels=labels, attention_mask=mask)
    assert ours.router_logits is None and ours.aux_loss is None  # the plain call cleared them
    real = mask.bool()
    assert_close(logits[real], want.logits[real])
    assert len(router_logits) == len(want.router_logits) == 2  # sparse layers 0 and 2 only
    for a, b in zip(router_logits, want.router_logits):
        assert a.shape == (32, 8)
        assert_close(a[real.reshape(-1)], b[real.reshape(-1)])
    assert_close(aux_loss, want.aux_loss)
    assert_close(loss, want.loss)
    assert abs(plain_loss.item() + 0.25 * want.aux_loss.item() - loss.item()) < 1e-5


def test_config_output_router_logits_adds_aux(tmp_path):
    ours, hf = tiny(tmp_path, output_router_logits=True)
    ids = tokens(2, 12)
    with torch.no_grad():
        want = hf(ids, labels=ids)
        logits, loss = ours(ids, labels=ids)
        assert_close(ours.aux_loss, want.aux_loss)
        assert_close(loss, want.loss)
        _, off = ours(ids, labels=ids, output_router_logits=False)  # the argument wins over the config
        assert_close(off, hf(ids, labels=ids, output_router_logits=False).loss)
    assert abs(off.item() - loss.item()) > 1e-4


# ----------------------------------------------------------------------------------------------
# KV cache, padding, generation
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sliding", [False, True])
def test_kv_cache_decode_equals_full_forward(tmp_path, sliding):
    extra = {"use_sliding_window": True, "sliding_window": 4} if sliding else {}
    ours, _ = tiny(tmp_path, **extra)
    ids = tokens(1, 14)
    with torch.no_grad():
        full = ours(ids)
        for static in (False, True):
            ours.setup_cache(1, 16)
            steps = [ours(ids[:, :8], input_pos=0)[:, -1]]
            for t in range(8, 14):
                if static:
                    slot = torch.tensor([t])
                    steps.append(ours(ids[:, t:t + 1], input_pos=slot, position_ids=slot[None])[:, -1])
                else:
                    steps.append(ours(ids[:, t:t + 1], input_pos=t)[:, -1])
            ours.clear_cache()
            assert_close(torch.stack(steps, 1), full[:, 7:])


def test_left_padded_row_equals_row_alone(tmp_path):
    ours, _ = tiny(tmp_path)
    long, short = tokens(1, 10, seed=3)[0].tolist(), tokens(1, 6, seed=4)[0].tolist()
    batch = torch.tensor([long, [0] * 4 + short])
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0
    with torch.no_grad():
        alone = ours(torch.tensor([short + [5, 7]]))
        ours.setup_cache(2, 12)
        prefill = ours(batch, attention_mask=mask[:, :10], input_pos=0)
        step = ours(torch.tensor([[1], [5]]), attention_mask=mask[:, :11], input_pos=10)
        step2 = ours(torch.tensor([[2], [7]]), attention_mask=mask[:, :12], input_pos=11)
        ours.clear_cache()
    assert_close(prefill[1, 4:], alone[0, :6])
    assert_close(step[1, 0], alone[0, 6])
    assert_close(step2[1, 0], alone[0, 7])


@pytest.mark.parametrize("dense", [False, True])
def test_greedy_generation_matches_transformers(tmp_path, dense):
    ours, hf = tiny(tmp_path, dense=dense)
    prompt = tokens(1, 7, seed=5)
    want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                       pad_token_id=0, eos_token_id=None)[0, 7:].tolist()
    got = list(generate.generate(ours, prompt[0].tolist(), 12, temperature=0))
    assert got == want


def test_generate_maps_model_types():
    assert checkpoint.model_module("qwen3_moe") is qwen3_moe
    assert checkpoint.model_module("qwen3") is qwen3_moe


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

def test_fused_expert_keys_load(tmp_path):
    folder, hf = save_tiny(tmp_path / "hf", Qwen3MoeConfig, Qwen3MoeForCausalLM, **MOE)
    fused = tmp_path / "fused"
    fused.mkdir()
    shutil.copy(os.path.join(folder, "config.json"), fused)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, str(fused / "model.safetensors"))
    ours = qwen3_moe.from_pretrained(str(fused))
    ids = tokens(2, 10)
    with torch.no_grad():
        assert_close(ours(ids), hf(ids).logits)


def rewrite_checkpoint(folder, edit_tensors=None, edit_config=None):
    path = os.path.join(folder, "model.safetensors")
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, path)
    if edit_config:
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
        edit_config(config)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f)


def test_expert_stacking_is_exact(tmp_path):
    folder, hf = save_tiny(tmp_path, Qwen3MoeConfig, Qwen3MoeForCausalLM, **MOE)
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        # the hub layout, one tensor per expert
        assert "model.layers.1.mlp.experts.3.up_proj.weight" in f.keys()
        gate, up, down = (f.get_tensor(f"model.layers.1.mlp.experts.3.{p}_proj.weight")
                          for p in ("gate", "up", "down"))
    ours = qwen3_moe.from_pretrained(folder)
    experts = ours.model.layers[1].mlp.experts
    assert torch.equal(experts.gate_up_proj[3], torch.cat([gate, up]))
    assert torch.equal(experts.down_proj[3], down)
    assert torch.equal(experts.gate_up_proj, hf.model.layers[1].mlp.experts.gate_up_proj)


def test_wrong_expert_shapes_and_counts_refused(tmp_path):
    folder, _ = save_tiny(tmp_path / "a", Qwen3MoeConfig, Qwen3MoeForCausalLM, **MOE)
    name = "model.layers.0.mlp.experts.2.gate_proj.weight"
    rewrite_checkpoint(folder, lambda t: t.__setitem__(name, torch.zeros(20, 32)))
    with pytest.raises(ValueError, match=rf"{name} has shape \(20, 32\).*expects \(24, 32\)"):
        qwen3_moe.from_pretrained(folder)

    folder, _ = save_tiny(tmp_path / "b", Qwen3MoeConfig, Qwen3MoeForCausalLM, **MOE)
    rewrite_checkpoint(folder, edit_config=lambda c: c.update(num_local_experts=6))  # checkpoint has 8
    with pytest.raises(ValueError, match=r"experts\.7\.\w+_proj\.weight makes 8 experts: .*gate_up_proj "
                                         r"would have shape \(8, 48, 32\), the config expects \(6, 48, 32\)"):
        checkpoint.from_pretrained(folder)  # the full reader counts before it reads
    with pytest.raises(ValueError, match=r"unexpected tensor model\.layers\.0\.mlp\.experts\.6\."):
        qwen3_moe.from_pretrained(folder)   # the model file's loader, as it reads

    folder, _ = save_tiny(tmp_path / "c", Qwen3MoeConfig, Qwen3MoeForCausalLM, **MOE)
    rewrite_checkpoint(folder, edit_config=lambda c: c.update(num_local_experts=10))  # the router says 8
    with pytest.raises(ValueError, match=r"makes 8 experts: .* expects \(10, 48, 32\) \(num_experts=10\)"):
        checkpoint.from_pretrained(folder)
    with pytest.raises(ValueError, match=r"mlp\.gate\.weight has shape \(8, 32\), the config expects "
                                         r"\(10, 32\)"):
        qwen3_moe.from_pretrained(folder)  # the router, read first

    folder, _ = save_tiny(tmp_path / "e", Qwen3MoeConfig, Qwen3MoeForCausalLM, **MOE)
    rewrite_checkpoint(folder, lambda t: [t.pop(f"model.layers.1.mlp.experts.7.{p}_proj.weight")
                                          for p in ("gate", "up")])
    with pytest.raises(ValueError, match=r"tensor model\.layers\.1\.mlp\.experts\.7\.gate_proj\.weight "
                                         r"is missing from the checkpoint \(and 1 more\); "
                                         r"the config has 8 experts"):
        checkpoint.from_pretrained(folder)
    with pytest.raises(ValueError, match=r"tensor model\.layers\.1\.mlp\.experts\.7\.gate_proj\.weight "
                                         r"is missing from the checkpoint \(and 1 more\)"):
        qwen3_moe.from_pretrained(folder)

    folder, _ = save_tiny(tmp_path / "d", Qwen3MoeConfig, Qwen3MoeForCausalLM, **MOE)
    rewrite_checkpoint(folder, edit_config=lambda c: c.update(moe_intermediate_size=12))
    with pytest.raises(ValueError, match=r"down_proj\.weight has shape \(32, 24\).*expects \(32, 12\)|"
                                         r"gate_proj\.weight has shape \(24, 32\).*expects \(12, 32\)|"
                                         r"up_proj\.weight has shape \(24, 32\).*expects \(12, 32\)"):
        qwen3_moe.from_pretrained(folder)


def test_wrong_fused_shape_refused(tmp_path):
    folder, hf = save_tiny(tmp_path, Qwen3MoeConfig, Qwen3MoeForCausalLM, **MOE)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    state["model.layers.2.mlp.experts.down_proj"] = torch.zeros(7, 32, 24)
    save_file(state, os.path.join(folder, "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.2\.mlp\.experts\.down_proj has shape \(7, 32, "
                                         r"24\), the config expects \(8, 32, 24\)"):
        qwen3_moe.from_pretrained(folder)


def test_refuses_other_model_types(tmp_path):
    folder, _ = save_tiny(tmp_path, Qwen3MoeConfig, Qwen3MoeForCausalLM, **MOE)
    rewrite_checkpoint(folder, edit_config=lambda c: c.update(model_type="qwen2_moe"))
    with pytest.raises(ValueError, match="model_type 'qwen2_moe'"):
        qwen3_moe.from_pretrained(folder)


def test_file_works_copied_alone(tmp_path):
    folder, hf = save_tiny(tmp_path / "ckpt", Qwen3MoeConfig, Qwen3MoeForCausalLM, **MOE)
    assert_works_copied_alone(tmp_path, "qwen3_moe.py", folder, hf, tokens(1, 9))


# ----------------------------------------------------------------------------------------------
# Real checkpoints (by hub id; skipped offline)
# ----------------------------------------------------------------------------------------------

@pytest.mark.hub
def test_hub_qwen3_dense_matches_transformers():
    if not hub_available():
        pytest.skip("the Hugging Face hub is not reachable")
    from transformers import AutoModelForCausalLM

    from tokenizer import Tokenizer
    ours = qwen3_moe.from_pretrained("Qwen/Qwen3-0.6B", dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained("Qwen/Qwen3-0.6B", dtype=torch.float32).eval()
    assert ours.config.tie_word_embeddings and ours.config.head_dim == 128
    ids = torch.tensor([Tokenizer.from_pretrained("Qwen/Qwen3-0.6B").encode("The capital of France is")])
    with torch.no_grad():
        assert_close(ours(ids), hf(ids).logits, atol=1e-3)


@pytest.mark.hub
@pytest.mark.slow
def test_hub_qwen3_30b_a3b_generates():
    if not hub_available():
        pytest.skip("the Hugging Face hub is not reachable")
    from tokenizer import Tokenizer
    ours = qwen3_moe.from_pretrained("Qwen/Qwen3-30B-A3B", dtype=torch.bfloat16)
    config = ours.config
    assert (config.num_experts, config.num_experts_per_tok, config.norm_topk_prob) == (128, 8, True)
    tok = Tokenizer.from_pretrained("Qwen/Qwen3-30B-A3B")
    ids = tok.encode_chat([{"role": "user", "content": "What is the capital of France? One word."}],
                          enable_thinking=False)
    out = tok.decode(generate.generate(ours, ids, 8, temperature=0, stop_ids=[tok.token_id("<|im_end|>")]))
    assert "Paris" in out
