"""Tensor and expert parallelism for the three model files, applied from outside.

    torchrun --nproc-per-node 2 generate.py --model Qwen/Qwen2.5-7B-Instruct --prompt "Hello"

    import parallel
    device = parallel.init()                          # join the group torchrun describes
    model = parallel.from_pretrained("Qwen/Qwen2.5-7B-Instruct", device=device)  # this rank's shard

N processes (ranks) each hold a slice of every large weight and compute their share of each layer;
a few collectives make the shares whole. The model files do not change: `shard` narrows their
parameters by Hugging Face names, sets the head counts their attention reads, and hangs the
collectives on forward hooks (as quantize.py rewrites a model from outside). Rank r of N holds:

  attention   q_proj, k_proj, v_proj  column parallel: the rows of its query heads [r*H/N, (r+1)*H/N)
                                      and of the key/value heads those use; its KV cache holds only them
              o_proj                  row parallel: the matching input columns -> a partial sum
              -> all-reduce (sum) of the attention output
  dense MLP   gate_proj, up_proj      column parallel: rows [i0, i1) of the intermediate size
  (and the    down_proj               row parallel: columns [i0, i1) -> a partial sum
  shared      -> all-reduce of the MLP output (a MoE layer's shared expert joins the experts' one)
  expert)
  MoE         router (gate)           replicated: every rank routes every token the same way
              experts                 expert parallel: whole experts [e0, e1), about E/N of them
              -> one all-reduce of routed + shared output
  embedding   replicated; lm_head     vocab parallel: rows [r*V/N, (r+1)*V/N) -> all-gather of logits
  norms, RoPE replicated (tiny)

Why the sums are right. Attention is a sum over heads: o_proj(concat_h out_h) = sum_h
o_proj[:, cols of h](out_h), and each head needs only its own q rows and the key/value head it
shares, so a rank's heads give a complete partial sum. The SwiGLU MLP is a sum over its
intermediate units: down(silu(gate x) * up x) = sum_i down[:, i] * silu(gate_i x) * up_i x, so
splitting gate/up by rows and down by the same columns gives partial sums. A MoE layer's output is a
sum over (token, chosen expert) pairs: every rank sees the same router logits, computes the pairs
whose expert it holds (zero for the others) and the all-reduce adds them up. The shared expert's
partial sum is scaled by its per-token sigmoid gate, which distributes over the sum, so it rides on
the same all-reduce: two all-reduces per layer, as in Megatron-LM.

Key/value heads. With fewer key/value heads than ranks (Qwen3-235B-A22B: 4 for 64 query heads at
N = 8), each key/value head is replicated on the N/KVH ranks whose query heads use it; that needs
H % N == 0 and either KVH % N == 0 or N % KVH == 0, checked before any weight is read.

Experts, all-reduce against all-to-all. Here every rank receives every token's hidden state (it has
it anyway, attention being tensor parallel) and returns a full-size (tokens, hidden) partial sum, so
an all-reduce moves 2 (N-1)/N * tokens * hidden values per rank. An all-to-all dispatch would send
each token only to the ranks that hold its top-k experts and bring back only those results, at most
k/N of the traffic when a token's experts fall on k ranks, and it lets ranks skip the tokens they do
not serve; at scale (large batches, expert parallelism across machines) that is the standard choice
(DeepSpeed-MoE, GShard). At batch 1 decode, the case this project measures, both are latency bound
and the all-reduce is one collective instead of two.

Embedding and lm_head. The embedding is replicated: a lookup reads only the B rows of this step's
tokens, so replication costs memory but no time (Qwen3-235B-A22B: 151936 x 4096 in bf16, 1.24 GB per
rank, 2% of its 59 GB share at N = 8). lm_head is a matmul that reads the whole matrix every step:
replicated, it would add 1.24 GB of reads per token on every rank, about 24% on top of the 5.2 GB of
attention and expert weights a rank reads per decode step (about 21B active parameters / 8, in bf16).
Split by vocabulary rows, each rank reads 0.16 GB and an all-gather of the B x 151936 logits (0.3 MB
per row in bf16) joins them: tiny next to the weights. A vocabulary that does not divide by N is padded
with zero rows on the last rank; the padding columns are cut after the gather.

Loading reads only this rank's slices straight from the safetensors files (safe_open's
`get_slice`), so no process ever holds the whole model: peak memory per rank is its share plus the
replicated tensors. An expert of another rank is never read at all.

Sampling: all ranks compute the same logits (an all-reduce and an all-gather give every rank the
same bits), but a sampler's random state need not agree, so generate.py broadcasts rank 0's token
every step: one 8-byte collective per token.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn

import checkpoint

# ----------------------------------------------------------------------------------------------
# The process group
# ----------------------------------------------------------------------------------------------

TIMEOUT_S = 600  # a collective that waits this long (a rank stopped without closing its sockets) fails


def init(device: str | None = None) -> torch.device:
    """Join the process group that torchrun's environment describes (RANK, WORLD_SIZE, MASTER_ADDR,
    ...): nccl with one GPU per process (LOCAL_RANK) on CUDA, gloo on CPU. Returns this rank's device."""
    kind = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")).type
    if kind == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ValueError(f"rank with LOCAL_RANK {local} has no GPU: this machine has "
                             f"{torch.cuda.device_count()}; start at most that many processes per node")
        torch.cuda.set_device(local)
        backend, place = "nccl", torch.device("cuda", local)
    elif kind == "cpu":
        backend, place = "gloo", torch.device("cpu")
    else:
        raise ValueError(f"parallel runs on cuda (nccl) or cpu (gloo), not {kind}")
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get("QWEN_DIST_TIMEOUT", TIMEOUT_S)))
        dist.init_process_group(backend, timeout=timeout)
    return place


class GroupStopped(Exception):
    """Under torchrun: the launcher is ending this process because another one stopped."""


def join_from_the_command_line(device: str | None = None) -> tuple[torch.device, bool]:
    """init() for generate.py's command line: (this rank's device, whether it keeps quiet). Rank 0
    alone prints and reads the keyboard, and turns torchrun's SIGTERM (sent when another rank stops)
    into GroupStopped; the others write nothing and end at once on a signal (a process waiting in a
    collective runs no Python)."""
    import signal
    import sys
    place = init(device)
    if dist.get_rank() == 0:
        def stopped(signum, frame):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one message, however many signals follow
            raise GroupStopped("another process of the group stopped; torchrun is ending the rest")
        signal.signal(signal.SIGTERM, stopped)
        return place, False
    sys.stdout = open(os.devnull, "w")
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    return place, True


def read_line(prompt: str) -> str:
    """input(); under torchrun rank 0 reads and every rank gets its line (EOFError on all at the end)."""
    if not dist.is_initialized():
        return input(prompt)
    line = [None]
    if dist.get_rank() == 0:
        try:
            line[0] = input(prompt)
        except EOFError:
            pass
    dist.broadcast_object_list(line, src=0)
    if line[0] is None:
        raise EOFError
    return line[0]


# ----------------------------------------------------------------------------------------------
# The layout: which slice of each weight a rank holds
# ----------------------------------------------------------------------------------------------

def split(n: int, world: int, rank: int) -> tuple[int, int]:
    """Rank's share [start, stop) of n units over `world` ranks: the first n % world ranks get one more."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


@dataclass
class Layout:
    """What one rank holds, decided by `plan` from the config alone."""
    rank: int                    # this process, 0 .. world - 1
    world: int                   # number of ranks N
    head_dim: int                # size of one attention head (rows of q/k/v per head)
    heads: tuple[int, int]       # query heads [start, stop) of this rank
    kv_heads: tuple[int, int]    # the key/value heads they use
    experts: tuple[int, int]     # routed experts [start, stop); (0, 0) without experts
    vocab_rows: int              # lm_head rows per rank, ceil(V / N) (the last rank's padded)


def plan(config, rank: int, world: int) -> Layout:
    """The layout of rank `rank` of `world` for a model config; a split that cannot work is refused
    with one line naming the sizes (before any weight is read)."""
    H, KVH = config.num_attention_heads, config.num_key_value_heads
    E = getattr(config, "num_experts", 0) or 0

    def fits(n):
        return H % n == 0 and (KVH % n == 0 or n % KVH == 0) and (not E or n <= E)

    if not fits(world):
        why = (f"{H} query heads do not divide by {world}" if H % world else
               f"{E} experts cannot give each of {world} ranks one" if KVH % world == 0 or world % KVH == 0
               else f"{KVH} key/value heads and {world} ranks: neither divides the other")
        sizes = [n for n in range(1, H + 1) if fits(n)]
        raise ValueError(f"cannot split this model over {world} ranks ({why}; num_attention_heads={H}, "
                         f"num_key_value_heads={KVH}{f', num_experts={E}' if E else ''}); "
                         f"use {', '.join(map(str, sizes))} ranks")
    per_rank = H // world
    if KVH >= world:
        kv_heads = (rank * KVH // world, (rank + 1) * KVH // world)
    else:  # each key/value head on world / KVH ranks: the one this rank's query heads use
        kv = rank * per_rank // (H // KVH)
        kv_heads = (kv, kv + 1)
    experts = split(E, world, rank) if E else (0, 0)
    return Layout(rank, world, config.head_dim, (rank * per_rank, (rank + 1) * per_rank), kv_heads, experts,
                  -(-config.vocab_size // world))


@dataclass
class Cut:
    """This rank's part of one tensor: [start, stop) along `dim`, then zero rows up to `pad_to`;
    zero=True: a zero tensor of the full shape (o_proj's bias, added by rank 0 alone)."""
    dim: int = 0
    start: int = 0
    stop: int = 0
    pad_to: int = 0
    zero: bool = False


def placement(name: str, shape: tuple, layout: Layout) -> Cut | None:
    """How parameter `name` (a Hugging Face name, full shape `shape`) is split; None: replicated."""
    D, (h0, h1), (k0, k1) = layout.head_dim, layout.heads, layout.kv_heads
    leaf = ".".join(name.split(".")[-2:])                      # "q_proj.weight", "experts.down_proj", ...
    if ".self_attn." in name:
        if leaf in ("q_proj.weight", "q_proj.bias"):
            return Cut(0, h0 * D, h1 * D)                      # column parallel: its query heads' rows
        if leaf in ("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias"):
            return Cut(0, k0 * D, k1 * D)                      # the key/value heads they use
        if leaf == "o_proj.weight":
            return Cut(1, h0 * D, h1 * D)                      # row parallel: their input columns
        if leaf == "o_proj.bias":                              # added once, after the sum
            return None if layout.rank == 0 else Cut(zero=True)
        return None                                            # q_norm, k_norm: per head_dim
    if ".mlp.experts." in name:                                # stacked (E, ., .): whole experts
        return Cut(0, *layout.experts)
    if ".mlp." in name and leaf in ("gate_proj.weight", "up_proj.weight"):
        return Cut(0, *split(shape[0], layout.world, layout.rank))   # column parallel (shared expert too)
    if ".mlp." in name and leaf == "down_proj.weight":
        return Cut(1, *split(shape[1], layout.world, layout.rank))   # row parallel
    if name == "lm_head.weight":                               # vocab parallel
        rows = layout.vocab_rows
        return Cut(0, min(layout.rank * rows, shape[0]), min((layout.rank + 1) * rows, shape[0]), rows)
    return None                                                # embedding, norms, router, gates


def cut(tensor: torch.Tensor, c: Cut | None) -> torch.Tensor:
    """Apply a Cut to a tensor in memory (on the meta device: the shape alone)."""
    if c is None:
        return tensor
    if c.zero:
        return torch.zeros_like(tensor)
    part = tensor.narrow(c.dim, c.start, c.stop - c.start)
    return pad(part, c)


def pad(part: torch.Tensor, c: Cut) -> torch.Tensor:
    if not c.pad_to or part.shape[c.dim] == c.pad_to:
        return part
    shape = list(part.shape)
    shape[c.dim] = c.pad_to - part.shape[c.dim]
    return torch.cat([part, part.new_zeros(shape)], dim=c.dim)


# ----------------------------------------------------------------------------------------------
# The collectives, as forward hooks (functional collectives: torch.compile traces them)
# ----------------------------------------------------------------------------------------------

def sum_over_ranks(module, args, output):
    """Forward hook: all-reduce the module's output (a MoE block's first output, its router logits
    being the same on every rank)."""
    if isinstance(output, tuple):
        return (funcol.all_reduce(output[0], "sum", dist.group.WORLD), *output[1:])
    return funcol.all_reduce(output, "sum", dist.group.WORLD)


def gather_vocab(vocab_size: int):
    """Forward hook for a vocab-parallel lm_head: (..., V/N) logits of every rank -> (..., V)."""
    def hook(module, args, logits):
        world, rows = dist.get_world_size(), logits.shape[-1]
        flat = logits.reshape(-1, rows)                                            # (M, V/N)
        parts = funcol.all_gather_single(flat.contiguous(), 0, dist.group.WORLD)   # (N*M, V/N) rank by rank
        full = parts.view(world, -1, rows).permute(1, 0, 2).reshape(flat.shape[0], world * rows)  # (M, N*V/N)
        return full[:, :vocab_size].view(*logits.shape[:-1], vocab_size)
    return hook


def expert_share(experts: nn.Module, first: int, count: int):
    """A forward for one layer's Experts module holding experts [first, first + count) as local
    experts [0, count): this rank's share of the routed output (the block's all-reduce adds the rest).
    The model file's own forward (its experts_function, whichever is installed) runs on the local pairs."""
    local_forward = type(experts).forward

    def forward(x, topk_ids, topk_weights):
        mine = (topk_ids >= first) & (topk_ids < first + count)                    # (N, K) pairs held here
        if torch.compiler.is_compiling():  # shapes that do not depend on the routing: every pair, the
            ids = torch.where(mine, topk_ids - first, 0)  # others weighted zero
            return local_forward(experts, x, ids, torch.where(mine, topk_weights, 0))
        token, pick = torch.nonzero(mine, as_tuple=True)                           # (P,) each
        out = torch.zeros_like(x)                                                  # (N, C)
        if len(token):
            ids, weights = topk_ids[token, pick] - first, topk_weights[token, pick]  # (P,) each
            y = local_forward(experts, x[token], ids[:, None], weights[:, None])   # (P, C)
            out.index_add_(0, token, y)
        return out
    return forward


# ----------------------------------------------------------------------------------------------
# Sharding a model
# ----------------------------------------------------------------------------------------------

def shard(model: nn.Module, layout: Layout) -> nn.Module:
    """Narrow `model` (any class of the three model files, loaded or on the meta device) to this
    rank's share in place and install the collectives; returns it. A tied lm_head gets its own
    vocab slice of the embedding."""
    if getattr(model, "parallel", None):
        raise ValueError("the model is already sharded")
    head = getattr(model, "lm_head", None)
    if layout.world > 1 and head is not None and head.weight is model.model.embed_tokens.weight:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)  # untied: sliced below
    for name, p in list(model.named_parameters()):
        c = placement(name, tuple(p.shape), layout)
        if c is not None and layout.world > 1:
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner)
            module._parameters[attr] = nn.Parameter(cut(p.detach(), c), requires_grad=False)
            if isinstance(module, nn.Linear):
                module.out_features, module.in_features = module.weight.shape
    if layout.world > 1:
        for name, module in model.named_modules():
            if hasattr(module, "q_proj") and hasattr(module, "n_heads"):           # attention
                module.n_heads = layout.heads[1] - layout.heads[0]
                module.n_kv_heads = layout.kv_heads[1] - layout.kv_heads[0]
                module.register_forward_hook(sum_over_ranks)
            elif name.endswith(".mlp"):                                            # dense MLP or MoE block
                module.register_forward_hook(sum_over_ranks)
            elif name.endswith(".mlp.experts"):
                first, stop = layout.experts
                module.forward = expert_share(module, first, stop - first)
        if head is not None:
            head.register_forward_hook(gather_vocab(model.config.vocab_size))
    model.parallel = layout
    return model


# ----------------------------------------------------------------------------------------------
# Loading a rank's share straight from the checkpoint
# ----------------------------------------------------------------------------------------------

def read(part, c: Cut | None, shape: tuple) -> tuple[torch.Tensor, int]:
    """Read a tensor's Cut from a safetensors slice object (only those bytes leave the file):
    (this rank's tensor, the number of bytes read)."""
    if c is None:
        tensor = part[:]
        return tensor, tensor.nbytes
    if c.zero:
        return torch.zeros(shape), 0
    tensor = part[(slice(None),) * c.dim + (slice(c.start, c.stop),)]
    return pad(tensor, c), tensor.nbytes


def from_pretrained(name_or_path: str, device=None, dtype=None, rank: int | None = None,
                    world: int | None = None, progress=None) -> nn.Module:
    """Load this rank's shard of a checkpoint (any class the model files build) for `world` ranks
    (default: the process group's rank and size, else torchrun's RANK and WORLD_SIZE). Each tensor
    is read as the slice this rank holds; other ranks' experts are not read at all. The number of
    bytes read is in model.bytes_read. progress(done, total): as checkpoint.load."""
    if rank is None:
        rank, world = ((dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else
                       (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))))
    ckpt = checkpoint.open_checkpoint(name_or_path, dtype)
    if ckpt.raw.get("quantization"):
        raise ValueError(f"{name_or_path} is quantized (quantize.save): shard the full-precision checkpoint "
                         f"and quantize each rank's share (generate.py --quantize does)")
    layout = plan(ckpt.config, rank, world)
    device = torch.device(device or "cpu")
    model = ckpt.build()
    full = {n: tuple(p.shape) for n, p in model.named_parameters()}  # the full shapes, for the checks
    tied = ckpt.config.tie_word_embeddings and "lm_head.weight" not in full and hasattr(model, "lm_head")
    table = checkpoint.backbone_of(model) + "embed_tokens.weight"
    shard(model, layout)
    model.bytes_read, sliced = 0, set()

    def read_slice(f, name, target):  # only this rank's bytes leave the file
        tensor, nbytes = read(f.get_slice(name), placement(target, full[target], layout), full[target])
        model.bytes_read += nbytes
        sliced.add(target)
        return tensor

    def put(name, tensor):
        if name not in sliced:  # a stack of this rank's experts, read one by one
            model.bytes_read += tensor.nbytes
        ckpt.module.set_parameter(model, name, tensor.to(device=device, dtype=ckpt.dtype))
        if tied and layout.world > 1 and name == table:  # the tied lm_head: its vocab slice of the embedding
            c = placement("lm_head.weight", tuple(tensor.shape), layout)
            ckpt.module.set_parameter(model, "lm_head.weight", cut(tensor, c).to(device, ckpt.dtype))

    first, stop = layout.experts
    checkpoint.load(ckpt, model, device, expected=full, put=put, experts=lambda stack: (first, stop - first),
                    read=read_slice, progress=progress)
    return checkpoint.finish(ckpt, model, device)  # (one rank: the tied lm_head is tied there)
