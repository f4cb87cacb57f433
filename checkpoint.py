"""Reading Hugging Face checkpoints, for generate.py and the add-ons (quantize.py, parallel.py).

Each model file has a short loader of its own (`from_pretrained`), enough for that file copied
alone. This module is the one full reader the rest of the project shares:

* a local folder, or a hub id downloaded into the hub cache (tokenizer.resolve_checkpoint);
* config.json's model_type -> the model file (MODEL_FILES), its `architectures` -> the class;
* sharded files (model.safetensors.index.json), mapped into memory as safetensors does (the pages
  are the file's, shared and read lazily), or for quantize.py each tensor read into memory of its
  own: a mapped page, once read, counts in the process until the file is closed, and quantizing
  reads every tensor;
* the hub's per-expert tensors stacked into the MoE files' (E, N, K) parameters (or stacked files
  read as they are), their number checked against the config before any tensor is read;
* a hook for each tensor as it arrives (`load`'s `put`): quantize.py quantizes the weights while they
  stream in, parallel.py keeps its rank's slice and reads no other rank's experts;
* one clear line for a bad checkpoint: a missing, unexpected or misshapen tensor, a wrong number of
  experts, a damaged or truncated file.

The model files' own helpers name the tensors (`parameter_for`, `EXPERT_KEY`, `set_parameter`), so
the naming rules are written once, in each model file.
"""
from __future__ import annotations

import importlib
import json
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn

from tokenizer import read_json, resolve_checkpoint

# model_type in config.json -> the file that implements it (the MoE files extend the family).
MODEL_FILES = {
    "qwen2": "qwen2",          # Qwen2, Qwen2.5 (and Qwen1.5 dense checkpoints)
    "qwen2_moe": "qwen2_moe",  # Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B
    "qwen3_moe": "qwen3_moe",  # Qwen3-30B-A3B, Qwen3-235B-A22B
    "qwen3": "qwen3_moe",      # dense Qwen3 = Qwen3-MoE with every layer dense
}

def model_module(model_type: str):
    """The model file for a config.json `model_type`."""
    if model_type not in MODEL_FILES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: "
                         f"{', '.join(sorted(MODEL_FILES))}")
    try:
        return importlib.import_module(MODEL_FILES[model_type])
    except ModuleNotFoundError as e:
        if e.name != MODEL_FILES[model_type]:
            raise
        raise ValueError(f"model_type {model_type!r} needs {MODEL_FILES[model_type]}.py, which is not "
                         f"present") from None


@dataclass
class Checkpoint:
    """A checkpoint folder, as the loaders read it."""
    folder: str                        # the local folder (a hub id's is in the hub cache)
    raw: dict                          # config.json
    module: object                     # the model file of its model_type
    architecture: str                  # the class to build, a key of module.ARCHITECTURES
    config: object                     # the model file's config, from config.json
    dtype: torch.dtype                 # the dtype the floating-point weights load in
    files: list                        # its safetensors files

    def build(self) -> nn.Module:
        """The model on the meta device, in self.dtype: its structure, no memory yet."""
        with torch.device("meta"):
            return self.module.ARCHITECTURES[self.architecture](self.config).to(self.dtype)


def open_checkpoint(name_or_path: str, dtype=None, architecture: str | None = None) -> Checkpoint:
    """Find a checkpoint (a local folder or a hub id) and read its config. dtype: a torch dtype or
    its name; default the checkpoint's own (config.json's torch_dtype), else float32."""
    folder = resolve_checkpoint(name_or_path)
    raw = read_json(os.path.join(folder, "config.json"))
    if not raw:
        raise FileNotFoundError(f"no config.json in {folder}: not a Hugging Face checkpoint folder")
    module = model_module(raw.get("model_type"))
    architecture = architecture or (raw.get("architectures") or [next(iter(module.ARCHITECTURES))])[0]
    if architecture not in module.ARCHITECTURES:
        raise ValueError(f"{name_or_path} is a {architecture}, which {module.__name__}.py does not build "
                         f"(it builds {', '.join(module.ARCHITECTURES)})")
    config_cls = next(v for k, v in vars(module).items() if k.endswith("Config") and isinstance(v, type))
    config = config_cls.from_dict(raw)
    dtypes = module.DTYPES  # (the model file's names of them)
    if isinstance(dtype, str) and dtype not in dtypes:
        raise ValueError(f"unknown dtype {dtype!r} (use float32, bfloat16 or float16)")
    dtype = dtypes.get(dtype, dtype) or dtypes.get(config.torch_dtype or "", torch.float32)
    return Checkpoint(folder, raw, module, architecture, config, dtype, safetensors_files(folder))


def safetensors_files(folder: str) -> list[str]:
    """The weight files: those the index names (a sharded checkpoint), else every *.safetensors."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        names = sorted(set(read_json(index)["weight_map"].values()))
    else:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    if not names:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise FileNotFoundError(f"{folder} lacks the weight file {missing[0]} named in its index")
    return [os.path.join(folder, n) for n in names]


SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
                      "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
                      "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def damaged(file: str, why: str) -> ValueError:
    return ValueError(f"{file} is damaged or incomplete ({why}): download or copy it again")


def read_header(f, file: str) -> tuple[dict, int]:
    """A .safetensors file's header (name -> dtype, shape, [begin, end) byte offsets past the header)
    and where its data begins. The format: 8 bytes of header length, the JSON header, the data."""
    size = os.fstat(f.fileno()).st_size
    header_len = int.from_bytes(f.read(8), "little")
    if header_len > size - 8:
        raise damaged(file, "its header runs past the end of the file")
    try:
        header = json.loads(f.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise damaged(file, f"unreadable header: {e}") from None
    header.pop("__metadata__", None)
    for name, info in header.items():
        begin, end = info["data_offsets"]
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{file}: tensor {name} has dtype {info['dtype']}, which this loader does not "
                             f"read")
        if 8 + header_len + end > size:
            raise damaged(file, f"tensor {name} does not fit its place in the file")
    return header, 8 + header_len


def read_tensors(file: str):
    """Yield (name, tensor) for each tensor of a .safetensors file, in file order, each read into
    memory of its own (not mapped: see the module docstring). The caller holds the only reference."""
    with open(file, "rb") as f:
        header, data_start = read_header(f, file)
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            begin, end = info["data_offsets"]
            tensor = torch.empty(info["shape"], dtype=SAFETENSORS_DTYPES[info["dtype"]])
            data = tensor.view(-1).view(torch.uint8).numpy()                  # its bytes, to read into
            if end - begin != len(data):
                raise damaged(file, f"tensor {name} does not fit its place in the file")
            f.seek(data_start + begin)
            if f.readinto(data) != len(data):
                raise damaged(file, f"tensor {name} is cut short")
            yield name, tensor
            del tensor, data


def open_safetensors(file: str):
    """safetensors' safe_open (a memory map: for reading slices), a damaged file as one clear line."""
    from safetensors import SafetensorError, safe_open
    try:
        return safe_open(file, framework="pt", device="cpu")
    except SafetensorError as e:
        raise damaged(file, str(e)) from None


def headers(ckpt: Checkpoint) -> dict:
    """file -> its header (tensor name -> dtype, shape, data_offsets), every file's read once."""
    out = {}
    for file in ckpt.files:
        with open(file, "rb") as f:
            out[file] = read_header(f, file)[0]
    return out


def backbone_of(model: nn.Module) -> str:
    """The prefix of the decoder stack's names in `model`: "model.", "transformer." or "" (itself)."""
    modules = dict(model.named_modules())  # (the embedding is a module whether quantized or not)
    return next(p for p in ("model.", "transformer.", "") if p + "embed_tokens" in modules)


def stack_of(expert) -> str:
    """The stacked parameter one expert's projection goes to (expert: a match of EXPERT_KEY)."""
    return expert[1] + (".down_proj" if expert[3] == "down" else ".gate_up_proj")


def check_expert_counts(ckpt: Checkpoint, expected: dict, backbone: str, header: dict):
    """Before any tensor is read: only sparse layers have per-expert tensors, and each layer has as
    many as its stack in `expected` (name -> full shape). header: file -> its header (`headers`)."""
    last = {}  # "model.layers.L.mlp.experts" -> (highest expert index, its tensor name)
    for file, names in header.items():
        for name in names:
            expert = ckpt.module.EXPERT_KEY.match(ckpt.module.parameter_for(name, backbone))
            if not expert:
                continue
            if stack_of(expert) not in expected:
                raise ValueError(f"unexpected tensor {name} in {os.path.basename(file)}: config.json makes "
                                 f"this layer a dense MLP")
            if int(expert[2]) >= last.get(expert[1], (-1, ""))[0]:
                last[expert[1]] = (int(expert[2]), name)
    for prefix, (e, name) in last.items():
        stack = prefix + ".gate_up_proj"
        want = tuple(expected[stack])
        if e + 1 != want[0]:
            raise ValueError(f"tensor {name} makes {e + 1} experts: {stack} would have shape "
                             f"{(e + 1, *want[1:])}, the config expects {want} (num_experts={want[0]})")


def load(ckpt: Checkpoint, model: nn.Module, device, *, expected: dict | None = None, put=None,
         experts=None, read=None, own_memory: bool = False, stack_device=None, hint: str = "",
         progress=None):
    """Stream every tensor of the checkpoint into `model` (built by ckpt.build(), perhaps rewritten
    since: quantized, sharded), one tensor at a time, and check that every expected one came.

    expected: name -> the full shape the config gives it; default the model's parameters as built.
    put(name, tensor): puts a complete tensor of `expected` in its place; default as a frozen
      parameter on `device` in ckpt.dtype (quantize.py quantizes instead; parallel.py's tensors are
      already its rank's slices).
    experts(stack) -> (first, count): the experts of that stack to read (default all of them);
      per-expert tensors are stacked on `stack_device` (default `device`) and `put` once complete.
    read(f, name, target): the tensor `name` from the safe_open file `f`, as `put` wants it (parallel:
      its slice); default the whole tensor, mapped from the file.
    own_memory: read each tensor whole into memory of its own instead (read_tensors; quantize.py).
    hint: ends the message when a tensor is missing.
    progress(done, total): called as the tensors go by, with bytes of the files done and in all.
    """
    module = ckpt.module
    expected = expected or {n: tuple(p.shape) for n, p in model.named_parameters()}
    put = put or (lambda name, t: module.set_parameter(model, name, t.to(device=device, dtype=ckpt.dtype)))
    key, backbone = getattr(module, "EXPERT_KEY", None), backbone_of(model)
    header = headers(ckpt) if key is not None or progress else {}
    if key is not None:
        check_expert_counts(ckpt, expected, backbone, header)
    stacks, seen = {}, set()  # stack -> (its tensor being filled, {(expert, part) read}); the names put
    sizes = {file: {name: info["data_offsets"][1] - info["data_offsets"][0] for name, info in h.items()}
             for file, h in header.items()}  # (bytes of each tensor in its file, for progress)
    done, total = 0, sum(sum(s.values()) for s in sizes.values())
    for file in ckpt.files:
        with nullcontext() if own_memory else open_safetensors(file) as f:
            for name, tensor in (read_tensors(file) if own_memory else ((n, None) for n in f.keys())):
                if progress:
                    done += sizes[file][name]
                    progress(done, total)
                target = module.parameter_for(name, backbone)
                expert = key.match(target) if key is not None else None
                if expert:  # one expert's projection: into its slice of the stack, put once complete
                    stack, e = stack_of(expert), int(expert[2])
                    first, count = experts(stack) if experts else (0, expected[stack][0])
                    if not first <= e < first + count:
                        continue                                   # another rank's expert: not read
                    if stack in seen:
                        raise ValueError(f"tensor {name} repeats an expert of {stack}, also in the "
                                         f"checkpoint")
                    if stack not in stacks:
                        shape = (count, *expected[stack][1:])                  # this rank's experts
                        stacks[stack] = (torch.empty(shape, dtype=ckpt.dtype, device=stack_device or device),
                                         set())
                    I = expected[expert[1] + ".down_proj"][2]
                    rows = {"gate": slice(0, I), "up": slice(I, 2 * I), "down": slice(None)}[expert[3]]
                    piece = stacks[stack][0][e - first, rows]
                    tensor = tensor if tensor is not None else f.get_tensor(name)
                    check_shape(name, tensor.shape, piece.shape)
                    piece.copy_(tensor)
                    stacks[stack][1].add((e, expert[3]))
                    if len(stacks[stack][1]) == count * (1 if expert[3] == "down" else 2):
                        put(stack, stacks.pop(stack)[0])
                        seen.add(stack)
                elif target in expected:
                    if target in seen or target in stacks:
                        raise ValueError(f"tensor {name} repeats {target}, also in the checkpoint")
                    shape = tensor.shape if own_memory else f.get_slice(name).get_shape()  # (the header's)
                    check_shape(name, shape, expected[target])
                    if tensor is None:  # mapped: read now, only what this caller keeps
                        tensor = read(f, name, target) if read else f.get_tensor(name)
                    put(target, tensor)
                    seen.add(target)
                elif target.partition(".")[0] not in module.HEADS and not name.endswith("inv_freq"):
                    raise ValueError(f"unexpected tensor {name} in {os.path.basename(file)}: the checkpoint "
                                     f"does not match its config.json")
                del tensor  # before the next one is read: one tensor at a time
    missing = [n for n in expected if n not in seen and n not in stacks]
    for stack, (tensor, read_pieces) in stacks.items():  # stacks with pieces still missing: name them
        first = experts(stack)[0] if experts else 0
        parts = ("down",) if stack.endswith("down_proj") else ("gate", "up")
        prefix = stack.rpartition(".")[0]
        missing += [f"{prefix}.{e}.{part}_proj.weight" for e in range(first, first + len(tensor))
                    for part in parts if (e, part) not in read_pieces]
    if missing:
        expert = key.match(missing[0]) if key is not None else None
        raise ValueError(f"tensor {missing[0]} is missing from the checkpoint" +
                         (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "") +
                         (f"; the config has {expected[stack_of(expert)][0]} experts per layer"
                          if expert else "") + hint)


def check_shape(name: str, shape, expected):
    """One line when checkpoint tensor `name` has another shape than the config gives it."""
    if tuple(shape) != tuple(expected):
        raise ValueError(f"tensor {name} has shape {tuple(shape)}, the config expects {tuple(expected)}")


def finish(ckpt: Checkpoint, model: nn.Module, device) -> nn.Module:
    """Tie a tied lm_head the checkpoint did not fill (it has no lm_head.weight) to the embedding,
    check that nothing is left on the meta device, compute the RoPE buffer (not a weight), freeze:
    ready for inference."""
    head = getattr(model, "lm_head", None)
    if ckpt.config.tie_word_embeddings and isinstance(head, nn.Linear) and head.weight.is_meta:
        head.weight = model.model.embed_tokens.weight
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if t is not None and t.is_meta and not n.endswith("inv_freq")]
    if left:
        raise ValueError(f"{ckpt.folder}: tensor {left[0]} is missing from the checkpoint"
                         + (f" (and {len(left) - 1} more)" if len(left) > 1 else ""))
    decoder = getattr(model, "transformer", getattr(model, "model", model))
    decoder.rotary_emb.inv_freq = ckpt.module.rope_frequencies(ckpt.config)[0].to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def from_pretrained(name_or_path: str, device=None, dtype=None, architecture: str | None = None,
                    progress=None) -> nn.Module:
    """Load any checkpoint of the three model files (as their own from_pretrained, through this reader).
    progress: as in `load`."""
    ckpt = open_checkpoint(name_or_path, dtype, architecture)
    device = torch.device(device or "cpu")
    model = ckpt.build()
    saved = (ckpt.raw.get("architectures") or [None])[0]
    hint = "" if saved in (None, ckpt.architecture) else (f"; {name_or_path} holds a {saved}, not a "
                                                          f"{ckpt.architecture}")
    load(ckpt, model, device, hint=hint, progress=progress)
    return finish(ckpt, model, device)
