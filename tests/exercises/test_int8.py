"""Exercise 13, weight-only int8 (docs/exercises/int8.md): quantize_int8 and dequantize_int8 against
quantize.py's."""
import torch

from . import reference
from ._harness import call, compare, fail, function, run

PAGE = "exercises/int8.md"
CASES = [  # (N, K, dtype of w, dtype of the scales)
    (8, 16, torch.float32, torch.float32),
    (12, 12, torch.float32, torch.float32),
    (32, 64, torch.bfloat16, torch.bfloat16),
    (5, 96, torch.float32, torch.bfloat16),
]


def check(impl):
    quantize_int8 = function(impl, "quantize_int8")
    dequantize_int8 = function(impl, "dequantize_int8")
    gen = torch.Generator().manual_seed(0)
    for N, K, w_dtype, dtype in CASES:
        # rows of very different sizes, so that a single scale for all of them shows
        w = (torch.randn(N, K, generator=gen) * torch.rand(N, 1, generator=gen)).to(w_dtype)
        case = f"quantize_int8(w {(N, K)} {str(w_dtype)[6:]}, {str(dtype)[6:]})"
        got = call(quantize_int8, w, dtype, case=case)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            fail(f"{case}: return (q, s), a pair of tensors")
        q, s = got
        want_q, want_s = reference.quantize_int8(w, dtype)
        w32 = w.float()
        row_max, all_max, col_max = w32.abs().amax(1), w32.abs().amax(), w32.abs().amax(0)
        compare(s, want_s, case + ": s", atol=0, rtol=0, causes=[
            ((all_max / 127).expand(N).to(dtype), "one scale for the whole matrix; each output channel (row) "
                                                  "gets its own, max |w[n, :]| / 127"),
            ((row_max / 128).to(dtype), "the largest weight must map to 127: divide by 127, not 128"),
            ((row_max / 255).to(dtype), "symmetric int8 uses [-127, 127]: divide by 127, not 255"),
            (row_max.to(dtype), "s is the size of one step, max |w| / 127, not max |w|")])
        if N == K:  # (a per-column scale has the right shape only for a square matrix)
            compare(s, want_s, case + ": s", causes=[
                ((col_max / 127).to(dtype), "the scale runs along the wrong axis: one per output channel "
                                            "(row), not per column")])
        compare(q, want_q, case + ": q", allowed=0.002, causes=[
            (torch.trunc(w32 / want_s.float()[:, None]).to(torch.int8), "you truncate; round to the nearest "
                                                                         "integer (torch.round)"),
            (torch.round(w32 / (row_max / 127)[:, None]).clamp(-127, 127).to(torch.int8),
             "q is rounded against the exact scale; round it against the scale as stored (in `dtype`), or "
             "the scale's own rounding adds to every weight's error")])
        back = call(dequantize_int8, want_q, want_s, w_dtype, case=f"dequantize_int8 of {case}")
        compare(back, reference.dequantize_int8(want_q, want_s, w_dtype), f"dequantize_int8 of {case}",
                atol=1e-6 if w_dtype == torch.float32 else 0, allowed=0.01 if w_dtype != torch.float32 else 0,
                causes=[(want_q.to(w_dtype), "multiply by the scale: w ~ q * s[n]")])


def test_int8(request):
    run(request, check, PAGE)
