"""Weight-only int8 and int4 quantization for the three model files, applied from outside.

    import quantize
    model = quantize.quantize(model, "int8")                 # or "int4", group_size=32

`quantize` rewrites a loaded model in place, finding the layers by their Hugging Face names, so the
model files keep their math: every linear layer of attention (q/k/v/o_proj) and of the MLPs
(gate/up/down_proj, the shared expert's included) becomes an Int8Linear or Int4Linear, and the
stacked experts of the MoE layers (mlp.experts.gate_up_proj (E, 2I, C) and down_proj (E, C, I))
become QuantizedStack objects that the model files' expert paths index like the tensors they
replace. What stays in the activation dtype: the embeddings, the norms, the router (mlp.gate) and
the shared-expert gate (tiny, and the routing decision is sensitive). lm_head: see LM_HEAD below.

The arithmetic. A weight matrix W (N outputs, K inputs) is stored as small integers q and a scale:

  int8, symmetric per output channel:
      s[n] = max_k |W[n, k]| / 127,   q[n, k] = round(W[n, k] / s[n]) in [-127, 127]
      W[n, k] ~ q[n, k] * s[n]
  int4, asymmetric per group of G consecutive inputs (tinygemm's convention):
      for the group g of row n: lo = min W, hi = max W over its G weights,
      s[n, g] = (hi - lo) / 15,   q[n, k] = round((W[n, k] - lo) / s[n, g]) in [0, 15]
      W[n, k] ~ (q[n, k] - 8) * s[n, g] + z[n, g],   with z[n, g] = lo + 8 * s[n, g]
  two per byte in llama.cpp's Q4_0 order (pack_int4), which qwen_kernels/cpu_matvec.cpp reads 32 at a time.
Scales (and zero points) are kept in the activation dtype. Error: at most half a step, s / 2, per
weight; int4's step is about 17 times int8's for the same spread, hence the groups.

Each layer has a plain reference (dequantize the whole matrix, then F.linear) that always works,
and fast paths beside it, tested equal to it. On CPU: for a decode step (a few rows), the
matrix-vector kernels of qwen_kernels/cpu_matvec.cpp (25-33 GB/s here, where torch's int8 kernel reads 15);
for a prompt, int8 multiplies by the int8 matrix cast to the activation dtype and scales the output
(x @ q^T * s = x @ (q * s)^T), int4 dequantizes once per call in C++ and multiplies; where the C++
kernels cannot be built, torch's _weight_int8pack_mm and _weight_int4pack_mm_for_cpu (int4 on a
copy repacked once in torch's layout). On CUDA int8 takes the cast-and-scale path, which
torch.compile fuses into the matmul, and int4 the Triton kernel of qwen_kernels/int4.py, which reads the
packed 4-bit weights and dequantizes them in registers (without triton: the reference).
"""
from __future__ import annotations

import json
import os
import shutil

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
from qwen_kernels import cpu as cpu_kernels

try:  # the Triton int4 matmul (qwen_kernels/int4.py) for int4 layers on CUDA, when triton is installed
    from qwen_kernels import int4 as int4_kernel
except ImportError as e:
    if (e.name or "").partition(".")[0] not in ("qwen_kernels", "triton"):
        raise  # a real error inside the kernel is not hidden
    int4_kernel = None

SCHEMES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 32  # measured: see docs/quantization.md (accuracy against memory)
# lm_head: int8 in both schemes. An int4 lm_head moved perplexity by far more than the rest of the
# model together on the real 0.5B checkpoint, and the head is the largest single matrix of the
# small models, so int8 keeps most of the saving (docs/quantization.md has the numbers).
LM_HEAD = "int8"
# Up to this many rows (decode steps, small batches) the CPU int8 kernel; from here on (prefill) the
# bf16 matmul on the int8 matrix cast once per call, measured 1.7x faster for a 128-token prompt.
PACKED_ROWS = 16
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------------------------
# The arithmetic: quantize and dequantize one matrix (or a stack of them: leading dimensions pass)
# ----------------------------------------------------------------------------------------------

def quantize_int8(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """W (..., N, K) -> (q int8 (..., N, K), s (..., N) in `dtype`): symmetric, per output channel.
    q is rounded against the scale as stored (in `dtype`), so that its rounding adds no error."""
    w = w.float()
    s = (w.abs().amax(dim=-1) / 127).clamp(min=1e-12).to(dtype)               # (..., N)
    q = torch.round(w / s.float()[..., None]).clamp(-127, 127).to(torch.int8)  # (..., N, K)
    return q, s


def dequantize_int8(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * s.float()[..., None]).to(dtype)                         # (..., N, K)


def quantize_int4(w: torch.Tensor, group_size: int,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W (..., N, K) -> (q uint8 in [0, 15] (..., N, K), s and z (..., N, K/G) in `dtype`); q is
    rounded against s and z as stored."""
    *lead, N, K = w.shape
    groups = w.float().reshape(*lead, N, K // group_size, group_size)          # (..., N, K/G, G)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)                          # (..., N, K/G)
    s = ((hi - lo) / 15).clamp(min=1e-12).to(dtype)
    z = (lo + 8 * s.float()).to(dtype)
    q = torch.round((groups - z.float()[..., None]) / s.float()[..., None] + 8).clamp(0, 15)
    return q.to(torch.uint8).reshape(*lead, N, K), s, z


def dequantize_int4(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    *lead, N, K = q.shape
    G = K // s.shape[-1]
    groups = q.float().reshape(*lead, N, K // G, G)                             # (..., N, K/G, G)
    w = (groups - 8) * s.float()[..., None] + z.float()[..., None]
    return w.reshape(*lead, N, K).to(dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q (..., N, K) in [0, 15], K % 32 == 0 -> (..., N, K/2) uint8, the layout cpu_matvec.cpp reads
    (llama.cpp's Q4_0 order): each 32 inputs are 16 bytes, byte j holding input j in its low nibble
    and input 16 + j in its high one, so that one 16-byte load gives 32 consecutive inputs."""
    *lead, N, K = q.shape
    q = q.to(torch.uint8).reshape(*lead, N, K // 32, 2, 16)                   # (..., N, K/32, half, j)
    return (q[..., 0, :] | (q[..., 1, :] << 4)).reshape(*lead, N, K // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4: (..., N, K/2) uint8 -> q (..., N, K) in [0, 15]."""
    *lead, N, half = packed.shape
    b = packed.reshape(*lead, N, half // 16, 1, 16)                           # (..., N, K/32, 1, j)
    return torch.cat((b & 15, b >> 4), dim=-2).reshape(*lead, N, 2 * half)


def by_rows(quantizer, w: torch.Tensor, *args, rows: int = 1024):
    """quantizer(w, *args) computed 1024 rows at a time (rows are independent): the float32
    temporaries of a 150k-row lm_head then stay small."""
    out = None
    for i in range(0, len(w), rows):
        part = quantizer(w[i:i + rows], *args)
        if out is None:  # the outputs, allocated once (a list of parts and a torch.cat would hold two)
            out = tuple(p.new_empty((len(w), *p.shape[1:])) for p in part)
        for whole, p in zip(out, part):
            whole[i:i + len(p)] = p
    return out


# ----------------------------------------------------------------------------------------------
# Quantized linear layers: a reference and the fast paths beside it
# ----------------------------------------------------------------------------------------------

class Int8Linear(nn.Module):
    """y = x @ (q * s)^T + bias, with q int8 (N, K) and s (N,) per output channel."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self.kernels = "auto"  # the paths forward may take: qwen_kernels.install sets it (KERNELS there)
        self.register_buffer("qweight", None)                                   # (N, K) int8
        self.register_buffer("scales", None)                                    # (N,)
        self.set_weight(linear.weight.detach())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(dtype),
                                                                  requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def set_weight(self, w: torch.Tensor):
        """Quantize the float weight (N, K) into this layer, on w's device."""
        self.qweight, self.scales = by_rows(quantize_int8, w, self.dtype)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize_int8(self.qweight, self.scales, x.dtype), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])                                       # (M, K)
        if self.kernels == "reference":
            return self.reference(x)
        if x.dtype == self.scales.dtype and self.kernels != "torch" and cpu_kernels.use(rows):
            # a decode step: qwen_kernels/cpu_matvec.cpp's matrix-vector product, bias included
            y = torch.ops.qwen_cpu.linear_int8(rows.contiguous(), self.qweight, self.scales, self.bias)
            return y.view(*x.shape[:-1], -1)
        if x.device.type == "cpu" and x.dtype == self.scales.dtype and len(rows) < PACKED_ROWS:
            y = torch._weight_int8pack_mm(rows, self.qweight, self.scales)      # (M, N)
        else:  # any device: the int8 matrix in the activation dtype, the scale on the output
            y = F.linear(rows, self.qweight.to(x.dtype)) * self.scales.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], -1)


class Int4Linear(nn.Module):
    """y = x @ ((q - 8) * s + z)^T + bias, per group of group_size inputs; q packed two per byte."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype, group_size: int):
        super().__init__()
        N, K = linear.weight.shape
        self.dtype, self.group_size = dtype, group_size
        self.kernels = "auto"  # the paths forward may take: qwen_kernels.install sets it (KERNELS there)
        self.register_buffer("qweight", None)                                   # (N, K/2) uint8
        self.register_buffer("scales", None)                                    # (N, K/G)
        self.register_buffer("zeros", None)                                     # (N, K/G)
        self.set_weight(linear.weight.detach())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(dtype),
                                                                  requires_grad=False)
        self.in_features, self.out_features = K, N

    def set_weight(self, w: torch.Tensor):
        """Quantize the float weight (N, K) into this layer, on w's device."""
        q, self.scales, self.zeros = by_rows(quantize_int4, w, self.group_size, self.dtype)
        self.qweight = pack_int4(q)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        w = dequantize_int4(unpack_int4(self.qweight), self.scales, self.zeros, x.dtype)
        return F.linear(x, w, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])                                       # (M, K)
        fast = self.kernels in ("auto", "triton")
        if x.dtype != self.scales.dtype or self.kernels == "reference":
            return self.reference(x)
        if x.is_cuda:  # the Triton kernel: the weights read as 4-bit numbers, dequantized in registers
            if not fast or int4_kernel is None or not int4_kernel.supports(rows, self.qweight):
                return self.reference(x)
            y = int4_kernel.linear_int4(rows, self.qweight, self.scales, self.zeros, self.group_size,
                                        self.bias)
        elif x.device.type != "cpu":
            return self.reference(x)
        elif fast and cpu_kernels.use(rows):  # a decode step: the C++ matrix-vector product, bias included
            y = torch.ops.qwen_cpu.linear_int4(rows.contiguous(), self.qweight, self.scales, self.zeros,
                                               self.group_size, self.bias)
        elif fast and cpu_kernels.usable(rows):  # a prompt: the matrix dequantized once, then one matmul
            w = torch.ops.qwen_cpu.dequantize_int4(self.qweight, self.scales, self.zeros, self.group_size)
            y = F.linear(rows, w, self.bias)
        elif self.out_features % 64 == 0:  # no C++ kernels here (or --kernels torch): torch's int4 kernel
            packed, scales_and_zeros = self.torch_layout()
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, packed, self.group_size, scales_and_zeros)
            y = y if self.bias is None else y + self.bias
        else:
            return self.reference(x)
        return y.view(*x.shape[:-1], -1)

    def torch_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weights in the layout of torch's own CPU int4 kernel, (packed, scales_and_zeros): made at
        the first call and kept (a second copy of the weights), for machines without the C++ kernels."""
        if getattr(self, "_torch_layout", None) is None:
            q = unpack_int4(self.qweight).to(torch.int32)                        # (N, K) 0..15
            self._torch_layout = (torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2),
                                  torch.stack((self.scales, self.zeros), -1).transpose(0, 1).contiguous())
        return self._torch_layout


class QuantizedStack(nn.Module):
    """The stacked weights of E experts, quantized per expert (and per output channel or group),
    standing in for the (E, N, K) tensor: indexing it (`w[e]`, or `w[ids]` with a tensor of expert
    ids) dequantizes only those experts, so the model files' expert paths run unchanged and read
    only the experts that received tokens. The fused Triton MoE kernel reads int8 stacks as they
    are (qwen_kernels/moe.py's int8 variant) and declines int4 ones."""

    def __init__(self, weight: torch.Tensor, scheme: str, dtype: torch.dtype, group_size: int):
        super().__init__()
        self.scheme, self.out_dtype, self.group_size = scheme, dtype, group_size
        self.shape = tuple(weight.shape)
        for name in ("qweight", "scales", "zeros"):
            self.register_buffer(name, None)
        self.set_weight(weight.detach())

    def set_weight(self, w: torch.Tensor):
        """Quantize the float stack (E, N, K) into this module, on w's device."""
        if self.scheme == "int8":
            self.qweight, self.scales = by_rows(quantize_int8, w, self.out_dtype)  # (E, N, K), (E, N)
            self.zeros = torch.empty(0, dtype=self.out_dtype, device=w.device)
        else:
            q, self.scales, self.zeros = by_rows(quantize_int4, w, self.group_size, self.out_dtype)
            # scales, zeros: (E, N, K/G)
            self.qweight = pack_int4(q)                                         # two per byte: (E, N, K/2)

    def __getitem__(self, index) -> torch.Tensor:
        q, s = self.qweight[index], self.scales[index]
        if self.scheme == "int8":
            return dequantize_int8(q, s, self.out_dtype)
        return dequantize_int4(unpack_int4(q), s, self.zeros[index], self.out_dtype)


class QuantizedEmbedding(QuantizedStack):
    """The embedding table (vocab, hidden) quantized as a stack of rows: int8 with one scale per row,
    or int4 per group of a row, exactly as a linear layer's weight of that shape. A lookup dequantizes
    the rows of the ids it is given, into the activation dtype. Only on request (quantize's
    `embeddings`): by default the table stays in the activation dtype. A tied lm_head quantized the
    same way reads the same tensors (`share_tied_table`): one copy serves both."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self[ids]                                                        # (..., hidden)


# ----------------------------------------------------------------------------------------------
# Rewriting a model
# ----------------------------------------------------------------------------------------------

def check_scheme(scheme: str, group_size: int):
    """One clear line for a scheme or group size this file does not have."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization {scheme!r} (use {' or '.join(SCHEMES)})")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group size {group_size} is not one of {', '.join(map(str, GROUP_SIZES))}")


def quantized_linear(linear: nn.Linear, scheme: str, dtype: torch.dtype, group_size: int) -> nn.Module:
    """The quantized replacement of one linear layer. int4 needs K % group_size == 0 (whole groups); a
    layer whose inputs do not divide into groups keeps int8."""
    N, K = linear.weight.shape
    if scheme == "int4" and K % group_size == 0:
        return Int4Linear(linear, dtype, group_size)
    return Int8Linear(linear, dtype)


def quantized_embedding(embedding: nn.Embedding, scheme: str, dtype: torch.dtype,
                        group_size: int) -> QuantizedEmbedding:
    """The quantized table: as quantized_linear chooses (int8 where a row does not divide into groups)."""
    if scheme == "int4" and embedding.embedding_dim % group_size:
        scheme = "int8"
    return QuantizedEmbedding(embedding.weight, scheme, dtype, group_size)


def shares_table(embedding: nn.Module, head: nn.Module) -> bool:
    """Can a tied lm_head read the quantized embedding's tensors as its own? Yes when both hold the
    (vocab, hidden) matrix in one layout: int8 per row, or int4 with the same groups."""
    if not isinstance(embedding, QuantizedEmbedding):
        return False
    if embedding.scheme == "int8":
        return isinstance(head, Int8Linear)
    return isinstance(head, Int4Linear) and head.group_size == embedding.group_size


def share_tied_table(model: nn.Module):
    """Point a tied model's quantized lm_head at the quantized embedding's integers and scales."""
    embedding, head = model.model.embed_tokens, model.lm_head
    if shares_table(embedding, head):
        for name in ("qweight", "scales") + (("zeros",) if embedding.scheme == "int4" else ()):
            setattr(head, name, getattr(embedding, name))


def replace(parent: nn.Module, name: str, layer: nn.Module):
    """Put `layer` in the place of parent.<name>. Forward hooks set on the old layer move to the new
    one: another add-on's work stays (parallel.py gathers a sharded lm_head's logits in one)."""
    layer._forward_hooks.update(getattr(parent, name)._forward_hooks)
    setattr(parent, name, layer)


def quantize(model: nn.Module, scheme: str = "int8", group_size: int = DEFAULT_GROUP_SIZE,
             lm_head: str | None = LM_HEAD, embeddings: str | None = None) -> nn.Module:
    """Quantize `model` (any class of the three model files) in place and return it.

    scheme: "int8" or "int4" for the layers named in the module docstring; group_size: int4's group.
    lm_head: "int8", "int4", or None to keep it in the activation dtype. A tied lm_head (the small
    Qwen2.5 and Qwen3 models) becomes a quantized copy of the embedding, which itself stays as it is,
    unless `embeddings` ("int8" or "int4"; None: kept in the activation dtype) quantizes the table
    too: then a tied lm_head of the same scheme reads the embedding's quantized table, one copy.
    """
    check_scheme(scheme, group_size)
    for what, value in (("lm_head", lm_head), ("embeddings", embeddings)):
        if value not in (None, *SCHEMES):
            raise ValueError(f"{what} must be None, int8 or int4, not {value!r}")
    head = getattr(model, "lm_head", None)
    embedding = getattr(getattr(model, "model", None), "embed_tokens", None)
    tied = getattr(head, "weight", 0) is getattr(embedding, "weight", None)
    if embeddings is not None and tied and lm_head is None:
        raise ValueError("a tied lm_head kept in full precision needs the embedding table as it is: "
                         "quantize the lm_head too, or keep the embeddings")
    dtype = next(p.dtype for p in model.parameters() if p.dtype.is_floating_point)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name in LINEAR_NAMES:
                replace(module, child_name, quantized_linear(child, scheme, dtype, group_size))
            elif child_name == "lm_head" and isinstance(child, nn.Linear) and lm_head is not None:
                replace(module, child_name, quantized_linear(child, lm_head, dtype, group_size))
            elif child_name == "embed_tokens" and isinstance(child, nn.Embedding) and embeddings is not None:
                replace(module, child_name, quantized_embedding(child, embeddings, dtype, group_size))
        if name.endswith("mlp.experts") and hasattr(module, "gate_up_proj"):
            for stack in ("gate_up_proj", "down_proj"):
                weight = module._parameters.pop(stack)                      # (E, N, K)
                setattr(module, stack, QuantizedStack(weight, scheme, dtype, group_size))
    if tied:
        share_tied_table(model)
    if getattr(model, "kernels", None):  # the paths qwen_kernels.install chose, for the new layers too
        for module in model.modules():
            if isinstance(getattr(module, "kernels", None), str):
                module.kernels = model.kernels
    model.quantization = {"scheme": scheme, "group_size": group_size, "lm_head": lm_head,
                          "embeddings": embeddings}
    return model


# ----------------------------------------------------------------------------------------------
# Saving and loading a quantized model
# ----------------------------------------------------------------------------------------------

COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja",
                "vocab.json", "merges.txt")


def save(model: nn.Module, folder: str, source: str):
    """Write a quantized model as a checkpoint folder that `load` (and generate.py) read back without
    quantizing again: model.safetensors with the integer weights and their scales (everything else
    as it is), source's config.json with a "quantization" entry, and source's tokenizer files."""
    from safetensors.torch import save_file

    from tokenizer import read_json, resolve_checkpoint
    if not getattr(model, "quantization", None):
        raise ValueError("the model is not quantized: call quantize.quantize(model, ...) first")
    source = resolve_checkpoint(source)
    os.makedirs(folder, exist_ok=True)
    state, seen = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():  # (the tensors themselves: ties show)
        if name.endswith("inv_freq") or id(tensor) in seen:  # a buffer, not a weight; a tied copy
            continue
        seen.add(id(tensor))
        state[name] = tensor.detach().contiguous()
    save_file(state, os.path.join(folder, "model.safetensors"))
    config = read_json(os.path.join(source, "config.json"))
    config["quantization"] = dict(model.quantization)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for name in COPIED_FILES:
        if os.path.isfile(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), folder)


def tie(model: nn.Module, config):
    """A tied quantized lm_head reads the quantized table when both are alike (share_tied_table); a
    full-precision one is tied to the embedding by checkpoint.finish."""
    if config.tie_word_embeddings and hasattr(model, "lm_head") and not isinstance(model.lm_head, nn.Linear):
        share_tied_table(model)


def from_pretrained(name_or_path: str, scheme: str = "int8", group_size: int = DEFAULT_GROUP_SIZE,
                    device=None, dtype=None, lm_head: str | None = LM_HEAD,
                    embeddings: str | None = None, progress=None) -> nn.Module:
    """Load a full-precision checkpoint quantized tensor by tensor as it streams in (the same layers
    as `quantize`), so that no full-precision copy of the model ever exists: a model that fits only
    in its quantized form loads. Peak memory: the quantized model, plus one tensor (for the MoE files,
    one layer's experts) in full precision. progress(done, total): bytes read, as checkpoint.load."""
    check_scheme(scheme, group_size)
    ckpt = checkpoint.open_checkpoint(name_or_path, dtype)
    device = torch.device(device or "cpu")
    model = quantize(ckpt.build(), scheme, group_size, lm_head, embeddings)  # on the meta device: no memory
    layers = {}  # the checkpoint's name of each quantized weight -> its layer
    for name, m in model.named_modules():
        if hasattr(m, "set_weight"):  # a stack of experts keeps its parameter's name; the others, .weight
            layers[name if type(m) is QuantizedStack else name + ".weight"] = m
    expected = {n: tuple(p.shape) for n, p in model.named_parameters()}
    for name, layer in layers.items():  # the full-precision shape each quantized weight stands for
        expected[name] = getattr(layer, "shape", None) or (layer.out_features, layer.in_features)
    table = checkpoint.backbone_of(model) + "embed_tokens.weight"
    # A tied head is quantized from the embedding's tensor, unless it reads the quantized table itself.
    tied_head = (ckpt.config.tie_word_embeddings and "lm_head.weight" in layers
                 and not shares_table(model.model.embed_tokens, model.lm_head))
    if ckpt.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)  # made from the embedding's tensor (or the table itself)

    def put(name, tensor):
        if name in layers:
            layers[name].set_weight(tensor.to(device))
        else:
            ckpt.module.set_parameter(model, name, tensor.to(device=device, dtype=ckpt.dtype))
        if tied_head and name == table:
            layers["lm_head.weight"].set_weight(tensor.to(device))

    checkpoint.load(ckpt, model, device, expected=expected, put=put, own_memory=True, stack_device="cpu",
                    progress=progress)
    tie(model, ckpt.config)
    return checkpoint.finish(ckpt, model, device)


def load(name_or_path: str, device=None, dtype=None) -> nn.Module:
    """Load a folder written by `save`: the model is built, quantized while still empty (on the meta
    device, so nothing is computed), then given the stored tensors."""
    from safetensors.torch import load_file
    ckpt = checkpoint.open_checkpoint(name_or_path, dtype)
    settings = ckpt.raw.get("quantization")
    if not settings:
        raise ValueError(f"{name_or_path} is not a quantized checkpoint (no quantization in its config.json)")
    scheme, group_size, lm_head = settings.get("scheme"), settings.get("group_size"), settings.get("lm_head")
    check_scheme(scheme, group_size)
    model = quantize(ckpt.build(), scheme, group_size, lm_head, settings.get("embeddings"))
    state = load_file(ckpt.files[0], device=str(device or "cpu"))
    state = {k: v.to(ckpt.dtype) if v.is_floating_point() else v for k, v in state.items()}
    expected = set(model.state_dict())
    if ckpt.config.tie_word_embeddings and isinstance(getattr(model, "lm_head", None), nn.Linear):
        expected.discard("lm_head.weight")  # the embedding's, tied below
    elif ckpt.config.tie_word_embeddings and shares_table(model.model.embed_tokens, model.lm_head):
        expected -= {n for n in expected if n.startswith("lm_head.")}  # the table's, shared below
    if set(state) != expected:
        odd = sorted(set(state) ^ expected)[0]
        raise ValueError(f"{ckpt.folder} does not match its config.json and quantization {settings}: tensor "
                         f"{odd} is {'missing' if odd in expected else 'unexpected'}")
    wanted = model.state_dict()  # the empty (meta) tensors, with their shapes
    for name, tensor in state.items():
        if tuple(wanted[name].shape) != tuple(tensor.shape):
            raise ValueError(f"{ckpt.folder}: tensor {name} has shape {tuple(tensor.shape)}, its config and "
                             f"quantization {settings} expect {tuple(wanted[name].shape)}")
    model.load_state_dict(state, strict=False, assign=True)
    tie(model, ckpt.config)
    return checkpoint.finish(ckpt, model, device or "cpu")


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer that holds weights (the KV cache and RoPE tables aside)."""
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith("inv_freq") or ".cache." in name:
            continue
        total += t.numel() * t.element_size()
    return total


# ----------------------------------------------------------------------------------------------
# Measuring the damage: perplexity, agreement of the greedy token, KL divergence
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def compare(reference: nn.Module, quantized: nn.Module, ids: list[int], window: int = 512) -> dict:
    """Both causal LMs on the same text, in windows of `window` tokens: the perplexity of each, the
    share of positions where their greedy next tokens agree, and the mean KL divergence
    KL(reference || quantized) of the next-token distributions."""
    nll_ref = nll_q = agree = kl = count = 0.0
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor([ids[start:start + window + 1]])
        if chunk.shape[1] < 2:
            break
        x, target = chunk[:, :-1], chunk[0, 1:]
        logp_ref = reference(x)[0].float().log_softmax(-1)                      # (T, vocab)
        logp_q = quantized(x)[0].float().log_softmax(-1)
        nll_ref -= logp_ref.gather(-1, target[:, None]).sum().item()
        nll_q -= logp_q.gather(-1, target[:, None]).sum().item()
        agree += (logp_ref.argmax(-1) == logp_q.argmax(-1)).sum().item()
        kl += (logp_ref.exp() * (logp_ref - logp_q)).sum().item()
        count += len(target)
    return {"tokens": int(count), "ppl_reference": float(torch.tensor(nll_ref / count).exp()),
            "ppl_quantized": float(torch.tensor(nll_q / count).exp()), "greedy_agreement": agree / count,
            "kl": kl / count}
