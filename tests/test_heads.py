"""The task heads (sequence classification, token classification, question answering) and `embed`,
for all three model files and dense Qwen3, against transformers' classes on tiny random checkpoints
written by save_pretrained (fp32, eager attention).

Padding: our decoder stack takes positions from the attention mask (each row as if alone, as
transformers' generate does), so transformers gets the same position_ids here. A left-padding query
sees no key at all; what it then computes differs between implementations (transformers' eager
attention averages every value, SDPA and ours differ again) and is never meant to be used, so those
positions are left out of the comparisons (the question-answering loss, which transformers takes over
every position, is compared without left padding).
"""
import json
import os

import pytest
import torch
from conftest import save_tiny

import generate
import qwen2
import qwen2_moe
import qwen3_moe

transformers = pytest.importorskip("transformers")

ATOL = 1e-5
PAD = 0  # the pad_token_id of the tiny configs
COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, pad_token_id=PAD)
ARCHS = {  # name -> (our file, transformers' class prefix, config overrides)
    "qwen2": (qwen2, "Qwen2", {}),
    "qwen2_moe": (qwen2_moe, "Qwen2Moe", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                              shared_expert_intermediate_size=24, initializer_range=0.15)),
    "qwen3_moe": (qwen3_moe, "Qwen3Moe", dict(head_dim=16, num_experts=8, num_experts_per_tok=2,
                                              moe_intermediate_size=16, norm_topk_prob=True)),
    "qwen3": (qwen3_moe, "Qwen3", dict(head_dim=16)),
}
B, T = 3, 11


def build(tmp_path, arch, head, **overrides):
    """(folder, transformers' model, ours) for `head` ("ForSequenceClassification", ...)."""
    module, prefix, extra = ARCHS[arch]
    config_cls = getattr(transformers, prefix + "Config")
    model_cls = getattr(transformers, prefix + head)
    folder, hf = save_tiny(tmp_path, config_cls, model_cls, **{**COMMON, **extra, **overrides})
    return folder, hf, module.from_pretrained(folder)


def batch(padding, seed=0):
    """input_ids (B, T) with pad tokens where the mask (B, T) is 0, and the positions both models use."""
    ids = torch.randint(1, COMMON["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(B, T, dtype=torch.long)
    if padding == "left":
        mask[0, :4], mask[2, :1] = 0, 0
    elif padding == "right":
        mask[0, -4:], mask[2, -2:] = 0, 0
    ids = ids.masked_fill(mask == 0, PAD)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, (None if padding == "none" else mask), positions


def close(a, b):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def hf_aux(hf, ids, mask, positions):
    """transformers' load-balancing loss on the same tokens (its heads do not add it themselves)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    base = getattr(hf, hf.base_model_prefix)
    out = base(ids, attention_mask=mask, position_ids=positions, output_router_logits=True)
    config = hf.config
    return load_balancing_loss_func(out.router_logits, config.num_experts, config.num_experts_per_tok, mask)


# ----------------------------------------------------------------------------------------------
# Sequence classification
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_sequence_classification_matches_transformers(tmp_path, arch, padding):
    cases = {  # problem_type -> (num_labels, labels)
        "regression": (1, torch.randn(B)),
        "single_label_classification": (3, torch.tensor([0, 2, 1])),
        "multi_label_classification": (3, torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])),
    }
    ids, mask, positions = batch(padding)
    for problem_type, (num_labels, labels) in cases.items():
        folder, hf, ours = build(tmp_path / problem_type, arch, "ForSequenceClassification",
                                 num_labels=num_labels)
        assert type(ours).__name__.endswith("ForSequenceClassification")
        assert ours.config.num_labels == num_labels
        with torch.no_grad():
            want = hf(ids, attention_mask=mask, position_ids=positions, labels=labels)
            logits, loss = ours(ids, labels, attention_mask=mask)
        assert ours.config.problem_type == hf.config.problem_type == problem_type  # chosen, then kept
        assert logits.shape == (B, num_labels)
        close(logits, want.logits)
        close(loss, want.loss)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3_moe"])
def test_sequence_classification_without_a_pad_token(tmp_path, arch):
    """transformers reads the last position of a single row, and refuses a larger batch."""
    folder, hf, ours = build(tmp_path, arch, "ForSequenceClassification", pad_token_id=None, num_labels=2)
    ids, _, _ = batch("none")
    with torch.no_grad():
        close(ours(ids[:1]), hf(ids[:1]).logits)
        with pytest.raises(ValueError, match="Cannot handle batch sizes > 1"):
            hf(ids)
        with pytest.raises(ValueError, match=r"a batch of 3 rows needs config\.pad_token_id"):
            ours(ids)


def test_reward_model_scores_like_transformers(tmp_path):
    """A reward model: one label, read at each answer's last token, answers of different lengths."""
    folder, hf, ours = build(tmp_path, "qwen2", "ForSequenceClassification", num_labels=1)
    ids, mask, positions = batch("left", seed=3)
    with torch.no_grad():
        rewards = ours(ids, attention_mask=mask)[:, 0]
        close(rewards, hf(ids, attention_mask=mask, position_ids=positions).logits[:, 0])
        alone = torch.stack([ours(ids[b:b + 1, mask[b].bool()])[0, 0] for b in range(B)])  # each row unpadded
    close(rewards, alone)


# ----------------------------------------------------------------------------------------------
# Token classification and question answering
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_token_classification_matches_transformers(tmp_path, arch, padding):
    folder, hf, ours = build(tmp_path, arch, "ForTokenClassification", num_labels=5)
    assert ours.score.bias is not None
    ids, mask, positions = batch(padding)
    labels = torch.randint(0, 5, (B, T), generator=torch.Generator().manual_seed(2))
    if mask is not None:
        labels = labels.masked_fill(mask == 0, -100)
    real = torch.ones(B, T, dtype=torch.bool) if mask is None else mask.bool()
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, position_ids=positions, labels=labels)
        logits, loss = ours(ids, labels, attention_mask=mask)
    close(logits[real], want.logits[real])
    close(loss, want.loss)


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_question_answering_matches_transformers(tmp_path, arch, padding):
    folder, hf, ours = build(tmp_path, arch, "ForQuestionAnswering")
    # transformers calls the decoder stack `transformer` here (`model` in Qwen2-MoE's class): so do we
    assert set(dict(ours.named_children())) == {hf.base_model_prefix, "qa_outputs"}
    ids, mask, positions = batch(padding)
    start, end = torch.tensor([5, 2, 30]), torch.tensor([[7], [9], [10]])  # 30: outside the text, ignored
    real = torch.ones(B, T, dtype=torch.bool) if mask is None else mask.bool()
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, position_ids=positions, start_positions=start, end_positions=end)
        start_logits, end_logits, loss = ours(ids, start, end, attention_mask=mask)
    close(start_logits[real], want.start_logits[real])
    close(end_logits[real], want.end_logits[real])
    if padding != "left":  # transformers' loss also counts the left-padding positions' logits (see top)
        close(loss, want.loss)


# ----------------------------------------------------------------------------------------------
# Mixture of experts: the router's auxiliary loss
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe"])
def test_moe_heads_add_the_aux_loss_like_the_causal_lm(tmp_path, arch):
    ids, mask, positions = batch("left")
    coef = 0.5
    folder, hf, ours = build(tmp_path / "seq", arch, "ForSequenceClassification", num_labels=3,
                             router_aux_loss_coef=coef)
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        aux = hf_aux(hf, ids, mask, positions)
        want = hf(ids, attention_mask=mask, position_ids=positions, labels=labels).loss
        _, plain = ours(ids, labels, attention_mask=mask)
        assert ours.aux_loss is None and ours.router_logits is None
        _, loss = ours(ids, labels, attention_mask=mask, output_router_logits=True)
    close(plain, want)
    close(ours.aux_loss, aux)
    assert len(ours.router_logits) == 3 and aux > 0.1
    close(loss, want + coef * aux)

    folder, hf, ours = build(tmp_path / "qa", arch, "ForQuestionAnswering", router_aux_loss_coef=coef,
                             output_router_logits=True)  # from the config this time
    start, end = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    ids, mask, positions = batch("right")
    with torch.no_grad():
        aux = hf_aux(hf, ids, mask, positions)
        want = hf(ids, attention_mask=mask, position_ids=positions, start_positions=start, end_positions=end)
        *_, loss = ours(ids, start, end, attention_mask=mask)
    close(loss, want.loss + coef * aux)

    folder, hf, ours = build(tmp_path / "tok", arch, "ForTokenClassification", num_labels=4,
                             router_aux_loss_coef=coef)
    labels = torch.randint(0, 4, (B, T), generator=torch.Generator().manual_seed(5))
    ids, mask, positions = batch("none")
    with torch.no_grad():
        aux = hf_aux(hf, ids, mask, positions)
        _, loss = ours(ids, labels, output_router_logits=True)
    close(loss, hf(ids, labels=labels).loss + coef * aux)


# ----------------------------------------------------------------------------------------------
# Loading by `architectures`, and bad input
# ----------------------------------------------------------------------------------------------

def test_checkpoints_load_as_the_class_config_json_names(tmp_path):
    folder, hf, ours = build(tmp_path / "tok", "qwen3", "ForTokenClassification", num_labels=4,
                             id2label={0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC"})
    assert type(ours) is qwen3_moe.Qwen3ForTokenClassification  # transformers' dense name
    assert isinstance(ours, qwen3_moe.Qwen3MoeForTokenClassification)
    assert ours.config.id2label == {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC"}
    assert ours.config.num_labels == 4
    with open(os.path.join(folder, "config.json")) as f:
        assert json.load(f)["architectures"] == ["Qwen3ForTokenClassification"]
    # the decoder stack alone loads from any head's checkpoint (the head's tensors are skipped)
    backbone = qwen3_moe.from_pretrained(folder, architecture="Qwen3MoeModel")
    assert type(backbone) is qwen3_moe.Qwen3MoeModel
    ids = batch("none")[0]
    with torch.no_grad():
        close(backbone(ids)[0], hf.model(ids).last_hidden_state)
    # generate.py needs a causal LM
    with pytest.raises(generate.UsageError,
                       match="Qwen3ForTokenClassification checkpoint: generate.py needs"):
        generate.load(folder)


def test_bad_input_is_one_clear_line(tmp_path):
    folder, hf, lm = build(tmp_path / "lm", "qwen2", "ForCausalLM")
    with pytest.raises(ValueError, match=r"tensor score\.weight is missing from the checkpoint; .* holds a "
                                         r"Qwen2ForCausalLM, not a Qwen2ForSequenceClassification"):
        qwen2.from_pretrained(folder, architecture="Qwen2ForSequenceClassification")
    with pytest.raises(ValueError, match=r"is a Qwen2ForMaskedLM, which qwen2\.py does not build \(it builds "
                                         r"Qwen2ForCausalLM, "):
        qwen2.from_pretrained(folder, architecture="Qwen2ForMaskedLM")
    folder, hf, ours = build(tmp_path / "seq", "qwen2", "ForSequenceClassification", num_labels=3)
    ids = batch("none")[0]
    with pytest.raises(ValueError, match=r"labels have shape \(3, 3\); single_label_classification with "
                                         r"3 rows and 3 labels expects \(3,\)"):
        ours(ids, torch.zeros(3, 3, dtype=torch.long))
    folder, hf, ours = build(tmp_path / "tok", "qwen2", "ForTokenClassification", num_labels=3)
    with pytest.raises(ValueError, match=r"labels have shape \(3,\); token classification expects one label "
                                         r"per token, \(3, 11\)"):
        ours(ids, torch.zeros(3, dtype=torch.long))
    folder, hf, ours = build(tmp_path / "qa", "qwen2", "ForQuestionAnswering")
    with pytest.raises(ValueError, match=r"end_positions have shape \(2,\); question answering expects"):
        ours(ids, torch.zeros(3, dtype=torch.long), torch.zeros(2, dtype=torch.long))


# ----------------------------------------------------------------------------------------------
# Embeddings
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("padding", ["left", "right"])
def test_embed_is_last_token_pooling_normalised(tmp_path, padding):
    """Qwen3's embedding models: the last real token's final hidden state, L2-normalised; the checkpoint
    is the bare decoder stack (no "model." prefix, architectures ["Qwen3Model"])."""
    from transformers import Qwen3Config, Qwen3Model
    folder, hf = save_tiny(tmp_path, Qwen3Config, Qwen3Model, **{**COMMON, "head_dim": 16})
    with open(os.path.join(folder, "config.json")) as f:
        assert json.load(f)["architectures"] == ["Qwen3Model"]
    ours = qwen3_moe.from_pretrained(folder)
    assert type(ours) is qwen3_moe.Qwen3Model  # transformers' dense name
    ids, mask, positions = batch(padding)
    with torch.no_grad():
        hidden = hf(ids, attention_mask=mask, position_ids=positions).last_hidden_state
        got = qwen3_moe.embed(ours, ids, mask)
    last = (torch.arange(T) * mask).argmax(-1)
    want = torch.nn.functional.normalize(hidden[torch.arange(B), last], dim=-1)
    close(got, want)
    assert torch.allclose(got.norm(dim=-1), torch.ones(B))
    with torch.no_grad():  # each row as if alone, and any class holding the decoder stack works too
        close(got[0], qwen3_moe.embed(ours, ids[:1, mask[0].bool()])[0])


@pytest.mark.parametrize("arch", ["qwen2", "qwen2_moe"])
def test_embed_works_on_every_file_and_class(tmp_path, arch):
    folder, hf, ours = build(tmp_path, arch, "ForCausalLM")
    ids, mask, positions = batch("left")
    module = ARCHS[arch][0]
    with torch.no_grad():
        got = module.embed(ours, ids, mask)
        hidden = hf.model(ids, attention_mask=mask, position_ids=positions).last_hidden_state
    close(got, torch.nn.functional.normalize(hidden[:, -1], dim=-1))
