"""The routed experts in torch, fast: what `install` puts into the MoE files' `Experts.experts_function`
where the fused Triton kernel does not run (on CPU, and on CUDA with kernels="torch").

The model files keep `experts_reference`, a loop over the experts that received tokens. The two
paths here compute the same function (tests/test_kernels_models.py holds them to the reference):

    out[n] = sum_k topk_weights[n, k] * down_e(silu(gate_e(x[n])) * up_e(x[n])),  e = topk_ids[n, k]

    x (N, C) tokens, w_gate_up (E, 2I, C) [rows [0, I) the gate projection, rows [I, 2I) the up
    projection], w_down (E, C, I), topk_ids (N, K) int, topk_weights (N, K)  ->  (N, C) in x.dtype

`experts_grouped` sorts the pairs by expert and runs one matmul per active expert; its loop depends
on the data (a host sync), so under torch.compile `torch_experts` takes `experts_gathered`, whose
shapes do not. The weights may be tensors or quantize.py's QuantizedStack (indexing it dequantizes
only the experts asked for).
"""
import torch
import torch.nn.functional as F


def experts_grouped(x, w_gate_up, w_down, topk_ids, topk_weights):
    """The N*K (token, expert) pairs sorted by expert, so each active expert works on one contiguous
    block of rows: one matmul per active expert and projection, everything else (SiLU, routing
    weights, the sum over K) done once for all rows. Experts that received no token are never read (a
    batch-1 decode step reads exactly its K experts). Only gathers (index_select) move rows:
    index_add_ is slow on CPU. The sum over each token's K rows is transformers' grouped_mm order too,
    so in bf16 the result equals transformers' bit for bit."""
    N, K = topk_ids.shape
    pair_expert = topk_ids.reshape(-1)                                    # (P,) expert of pair p = n*K + k
    order = torch.argsort(pair_expert, stable=True)                       # (P,) pairs grouped by expert
    counts = torch.bincount(pair_expert, minlength=w_down.shape[0]).tolist()  # pairs per expert (host sync)
    groups, start = [], 0                                                 # (expert, its rows), active only
    for e, n in enumerate(counts):
        if n:
            groups.append((e, slice(start, start + n)))
            start += n
    xs = x.index_select(0, order // K)                                    # (P, C) each pair's token, grouped
    gate_up = torch.cat([F.linear(xs[rows], w_gate_up[e]) for e, rows in groups])  # (P, 2I)
    gate, up = gate_up.chunk(2, dim=-1)                                   # (P, I) each
    h = F.silu(gate) * up                                                 # (P, I)
    y = torch.cat([F.linear(h[rows], w_down[e]) for e, rows in groups])   # (P, C)
    y = y * topk_weights.reshape(-1, 1).index_select(0, order)            # (P, C) times each routing weight
    y = y.index_select(0, torch.argsort(order))                           # (P, C) back in pair order
    return y.view(N, K, -1).sum(dim=1)                                    # (N, C) each token's K rows summed


def experts_gathered(x, w_gate_up, w_down, topk_ids, topk_weights):
    """Shapes that do not depend on the routing, for torch.compile and CUDA graphs: each pair gathers
    its expert's weights, (N, K, 2I, C). It reads only the chosen experts but copies them, so it suits
    decode steps (N small) only."""
    gate_up = torch.einsum("nc,nkoc->nko", x, w_gate_up[topk_ids])        # (N, K, 2I)
    gate, up = gate_up.chunk(2, dim=-1)                                   # (N, K, I) each
    y = torch.einsum("nki,nkci->nkc", F.silu(gate) * up, w_down[topk_ids])  # (N, K, C)
    return (y * topk_weights[..., None]).sum(dim=1)                       # (N, C)


def torch_experts(x, w_gate_up, w_down, topk_ids, topk_weights):
    """experts_grouped, or experts_gathered inside torch.compile (decided while tracing)."""
    if torch.compiler.is_compiling():
        return experts_gathered(x, w_gate_up, w_down, topk_ids, topk_weights)
    return experts_grouped(x, w_gate_up, w_down, topk_ids, topk_weights)
