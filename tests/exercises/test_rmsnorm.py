"""Exercise 1, RMSNorm (docs/exercises/rmsnorm.md): rms_norm against qwen2.RMSNorm."""
import torch

from . import reference
from ._harness import call, compare, function, run

PAGE = "exercises/rmsnorm.md"
CASES = [  # (shape, dtype, eps, scale of x)
    ((2, 5, 64), torch.float32, 1e-6, 1.0),
    ((3, 16), torch.bfloat16, 1e-6, 1.0),
    ((1, 7, 96), torch.float16, 1e-6, 1.0),
    ((4, 9, 64), torch.bfloat16, 1e-6, 3.0),
    ((6, 32), torch.float32, 1e-5, 1e-3),  # mean square ~ eps: eps must sit inside the square root
]


def check(impl):
    rms_norm = function(impl, "rms_norm")
    gen = torch.Generator().manual_seed(0)
    for shape, dtype, eps, scale in CASES:
        x = (torch.randn(shape, generator=gen) * scale).to(dtype)
        weight = (1 + 0.2 * torch.randn(shape[-1], generator=gen)).to(dtype)
        case = f"x {tuple(shape)} {str(dtype)[6:]}, eps {eps:g}"
        got = call(rms_norm, x, weight, eps, case=case)
        x32 = x.float()
        inv = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        causes = [
            ((weight * (x32 * inv)).to(dtype), "you multiply by the weight before casting back to the input "
             "dtype; cast the normalised x to x.dtype first, then multiply by the weight (transformers' "
             "order)"),
            (weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)),
             "the mean of squares is computed in the input dtype; compute it in float32"),
            (weight * (x32 / (x32.pow(2).mean(-1, keepdim=True).sqrt() + eps)).to(dtype),
             "eps is added outside the square root; it goes inside: rsqrt(mean(x^2) + eps)"),
            (weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True))).to(dtype), "eps is missing"),
            (weight * ((x32 - x32.mean(-1, keepdim=True))
                       * torch.rsqrt(x32.var(-1, keepdim=True, unbiased=False) + eps)).to(dtype),
             "you subtract the mean (that is LayerNorm); RMSNorm does not center"),
            ((x32 * inv).to(dtype), "the weight is missing"),
        ]
        exact = dtype != torch.float32
        compare(got, reference.rms_norm(x, weight, eps), case, atol=0 if exact else 1e-5,
                allowed=0.01 if exact else 0, causes=causes)


def test_rmsnorm(request):
    run(request, check, PAGE)
