"""Exercise 9, the load-balancing loss (docs/exercises/load_balancing.md): load_balancing_loss against
qwen2_moe.load_balancing_loss (transformers' load_balancing_loss_func)."""
import torch

from . import reference
from ._harness import call, compare, fail, function, run

PAGE = "exercises/load_balancing.md"


def check(impl):
    load_balancing_loss = function(impl, "load_balancing_loss")
    gen = torch.Generator().manual_seed(0)
    B, T, E, K = 2, 6, 8, 2
    layers = tuple(torch.randn(B * T, E, generator=gen) * 2 for _ in range(3))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :2] = 0  # left padding in row 0
    cases = [
        ("one layer", layers[:1], None, 1e-5),
        ("three layers", layers, None, 1e-5),
        ("three layers, row 0 left-padded by 2 (token_mask)", layers, mask, 1e-5),
        ("uniform router (all logits 0): the loss equals top_k", (torch.zeros(B * T, E),), None, 1e-5),
        ("one layer in bfloat16", (layers[0].to(torch.bfloat16),), None, 1e-2),
    ]
    for what, logits, token_mask, rtol in cases:
        case = (f"{what}: load_balancing_loss({len(logits)} x {tuple(logits[0].shape)}, num_experts={E}, "
                f"top_k={K}" + (", token_mask)" if token_mask is not None else ")"))
        got = call(load_balancing_loss, logits, E, K, token_mask, case=case)
        want = reference.load_balancing_loss(logits, E, K, token_mask)
        if not torch.is_tensor(got) or got.numel() != 1:
            fail(f"{case}: return a scalar tensor, got {got!r}"[:300])
        got = got.reshape(()).float()
        causes = [(want / E, "the sum over experts is not multiplied by num_experts"),
                  (want * E, "num_experts is applied twice")]
        if token_mask is not None:
            causes.append((reference.load_balancing_loss(logits, E, K, None).float(),
                           "the padded tokens (token_mask 0) are counted; leave them out of both means"))
        if len(logits) > 1:
            per_layer = torch.stack([reference.load_balancing_loss((l,), E, K, token_mask) for l in logits])
            causes += [(per_layer.sum().float(), "you add one loss per layer; concatenate the layers' router "
                                                 "logits and compute one loss over all rows"),
                       (per_layer.mean().float(), "you average per-layer losses; concatenate the layers' "
                                                  "rows and compute the loss once")]
        compare(got, want.float(), case, atol=1e-6, rtol=rtol, causes=causes)


def test_load_balancing(request):
    run(request, check, PAGE)
