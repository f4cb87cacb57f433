"""Qwen1.5-MoE and Qwen2-MoE in one file (Hugging Face `model_type` "qwen2_moe").

Checkpoints: Qwen/Qwen1.5-MoE-A2.7B(-Chat) (60 experts, 4 per token, 14.3B parameters of which 2.7B
are active per token) and Qwen/Qwen2-57B-A14B(-Instruct) (64 experts, 8 per token).

A decoder-only transformer, read top to bottom:

    tokens -> embed_tokens -> N x DecoderLayer -> norm -> lm_head -> logits
    DecoderLayer(x):  x = x + Attention(RMSNorm(x));  x = x + FeedForward(RMSNorm(x))

where FeedForward is, on the *sparse* layers, a mixture of experts:

    router:  p = softmax(x @ gate.weight.T) over E experts; keep the top K (optionally rescaled
             so that they add up to 1)
    output:  sum_k p_k * Expert_{e_k}(x)  +  sigmoid(shared_expert_gate(x)) * SharedExpert(x)

Every expert (and the shared expert) is a SwiGLU MLP, `down(silu(gate(x)) * up(x))`. A token
only runs through its K chosen experts, so most of the expert weights are idle for any one token.

The sections, in the same order in all three model files (what they share is written identically,
and tests/test_copies.py holds them to it): configuration; RMSNorm and RoPE; attention; feed-forward
(MLP, router, `experts_reference`, `Experts`, `SparseMoeBlock`); layer, model, causal LM; task heads;
losses; loading.

What differs from Qwen2 (qwen2.py):
* The MLP of the sparse layers (layer i is sparse iff i is not in `mlp_only_layers`,
  `num_experts > 0` and `(i + 1) % decoder_sparse_step == 0`) is the mixture of experts above,
  with a shared expert gated by a sigmoid; the other layers keep a dense MLP. Each layer returns
  its router logits, and with `output_router_logits` the loss of the causal LM and of every task
  head adds `router_aux_loss_coef` times a load-balancing loss.
* q/k/v bias follows `qkv_bias` (default true); Qwen2 always has it.
* Sliding-window layers (without `layer_types`): layer i slides iff `use_sliding_window`, i is
  even and `i < max_window_layers` (Qwen2: iff `i >= max_window_layers`).
* Expert weights live stacked per layer, as transformers 5 keeps them in memory:
  `mlp.experts.gate_up_proj` (E, 2I, C) and `mlp.experts.down_proj` (E, C, I); the loader stacks
  the per-expert tensors of the hub files into them.
What differs from Qwen3-MoE (qwen3_moe.py): Qwen3-MoE has no shared expert, has per-head RMSNorm
on queries and keys, an explicit head_dim, no q/k/v bias by default, slides on every layer when
`use_sliding_window`, and renormalises the top-k weights (norm_topk_prob true in its checkpoints;
false in Qwen1.5-MoE and Qwen2-MoE).

The seams. Everything here is the plain computation; faster versions are swapped in from outside
(`qwen_kernels.install(model)`) at three places this file names once: `Attention.attention_function`
(default `sdpa_attention`, torch's fused attention; `reference_attention` spells it out),
`Experts.experts_function` (default `experts_reference`, a loop over the experts that received
tokens) and the `nn.Linear` layers, found by their Hugging Face names (quantize.py and the CPU
kernels replace them). Copied alone into another project, the file runs as it is.

Parameter names are Hugging Face's (`model.layers.0.mlp.experts.gate_up_proj`, ...).
transformers' `modeling_qwen2_moe.py` is the semantics we match. The file needs torch and the
standard library; its loader also imports safetensors (and huggingface_hub for hub ids) when called.

References:
  Qwen1.5-MoE blog, https://qwenlm.github.io/blog/qwen-moe/
  Qwen2 technical report (Qwen2-57B-A14B), https://arxiv.org/abs/2407.10671
  DeepSeekMoE (fine-grained and shared experts), https://arxiv.org/abs/2401.06066
  Switch Transformer (load-balancing loss), https://arxiv.org/abs/2101.03961
  RoFormer (rotary embeddings), https://arxiv.org/abs/2104.09864
  GQA, https://arxiv.org/abs/2305.13245 ; YaRN, https://arxiv.org/abs/2309.00071
  RMSNorm, https://arxiv.org/abs/1910.07467 ; SwiGLU, https://arxiv.org/abs/2002.05202
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

@dataclass
class Qwen2MoeConfig:
    # Defaults are transformers' Qwen2MoeConfig defaults (Qwen1.5-MoE-A2.7B shapes), so a key
    # missing from config.json means what it means to transformers.
    vocab_size: int = 151936            # tokens in the vocabulary
    hidden_size: int = 2048             # width of the residual stream
    intermediate_size: int = 5632       # width of the dense MLP's hidden layer (non-sparse layers)
    num_hidden_layers: int = 24         # decoder layers
    num_attention_heads: int = 16       # query heads
    num_key_value_heads: int = 16       # key/value heads (GQA); equal to query heads = plain MHA
    head_dim: int | None = None         # size of one head; None -> hidden_size // num_attention_heads
    max_position_embeddings: int = 32768  # context length the model was trained for
    rms_norm_eps: float = 1e-6          # epsilon inside RMSNorm
    rope_theta: float = 10000.0         # RoPE base wavelength
    rope_type: str = "default"          # "default", "linear", "dynamic" or "yarn"
    rope_scaling: dict | None = None    # its parameters (factor, original_max_position_embeddings, ...)
    tie_word_embeddings: bool = False   # lm_head shares the embedding matrix
    qkv_bias: bool = True               # bias on q_proj, k_proj, v_proj (never on o_proj)
    use_sliding_window: bool = False    # turn sliding-window attention on
    sliding_window: int | None = 4096   # keys a sliding layer sees, itself included
    max_window_layers: int = 28         # without layer_types: only even layers below this one slide
    layer_types: list | None = None     # per layer "full_attention" / "sliding_attention" (wins if given)
    num_experts: int = 60               # routed experts per sparse layer (E)
    num_experts_per_tok: int = 4        # experts each token is routed to (K, "top-k")
    moe_intermediate_size: int = 1408   # hidden width of one routed expert (I)
    shared_expert_intermediate_size: int = 5632  # hidden width of the shared expert
    norm_topk_prob: bool = False        # rescale the K routing weights to sum to 1
    decoder_sparse_step: int = 1        # layer i is sparse iff (i + 1) % decoder_sparse_step == 0 ...
    mlp_only_layers: list | None = None  # ... and i is not in this list (these keep a dense MLP)
    output_router_logits: bool = False  # keep router logits, add the load-balancing loss to the loss
    router_aux_loss_coef: float = 0.001  # weight of the load-balancing loss
    hidden_act: str = "silu"            # MLP activation (Qwen2-MoE only ever uses SiLU)
    torch_dtype: str | None = None      # dtype the checkpoint was saved in, e.g. "bfloat16"
    # The task heads (sequence / token classification, question answering):
    num_labels: int = 2                 # outputs of the classification heads (len(id2label) when given)
    id2label: dict | None = None        # class index -> label name
    problem_type: str | None = None     # regression, single_label_classification, multi_label_classification
    pad_token_id: int | None = None     # padding token: sequence classification reads the last other token
    classifier_dropout: float | None = None  # token classification's dropout (None: 0.1, as transformers)
    model_type: str = "qwen2_moe"

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.id2label:  # config.json's keys are strings
            self.id2label = {int(k): v for k, v in self.id2label.items()}
            self.num_labels = len(self.id2label)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.rope_type not in ("default", "linear", "dynamic", "yarn"):
            raise ValueError(f"unsupported RoPE type {self.rope_type!r} (default, linear, dynamic or yarn)")
        if self.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r} (Qwen2-MoE uses silu)")
        self.mlp_only_layers = list(self.mlp_only_layers or [])
        if self.num_experts > 0 and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..num_experts "
                             f"({self.num_experts})")
        # transformers (configuration_qwen2_moe.py): without layer_types, layer i slides iff
        # use_sliding_window and i is even and i < max_window_layers -- not Qwen2's rule.
        if self.layer_types is None:
            self.layer_types = ["sliding_attention" if self.use_sliding_window and i % 2 == 0
                                and i < self.max_window_layers else "full_attention"
                                for i in range(self.num_hidden_layers)]
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for "
                             f"{self.num_hidden_layers} layers")

    def window(self, layer: int) -> int | None:
        """The sliding window of `layer` in keys, or None for full causal attention."""
        if self.layer_types[layer] != "sliding_attention":
            return None
        if not self.use_sliding_window or not self.sliding_window:
            raise ValueError(f"layer {layer} is a sliding_attention layer but the config sets no "
                             f"sliding window")
        return self.sliding_window

    def is_sparse(self, layer: int) -> bool:
        """Whether `layer` has the mixture of experts (else a dense MLP of intermediate_size)."""
        return (layer not in self.mlp_only_layers and self.num_experts > 0
                and (layer + 1) % self.decoder_sparse_step == 0)

    @classmethod
    def from_dict(cls, d: dict) -> "Qwen2MoeConfig":
        """Build from a config.json dict: classic keys (`rope_theta`, `rope_scaling`) or the newer
        `rope_parameters`; unknown keys are ignored."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known and k not in ("rope_scaling", "rope_type")}
        if kwargs.get("num_key_value_heads") is None:
            kwargs["num_key_value_heads"] = d.get("num_attention_heads", cls.num_attention_heads)
        kwargs["torch_dtype"] = d.get("torch_dtype") or d.get("dtype")
        rope = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})  # (rope_scaling wins)
        kwargs["rope_theta"] = float(rope.pop("rope_theta", d.get("rope_theta", cls.rope_theta)))
        kwargs["rope_type"] = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
        rope.pop("type", None)
        kwargs["rope_scaling"] = rope or None
        return cls(**kwargs)


# ----------------------------------------------------------------------------------------------
# RMSNorm and rotary position embeddings
# ----------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)  # cast back *before* the weight: matches transformers in bf16


def rope_frequencies(config: Qwen2MoeConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim/2,) and the cos/sin scale for the config's RoPE type.

    `seq_len` only matters for "dynamic" (NTK) scaling, which raises the base once the sequence
    grows past max_position_embeddings.
    """
    dim, base, p = config.head_dim, config.rope_theta, dict(config.rope_scaling or {})
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim  # (dim/2,)
    if config.rope_type == "linear":  # positions divided by factor == frequencies divided by factor
        return 1.0 / base ** exponents / p["factor"], 1.0
    if config.rope_type == "dynamic":
        max_pos = config.max_position_embeddings
        seq_len = max(seq_len or max_pos, max_pos)
        base = base * ((p["factor"] * seq_len / max_pos) - (p["factor"] - 1)) ** (dim / (dim - 2))
    if config.rope_type != "yarn":
        return 1.0 / base ** exponents, 1.0
    # YaRN: interpolate the low frequencies, keep (extrapolate) the high ones, ramp in between.
    original = p.get("original_max_position_embeddings") or config.max_position_embeddings
    factor = p.get("factor") or config.max_position_embeddings / original

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None and p.get("mscale") and p.get("mscale_all_dim"):
        attention_factor = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])

    def correction_dim(rotations):  # the dimension whose wavelength turns `rotations` times
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(p.get("beta_fast") or 32), correction_dim(p.get("beta_slow") or 1)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the original frequency), 0: interpolate
    pos_freqs = base ** exponents
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    return inv_freq, float(mscale(factor) if attention_factor is None else attention_factor)


class RotaryEmbedding(nn.Module):
    def __init__(self, config: Qwen2MoeConfig):
        super().__init__()
        self.config = config
        inv_freq, self.attention_scaling = rope_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: (B, T) integer positions; returns cos, sin of shape (B, T, head_dim) in `dtype`.
        inv_freq, scaling = self.inv_freq, self.attention_scaling
        if self.config.rope_type == "dynamic":
            seq_len = int(positions.max()) + 1
            if seq_len > self.config.max_position_embeddings:
                inv_freq, scaling = rope_frequencies(self.config, seq_len)
                inv_freq = inv_freq.to(positions.device)
        freqs = positions.float()[..., None] * inv_freq.float()  # (B, T, head_dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)                   # (B, T, head_dim)
        return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, heads, T, head_dim); cos/sin: (B, T, head_dim), broadcast over heads
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------

def visibility_mask(q_slots: torch.Tensor, S: int, window: int | None,
                    key_mask: torch.Tensor | None) -> torch.Tensor:
    """Which keys each query may see: (B or 1, 1, T, S) booleans.

    Query i sits at cache slot q_slots[i]; key slot j is visible when j <= q_slots[i] (causal),
    j > q_slots[i] - window (sliding window: exactly `window` keys, itself included) and
    key_mask[b, j] (0 marks left padding).
    """
    q = q_slots[:, None]                                         # (T, 1)
    k = torch.arange(S, device=q_slots.device)[None, :]          # (1, S)
    visible = k <= q
    if window is not None:
        visible = visible & (k > q - window)
    visible = visible[None, None]                                # (1, 1, T, S)
    if key_mask is not None:
        visible = visible & key_mask[:, None, None, :S].bool()   # (B, 1, T, S)
        # A query that sees no key at all (left padding) sees itself, so that its softmax stays finite
        # (its output is never used); every other query keeps exactly the keys above.
        visible = visible | ((k == q) & ~visible.any(-1, keepdim=True))
    return visible


@dataclass
class Step:
    """One forward pass as every layer sees it, decided once by the model (`make_step`)."""
    cos: torch.Tensor                  # (B, T, head_dim) rotary cosines at each token's position
    sin: torch.Tensor                  # (B, T, head_dim) rotary sines
    slots: torch.Tensor | None         # (T,) cache slots the new keys/values go to; None: no cache
    num_keys: int                      # attention reads key slots [0, num_keys)
    masks: dict                        # window -> (B|1, 1, T, num_keys) bool, or None: plain causal
    key_mask: torch.Tensor | None      # (B, >= num_keys) 1 for real tokens, 0 for left padding; None: none


def reference_attention(q, k, v, step: Step, window: int | None) -> torch.Tensor:
    """Attention spelled out, exactly as transformers' eager path computes it.

    q: (B, H, T, D); k, v: (B, KVH, S, D); the keys each query sees: step.masks[window]. The H query
    heads are grouped G = H // KVH at a time onto their key/value head by a reshape, so the repeated
    K/V never exists in memory.
    """
    B, H, T, D = q.shape
    KVH, S = k.shape[1], k.shape[2]
    mask = step.masks[window]
    if mask is None:  # plain causal attention: the T queries are the last T of the S slots
        mask = visibility_mask(torch.arange(S - T, S, device=q.device), S, None, None)
    qg = q.view(B, KVH, H // KVH, T, D)                                 # (B, KVH, G, T, D)
    scores = qg @ k[:, :, None].transpose(-1, -2) * D ** -0.5           # (B, KVH, G, T, S)
    scores = scores.masked_fill(~mask[:, :, None], torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return (probs @ v[:, :, None]).view(B, H, T, D)                     # (B, H, T, D)


def sdpa_attention(q, k, v, step: Step, window: int | None) -> torch.Tensor:
    """The same function through torch's fused scaled_dot_product_attention (the default). With no
    mask (plain causal) a prefill says is_causal and a one-token step sees every key."""
    mask = step.masks[window]
    if mask is None and q.shape[2] > 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


class KVCache(nn.Module):
    """Preallocated keys and values of one layer: (batch, kv_heads, max_len, head_dim)."""

    def __init__(self, batch_size, n_kv_heads, max_len, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, step: Step, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, KVH, T, D) at the step's slots; return slots [0, num_keys), (B, KVH, S, D) each
        (views of the cache, no copy)."""
        self.k.index_copy_(2, step.slots, k)
        self.v.index_copy_(2, step.slots, v)
        return self.k[:, :, :step.num_keys], self.v[:, :, :step.num_keys]


class Attention(nn.Module):
    # The seam: the function that computes attention, (q, k, v, step, window) -> (B, H, T, D).
    # qwen_kernels.install sets faster ones on each layer; reference_attention spells it out.
    attention_function = staticmethod(sdpa_attention)

    def __init__(self, config: Qwen2MoeConfig, layer: int):
        super().__init__()
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.window = config.window(layer)
        bias = config.qkv_bias
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)
        self.cache: KVCache | None = None  # set by setup_cache

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KVH, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KVH, T, D)
        q, k = apply_rope(q, step.cos, step.sin), apply_rope(k, step.cos, step.sin)
        if step.slots is not None:                     # with a KV cache: store, then read every slot so far
            k, v = self.cache.update(step, k, v)                                       # (B, KVH, S, D)
        out = self.attention_function(q, k, v, step, self.window)                      # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


# ----------------------------------------------------------------------------------------------
# Feed-forward
# ----------------------------------------------------------------------------------------------

class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def route(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick each token's experts: router_logits (N, E) in the model dtype -> (topk_weights, topk_ids),
    each (N, K).

    Softmax over all E experts in float32, keep the K largest; rescale them to sum to 1 only when
    norm_topk_prob; the weights come back in the model dtype.
    """
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)     # (N, E)
    topk_weights, topk_ids = torch.topk(probs, top_k, dim=-1)             # (N, K) each
    if norm_topk_prob:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights.to(router_logits.dtype), topk_ids


# The routed experts. What every implementation of Experts.experts_function computes:
#
#   out[n] = sum_k topk_weights[n, k] * down_e(silu(gate_e(x[n])) * up_e(x[n])),  e = topk_ids[n, k]
#
#   x (N, C) tokens, w_gate_up (E, 2I, C) [rows [0, I) the gate projection, rows [I, 2I) the up
#   projection], w_down (E, C, I), topk_ids (N, K) int, topk_weights (N, K)  ->  (N, C) in x.dtype

def experts_reference(x, w_gate_up, w_down, topk_ids, topk_weights):
    """The reference: a loop over the experts that received tokens, in the same arithmetic and order
    as transformers' eager experts (index_add_ expert by expert)."""
    out = torch.zeros_like(x)                                             # (N, C)
    for e in topk_ids.unique().tolist():                                  # experts with tokens, ascending
        token, slot = torch.where(topk_ids == e)                          # its tokens, and which pick
        gate, up = F.linear(x[token], w_gate_up[e]).chunk(2, dim=-1)      # (n_e, I) each
        y = F.linear(F.silu(gate) * up, w_down[e])                        # (n_e, C)
        out.index_add_(0, token, y * topk_weights[token, slot, None])     # weighted, into each token's row
    return out


class Experts(nn.Module):
    """The E routed experts of one layer, stacked (as transformers 5 keeps them in memory):
    gate_up_proj (E, 2I, C), each expert's gate rows then its up rows, and down_proj (E, C, I)."""
    # The seam: the function that computes the routed experts (its arguments are in the comment above).
    # qwen_kernels.install sets faster ones on each layer (grouped matmuls, the fused Triton kernel).
    experts_function = staticmethod(experts_reference)

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        E, C, I = num_experts, hidden_size, intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, C).normal_(std=0.02))  # (a no-op on meta)
        self.down_proj = nn.Parameter(torch.empty(E, C, I).normal_(std=0.02))

    def forward(self, x, topk_ids, topk_weights) -> torch.Tensor:
        """x (N, C), topk_ids and topk_weights (N, K) -> (N, C)."""
        return self.experts_function(x, self.gate_up_proj, self.down_proj, topk_ids, topk_weights)


class SparseMoeBlock(nn.Module):
    """The mixture of experts of a sparse layer: router, routed experts, and a shared expert that every
    token runs through, gated by a sigmoid."""

    def __init__(self, config: Qwen2MoeConfig):
        super().__init__()
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)  # the router
        self.experts = Experts(config.num_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_expert = MLP(config.hidden_size, config.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor):
        """x (B, T, C) -> (output (B, T, C), router logits (B*T, E))."""
        B, T, C = x.shape
        x = x.reshape(B * T, C)                                              # (N, C), N = B*T tokens
        router_logits = self.gate(x)                                         # (N, E) in the model dtype
        topk_weights, topk_ids = route(router_logits, self.top_k, self.norm_topk_prob)  # (N, K) each
        routed = self.experts(x, topk_ids, topk_weights)                    # (N, C)
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)  # (N, 1) * (N, C)
        return (routed + shared).view(B, T, C), router_logits


# ----------------------------------------------------------------------------------------------
# Layer, model, causal LM
# ----------------------------------------------------------------------------------------------

class DecoderLayer(nn.Module):
    def __init__(self, config: Qwen2MoeConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.sparse = config.is_sparse(layer)
        self.mlp = (SparseMoeBlock(config) if self.sparse
                    else MLP(config.hidden_size, config.intermediate_size))

    def forward(self, x: torch.Tensor, step: Step):
        """Returns (x, router logits (B*T, E)); the router logits are None on a dense layer."""
        x = x + self.self_attn(self.input_layernorm(x), step)
        h = self.post_attention_layernorm(x)
        if not self.sparse:
            return x + self.mlp(h), None
        h, router_logits = self.mlp(h)
        return x + h, router_logits


def cache_slots(input_pos, T: int, device) -> torch.Tensor:
    """The (T,) cache slots of a forward's tokens: input_pos itself when it is a tensor of slots,
    else the T slots from input_pos (None: 0) on."""
    if torch.is_tensor(input_pos):
        return input_pos
    start = int(input_pos or 0)
    return torch.arange(start, start + T, device=device)


class Qwen2MoeModel(nn.Module):
    """The decoder stack: token ids -> final hidden states. It holds the KV caches."""

    def __init__(self, config: Qwen2MoeConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.max_cache_len = 0   # slots of the KV caches (0: none set up)

    def setup_cache(self, batch_size: int, max_len: int, dtype=None, device=None):
        """Allocate every layer's KV cache for `batch_size` rows of up to `max_len` tokens."""
        ref = self.norm.weight  # (never quantized: quantize.py may quantize the embedding)
        for layer in self.layers:
            attn = layer.self_attn
            attn.cache = KVCache(batch_size, attn.n_kv_heads, max_len, attn.head_dim, dtype or ref.dtype,
                                 device or ref.device)
        self.max_cache_len = max_len

    def clear_cache(self):
        for layer in self.layers:
            layer.self_attn.cache = None
        self.max_cache_len = 0

    def make_step(self, input_ids, attention_mask, position_ids, input_pos, dtype) -> Step:
        """What every layer needs besides the hidden states, decided once per forward (see forward)."""
        B, T = input_ids.shape
        fixed = torch.is_tensor(input_pos)   # slots given as a tensor: attention reads the whole cache
        slots = cache_slots(input_pos, T, input_ids.device)                     # (T,)
        num_keys = self.max_cache_len if fixed else int(input_pos or 0) + T     # key slots attention reads
        if input_pos is not None and not 0 < num_keys <= self.max_cache_len:
            raise ValueError(f"cache slots up to {num_keys} need a KV cache that long: call "
                             f"setup_cache(batch_size, max_len) first")
        if position_ids is None:  # with left padding, count real tokens only (as transformers' generate)
            position_ids = (slots[None].expand(B, T) if attention_mask is None
                            else (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, slots])   # (B, T)
        if attention_mask is not None and not fixed and bool(attention_mask[:, :num_keys].all()):
            attention_mask = None                                                # nothing hidden
        # Plain causal attention needs no mask tensor: SDPA's is_causal covers a prefill from slot 0,
        # and a one-token step sees every slot so far.
        plain = not fixed and attention_mask is None and (T == 1 or num_keys == T)
        masks = {w: None if plain and (w is None or w >= num_keys) else visibility_mask(slots, num_keys, w,
                                                                                       attention_mask)
                 for w in {layer.self_attn.window for layer in self.layers}}            # one per window size
        cos, sin = self.rotary_emb(position_ids, dtype)                          # (B, T, head_dim) each
        return Step(cos, sin, None if input_pos is None else slots, num_keys, masks, attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, input_pos=None, output_router_logits: bool = False):
        """input_ids (B, T) -> (hidden states (B, T, hidden) after the final norm, router logits).

        router logits: with output_router_logits, a tuple of each sparse layer's (B*T, E) router
          logits in layer order (model dtype); else None.

        input_pos: None = no cache. An int = write this chunk's keys/values at cache slots
          [input_pos, input_pos + T) and attend to every slot so far (after `setup_cache`). A (T,)
          tensor of slots = the same, but attention reads the whole cache, masked, so that no shape
          depends on the position (for torch.compile and CUDA graphs).
        attention_mask: (B, slots) 1 for real tokens, 0 for (left) padding, over every slot so far
          (the whole cache for a tensor input_pos); positions then count real tokens only, as
          transformers' generate does. position_ids: (B, T) RoPE positions instead of those.
        """
        x = self.embed_tokens(input_ids)                                         # (B, T, hidden)
        step = self.make_step(input_ids, attention_mask, position_ids, input_pos, x.dtype)
        router_logits = []
        for layer in self.layers:
            x, layer_router_logits = layer(x, step)
            if output_router_logits and layer_router_logits is not None:
                router_logits.append(layer_router_logits)                        # (B*T, E)
        return self.norm(x), (tuple(router_logits) if output_router_logits else None)


class Qwen2MoeForCausalLM(nn.Module):
    """The decoder stack and the language-model head: token ids -> next-token logits."""

    def __init__(self, config: Qwen2MoeConfig):
        super().__init__()
        self.config = config
        self.model = Qwen2MoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.router_logits: tuple[torch.Tensor, ...] | None = None  # set by forward, see there
        self.aux_loss: torch.Tensor | None = None

    def setup_cache(self, batch_size: int, max_len: int, dtype=None, device=None):  # (Qwen2MoeModel's)
        self.model.setup_cache(batch_size, max_len, dtype, device)

    def clear_cache(self):
        self.model.clear_cache()

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                input_pos=None, logits_to_keep: int = 0, output_router_logits: bool | None = None):
        """input_ids (B, T) -> logits (B, T, vocab); with `labels`, (logits, loss).

        attention_mask, position_ids, input_pos: as in Qwen2MoeModel.forward.
        logits_to_keep: if > 0, compute logits for the last that many positions only.
        output_router_logits: None = config.output_router_logits. When on, this forward leaves
          `self.router_logits` (one (B*T, E) tensor per sparse layer, in layer order, model dtype)
          and `self.aux_loss` (the load-balancing loss, padding left out by attention_mask), and the
          loss with labels is cross-entropy + router_aux_loss_coef * aux_loss, as in transformers.
          When off (or without sparse layers), both attributes are None. The return value has the
          same form either way.
        """
        hidden, self.router_logits, self.aux_loss = decoder_outputs(
            self.model, self.config, input_ids, attention_mask, position_ids, output_router_logits, input_pos)
        hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        # On 2-D rows: on CPU, a bf16 linear of a sliced 3-D tensor takes a slow batched path.
        logits = self.lm_head(hidden.reshape(-1, hidden.shape[-1])).view(*hidden.shape[:2], -1)  # (B, T, V)
        return logits if labels is None else (logits, with_aux_loss(causal_lm_loss(logits, labels), self))

    @property
    def device(self):
        return self.model.norm.weight.device

    @property
    def dtype(self):  # (the final norm's: quantize.py may quantize lm_head and the embedding)
        return self.model.norm.weight.dtype


# ----------------------------------------------------------------------------------------------
# Task heads: sequence classification (reward models), token classification, question answering
# ----------------------------------------------------------------------------------------------

class Qwen2MoeForSequenceClassification(nn.Module):
    """The decoder stack and `score`: one vector of num_labels logits per sequence, read at its last
    token that is not padding (reward models: num_labels 1, the reward)."""

    def __init__(self, config: Qwen2MoeConfig):
        super().__init__()
        self.config = config
        self.model = Qwen2MoeModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.router_logits: tuple[torch.Tensor, ...] | None = None  # set by forward, as in the causal LM
        self.aux_loss: torch.Tensor | None = None

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                output_router_logits: bool | None = None):
        """input_ids (B, T) -> logits (B, num_labels); with `labels`, (logits, loss) by the config's
        problem_type (see sequence_classification_loss), plus the router's auxiliary loss when router
        logits are on (output_router_logits as in the causal LM)."""
        hidden, self.router_logits, self.aux_loss = decoder_outputs(
            self.model, self.config, input_ids, attention_mask, position_ids, output_router_logits)
        last = last_token_index(input_ids, self.config.pad_token_id)                # (B,)
        logits = self.score(hidden[torch.arange(len(last), device=last.device), last])  # (B, num_labels)
        if labels is None:
            return logits
        return logits, with_aux_loss(sequence_classification_loss(logits, labels, self.config), self)


class Qwen2MoeForTokenClassification(nn.Module):
    """The decoder stack, dropout and `score` (with bias): num_labels logits for every token."""

    def __init__(self, config: Qwen2MoeConfig):
        super().__init__()
        self.config = config
        self.model = Qwen2MoeModel(config)
        self.dropout = nn.Dropout(0.1 if config.classifier_dropout is None else config.classifier_dropout)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=True)
        self.router_logits: tuple[torch.Tensor, ...] | None = None  # set by forward, as in the causal LM
        self.aux_loss: torch.Tensor | None = None

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                output_router_logits: bool | None = None):
        """input_ids (B, T) -> logits (B, T, num_labels); with `labels` (B, T), (logits, loss), plus the
        router's auxiliary loss when router logits are on."""
        hidden, self.router_logits, self.aux_loss = decoder_outputs(
            self.model, self.config, input_ids, attention_mask, position_ids, output_router_logits)
        logits = self.score(self.dropout(hidden))                                    # (B, T, num_labels)
        if labels is None:
            return logits
        return logits, with_aux_loss(token_classification_loss(logits, labels), self)


class Qwen2MoeForQuestionAnswering(nn.Module):
    """The decoder stack and `qa_outputs`: for every token, the logit that the answer starts there and
    the logit that it ends there. The decoder stack keeps the name `model` here, as in transformers'
    Qwen2MoeForQuestionAnswering (the sibling files' question-answering classes call it `transformer`)."""

    def __init__(self, config: Qwen2MoeConfig):
        super().__init__()
        self.config = config
        self.model = Qwen2MoeModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.router_logits: tuple[torch.Tensor, ...] | None = None  # set by forward, as in the causal LM
        self.aux_loss: torch.Tensor | None = None

    def forward(self, input_ids: torch.Tensor, start_positions: torch.Tensor | None = None,
                end_positions: torch.Tensor | None = None, *, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, output_router_logits: bool | None = None):
        """input_ids (B, T) -> (start_logits, end_logits), (B, T) each; with start_positions and
        end_positions (B,), (start_logits, end_logits, loss), plus the router's auxiliary loss when
        router logits are on."""
        hidden, self.router_logits, self.aux_loss = decoder_outputs(
            self.model, self.config, input_ids, attention_mask, position_ids, output_router_logits)
        start_logits, end_logits = self.qa_outputs(hidden).unbind(-1)               # (B, T) each
        if start_positions is None or end_positions is None:
            return start_logits, end_logits
        loss = question_answering_loss(start_logits, end_logits, start_positions, end_positions)
        return start_logits, end_logits, with_aux_loss(loss, self)


def last_token_index(input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """(B,) the position of each row's last token that is not padding, as transformers' sequence
    classification pools: the rightmost token other than pad_token_id (left or right padding alike;
    0 for a row of padding only). Without a pad token only a batch of one row is allowed."""
    B, T = input_ids.shape
    if pad_token_id is None:
        if B != 1:
            raise ValueError(f"a batch of {B} rows needs config.pad_token_id to find each row's last token; "
                             f"set it (the tokenizer's padding token) or pass one row at a time")
        return torch.full((1,), T - 1, device=input_ids.device)
    positions = torch.arange(T, device=input_ids.device)                     # (T,)
    return (positions * (input_ids != pad_token_id)).argmax(-1)              # (B,)


def embed(model: nn.Module, input_ids: torch.Tensor,
          attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Text embeddings as Qwen3's embedding models compute them: the final hidden state of each row's
    last real token, L2-normalised. (B, T) token ids -> (B, hidden_size). model: the decoder stack or
    any class of this file that holds one; attention_mask (B, T): 1 for real tokens, 0 for padding
    (left or right). Their convention: each text ends with <|endoftext|> (append it yourself with
    this project's Tokenizer), a query reads "Instruct: {task}\\nQuery:{query}", documents as they are.
    """
    decoder = getattr(model, "transformer", getattr(model, "model", model))
    hidden = decoder(input_ids, attention_mask)
    if isinstance(hidden, tuple):  # the MoE files' decoder stack also returns router logits
        hidden = hidden[0]                                                   # (B, T, C)
    last = torch.full((len(input_ids),), input_ids.shape[1] - 1, device=input_ids.device)
    if attention_mask is not None:  # the rightmost real token of each row
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = (positions * attention_mask.to(positions.device)).argmax(-1)   # (B,)
    pooled = hidden[torch.arange(len(last), device=last.device), last]         # (B, C)
    return F.normalize(pooled.float(), dim=-1).to(hidden.dtype)


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------

def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in float32: position t predicts labels[t + 1]; -100 is ignored."""
    shift_labels = F.pad(labels, (0, 1), value=-100)[:, 1:]                   # (B, T)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=-100)


def sequence_classification_loss(logits: torch.Tensor, labels: torch.Tensor, config) -> torch.Tensor:
    """transformers' loss for sequence classification, by config.problem_type: "regression" (mean
    squared error), "single_label_classification" (cross-entropy over num_labels, -100 ignored) or
    "multi_label_classification" (binary cross-entropy with logits per label). When the config
    names none, it is chosen from num_labels and the labels' dtype and written into the config, as
    transformers does, so later calls keep it. logits: (B, num_labels)."""
    B, num_labels = logits.shape
    if config.problem_type is None:
        config.problem_type = ("regression" if num_labels == 1 else "single_label_classification"
                               if labels.dtype in (torch.long, torch.int) else "multi_label_classification")
    wanted = {"regression": [(B,), (B, num_labels)], "single_label_classification": [(B,)],
              "multi_label_classification": [(B, num_labels)]}.get(config.problem_type)
    if wanted is None:
        raise ValueError(f"unknown problem_type {config.problem_type!r} (regression, "
                         f"single_label_classification or multi_label_classification)")
    if tuple(labels.shape) not in wanted:
        raise ValueError(f"labels have shape {tuple(labels.shape)}; {config.problem_type} with {B} rows and "
                         f"{num_labels} labels expects {' or '.join(map(str, wanted))}")
    labels = labels.to(logits.device)
    if config.problem_type == "regression":
        squeeze = num_labels == 1  # (B, 1) logits against (B,) or (B, 1) labels
        return F.mse_loss(logits.squeeze(), labels.squeeze()) if squeeze else F.mse_loss(logits, labels)
    if config.problem_type == "single_label_classification":
        return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1), ignore_index=-100)
    return F.binary_cross_entropy_with_logits(logits, labels)


def token_classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every token in float32, labels of -100 ignored. logits (B, T, num_labels),
    labels (B, T)."""
    if tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"labels have shape {tuple(labels.shape)}; token classification expects one label "
                         f"per token, {tuple(logits.shape[:2])}")
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device),
                           ignore_index=-100)


def question_answering_loss(start_logits: torch.Tensor, end_logits: torch.Tensor,
                            start_positions: torch.Tensor, end_positions: torch.Tensor) -> torch.Tensor:
    """The mean of the start and the end cross-entropies, as transformers computes it: positions (B,)
    (or (B, 1)) are clamped to [0, T], and T (an answer outside the text) is ignored."""
    B, T = start_logits.shape
    positions = []
    for name, p in (("start_positions", start_positions), ("end_positions", end_positions)):
        p = p.squeeze(-1) if p.dim() > 1 else p
        if tuple(p.shape) != (B,):
            raise ValueError(f"{name} have shape {tuple(p.shape)}; question answering expects one position "
                             f"per row, ({B},)")
        positions.append(p.to(start_logits.device).clamp(0, T))
    start_loss = F.cross_entropy(start_logits, positions[0], ignore_index=T)
    end_loss = F.cross_entropy(end_logits, positions[1], ignore_index=T)
    return (start_loss + end_loss) / 2


def load_balancing_loss(router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int,
                        token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch Transformer's auxiliary loss, as transformers' `load_balancing_loss_func` computes it.

    router_logits: one (N, E) tensor per sparse layer, N = B*T tokens; token_mask: (B, T), 0 for
    padding (those rows are left out). Over all rows of all layers: f_e = share of the top-k picks
    that went to expert e (K picks per row), P_e = mean router probability of e;
    aux = E * sum_e f_e * P_e, which is K when routing is uniform.
    """
    logits = torch.cat(router_logits)                                     # (L*N, E)
    probs = torch.softmax(logits, dim=-1)                                 # (L*N, E) in the logits' dtype
    picks = torch.topk(probs, top_k, dim=-1).indices                      # (L*N, K)
    chosen = F.one_hot(picks, num_experts).sum(dim=1).float()             # (L*N, E): K ones per row
    if token_mask is None:
        keep = torch.ones(logits.shape[0], device=logits.device)          # (L*N,)
    else:
        keep = token_mask.reshape(-1).float().repeat(len(router_logits))  # (L*N,) the same mask each layer
    rows = keep.sum()
    f = (chosen * keep[:, None]).sum(dim=0) / rows                        # (E,)
    p = (probs.float() * keep[:, None]).sum(dim=0) / rows                 # (E,)
    return num_experts * (f * p).sum()


def decoder_outputs(decoder, config, input_ids, attention_mask=None, position_ids=None,
                    output_router_logits=None, input_pos=None):
    """Run the decoder stack for any class of this file: (hidden states (B, T, C), router logits,
    load-balancing loss). The last two are None unless router logits are asked for (None:
    config.output_router_logits) and some layer is sparse; the loss leaves padding out by
    attention_mask."""
    if output_router_logits is None:
        output_router_logits = config.output_router_logits
    hidden, router_logits = decoder(input_ids, attention_mask, position_ids, input_pos, output_router_logits)
    if not router_logits:
        return hidden, None, None
    token_mask = None                                                            # (B, T) of this forward
    if attention_mask is not None:
        token_mask = attention_mask[:, cache_slots(input_pos, input_ids.shape[1], input_ids.device)]
    aux_loss = load_balancing_loss(router_logits, config.num_experts, config.num_experts_per_tok, token_mask)
    return hidden, router_logits, aux_loss


def with_aux_loss(loss: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """loss + router_aux_loss_coef * the model's load-balancing loss of its last forward, if it has one."""
    if model.aux_loss is None:
        return loss
    return loss + model.config.router_aux_loss_coef * model.aux_loss.to(loss.device)


# ----------------------------------------------------------------------------------------------
# Loading a checkpoint
# ----------------------------------------------------------------------------------------------

MODEL_TYPES = ("qwen2_moe",)  # the config.json model_type values this file loads


ARCHITECTURES = {  # config.json's `architectures` -> the class this file builds for it (the first: default)
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen2MoeForSequenceClassification": Qwen2MoeForSequenceClassification,
    "Qwen2MoeForTokenClassification": Qwen2MoeForTokenClassification,
    "Qwen2MoeForQuestionAnswering": Qwen2MoeForQuestionAnswering,
    "Qwen2MoeModel": Qwen2MoeModel,
}


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

HEADS = ("lm_head", "score", "qa_outputs")  # the modules of the task heads, beside the decoder stack


def parameter_for(name: str, backbone: str) -> str:
    """The model's name for a checkpoint tensor. The decoder stack's tensors go under the model's own
    prefix `backbone`: "model." (the causal LM and most heads), "transformer." (question answering),
    or none (the bare decoder stack, as embedding models are saved); the heads' tensors (lm_head,
    score, qa_outputs) keep their names."""
    first, _, rest = name.partition(".")
    if first in ("model", "transformer"):
        name, first = rest, rest.partition(".")[0]
    return name if first in HEADS else backbone + name


# One expert's projection as hub checkpoints (and transformers 5's save_pretrained) store it; the
# loader stacks these into mlp.experts.gate_up_proj (E, 2I, C) and mlp.experts.down_proj (E, C, I).
EXPERT_KEY = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")


def set_parameter(model: nn.Module, name: str, tensor: torch.Tensor):
    module_name, _, attr = name.rpartition(".")
    model.get_submodule(module_name)._parameters[attr] = nn.Parameter(tensor, requires_grad=False)


def load_weights(model: nn.Module, folder: str, device, dtype, hint: str = ""):
    """Stream every tensor of the folder's safetensors files into `model` (built on the meta device),
    each straight to `device` and `dtype`, so no second copy of the model exists. A head the model
    does not have (lm_head when it is tied or when loading a classifier, ...) is skipped; `hint` ends
    the message when a tensor is missing. Per-expert tensors (the hub's layout) are copied into their
    slice of the stacked parameter; files that already hold the stacks load them as they are."""
    from safetensors import safe_open
    expected = dict(model.named_parameters())
    backbone = next(p for p in ("model.", "transformer.", "") if p + "embed_tokens.weight" in expected)
    seen, built = set(), set()  # the tensors read; the stacks built from per-expert pieces
    index = os.path.join(folder, "model.safetensors.index.json")  # sharded: the files its weight_map names
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted({os.path.join(folder, n) for n in json.load(f)["weight_map"].values()})
    else:
        files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                target = parameter_for(name, backbone)
                expert = EXPERT_KEY.match(target)
                stack = expert and expert[1] + (".down_proj" if expert[3] == "down" else ".gate_up_proj")
                if expert and stack in expected and int(expert[2]) < expected[stack].shape[0]:
                    if stack not in built:  # its first piece: the whole stack, on the device
                        whole = torch.empty(expected[stack].shape, device=device, dtype=dtype)
                        set_parameter(model, stack, whole)
                        built.add(stack)
                    I = expected[expert[1] + ".down_proj"].shape[2]
                    rows = {"gate": slice(0, I), "up": slice(I, 2 * I), "down": slice(None)}[expert[3]]
                    place = model.get_parameter(stack)[int(expert[2]), rows]    # this expert's rows
                elif target in expected and not expert:
                    place = expected[target]
                elif target.partition(".")[0] in HEADS or name.endswith("rotary_emb.inv_freq"):
                    continue
                else:
                    raise ValueError(f"unexpected tensor {name} in {os.path.basename(file)}: the checkpoint "
                                     f"does not match its config.json")
                tensor = f.get_tensor(name)
                if tuple(tensor.shape) != tuple(place.shape):
                    raise ValueError(f"tensor {name} has shape {tuple(tensor.shape)}, the config expects "
                                     f"{tuple(place.shape)}")
                if expert:
                    place.copy_(tensor)
                else:
                    set_parameter(model, target, tensor.to(device=device, dtype=dtype))
                seen.add(target)
    missing = [n for n in expected if n not in seen and n not in built]
    for stack in sorted(built):  # a stack built from pieces needs every expert's
        prefix, parts = stack.rpartition(".")[0], ("down",) if stack.endswith("down_proj") else ("gate", "up")
        missing += [piece for e in range(expected[stack].shape[0]) for part in parts
                    if (piece := f"{prefix}.{e}.{part}_proj.weight") not in seen]
    if missing:
        raise ValueError(f"tensor {missing[0]} is missing from the checkpoint" +
                         (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "") + hint)


def from_pretrained(name_or_path: str, device=None, dtype=None, architecture: str | None = None) -> nn.Module:
    """Load a Qwen1.5-MoE / Qwen2-MoE checkpoint: a local folder or a hub id such as
    "Qwen/Qwen1.5-MoE-A2.7B-Chat".

    architecture: the class to build, by its transformers name (a key of ARCHITECTURES); default the
    one config.json's `architectures` names (the causal LM when it names none). The decoder stack
    alone ("Qwen2MoeModel") loads from a checkpoint of any of them, for embeddings.
    dtype: a torch dtype or its name; default the checkpoint's own dtype (config.json's torch_dtype).
    device: default "cpu". Parameters load with requires_grad=False; call `model.requires_grad_(True)`
    to train.
    """
    folder = os.path.expanduser(name_or_path)
    if not os.path.isdir(folder):  # a hub id: download its json and safetensors files into the hub cache
        if folder.startswith((".", "/", "~")) or folder.count("/") != 1:
            raise FileNotFoundError(f"checkpoint folder {name_or_path} does not exist")
        from huggingface_hub import snapshot_download
        folder = snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.jinja"])
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"no config.json in {folder}: not a Hugging Face checkpoint folder")
    with open(os.path.join(folder, "config.json")) as f:
        raw = json.load(f)
    if raw.get("model_type") not in MODEL_TYPES:
        raise ValueError(f"{name_or_path} has model_type {raw.get('model_type')!r}; "
                         f"{os.path.basename(__file__)} loads {' and '.join(map(repr, MODEL_TYPES))}")
    saved = (raw.get("architectures") or [None])[0]
    architecture = architecture or saved or next(iter(ARCHITECTURES))
    if architecture not in ARCHITECTURES:
        raise ValueError(f"{name_or_path} is a {architecture}, which {os.path.basename(__file__)} does not "
                         f"build (it builds {', '.join(ARCHITECTURES)}; choose one with architecture=)")
    config = Qwen2MoeConfig.from_dict(raw)
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (use float32, bfloat16 or float16)")
    dtype = DTYPES.get(dtype, dtype) or DTYPES.get(config.torch_dtype or "", torch.float32)
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = ARCHITECTURES[architecture](config)
    hint = "" if saved in (None, architecture) else f"; {name_or_path} holds a {saved}, not a {architecture}"
    load_weights(model, folder, device, dtype, hint)
    if config.tie_word_embeddings and hasattr(model, "lm_head"):  # the checkpoint has no lm_head.weight
        model.lm_head.weight = model.model.embed_tokens.weight
    decoder = getattr(model, "transformer", getattr(model, "model", model))
    decoder.rotary_emb.inv_freq = rope_frequencies(config)[0].to(device)  # a buffer, not a weight
    return model.eval()

