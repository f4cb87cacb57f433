"""The reference answers to the exercises: thin adapters around the model files' own code, with the
signatures of docs/exercises/starter.py. The checkers compare a student's functions with these;
`QWEN_EXERCISE_IMPL=tests/exercises/reference.py pytest tests/exercises/test_rmsnorm.py` passes.

No arithmetic is written here: each function calls the code the model files run, so an exercise
checks exactly what the models compute.
"""
import os
import sys

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import generate  # noqa: E402
import quantize  # noqa: E402
import qwen2  # noqa: E402
import qwen2_moe  # noqa: E402
import tokenizer  # noqa: E402


def _param(t):
    return nn.Parameter(t, requires_grad=False)


# 1. qwen2.RMSNorm
def rms_norm(x, weight, eps=1e-6):
    norm = qwen2.RMSNorm(x.shape[-1], eps)
    norm.weight = _param(weight)
    return norm(x)


# 2. qwen2.RotaryEmbedding (default RoPE), rotate_half, apply_rope
def _rope_config(head_dim, theta, **kw):
    return qwen2.Qwen2Config(hidden_size=head_dim, num_attention_heads=1, num_key_value_heads=1,
                             head_dim=head_dim, rope_theta=theta, **kw)


def rope_cos_sin(positions, head_dim, theta, dtype):
    return qwen2.RotaryEmbedding(_rope_config(head_dim, theta))(positions, dtype)


rotate_half = qwen2.rotate_half
apply_rope = qwen2.apply_rope

# 3. and 4.
visibility_mask = qwen2.visibility_mask


def gqa_attention(q, k, v, mask, scale):
    """qwen2.reference_attention, which takes the keys' visibility from a Step (mask None there is
    plain causal attention; here, every key visible) and scales by D ** -0.5 itself."""
    T, S, D = q.shape[2], k.shape[2], q.shape[3]
    mask = torch.ones(1, 1, T, S, dtype=torch.bool, device=q.device) if mask is None else mask
    step = qwen2.Step(cos=None, sin=None, slots=None, num_keys=S, masks={None: mask}, key_mask=None)
    return qwen2.reference_attention(q * (scale / D ** -0.5), k, v, step, None)


# 5. qwen2.KVCache.update, on the student's cache tensors
def kv_cache_update(cache_k, cache_v, slots, k, v):
    cache = qwen2.KVCache(1, 1, 1, 1, cache_k.dtype, cache_k.device)
    cache.k, cache.v = cache_k, cache_v  # the buffers become the given tensors (written in place)
    step = qwen2.Step(cos=None, sin=None, slots=slots, num_keys=cache_k.shape[2], masks={}, key_mask=None)
    return cache.update(step, k, v)  # (the whole cache: the step reads every slot)


# 6. generate.sampling_probs: the distribution generate.sample draws from
sampling_probs = generate.sampling_probs


# 7. and 9.
route = qwen2_moe.route
load_balancing_loss = qwen2_moe.load_balancing_loss


# 8. qwen2_moe.SparseMoeBlock: routed experts plus the sigmoid-gated shared expert
def moe_block(x, router_weight, w_gate_up, w_down, shared_gate_proj, shared_up_proj, shared_down_proj,
              shared_expert_gate, top_k, norm_topk_prob):
    E, H = router_weight.shape
    config = qwen2_moe.Qwen2MoeConfig(hidden_size=H, num_attention_heads=1, num_key_value_heads=1,
                                      num_hidden_layers=1, num_experts=E, num_experts_per_tok=top_k,
                                      moe_intermediate_size=w_down.shape[2],
                                      shared_expert_intermediate_size=shared_down_proj.shape[1],
                                      norm_topk_prob=norm_topk_prob)
    block = qwen2_moe.SparseMoeBlock(config).to(x.dtype)
    block.gate.weight = _param(router_weight)
    block.experts.gate_up_proj, block.experts.down_proj = _param(w_gate_up), _param(w_down)
    block.shared_expert.gate_proj.weight = _param(shared_gate_proj)
    block.shared_expert.up_proj.weight = _param(shared_up_proj)
    block.shared_expert.down_proj.weight = _param(shared_down_proj)
    block.shared_expert_gate.weight = _param(shared_expert_gate)
    return block(x)[0]  # (the file's own experts_function: experts_reference)


# 10.
StreamDecoder = tokenizer.StreamDecoder


# 11. qwen2.rope_frequencies for rope_type "yarn"
def yarn_frequencies(head_dim, theta, factor, original_max_position_embeddings, beta_fast=32.0,
                     beta_slow=1.0):
    scaling = {"factor": factor, "original_max_position_embeddings": original_max_position_embeddings,
               "beta_fast": beta_fast, "beta_slow": beta_slow}
    config = _rope_config(head_dim, theta, rope_type="yarn", rope_scaling=scaling,
                          max_position_embeddings=int(original_max_position_embeddings * factor))
    return qwen2.rope_frequencies(config)


# 13. quantize.quantize_int8 and dequantize_int8
quantize_int8 = quantize.quantize_int8
dequantize_int8 = quantize.dequantize_int8
