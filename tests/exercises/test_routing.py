"""Exercise 7, top-k routing (docs/exercises/routing.md): route against qwen2_moe.route, with and
without renormalising the top-k weights (norm_topk_prob)."""
import torch

from . import reference
from ._harness import call, compare, fail, function, run

PAGE = "exercises/routing.md"
CASES = [  # (N tokens, E experts, K, dtype, norm_topk_prob)
    (10, 8, 2, torch.float32, False), (10, 8, 2, torch.float32, True),
    (6, 60, 4, torch.bfloat16, False), (6, 64, 8, torch.bfloat16, True),
]


def by_id(weights, ids):
    """Each row's (weight, id) pairs ordered by expert id: any order of the K picks is accepted."""
    order = ids.argsort(-1)
    return weights.gather(-1, order), ids.gather(-1, order)


def check(impl):
    route = function(impl, "route")
    gen = torch.Generator().manual_seed(0)
    for N, E, K, dtype, norm in CASES:
        logits = (torch.randn(N, E, generator=gen) * 2).to(dtype)
        case = f"route(router_logits {(N, E)} {str(dtype)[6:]}, top_k={K}, norm_topk_prob={norm})"
        got = call(route, logits, K, norm, case=case)
        if not isinstance(got, (tuple, list)) or len(got) != 2 or not all(torch.is_tensor(t) for t in got):
            fail(f"{case}: return (weights, ids), two (N, K) tensors")
        want_w, want_ids = reference.route(logits, K, norm)
        if got[1].shape != want_ids.shape or got[0].shape != want_w.shape:
            fail(f"{case}: weights {tuple(got[0].shape)} and ids {tuple(got[1].shape)}; both should be "
                 f"{(N, K)} (did you swap them? return (weights, ids))")
        w, ids = by_id(got[0], got[1].long())
        want_w, want_ids = by_id(want_w, want_ids)
        if not torch.equal(ids, want_ids):
            row = int((ids != want_ids).any(-1).nonzero()[0])
            fail(f"{case}: row {row} picks experts {sorted(ids[row].tolist())}, the reference "
                 f"{sorted(want_ids[row].tolist())} (the K experts with the largest router probability)")
        p32 = torch.softmax(logits, -1, dtype=torch.float32)
        top = p32.gather(-1, want_ids)
        causes = [(by_id(*reference.route(logits, K, not norm))[0],
                   "the weights are renormalised to sum to 1 although norm_topk_prob is False"
                   if not norm else "norm_topk_prob is True: divide the K weights by their sum"),
                  (top, "the weights must come back in the logits' dtype")]
        if norm:  # Hint 2's trap, a cast before the renormalisation: the same numbers as a bf16 softmax
            cast_first = top.to(dtype)
            causes.append((cast_first / cast_first.sum(-1, keepdim=True), "the weights were rounded to the "
                           "logits' dtype before the renormalisation: you cast them before renormalising "
                           "(Hint 2), or the softmax runs in the logits' dtype; run the softmax in float32, "
                           "renormalise, and cast at the end"))
        causes += [(torch.softmax(logits, -1).gather(-1, want_ids).to(dtype) if not norm else
                   (lambda t: t / t.sum(-1, keepdim=True))(torch.softmax(logits, -1).gather(-1, want_ids)),
                   "the softmax runs in the logits' dtype; run it in float32 (softmax(..., "
                   "dtype=torch.float32)) and cast the weights back at the end")]
        if not norm:  # (with norm_topk_prob, a softmax over the K chosen logits is the right answer)
            causes.append((torch.softmax(logits.float().gather(-1, want_ids), -1).to(dtype),
                           "the softmax is taken over the K chosen logits only; take it over all E "
                           "experts, then pick"))
        compare(w, want_w, case + ": weights", atol=1e-6 if dtype == torch.float32 else 0, causes=causes)


def test_routing(request):
    run(request, check, PAGE)
