"""Exercise 6, sampling (docs/exercises/sampling.md): sampling_probs against the distribution
generate.sample draws from (temperature, then top-k, then top-p, as transformers orders them)."""
import torch

from . import reference
from ._harness import call, compare, fail, function, run

PAGE = "exercises/sampling.md"
CASES = [  # (temperature, top_k, top_p)
    (0.7, 0, 1.0), (1.0, 10, 1.0), (1.0, 0, 0.9), (0.8, 5, 0.5), (1.3, 20, 0.95), (1.0, 0, 0.01),
    (0.6, 3, 0.8),
]


def kept(probs, row):
    return sorted(int(i) for i in (probs[row] > 0).nonzero().flatten())


def check(impl):
    sampling_probs = function(impl, "sampling_probs")
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 60, generator=gen) * 3
    for temperature, top_k, top_p in CASES:
        case = (f"sampling_probs(logits {tuple(logits.shape)}, temperature={temperature}, top_k={top_k}, "
                f"top_p={top_p})")
        got = call(sampling_probs, logits.clone(), temperature, top_k, top_p, case=case)
        want = reference.sampling_probs(logits.clone(), temperature, top_k, top_p)
        if not torch.is_tensor(got) or got.shape != want.shape:
            compare(got, want, case)
        got = got.float()
        causes = [(reference.sampling_probs(logits * temperature ** 2, temperature, top_k, top_p),
                   "the logits are multiplied by the temperature; divide them by it"),
                  (torch.softmax(logits / temperature, -1) * (want > 0), "the kept probabilities are not "
                   "renormalised: filter the logits (set the dropped ones to -inf), then take the softmax")]
        if top_p < 1.0:
            if top_k:
                p_first = reference.sampling_probs(logits, temperature, 0, top_p) > 0
                p_then_k = reference.sampling_probs(logits.masked_fill(~p_first, float("-inf")), temperature,
                                                    top_k, 1.0)
                causes.append((p_then_k, "top-p is applied before top-k; transformers (and generate.py) "
                                         "apply temperature, then top-k, then top-p"))
            top_k_only = reference.sampling_probs(logits, temperature, top_k, 1.0)
            probs, order = torch.sort(top_k_only, descending=True)
            keep_sorted = probs.cumsum(-1) <= top_p
            keep_sorted[:, 0] = True
            keep = keep_sorted.scatter(1, order, keep_sorted)
            alt = reference.sampling_probs(logits.masked_fill(~keep, float("-inf")), temperature, 0, 1.0)
            causes.append((alt, "your nucleus stops before the token that crosses top_p; keep the smallest "
                                "set of most likely tokens whose probabilities add up to at least top_p"))
        for row in range(logits.shape[0]):
            if kept(got, row) != kept(want, row):
                likely = [why for alt, why in causes if torch.allclose(got, alt, atol=1e-6)]
                yours, ref = kept(got, row), kept(want, row)
                fail(f"{case}: row {row} keeps {len(yours)} tokens, the reference keeps {len(ref)} "
                     f"(only yours: {sorted(set(yours) - set(ref))[:8]}, only the reference's: "
                     f"{sorted(set(ref) - set(yours))[:8]})."
                     + (f" Likely cause: {likely[0]}" if likely else ""))
        compare(got, want, case, atol=1e-6, causes=causes)


def test_sampling(request):
    run(request, check, PAGE)
