"""Exercise 8, the MoE block with its shared expert (docs/exercises/shared_expert.md): moe_block
against qwen2_moe.SparseMoeBlock (routed experts + sigmoid-gated shared expert)."""
import torch
import torch.nn.functional as F

from . import reference
from ._harness import call, compare, function, run

PAGE = "exercises/shared_expert.md"
CASES = [  # (B, T, H, E, K, I, Is, norm_topk_prob)
    (2, 5, 16, 6, 2, 8, 12, False), (1, 7, 16, 8, 3, 8, 24, True), (3, 1, 32, 4, 1, 16, 16, False),
]


def check(impl):
    moe_block = function(impl, "moe_block")
    gen = torch.Generator().manual_seed(0)
    for B, T, H, E, K, I, Is, norm in CASES:
        def rand(*shape, std=0.3):
            return torch.randn(*shape, generator=gen) * std
        x = rand(B, T, H, std=1.0)
        args = dict(router_weight=rand(E, H, std=1.0), w_gate_up=rand(E, 2 * I, H), w_down=rand(E, H, I),
                    shared_gate_proj=rand(Is, H), shared_up_proj=rand(Is, H), shared_down_proj=rand(H, Is),
                    shared_expert_gate=rand(1, H, std=1.0), top_k=K, norm_topk_prob=norm)
        case = (f"moe_block(x {(B, T, H)}, {E} experts, top_k={K}, expert width {I}, shared width {Is}, "
                f"norm_topk_prob={norm})")
        got = call(moe_block, x.clone(), *args.values(), case=case)
        want = reference.moe_block(x, **args)
        routed = reference.moe_block(x, **{**args, "shared_down_proj": torch.zeros(H, Is)})
        shared = F.linear(F.silu(F.linear(x, args["shared_gate_proj"])) * F.linear(x, args["shared_up_proj"]),
                          args["shared_down_proj"])                                # the ungated shared expert
        causes = [(routed,
                   "the shared expert is missing: add sigmoid(x @ shared_expert_gate.T) * shared_expert(x)"),
                  (routed + shared, "the shared expert is not gated: multiply it by sigmoid(x @ "
                                    "shared_expert_gate.T), one scalar per token"),
                  (routed + shared * (x @ args["shared_expert_gate"].T), "the gate needs a sigmoid"),
                  (reference.moe_block(x, **{**args, "norm_topk_prob": not norm}),
                   "norm_topk_prob is not followed: renormalise the top-k weights only when it is True"),
                  (want - routed, "the routed experts are missing")]
        compare(got, want, case, atol=1e-5, causes=causes)


def test_shared_expert(request):
    run(request, check, PAGE)
