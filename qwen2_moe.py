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

What differs from Qwen2 (qwen2.py):
* The MLP of the sparse layers (layer i is sparse iff i is not in `mlp_only_layers`,
  `num_experts > 0` and `(i + 1) % decoder_sparse_step == 0`) is the mixture of experts above,
  with a shared expert gated by a sigmoid; the other layers keep a dense MLP.
* q/k/v bias follows `qkv_bias` (default true); Qwen2 always has it.
* Sliding-window layers (without `layer_types`): layer i slides iff `use_sliding_window`, i is
  even and `i < max_window_layers` (Qwen2: iff `i >= max_window_layers`).
* With `output_router_logits`, the loss adds `router_aux_loss_coef` times a load-balancing loss.
* Expert weights live stacked per layer, as transformers 5 keeps them in memory:
  `mlp.experts.gate_up_proj` (E, 2I, H) and `mlp.experts.down_proj` (E, H, I); the loader stacks
  the per-expert tensors of the hub files into them.
What differs from Qwen3-MoE (qwen3_moe.py): Qwen3-MoE has no shared expert, has per-head RMSNorm
on queries and keys, an explicit head_dim, no q/k/v bias by default, slides on every layer when
`use_sliding_window`, and renormalises the top-k weights (norm_topk_prob true in its checkpoints;
false in Qwen1.5-MoE and Qwen2-MoE).

The expert computation has two torch paths that give the same result: `experts_reference` (a
loop over the experts that received tokens, the easiest to follow) and `experts_grouped` (tokens
sorted by expert, one matmul per active expert; the default). On CUDA, the fused Triton kernel
of kernels/moe.py replaces them when the `kernels` package sits next to this file.

Parameter names are Hugging Face's (`model.layers.0.mlp.experts.gate_up_proj`, ...).
transformers' `modeling_qwen2_moe.py` is the semantics we match.

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

import importlib
import json
import math
import os
import re
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # optional Triton kernels, used on CUDA when the `kernels` package sits next to this file
    triton_attention = importlib.import_module("kernels.attention")
except Exception:  # a copy of this file alone, no triton, no GPU: the torch path serves
    triton_attention = None
try:
    triton_moe = importlib.import_module("kernels.moe")
except Exception:
    triton_moe = None


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
    rope_scaling: dict | None = None    # the scaling parameters (factor, original_max_position_embeddings, ...)
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
    model_type: str = "qwen2_moe"

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.rope_type not in ("default", "linear", "dynamic", "yarn"):
            raise ValueError(f"unsupported RoPE type {self.rope_type!r} (supported: default, linear, dynamic, yarn)")
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
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")

    def window(self, layer: int) -> int | None:
        """The sliding window of `layer` in keys, or None for full causal attention."""
        if self.layer_types[layer] != "sliding_attention":
            return None
        if not self.use_sliding_window or not self.sliding_window:
            raise ValueError(f"layer {layer} is a sliding_attention layer but the config sets no sliding window")
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
        rope = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})  # transformers: rope_scaling wins
        kwargs["rope_theta"] = float(rope.pop("rope_theta", d.get("rope_theta", cls.rope_theta)))
        kwargs["rope_type"] = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
        rope.pop("type", None)
        kwargs["rope_scaling"] = rope or None
        return cls(**kwargs)


# ----------------------------------------------------------------------------------------------
# Building blocks
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
    if config.rope_type == "default":
        return 1.0 / base ** exponents, 1.0
    if config.rope_type == "linear":  # positions divided by factor == frequencies divided by factor
        return 1.0 / base ** exponents / p["factor"], 1.0
    if config.rope_type == "dynamic":
        max_pos = config.max_position_embeddings
        seq_len = max(seq_len or max_pos, max_pos)
        base = base * ((p["factor"] * seq_len / max_pos) - (p["factor"] - 1)) ** (dim / (dim - 2))
        return 1.0 / base ** exponents, 1.0
    # YaRN: interpolate the low frequencies, keep (extrapolate) the high ones, ramp in between.
    original = p.get("original_max_position_embeddings") or config.max_position_embeddings
    factor = p.get("factor") or config.max_position_embeddings / original

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention_factor = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations):  # the dimension whose wavelength turns `rotations` times
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the original frequency), 0: interpolate
    pos_freqs = base ** exponents
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    return inv_freq, float(attention_factor)


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


def visibility_mask(q_slots: torch.Tensor, S: int, window: int | None, key_mask: torch.Tensor | None) -> torch.Tensor:
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
        # A padding query sees no key; let it see itself so its softmax stays finite (output unused).
        visible = visible | (k == q)
    return visible


def reference_attention(q, k, v, mask, scale):
    """Attention spelled out, exactly as transformers' eager path computes it.

    q: (B, H, T, D); k, v: (B, KVH, S, D); mask: (B|1, 1, T, S) bool or None (= all visible).
    The H query heads are grouped G = H // KVH at a time onto their key/value head by a reshape,
    so the repeated K/V never exists in memory.
    """
    B, H, T, D = q.shape
    KVH = k.shape[1]
    qg = q.view(B, KVH, H // KVH, T, D)                                 # (B, KVH, G, T, D)
    scores = qg @ k[:, :, None].transpose(-1, -2) * scale               # (B, KVH, G, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, :, None], torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return (probs @ v[:, :, None]).view(B, H, T, D)                     # (B, H, T, D)


# ----------------------------------------------------------------------------------------------
# Mixture of experts
# ----------------------------------------------------------------------------------------------

def route(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick each token's experts. router_logits (N, E) in the model dtype -> (weights, ids), each (N, K).

    Softmax over all E experts in float32, keep the K largest; rescale them to sum to 1 only when
    norm_topk_prob (Qwen1.5-MoE and Qwen2-MoE checkpoints: off); weights in the model dtype.
    """
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)     # (N, E)
    weights, ids = torch.topk(probs, top_k, dim=-1)                       # (N, K) each
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), ids


def experts_reference(x, w_gate_up, w_down, ids, weights):
    """The routed experts, spelled out: a loop over the experts that received tokens.

    x: (N, H) tokens; w_gate_up: (E, 2I, H), rows [0, I) the gate projection, [I, 2I) the up
    projection; w_down: (E, H, I); ids, weights: (N, K) each token's experts and routing weights.
    Returns (N, H): out[n] = sum_k weights[n, k] * down_e(silu(gate_e(x[n])) * up_e(x[n])), e = ids[n, k].
    Same arithmetic and order as transformers' eager experts (index_add_ expert by expert).
    """
    out = torch.zeros_like(x)                                             # (N, H)
    for e in ids.unique().tolist():                                       # experts with tokens, ascending
        token, slot = torch.where(ids == e)                               # its tokens, and which of their K picks
        gate, up = F.linear(x[token], w_gate_up[e]).chunk(2, dim=-1)      # (n_e, I) each
        y = F.linear(F.silu(gate) * up, w_down[e])                        # (n_e, H)
        out.index_add_(0, token, y * weights[token, slot, None])          # weighted, into each token's row
    return out


def experts_grouped(x, w_gate_up, w_down, ids, weights):
    """The routed experts, batched: the same result as experts_reference, faster.

    The N*K (token, expert) pairs are sorted by expert, so each expert's tokens form one contiguous
    block of rows: one matmul per active expert and projection, written into a shared buffer, and
    everything else (SiLU, routing weights, the sum over K) done once for all rows. Experts that got
    no token are skipped, so a one-token decode step reads only its K experts' weights. (The sum
    over each token's K rows is transformers' grouped_mm order too.)
    """
    N, K = ids.shape
    P, H, I = N * K, x.shape[1], w_down.shape[2]
    flat = ids.reshape(-1)                                                # (P,) expert of pair p = n*K + k
    order = flat.argsort(stable=True)                                     # (P,) pairs grouped by expert
    counts = torch.bincount(flat, minlength=w_down.shape[0]).tolist()     # (E,) pairs per expert (host sync)
    groups, start = [], 0                                                 # (expert, its rows), active only
    for e, n in enumerate(counts):
        if n:
            groups.append((e, slice(start, start + n)))
            start += n
    xs = x.index_select(0, order // K)                                    # (P, H) each pair's token, grouped
    gate_up = x.new_empty(P, 2 * I)                                       # (P, 2I)
    for e, rows in groups:
        torch.mm(xs[rows], w_gate_up[e].t(), out=gate_up[rows])
    gate, up = gate_up.chunk(2, dim=-1)                                   # (P, I) each
    h = F.silu(gate) * up                                                 # (P, I)
    ys = x.new_empty(P, H)                                                # (P, H)
    for e, rows in groups:
        torch.mm(h[rows], w_down[e].t(), out=ys[rows])
    ys *= weights.reshape(-1, 1).index_select(0, order)                   # times each pair's routing weight
    out = ys.index_select(0, order.argsort())                             # (P, H) back in pair order n*K + k
    return out.view(N, K, H).sum(dim=1)                                   # (N, H) each token's K rows summed


def experts_gathered(x, w_gate_up, w_down, ids, weights):
    """The routed experts with static shapes (for torch.compile / CUDA graphs, which cannot take
    experts_grouped's data-dependent loop): gather each pair's expert weights, (N, K, 2I, H).
    Reads only the chosen experts but copies them, so it suits decode steps (N small) only."""
    gate_up = torch.einsum("nh,nkoh->nko", x, w_gate_up[ids])             # (N, K, 2I)
    gate, up = gate_up.chunk(2, dim=-1)                                   # (N, K, I) each
    y = torch.einsum("nki,nkhi->nkh", F.silu(gate) * up, w_down[ids])     # (N, K, H)
    return (y * weights[..., None]).sum(dim=1)                            # (N, H)


class Experts(nn.Module):
    """The E routed experts of one layer, stacked (as transformers 5 keeps them in memory)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        E, H, I = num_experts, hidden_size, intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H).normal_(std=0.02))  # [gate; up] rows
        self.down_proj = nn.Parameter(torch.empty(E, H, I).normal_(std=0.02))
        self.kernels = "auto"  # "auto" | "triton" | "torch" | "reference", set by set_kernels

    def forward(self, x, ids, weights):
        # x: (N, H); ids, weights: (N, K) -> (N, H)
        w_gate_up, w_down = self.gate_up_proj, self.down_proj
        if self.kernels == "reference":
            return experts_reference(x, w_gate_up, w_down, ids, weights)
        # The fused Triton kernel: "auto" on CUDA, "triton" wherever it runs (also Triton's CPU
        # interpreter), inside torch.compile too. Without it, torch.compile takes the static-shape
        # experts_gathered.
        wanted = self.kernels == "triton" or (self.kernels == "auto" and x.is_cuda)
        if wanted and triton_moe is not None and triton_moe.supports(x, w_gate_up):
            return triton_moe.fused_moe(x, w_gate_up, w_down, ids, weights)
        if torch.compiler.is_compiling():
            return experts_gathered(x, w_gate_up, w_down, ids, weights)
        return experts_grouped(x, w_gate_up, w_down, ids, weights)


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoeBlock(nn.Module):
    """Router + routed experts + sigmoid-gated shared expert. Returns (output, router logits)."""

    def __init__(self, config: Qwen2MoeConfig):
        super().__init__()
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)  # the router
        self.experts = Experts(config.num_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_expert = MLP(config.hidden_size, config.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, x):
        B, T, H = x.shape
        x = x.reshape(B * T, H)                                              # (N, H), N = B*T tokens
        router_logits = self.gate(x)                                         # (N, E) in the model dtype
        weights, ids = route(router_logits, self.top_k, self.norm_topk_prob)  # (N, K) each
        routed = self.experts(x, ids, weights)                               # (N, H)
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)  # (N, 1) * (N, H)
        return (routed + shared).view(B, T, H), router_logits


def load_balancing_loss(router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int,
                        token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch Transformer's auxiliary loss, as transformers' `load_balancing_loss_func` computes it.

    router_logits: one (N, E) tensor per sparse layer, N = B*T tokens; token_mask: (B, T), 0 for
    padding (those rows are left out). Over all rows of all layers: f_e = share of the top-k picks
    that went to expert e (K picks per row), P_e = mean router probability of e;
    aux = E * sum_e f_e * P_e, which is K when routing is uniform.
    """
    if not router_logits:
        return torch.zeros(())
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


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------

class KVCache(nn.Module):
    """Preallocated keys and values of one layer: (batch, kv_heads, max_len, head_dim)."""

    def __init__(self, batch_size, n_kv_heads, max_len, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, KVH, T, D) at cache slots input_pos .. input_pos + T - 1.

        input_pos an int: return the slots written so far, (B, KVH, input_pos + T, D).
        input_pos a (T,) tensor of slots (static shapes for torch.compile / CUDA graphs): return
        the whole cache, (B, KVH, max_len, D); the attention mask hides the unwritten slots.
        """
        if torch.is_tensor(input_pos):
            self.k.index_copy_(2, input_pos, k)
            self.v.index_copy_(2, input_pos, v)
            return self.k, self.v
        end = input_pos + k.shape[2]
        self.k[:, :, input_pos:end] = k
        self.v[:, :, input_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, config: Qwen2MoeConfig, layer: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                        config.head_dim)
        self.window = config.window(layer)
        bias = config.qkv_bias
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)
        self.cache: KVCache | None = None
        self.kernels = "auto"  # "auto" | "triton" | "torch" | "reference", set by set_kernels

    def forward(self, x, cos, sin, input_pos, key_mask, masks):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KVH, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KVH, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if input_pos is not None:                                    # a cached forward: write, then read the cache
            k, v = self.cache.update(input_pos, k, v)                                   # (B, KVH, S, D)
        out = self.attend(q, k, v, input_pos, key_mask, masks)                            # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def attend(self, q, k, v, input_pos, key_mask, masks):
        scale = self.head_dim ** -0.5
        start = 0 if input_pos is None else input_pos
        # The Triton kernels: "auto" on CUDA, "triton" wherever they run (also Triton's CPU interpreter).
        # On the static path (tensor input_pos) only one-token decode: that kernel reads the slot
        # from the tensor and skips the cache slots past it.
        wanted = self.kernels == "triton" or (self.kernels == "auto" and q.is_cuda)
        static_prefill = torch.is_tensor(start) and q.shape[2] > 1
        if wanted and triton_attention is not None and not static_prefill and triton_attention.supports(q, k):
            pad = None if key_mask is None else (key_mask[:, :k.shape[2]] == 0).sum(-1)  # left padding per row
            return triton_attention.attention(q, k, v, start, pad=pad, window=self.window, scale=scale)
        mask = masks(self.window)  # (B|1, 1, T, S) bool, or None when plain causal / nothing hidden
        if self.kernels == "reference":
            if mask is None:  # spell out the causal mask for the reference path
                slots = torch.arange(start, start + q.shape[2], device=q.device)
                mask = visibility_mask(slots, k.shape[2], None, None)
            return reference_attention(q, k, v, mask, scale)
        if mask is None and q.shape[2] > 1:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


class DecoderLayer(nn.Module):
    def __init__(self, config: Qwen2MoeConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.sparse = config.is_sparse(layer)
        self.mlp = SparseMoeBlock(config) if self.sparse else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, cos, sin, input_pos, key_mask, masks):
        """Returns (x, router logits (B*T, E)); the router logits are None on a dense layer."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, input_pos, key_mask, masks)
        h = self.post_attention_layernorm(x)
        if self.sparse:
            h, router_logits = self.mlp(h)
            return x + h, router_logits
        return x + self.mlp(h), None


class Qwen2MoeModel(nn.Module):
    def __init__(self, config: Qwen2MoeConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class Qwen2MoeForCausalLM(nn.Module):
    def __init__(self, config: Qwen2MoeConfig):
        super().__init__()
        self.config = config
        self.model = Qwen2MoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.max_cache_len = 0
        self.router_logits: tuple[torch.Tensor, ...] | None = None  # set by forward, see there
        self.aux_loss: torch.Tensor | None = None

    # -- KV cache ------------------------------------------------------------------------------
    def setup_cache(self, batch_size: int, max_len: int, dtype=None, device=None):
        """Allocate every layer's KV cache for `batch_size` rows of up to `max_len` tokens.

        A cache of that shape that is already set up is kept, not cleared (a step never sees the
        slots past its own, so old values are harmless): its memory stays where a captured CUDA
        graph expects it."""
        ref = self.lm_head.weight
        dtype, device = dtype or ref.dtype, torch.device(device or ref.device)
        shape = (batch_size, self.config.num_key_value_heads, max_len, self.config.head_dim)
        for layer in self.model.layers:
            cache = layer.self_attn.cache
            if cache is None or (cache.k.shape, cache.k.dtype, cache.k.device) != (shape, dtype, device):
                layer.self_attn.cache = KVCache(*shape, dtype, device)
        self.max_cache_len = max_len

    def clear_cache(self):
        for layer in self.model.layers:
            layer.self_attn.cache = None
        self.max_cache_len = 0

    def set_kernels(self, kernels: str = "auto"):
        """"auto": Triton kernels (attention, fused MoE) on CUDA when available; "triton": insist;
        "torch": SDPA and experts_grouped; "reference": the spelled-out `reference_attention` and
        `experts_reference`."""
        if kernels not in ("auto", "triton", "torch", "reference"):
            raise ValueError(f"kernels must be auto, triton, torch or reference, not {kernels!r}")
        if kernels == "triton" and (triton_attention is None or triton_moe is None):
            raise ValueError("kernels='triton' needs triton and the kernels/ package next to this file")
        for layer in self.model.layers:
            layer.self_attn.kernels = kernels
            if layer.sparse:
                layer.mlp.experts.kernels = kernels

    # -- forward -------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                input_pos=None, logits_to_keep: int = 0, output_router_logits: bool | None = None):
        """input_ids (B, T) -> logits (B, T, vocab); with `labels`, (logits, loss).

        input_pos: None = no cache (the whole sequence is in input_ids; a cache set up stays
          untouched). An int = write this chunk's keys/values at cache slots [input_pos, input_pos + T)
          and attend to every slot so far (needs `setup_cache`). A (T,) tensor of slots = the same
          with static shapes: attention runs over the whole cache, masked (for torch.compile and
          CUDA graphs).
        attention_mask: (B, slots) with 1 for real tokens and 0 for (left) padding, covering every
          slot so far (the whole cache when input_pos is a tensor). Positions then count real
          tokens only, as transformers' generate does.
        logits_to_keep: if > 0, compute logits for the last that many positions only.
        output_router_logits: None = config.output_router_logits. When on, this forward leaves
          `self.router_logits` (one (B*T, E) tensor per sparse layer, in layer order, model dtype)
          and `self.aux_loss` (the load-balancing loss, padding left out by attention_mask), and the
          loss with labels is cross-entropy + router_aux_loss_coef * aux_loss, as in transformers.
          When off, both attributes are None. The return value has the same form either way.
        """
        B, T = input_ids.shape
        static = torch.is_tensor(input_pos)
        if input_pos is not None and not self.max_cache_len:
            raise ValueError("input_pos needs a KV cache: call setup_cache(batch_size, max_len) first")
        if static:
            q_slots, S = input_pos, self.max_cache_len                           # slots (T,), keys seen
        else:
            start = 0 if input_pos is None else int(input_pos)
            q_slots, S = torch.arange(start, start + T, device=input_ids.device), start + T
            if input_pos is not None and S > self.max_cache_len:
                raise ValueError(f"positions {start}..{S} do not fit the KV cache of {self.max_cache_len} "
                                 f"(call setup_cache with a larger max_len)")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, q_slots]
            else:
                position_ids = q_slots[None].expand(B, T)                        # (B, T)
        key_mask = attention_mask
        if key_mask is not None and not static and bool(key_mask[:, :S].all()):
            key_mask = None                                                      # nothing hidden
        keep_router = self.config.output_router_logits if output_router_logits is None else output_router_logits

        x = self.model.embed_tokens(input_ids)                                   # (B, T, hidden)
        cos, sin = self.model.rotary_emb(position_ids, x.dtype)                  # (B, T, head_dim) each
        built = {}

        def masks(window):  # one mask per window size, built on first use and shared by the layers
            if window not in built:
                # Plain causal attention needs no mask: SDPA's is_causal covers a prefill from slot 0,
                # and a one-token decode sees every slot anyway.
                plain = (not static and key_mask is None and (window is None or window >= S)
                         and (T == 1 or S == T))
                built[window] = None if plain else visibility_mask(q_slots, S, window, key_mask)
            return built[window]

        router_logits = []
        for layer in self.model.layers:
            x, layer_router_logits = layer(x, cos, sin, input_pos, key_mask, masks)
            if keep_router and layer_router_logits is not None:
                router_logits.append(layer_router_logits)                        # (B*T, E)
        x = self.model.norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        # lm_head on 2-D rows: on CPU, a bf16 linear of a sliced 3-D tensor takes a slow batched path.
        logits = self.lm_head(x.reshape(-1, x.shape[-1])).view(*x.shape[:2], -1)  # (B, T, vocab)

        self.router_logits = self.aux_loss = None
        if keep_router:
            token_mask = None if attention_mask is None else attention_mask[:, q_slots]  # (B, T)
            self.router_logits = tuple(router_logits)
            self.aux_loss = load_balancing_loss(self.router_logits, self.config.num_experts,
                                                self.config.num_experts_per_tok, token_mask)
        if labels is None:
            return logits
        loss = causal_lm_loss(logits, labels)
        if keep_router:
            loss = loss + self.config.router_aux_loss_coef * self.aux_loss.to(loss.device)
        return logits, loss

    @property
    def device(self):
        return self.lm_head.weight.device

    @property
    def dtype(self):
        return self.lm_head.weight.dtype


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in float32: position t predicts labels[t + 1]; -100 is ignored."""
    shift_labels = F.pad(labels, (0, 1), value=-100)[:, 1:]                   # (B, T)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=-100)


# ----------------------------------------------------------------------------------------------
# Loading a checkpoint
# ----------------------------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# The hub's per-expert tensors, stacked on load into mlp.experts.gate_up_proj / down_proj.
EXPERT_TENSOR = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def resolve_checkpoint(name_or_path: str) -> str:
    """A local folder, or a hub id downloaded (json and safetensors only) into the hub cache."""
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ValueError(f"{name_or_path} is a file; pass the checkpoint folder that holds config.json")
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise FileNotFoundError(f"checkpoint folder {name_or_path} does not exist (nor is it a hub id like "
                                f"Qwen/Qwen1.5-MoE-A2.7B-Chat)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)
    try:
        return snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.jinja"])
    except GatedRepoError:
        raise ValueError(f"{name_or_path} is gated on the hub: accept its license and log in "
                         f"(huggingface-cli login)") from None
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise FileNotFoundError(f"{name_or_path} is neither a local folder nor a model on the Hugging Face "
                                f"hub") from None
    except LocalEntryNotFoundError:
        raise FileNotFoundError(f"cannot reach the Hugging Face hub and {name_or_path} is not in the local "
                                f"cache; connect once or pass a local folder") from None
    except OSError as e:  # network errors surface as OSError subclasses
        raise FileNotFoundError(f"could not download {name_or_path}: {e}") from None


def load_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {folder}: not a Hugging Face checkpoint folder")
    with open(path) as f:
        return json.load(f)


def safetensors_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
    else:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    if not names:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise FileNotFoundError(f"{folder} lacks the weight file {missing[0]} named in its index")
    return [os.path.join(folder, n) for n in names]


def check_expert_counts(expected: dict, files: list[str]):
    """Before reading any tensor: each layer's per-expert tensors must number config.num_experts."""
    from safetensors import safe_open
    last = {}  # "model.layers.L.mlp.experts" -> (highest expert index, its tensor name)
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                m = EXPERT_TENSOR.match(name)
                if m:
                    prefix, e = m.group(1), int(m.group(2))
                    if prefix + ".gate_up_proj" not in expected:
                        raise ValueError(f"unexpected tensor {name} in {os.path.basename(file)}: config.json makes "
                                         f"this layer a dense MLP")
                    if e >= last.get(prefix, (-1, ""))[0]:
                        last[prefix] = (e, name)
    for prefix, (e, name) in last.items():
        want = tuple(expected[prefix + ".gate_up_proj"].shape)
        if e + 1 != want[0]:
            raise ValueError(f"tensor {name} makes {e + 1} experts: {prefix}.gate_up_proj would have shape "
                             f"{(e + 1, *want[1:])}, the config expects {want} (num_experts={want[0]})")


def load_weights(model: nn.Module, folder: str, device, dtype, skip=lambda name: False):
    """Stream every tensor from the safetensors files into `model` (built on the meta device):
    one tensor at a time, straight to `device` and `dtype`, so no second full copy exists.

    Per-expert tensors `...mlp.experts.E.{gate,up,down}_proj.weight` (the hub layout) are copied
    into their slot of the stacked parameter, allocated once on `device`; fused files that
    already hold `...mlp.experts.gate_up_proj` / `down_proj` load as they are.
    """
    from safetensors import safe_open
    expected = dict(model.named_parameters())
    files = safetensors_files(folder)
    check_expert_counts(expected, files)
    seen, stacked = set(), {}
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                m = EXPERT_TENSOR.match(name)
                if m:  # one expert's projection: copy it into its slot of the stacked parameter
                    prefix, e, proj = m.group(1), int(m.group(2)), m.group(3)
                    target = f"{prefix}.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}"
                    shape = expected[target].shape                    # (E, 2I, H) or (E, H, I)
                    want = (shape[1] // 2, shape[2]) if proj != "down_proj" else tuple(shape[1:])
                    tensor = f.get_tensor(name)
                    if tuple(tensor.shape) != want:
                        raise ValueError(f"tensor {name} has shape {tuple(tensor.shape)}, the config expects {want}")
                    if target not in stacked:
                        stacked[target] = torch.empty(tuple(shape), device=device, dtype=dtype)
                        set_parameter(model, target, stacked[target])
                    rows = {"gate_proj": slice(0, want[0]), "up_proj": slice(want[0], 2 * want[0]),
                            "down_proj": slice(None)}[proj]
                    stacked[target][e, rows].copy_(tensor)
                    seen.add(name)
                    continue
                if name not in expected:
                    if skip(name) or name.endswith("rotary_emb.inv_freq"):
                        continue
                    raise ValueError(f"unexpected tensor {name} in {os.path.basename(file)}: the checkpoint does "
                                     f"not match its config.json")
                tensor = f.get_tensor(name)
                if tuple(tensor.shape) != tuple(expected[name].shape):
                    raise ValueError(f"tensor {name} has shape {tuple(tensor.shape)}, the config expects "
                                     f"{tuple(expected[name].shape)}")
                set_parameter(model, name, tensor.to(device=device, dtype=dtype))
                seen.add(name)
    needed = []  # every tensor the checkpoint must hold: a stacked parameter counts as loaded
    for name, p in expected.items():  # when its fused tensor was read, else needs all its experts
        if name.endswith((".experts.gate_up_proj", ".experts.down_proj")) and name not in seen:
            prefix, projs = name.rsplit(".", 1)[0], (("gate_proj", "up_proj") if name.endswith("gate_up_proj")
                                                     else ("down_proj",))
            needed += [f"{prefix}.{e}.{proj}.weight" for e in range(p.shape[0]) for proj in projs]
        else:
            needed.append(name)
    missing = [n for n in needed if n not in seen]
    if missing:
        raise ValueError(f"tensor {missing[0]} is missing from the checkpoint" +
                         (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def set_parameter(model: nn.Module, name: str, tensor: torch.Tensor):
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)


def from_pretrained(name_or_path: str, device=None, dtype=None) -> Qwen2MoeForCausalLM:
    """Load a Qwen1.5-MoE / Qwen2-MoE checkpoint: a local folder or a hub id such as
    "Qwen/Qwen1.5-MoE-A2.7B-Chat".

    dtype: a torch dtype or its name; default the checkpoint's own dtype (config.json's torch_dtype).
    device: default "cpu". Parameters load with requires_grad=False; call
    `model.requires_grad_(True)` to train.
    """
    folder = resolve_checkpoint(name_or_path)
    raw = load_config(folder)
    if raw.get("model_type") != "qwen2_moe":
        raise ValueError(f"{name_or_path} has model_type {raw.get('model_type')!r}; qwen2_moe.py loads "
                         f"'qwen2_moe'")
    config = Qwen2MoeConfig.from_dict(raw)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r} (use float32, bfloat16 or float16)")
        dtype = DTYPES[dtype]
    dtype = dtype or DTYPES.get(config.torch_dtype or "", torch.float32)
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = Qwen2MoeForCausalLM(config)
    tied = config.tie_word_embeddings  # the checkpoint then has no lm_head.weight (ignored if present)
    load_weights(model, folder, device, dtype, skip=lambda name: tied and name == "lm_head.weight")
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb.inv_freq = rope_frequencies(config)[0].to(device)
    return model.eval()
