"""Qwen2 and Qwen2.5 in one file (Hugging Face `model_type` "qwen2").

A decoder-only transformer, read top to bottom:

    tokens -> embed_tokens -> N x DecoderLayer -> norm -> lm_head -> logits
    DecoderLayer(x):  x = x + Attention(RMSNorm(x));  x = x + MLP(RMSNorm(x))

* RMSNorm: normalise in float32, cast back to the input dtype, then multiply by the weight.
* Attention: grouped-query attention (each key/value head serves `n_heads / n_kv_heads` consecutive
  query heads), bias on q/k/v only, rotary position embeddings in the half-split form
  (`rotate_half`), optional sliding window on some layers.
* MLP: SwiGLU, `down(silu(gate(x)) * up(x))`, no biases.
* KV cache: preallocated per layer and written at each token's slot, so the same forward serves
  the prompt (prefill) and the one-token decode steps.

The sections, in the same order in all three model files (what they share is written identically,
and tests/test_copies.py holds them to it): configuration; RMSNorm and RoPE; attention; feed-forward;
layer, model, causal LM; the task heads transformers defines on the same decoder stack (sequence
classification for reward models, token classification, question answering; `embed` for embedding
models); losses; loading. qwen2_moe.py and qwen3_moe.py say in their headers how they differ.

The seams. Everything here is the plain computation; faster versions are swapped in from outside
(`qwen_kernels.install(model)`) at two places this file names once: `Attention.attention_function`
(default `sdpa_attention`, torch's fused attention; `reference_attention` spells it out) and the
`nn.Linear` layers, found by their Hugging Face names (quantize.py and the CPU kernels replace them).
Copied alone into another project, the file runs as it is.

Parameter names are Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, ...), so hub
checkpoints load with no renaming. transformers' `modeling_qwen2.py` is the semantics we match. The
file needs torch and the standard library; its loader also imports safetensors (and huggingface_hub
for hub ids) when called.

References:
  Qwen2 technical report, https://arxiv.org/abs/2407.10671
  Qwen2.5 technical report, https://arxiv.org/abs/2412.15115
  RoFormer (rotary embeddings), https://arxiv.org/abs/2104.09864
  GQA, https://arxiv.org/abs/2305.13245 ; YaRN, https://arxiv.org/abs/2309.00071
  RMSNorm, https://arxiv.org/abs/1910.07467 ; SwiGLU, https://arxiv.org/abs/2002.05202
"""
from __future__ import annotations

import glob
import json
import math
import os
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

@dataclass
class Qwen2Config:
    vocab_size: int = 151936            # tokens in the vocabulary
    hidden_size: int = 896              # width of the residual stream
    intermediate_size: int = 4864       # width of the MLP's hidden layer
    num_hidden_layers: int = 24         # decoder layers
    num_attention_heads: int = 14       # query heads
    num_key_value_heads: int = 2        # key/value heads (GQA); equal to query heads = plain MHA
    head_dim: int | None = None         # size of one head; None -> hidden_size // num_attention_heads
    max_position_embeddings: int = 32768  # context length the model was trained for
    rms_norm_eps: float = 1e-6          # epsilon inside RMSNorm
    rope_theta: float = 10000.0         # RoPE base wavelength
    rope_type: str = "default"          # "default", "linear", "dynamic" or "yarn"
    rope_scaling: dict | None = None    # its parameters (factor, original_max_position_embeddings, ...)
    tie_word_embeddings: bool = False   # lm_head shares the embedding matrix
    use_sliding_window: bool = False    # turn sliding-window attention on
    sliding_window: int | None = 4096   # keys a sliding layer sees, itself included
    max_window_layers: int = 28         # without layer_types: layers i >= this one slide
    layer_types: list | None = None     # per layer "full_attention" / "sliding_attention" (wins if given)
    hidden_act: str = "silu"            # MLP activation (Qwen2 only ever uses SiLU)
    torch_dtype: str | None = None      # dtype the checkpoint was saved in, e.g. "bfloat16"
    # The task heads (sequence / token classification, question answering):
    num_labels: int = 2                 # outputs of the classification heads (len(id2label) when given)
    id2label: dict | None = None        # class index -> label name
    problem_type: str | None = None     # regression, single_label_classification, multi_label_classification
    pad_token_id: int | None = None     # padding token: sequence classification reads the last other token
    classifier_dropout: float | None = None  # token classification's dropout (None: 0.1, as transformers)
    model_type: str = "qwen2"

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
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r} (Qwen2 uses silu)")
        # transformers: the window exists only when use_sliding_window is set; without layer_types,
        # layer i slides iff i >= max_window_layers.
        if self.layer_types is None:
            self.layer_types = ["sliding_attention" if self.use_sliding_window and i >= self.max_window_layers
                                else "full_attention" for i in range(self.num_hidden_layers)]
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

    @classmethod
    def from_dict(cls, d: dict) -> "Qwen2Config":
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


def rope_frequencies(config: Qwen2Config, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
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
    def __init__(self, config: Qwen2Config):
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

    def __init__(self, config: Qwen2Config, layer: int):
        super().__init__()
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.window = config.window(layer)
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=True)
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


# ----------------------------------------------------------------------------------------------
# Layer, model, causal LM
# ----------------------------------------------------------------------------------------------

class DecoderLayer(nn.Module):
    def __init__(self, config: Qwen2Config, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), step)
        return x + self.mlp(self.post_attention_layernorm(x))


def cache_slots(input_pos, T: int, device) -> torch.Tensor:
    """The (T,) cache slots of a forward's tokens: input_pos itself when it is a tensor of slots,
    else the T slots from input_pos (None: 0) on."""
    if torch.is_tensor(input_pos):
        return input_pos
    start = int(input_pos or 0)
    return torch.arange(start, start + T, device=device)


class Qwen2Model(nn.Module):
    """The decoder stack: token ids -> final hidden states. It holds the KV caches."""

    def __init__(self, config: Qwen2Config):
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
                position_ids: torch.Tensor | None = None, input_pos=None) -> torch.Tensor:
        """input_ids (B, T) -> hidden states (B, T, hidden) after the final norm.

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
        for layer in self.layers:
            x = layer(x, step)
        return self.norm(x)                                                      # (B, T, hidden)


class Qwen2ForCausalLM(nn.Module):
    """The decoder stack and the language-model head: token ids -> next-token logits."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.config = config
        self.model = Qwen2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def setup_cache(self, batch_size: int, max_len: int, dtype=None, device=None):  # (Qwen2Model's)
        self.model.setup_cache(batch_size, max_len, dtype, device)

    def clear_cache(self):
        self.model.clear_cache()

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                input_pos=None, logits_to_keep: int = 0):
        """input_ids (B, T) -> logits (B, T, vocab); with `labels`, (logits, loss).

        attention_mask, position_ids, input_pos: as in Qwen2Model.forward.
        logits_to_keep: if > 0, compute logits for the last that many positions only.
        """
        hidden = self.model(input_ids, attention_mask, position_ids, input_pos)  # (B, T, hidden)
        hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        # On 2-D rows: on CPU, a bf16 linear of a sliced 3-D tensor takes a slow batched path.
        logits = self.lm_head(hidden.reshape(-1, hidden.shape[-1])).view(*hidden.shape[:2], -1)  # (B, T, V)
        return logits if labels is None else (logits, causal_lm_loss(logits, labels))

    @property
    def device(self):
        return self.model.norm.weight.device

    @property
    def dtype(self):  # (the final norm's: quantize.py may quantize lm_head and the embedding)
        return self.model.norm.weight.dtype
# ----------------------------------------------------------------------------------------------
# Task heads: sequence classification (reward models), token classification, question answering
# ----------------------------------------------------------------------------------------------

class Qwen2ForSequenceClassification(nn.Module):
    """The decoder stack and `score`: one vector of num_labels logits per sequence, read at its last
    token that is not padding (reward models: num_labels 1, the reward)."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.config = config
        self.model = Qwen2Model(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None):
        """input_ids (B, T) -> logits (B, num_labels); with `labels`, (logits, loss) by the config's
        problem_type (see sequence_classification_loss)."""
        hidden = self.model(input_ids, attention_mask, position_ids)                 # (B, T, C)
        last = last_token_index(input_ids, self.config.pad_token_id)                # (B,)
        logits = self.score(hidden[torch.arange(len(last), device=last.device), last])  # (B, num_labels)
        if labels is None:
            return logits
        return logits, sequence_classification_loss(logits, labels, self.config)


class Qwen2ForTokenClassification(nn.Module):
    """The decoder stack, dropout and `score` (with bias): num_labels logits for every token."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.config = config
        self.model = Qwen2Model(config)
        self.dropout = nn.Dropout(0.1 if config.classifier_dropout is None else config.classifier_dropout)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=True)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None):
        """input_ids (B, T) -> logits (B, T, num_labels); with `labels` (B, T), (logits, loss)."""
        hidden = self.model(input_ids, attention_mask, position_ids)                 # (B, T, C)
        logits = self.score(self.dropout(hidden))                                    # (B, T, num_labels)
        if labels is None:
            return logits
        return logits, token_classification_loss(logits, labels)


class Qwen2ForQuestionAnswering(nn.Module):
    """The decoder stack and `qa_outputs`: for every token, the logit that the answer starts there and
    the logit that it ends there. The decoder stack is named `transformer` here, as in transformers'
    checkpoints of this class."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.config = config
        self.transformer = Qwen2Model(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)

    def forward(self, input_ids: torch.Tensor, start_positions: torch.Tensor | None = None,
                end_positions: torch.Tensor | None = None, *, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None):
        """input_ids (B, T) -> (start_logits, end_logits), (B, T) each; with start_positions and
        end_positions (B,), (start_logits, end_logits, loss)."""
        hidden = self.transformer(input_ids, attention_mask, position_ids)           # (B, T, C)
        start_logits, end_logits = self.qa_outputs(hidden).unbind(-1)               # (B, T) each
        if start_positions is None or end_positions is None:
            return start_logits, end_logits
        return start_logits, end_logits, question_answering_loss(start_logits, end_logits, start_positions,
                                                                 end_positions)


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


# ----------------------------------------------------------------------------------------------
# Loading a checkpoint
# ----------------------------------------------------------------------------------------------

MODEL_TYPES = ("qwen2",)  # the config.json model_type values this file loads

ARCHITECTURES = {  # config.json's `architectures` -> the class this file builds for it (the first: default)
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen2ForSequenceClassification": Qwen2ForSequenceClassification,
    "Qwen2ForTokenClassification": Qwen2ForTokenClassification,
    "Qwen2ForQuestionAnswering": Qwen2ForQuestionAnswering,
    "Qwen2Model": Qwen2Model,
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


def set_parameter(model: nn.Module, name: str, tensor: torch.Tensor):
    module_name, _, attr = name.rpartition(".")
    model.get_submodule(module_name)._parameters[attr] = nn.Parameter(tensor, requires_grad=False)


def load_weights(model: nn.Module, folder: str, device, dtype, hint: str = ""):
    """Stream every tensor of the folder's safetensors files into `model` (built on the meta device),
    each straight to `device` and `dtype`, so no second copy of the model exists. A head the model
    does not have (lm_head when it is tied or when loading a classifier, ...) is skipped; `hint` ends
    the message when a tensor is missing."""
    from safetensors import safe_open
    expected = dict(model.named_parameters())
    backbone = next(p for p in ("model.", "transformer.", "") if p + "embed_tokens.weight" in expected)
    seen = set()
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
                if target not in expected:
                    if target.partition(".")[0] in HEADS or name.endswith("rotary_emb.inv_freq"):
                        continue
                    raise ValueError(f"unexpected tensor {name} in {os.path.basename(file)}: the checkpoint "
                                     f"does not match its config.json")
                tensor = f.get_tensor(name)
                if tuple(tensor.shape) != tuple(expected[target].shape):
                    raise ValueError(f"tensor {name} has shape {tuple(tensor.shape)}, the config expects "
                                     f"{tuple(expected[target].shape)}")
                set_parameter(model, target, tensor.to(device=device, dtype=dtype))
                seen.add(target)
    missing = [n for n in expected if n not in seen]
    if missing:
        raise ValueError(f"tensor {missing[0]} is missing from the checkpoint" +
                         (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "") + hint)


def from_pretrained(name_or_path: str, device=None, dtype=None, architecture: str | None = None) -> nn.Module:
    """Load a Qwen2 / Qwen2.5 checkpoint: a local folder or a hub id such as
    "Qwen/Qwen2.5-0.5B-Instruct".

    architecture: the class to build, by its transformers name (a key of ARCHITECTURES); default the
    one config.json's `architectures` names (the causal LM when it names none). The decoder stack
    alone ("Qwen2Model") loads from a checkpoint of any of them, for embeddings.
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
    config = Qwen2Config.from_dict(raw)
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
