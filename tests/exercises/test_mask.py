"""Exercise 3, the attention mask (docs/exercises/mask.md): visibility_mask against qwen2.visibility_mask."""
import torch

from . import reference
from ._harness import call, compare, fail, function, run

PAGE = "exercises/mask.md"

PAD = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])  # row 0: two slots of left padding
CASES = [  # (q_slots, S, window, key_mask, what)
    (torch.arange(6), 6, None, None, "prefill of 6 tokens, causal"),
    (torch.arange(8), 8, 3, None, "prefill of 8 tokens, window 3"),
    (torch.arange(4, 7), 7, None, None, "a chunk at slots 4..6 after 4 cached tokens"),
    (torch.arange(4, 7), 7, 2, None, "a chunk at slots 4..6, window 2"),
    (torch.tensor([9]), 10, 4, None, "one decode step at slot 9, window 4"),
    (torch.tensor([5]), 12, None, None, "static decode at slot 5 over a 12-slot cache"),
    (torch.arange(6), 6, None, PAD, "prefill of 6 with left padding (key_mask)"),
    (torch.arange(8), 8, 3, PAD, "prefill of 8 with left padding, window 3"),
]


def check(impl):
    visibility_mask = function(impl, "visibility_mask")
    for q_slots, S, window, key_mask, what in CASES:
        case = f"{what}: visibility_mask(q_slots={q_slots.tolist()}, S={S}, window={window}" + \
               (", key_mask given)" if key_mask is not None else ")")
        got = call(visibility_mask, q_slots, S, window, key_mask, case=case)
        want = reference.visibility_mask(q_slots, S, window, key_mask)
        q, k = q_slots[:, None], torch.arange(S)[None, :]
        causes = [(torch.ones(1, 1, len(q_slots), S, dtype=torch.bool), "nothing is hidden")]
        if window is not None:
            causes += [((k <= q)[None, None], "the window is ignored"),
                       (((k <= q) & (k >= q - window))[None, None],
                        f"your window lets each query see {window + 1} keys; it sees exactly window = "
                        f"{window} keys, its own slot included (j > i - window)"),
                       (((k <= q) & (k > q - window + 1))[None, None],
                        f"your window lets each query see {window - 1} keys; it sees exactly window = "
                        f"{window}, its own slot included"),
                       ((k > q - window)[None, None], "the causal part is missing: j <= i")]
        if key_mask is not None:
            base = reference.visibility_mask(q_slots, S, window, None)
            causes += [(base, "key_mask is ignored: slots where key_mask is 0 must be hidden"),
                       (base & key_mask[:, None, None, :S].bool(), "a padding query now sees no key at all, "
                        "so its softmax is 0/0 = NaN; let every query see its own slot")]
        comparable = torch.is_tensor(got) and got.shape == want.shape and got.dtype == torch.bool
        if comparable and (got != want).any():
            b, _, t, j = (int(i) for i in (got != want).nonzero()[0])
            where = (f" (row {b}, query at slot {int(q_slots[t])}, key slot {j}: yours "
                     f"{bool(got[b, 0, t, j])}, expected {bool(want[b, 0, t, j])})")
            likely = [why for alt, why in causes if torch.equal(alt.expand_as(want), got)]
            fail(f"{case}: {int((got != want).sum())} of {want.numel()} entries differ{where}." +
                 (f" Likely cause: {likely[0]}" if likely else ""))
        compare(got, want, case, causes=causes)


def test_mask(request):
    run(request, check, PAGE)
