"""Exercise 11, YaRN (docs/exercises/yarn.md): yarn_frequencies against qwen2.rope_frequencies with
rope_type "yarn" (what transformers' _compute_yarn_parameters computes)."""
import math

import torch

from . import reference
from ._harness import call, compare, fail, function, run

PAGE = "exercises/yarn.md"
CASES = [  # (head_dim, theta, factor, original_max_position_embeddings, beta_fast, beta_slow)
    (128, 1e6, 4.0, 32768, 32.0, 1.0),   # the long-context setting of the Qwen2.5 / Qwen3 model cards
    (64, 10000.0, 2.0, 4096, 32.0, 1.0),
    (128, 1e6, 8.0, 8192, 16.0, 2.0),
]


def check(impl):
    yarn_frequencies = function(impl, "yarn_frequencies")
    for head_dim, theta, factor, original, fast, slow in CASES:
        case = (f"yarn_frequencies(head_dim={head_dim}, theta={theta:g}, factor={factor:g}, "
                f"original_max_position_embeddings={original}, beta_fast={fast:g}, beta_slow={slow:g})")
        got = call(yarn_frequencies, head_dim, theta, factor, original, fast, slow, case=case)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            fail(f"{case}: return (inv_freq, attention_scaling)")
        inv_freq, scaling = reference.yarn_frequencies(head_dim, theta, factor, original, fast, slow)
        plain = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        compare(got[0], inv_freq, case + ": inv_freq", rtol=1e-5, causes=[
            (plain, "these are the unscaled frequencies: the low frequencies (long wavelengths) must be "
                    "divided by factor"),
            (plain / factor, "every frequency is divided by factor (that is linear scaling); the high "
                             "frequencies keep their value, with a linear ramp between the two correction "
                             "dimensions"),
            (plain / factor + plain - inv_freq, "the ramp runs the wrong way: the high frequencies (first "
                                                "dimensions) keep their value, the low ones are divided by "
                                                "factor")])
        try:
            ok = math.isclose(float(got[1]), scaling, rel_tol=1e-6)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            fail(f"{case}: attention_scaling {got[1]!r}, expected {scaling:.6f} (0.1 * ln(factor) + 1)")


def test_yarn(request):
    run(request, check, PAGE)
