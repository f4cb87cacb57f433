"""Exercise 2, RoPE (docs/exercises/rope.md): rope_cos_sin, rotate_half and apply_rope against
qwen2.RotaryEmbedding, qwen2.rotate_half and qwen2.apply_rope."""
import torch

from . import reference
from ._harness import call, compare, fail, function, run

PAGE = "exercises/rope.md"


def wrong_tables(positions, head_dim, theta, dtype):
    """cos/sin from frequencies built in three wrong ways, each with its explanation."""
    def tables(inv_freq, layout="cat"):
        freqs = positions.float()[..., None] * inv_freq
        emb = torch.cat((freqs, freqs), -1) if layout == "cat" else freqs.repeat_interleave(2, -1)
        return emb.cos().to(dtype), emb.sin().to(dtype)
    even = torch.arange(0, head_dim, 2, dtype=torch.float32)
    return [
        (tables(1.0 / theta ** (even / 2 / head_dim)), "the exponent is i / head_dim; it is 2i / head_dim "
         "(arange(0, head_dim, 2) / head_dim)"),
        (tables(1.0 / theta ** (even / head_dim), "interleave"), "the frequencies are repeated pairwise "
         "(f0, f0, f1, f1, ...); Qwen concatenates two copies (f0, f1, ..., f0, f1, ...)"),
        (tables(theta ** (even / head_dim)), "these are frequencies of theta ** (2i/d); the inverse "
         "frequency is 1 / theta ** (2i/d)"),
    ]


def check(impl):
    rope_cos_sin, rotate_half, apply_rope = (function(impl, n)
                                             for n in ("rope_cos_sin", "rotate_half", "apply_rope"))
    gen = torch.Generator().manual_seed(0)
    for head_dim, theta, dtype in [(64, 10000.0, torch.float32), (128, 1e6, torch.float32),
                                   (32, 10000.0, torch.bfloat16)]:
        positions = torch.randint(0, 500, (2, 7), generator=gen)
        case = (f"rope_cos_sin(positions {tuple(positions.shape)}, head_dim {head_dim}, theta {theta:g}, "
                f"{str(dtype)[6:]})")
        got = call(rope_cos_sin, positions, head_dim, theta, dtype, case=case)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            fail(f"{case}: return (cos, sin), a pair of tensors")
        want = reference.rope_cos_sin(positions, head_dim, theta, dtype)
        wrong = wrong_tables(positions, head_dim, theta, dtype)
        atol = 5e-4 if dtype == torch.float32 else 8e-3
        for i, name in enumerate(("cos", "sin")):
            compare(got[i], want[i], f"{case}: {name}", atol=atol, causes=[(w[i], why) for w, why in wrong])

    for shape in [(2, 3, 5, 8), (1, 4, 1, 64)]:
        x = torch.randn(shape, generator=gen)
        x1, x2 = x.chunk(2, -1)
        case = f"rotate_half(x {shape})"
        compare(call(rotate_half, x, case=case), reference.rotate_half(x), case, causes=[
            (torch.stack((-x[..., 1::2], x[..., 0::2]), -1).flatten(-2),
             "you rotate interleaved pairs (x0, x1), (x2, x3), ... (GPT-J / Meta's complex form); Qwen pairs "
             "x[i] with x[i + D/2]: cat(-x2, x1) of the halves"),
            (torch.cat((x2, -x1), -1),
             "the sign is on the wrong half: the result is cat(-second half, first half)"),
            (torch.cat((-x1, x2), -1), "the halves are not swapped"),
        ])

    B, H, T, D = 2, 3, 6, 16
    x = torch.randn(B, H, T, D, generator=gen)
    cos, sin = reference.rope_cos_sin(torch.arange(T).expand(B, T) + 3, D, 10000.0, torch.float32)
    case = f"apply_rope(x {(B, H, T, D)}, cos/sin {(B, T, D)})"
    got = call(apply_rope, x, cos, sin, case=case)
    compare(got, reference.apply_rope(x, cos, sin), case, atol=1e-6, causes=[
        (x * cos[:, None] - reference.rotate_half(x) * sin[:, None], "the sine term has the wrong sign: "
         "x * cos + rotate_half(x) * sin"),
        (x * cos[:, None] + x * sin[:, None], "rotate_half is missing from the sine term"),
    ])


def test_rope(request):
    run(request, check, PAGE)
