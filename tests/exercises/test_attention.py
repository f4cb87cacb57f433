"""Exercise 4, grouped-query attention (docs/exercises/attention.md): gqa_attention against
qwen2.reference_attention (what transformers' eager attention computes)."""
import torch

from . import reference
from ._harness import call, compare, function, run

PAGE = "exercises/attention.md"
PAD = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1, 1]])
CASES = [  # (B, H, KVH, T, S, D, dtype, mask, what)
    (2, 8, 2, 5, 9, 16, torch.float32, "causal",
     "GQA, 4 query heads per KV head, a chunk after 4 cached tokens"),
    (2, 8, 2, 1, 9, 16, torch.float32, None, "GQA, one decode step, no mask"),
    (1, 4, 1, 6, 6, 32, torch.float32, "window", "multi-query (one KV head), window 3"),
    (2, 4, 4, 5, 9, 16, torch.float32, "padded", "plain multi-head, left padding in row 0"),
    (2, 6, 2, 5, 9, 32, torch.bfloat16, "causal", "GQA in bfloat16"),
]


def make_mask(kind, B, T, S):
    slots = torch.arange(S - T, S)
    if kind == "causal":
        return reference.visibility_mask(slots, S, None, None)
    if kind == "window":
        return reference.visibility_mask(slots, S, 3, None)
    if kind == "padded":
        return reference.visibility_mask(slots, S, None, PAD[:B, :S])
    return None


def check(impl):
    gqa_attention = function(impl, "gqa_attention")
    gen = torch.Generator().manual_seed(0)
    for B, H, KVH, T, S, D, dtype, kind, what in CASES:
        q = torch.randn(B, H, T, D, generator=gen).to(dtype)
        k = torch.randn(B, KVH, S, D, generator=gen).to(dtype)
        v = torch.randn(B, KVH, S, D, generator=gen).to(dtype)
        mask, scale = make_mask(kind, B, T, S), D ** -0.5
        case = (f"{what}: q {tuple(q.shape)}, k/v {tuple(k.shape)} {str(dtype)[6:]}, "
                f"mask {None if mask is None else tuple(mask.shape)}")
        got = call(gqa_attention, q, k, v, mask, scale, case=case)
        want = reference.gqa_attention(q, k, v, mask, scale)
        G = H // KVH
        causes = [(reference.gqa_attention(q, k, v, mask, 1.0),
                   "the scores are not scaled: multiply q @ k^T by `scale`"),
                  (reference.gqa_attention(q, k, v, mask, scale ** 2), "the scores are scaled by 1/D; the "
                   "scale given is 1/sqrt(D): use it as given")]
        if G > 1 and KVH > 1:
            modulo = reference.gqa_attention(q, k.repeat(1, G, 1, 1), v.repeat(1, G, 1, 1), mask, scale)
            causes.append((modulo,
                           f"query head h reads KV head h % {KVH}; it reads KV head h // {G} (consecutive "
                           f"query heads share a KV head: repeat_interleave, not repeat)"))
        if mask is not None:
            causes.append((reference.gqa_attention(q, k, v, None, scale), "the mask is ignored"))
        atol = 1e-5 if dtype == torch.float32 else 2e-2
        compare(got, want, case, atol=atol, causes=causes)


def test_attention(request):
    run(request, check, PAGE)
