"""Triton kernels (qwen_kernels/) against their plain-torch references.

Without CUDA the kernels run in Triton's CPU interpreter (fp32/fp16: the interpreter computes
bf16 wrongly) at small shapes; with CUDA the same tests run on the GPU, plus bf16 tests at the
real Qwen shapes.
"""

import pytest
import torch
from conftest import linear

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

triton = pytest.importorskip("triton", reason="triton is not installed: no kernels to test")

import quantize  # noqa: E402
import qwen_kernels.attention as attn  # noqa: E402
import qwen_kernels.common as common  # noqa: E402
import qwen_kernels.int4 as int4  # noqa: E402
import qwen_kernels.moe as moe  # noqa: E402

# Without CUDA the kernels run in Triton's CPU interpreter, which tests/conftest.py switches on for
# the session before triton is first imported (Triton fixes the mode then).
assert CUDA or common.INTERPRET, "no GPU, and triton imported without TRITON_INTERPRET=1 (tests/conftest.py)"


@pytest.fixture(autouse=True)
def _interpreter_on(monkeypatch):
    """Keep the interpreter switched on during each test (Triton also checks it at launch)."""
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (bf16 at real model shapes)")

TOL = {  # (atol, rtol) against a float32 reference computed from the same inputs
    torch.float32: (2e-5, 1e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


def assert_close(actual, expected, dtype):
    atol, rtol = TOL[dtype]
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------
def make_qkv(B, H, KVH, T, S, D, dtype, device=DEVICE, seed=0):
    """q (B, H, T, D); k, v as (B, KVH, S, D) views into a longer cache, like the model's."""
    g = torch.Generator(device).manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g, device=device).to(dtype)
    cache = torch.randn(2, B, KVH, S + 9, D, generator=g, device=device).to(dtype)
    return q, cache[0, :, :, :S], cache[1, :, :, :S]


def naive_attention(q, k, v, start, pad, window, scale):
    """Independent spec: one query row at a time, listing its visible keys explicitly."""
    B, H, T, D = q.shape
    KVH, S = k.shape[1], k.shape[2]
    out = torch.zeros(B, H, T, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            kv = h * KVH // H  # consecutive query heads share a KV head
            for i in range(T):
                p = start + i
                keys = [j for j in range(S)
                        if j <= p and j >= pad[b] and (window is None or p - j < window)]
                if not keys:
                    continue  # padding row: zeros
                kk, vv = k[b, kv, keys].double(), v[b, kv, keys].double()  # (n, D)
                w = torch.softmax(kk @ q[b, h, i].double() * scale, dim=0)  # (n,)
                out[b, h, i] = w @ vv
    return out


@pytest.mark.parametrize("B,H,KVH,T,S,start,window,pad", [
    (2, 4, 2, 6, 6, 0, None, [0, 2]),
    (2, 4, 4, 3, 11, 8, None, None),
    (2, 6, 2, 5, 11, 6, 3, [1, 9]),  # row 1 starts as padding
    (1, 3, 1, 1, 9, 8, 4, None),
])
def test_reference_matches_naive(B, H, KVH, T, S, start, window, pad):
    D = 16
    q, k, v = make_qkv(B, H, KVH, T, S, D, torch.float32, device="cpu")
    pad_t = None if pad is None else torch.tensor(pad)
    expected = naive_attention(q, k, v, start, pad or [0] * B, window, 0.3)
    actual = attn.attention_reference(q, k, v, start, pad_t, window, scale=0.3)
    torch.testing.assert_close(actual.double(), expected, atol=1e-5, rtol=1e-5)


ATTN_CASES = [
    # B, H, KVH, T,  S,  D,  start, window, pad
    (1, 2, 2, 7, 7, 64, 0, None, None),  # plain causal prefill, MHA
    (2, 4, 2, 33, 40, 64, 7, None, None),  # chunked prefill over a cache, G=2
    (2, 7, 1, 7, 20, 128, 13, 5, [3, 15]),  # G=7, window, row 1 partly padding
    (2, 4, 2, 33, 33, 64, 0, 8, [0, 5]),  # window smaller than T, left padding
    (1, 2, 1, 1, 17, 64, 16, None, None),  # T=1 through the prefill kernel
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,H,KVH,T,S,D,start,window,pad", ATTN_CASES)
def test_prefill_attention(B, H, KVH, T, S, D, start, window, pad, dtype):
    q, k, v = make_qkv(B, H, KVH, T, S, D, dtype)
    pad = None if pad is None else torch.tensor(pad, device=DEVICE)
    out = attn.prefill_attention(q, k, v, start, pad, window)
    ref = attn.attention_reference(q, k, v, start, pad, window)
    assert out.shape == (B, H, T, D)
    assert_close(out, ref, dtype)
    if pad is not None:  # padding rows are exactly zero
        rows = torch.arange(T, device=DEVICE) + start < pad[:, None]  # (B, T)
        assert (out.transpose(1, 2)[rows] == 0).all()


DECODE_CASES = [
    # B, H, KVH, S,  D,  start, window, pad        (interpreter chunks are 32 keys)
    (1, 2, 2, 100, 64, 99, None, None),  # MHA, 4 chunks
    (2, 4, 2, 70, 128, 66, None, [0, 50]),  # G=2, cache longer than start+1, padding
    (2, 14, 2, 130, 64, 129, 40, [0, 120]),  # G=7, window spans 2 chunks
    (2, 7, 1, 45, 64, 30, None, [40, 3]),  # row 0 is all padding -> zeros
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,H,KVH,S,D,start,window,pad", DECODE_CASES)
def test_decode_attention(B, H, KVH, S, D, start, window, pad, dtype):
    q, k, v = make_qkv(B, H, KVH, 1, S, D, dtype)
    pad = None if pad is None else torch.tensor(pad, device=DEVICE)
    out = attn.decode_attention(q, k, v, start, pad, window)
    ref = attn.attention_reference(q, k, v, start, pad, window)
    assert out.shape == (B, H, 1, D)
    assert_close(out, ref, dtype)
    if pad is not None:
        assert (out[start < pad] == 0).all()
    # The slot as a (1,) device tensor, read by the kernel (a CUDA graph replays it with new values)
    slot = torch.tensor([start], device=DEVICE)
    assert torch.equal(attn.decode_attention(q, k, v, slot, pad, window), out)


def test_decode_slot_tensor_skips_unwritten_cache():
    """With a tensor slot over a longer (static) cache, slots past it are never read: poisoning
    them changes nothing."""
    q, k, v = make_qkv(1, 4, 2, 1, 200, 64, torch.float32)
    start = 57
    k[:, :, start + 1:] = float("nan")
    v[:, :, start + 1:] = float("nan")
    out = attn.decode_attention(q, k, v, torch.tensor([start], device=DEVICE))
    assert out.isfinite().all()
    assert_close(out, attn.attention_reference(q, k[:, :, :start + 1], v[:, :, :start + 1], start),
                 torch.float32)


def test_attention_rejects_a_tensor_start_for_prefill():
    q, k, v = make_qkv(1, 4, 2, 3, 10, 64, torch.float32)
    with pytest.raises(ValueError, match="int start"):
        attn.attention(q, k, v, torch.tensor([7], device=DEVICE))


def test_kernels_inside_torch_compile():
    """Under torch.compile(fullgraph=True) the kernels run as custom ops: same results as eager."""
    pytest.importorskip("torch._inductor")
    q, k, v = make_qkv(2, 4, 2, 1, 40, 64, torch.float32)
    pad, slot = torch.tensor([0, 5], device=DEVICE), torch.tensor([30], device=DEVICE)
    x, w_gate_up, w_down, ids, weights = make_moe(3, 8, 2, 32, 48, torch.float32)

    def step(q, k, v, slot, pad, x, w_gate_up, w_down, ids, weights):
        a = attn.attention(q, k, v, slot, pad=pad, window=16, scale=0.2)
        return a * 2, moe.fused_moe(x, w_gate_up, w_down, ids, weights) + 1

    args = (q, k, v, slot, pad, x, w_gate_up, w_down, ids, weights)
    compiled = torch.compile(step, fullgraph=True)
    eager_a, eager_m = step(*args)
    got_a, got_m = compiled(*args)
    assert_close(got_a, eager_a, torch.float32)
    assert_close(got_m, eager_m, torch.float32)
    slot.fill_(35)  # a new slot in the same tensor: no recompilation, the kernel reads it
    with torch._dynamo.config.patch(error_on_recompile=True):
        torch.testing.assert_close(compiled(*args)[0], step(*args)[0])


@pytest.mark.parametrize("D", [16, 256])
def test_attention_dispatch_odd_head_dims_and_strides(D):
    """attention() picks the right kernel; q may be a transposed (B, T, H, D) view; any scale."""
    B, H, KVH, S = 1, 4, 2, 24
    dtype = torch.float32 if D <= 128 else torch.float16  # float32 x 256 exceeds GPU shared memory
    for T, start in [(1, 23), (5, 19)]:
        x = torch.randn(B, T, H, D, device=DEVICE, dtype=dtype)
        q = x.transpose(1, 2)  # (B, H, T, D), non-contiguous
        _, k, v = make_qkv(B, H, KVH, T, S, D, dtype)
        out = attn.attention(q, k, v, start, scale=0.1)
        assert_close(out, attn.attention_reference(q, k, v, start, scale=0.1), dtype)


def test_bf16_capability_check_is_asked_once_and_traces(monkeypatch):
    """supports() on CUDA asks the GPU for bf16 support once, and torch.compile(fullgraph=True)
    takes the answer as a constant (no graph break) -- checked here with a stand-in GPU."""
    pytest.importorskip("torch._inductor")
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: asked.append(1) or (9, 0))
    monkeypatch.setattr(common, "_BF16_TENSOR_CORES", None)
    step = torch.compile(lambda x: x + 1 if common.gpu_has_bf16() else x - 1, fullgraph=True)
    assert step(torch.zeros(2)).tolist() == [1.0, 1.0]
    assert common.gpu_has_bf16() and common.gpu_has_bf16()
    assert len(asked) == 1


def test_attention_supports(monkeypatch):
    q = torch.zeros(1, 4, 3, 64, device=DEVICE)
    k = torch.zeros(1, 2, 3, 64, device=DEVICE)
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter counts only while it is on
    assert attn.supports(q, k)
    assert attn.supports(q.half(), k.half())
    assert attn.supports(q.bfloat16(), k.bfloat16()) == CUDA  # interpreter: bf16 is wrong
    assert not attn.supports(q.double(), k.double())
    assert not attn.supports(q[..., :48], k[..., :48])  # head_dim not a power of two
    assert not attn.supports(q[:, :3], k)  # 3 query heads, 2 KV heads
    if not CUDA:
        monkeypatch.delenv("TRITON_INTERPRET")
        assert not attn.supports(q, k)


# ----------------------------------------------------------------------------------------
# MoE
# ----------------------------------------------------------------------------------------
def make_moe(N, E, K, Hd, I, dtype, device=DEVICE, used_experts=None, seed=0):
    """Random tokens, experts and a softmax-top-k router limited to `used_experts`."""
    g = torch.Generator(device).manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, device=device)  # noqa: E731
    x = randn(N, Hd).to(dtype)
    w_gate_up = (randn(E, 2 * I, Hd) / Hd**0.5).to(dtype)
    w_down = (randn(E, Hd, I) / I**0.5).to(dtype)
    logits = randn(N, E)
    if used_experts is not None:
        logits[:, used_experts:] = float("-inf")  # experts >= used_experts get no token
    topk_weights, topk_ids = torch.softmax(logits, dim=-1).topk(K, dim=-1)  # float32, int64
    return x, w_gate_up, w_down, topk_ids, topk_weights


MOE_CASES = [
    # N, E,  K, Hd, I,  used experts
    (1, 8, 1, 64, 48, None),  # decode, top-1
    (1, 16, 8, 48, 40, None),  # decode, top-8
    (45, 5, 4, 72, 40, None),  # prefill-like: 36 pairs per expert -> 64-row blocks
    (37, 16, 8, 48, 56, None),  # 18 pairs per expert -> 32-row blocks
    (13, 8, 2, 40, 24, 4),  # half of the experts are empty
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N,E,K,Hd,I,used", MOE_CASES)
def test_fused_moe(N, E, K, Hd, I, used, dtype):
    x, w_gate_up, w_down, ids, weights = make_moe(N, E, K, Hd, I, dtype, used_experts=used)
    out = moe.fused_moe(x, w_gate_up, w_down, ids, weights)
    ref = moe.fused_moe_reference(x, w_gate_up, w_down, ids, weights)
    assert out.shape == (N, Hd)
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N,E,K,Hd,I,used", MOE_CASES[:3])
def test_fused_moe_with_int8_weights(N, E, K, Hd, I, used, dtype):
    """Stacks quantized per output channel (quantize.QuantizedStack): the kernels read the int8
    weights and scale each output column; equal to the float computation on the dequantized stacks."""
    import types
    x, w_gate_up, w_down, ids, weights = make_moe(N, E, K, Hd, I, dtype, used_experts=used)

    def int8(w):  # symmetric per output channel, as quantize.quantize_int8
        s = (w.float().abs().amax(-1) / 127).clamp(min=1e-12)
        return types.SimpleNamespace(qweight=torch.round(w.float() / s[..., None]).to(torch.int8),
                                     scales=s.to(dtype))

    q_gate_up, q_down = int8(w_gate_up), int8(w_down)
    assert moe.supports(x, q_gate_up)
    out = moe.fused_moe(x, q_gate_up, q_down, ids, weights)
    dequantized = [(q.qweight.float() * q.scales.float()[..., None]).to(dtype) for q in (q_gate_up, q_down)]
    assert_close(out, moe.fused_moe_reference(x, *dequantized, ids, weights), dtype)
    assert_close(out, moe.fused_moe_reference(x, q_gate_up, q_down, ids, weights), dtype)
    int4 = types.SimpleNamespace(qweight=q_gate_up.qweight.to(torch.uint8), scales=torch.ones(E, 2 * I, 1))
    assert not moe.supports(x, int4)  # only int8 per channel


def test_fused_moe_reads_only_routed_experts():
    """Experts that get no token launch no work: poisoning their weights changes nothing."""
    x, w_gate_up, w_down, ids, weights = make_moe(3, 10, 2, 32, 32, torch.float32)
    unused = torch.ones(10, dtype=torch.bool)
    unused[ids.flatten().cpu()] = False
    w_gate_up[unused.to(DEVICE)] = float("nan")
    w_down[unused.to(DEVICE)] = float("nan")
    out = moe.fused_moe(x, w_gate_up, w_down, ids, weights)
    assert out.isfinite().all()
    assert_close(out, moe.fused_moe_reference(x, w_gate_up, w_down, ids, weights), torch.float32)


def test_group_pairs_by_expert():
    """Each block holds pairs of one expert; every pair appears once; empty experts get no block."""
    ids = torch.tensor([[3, 0], [3, 5], [0, 3], [3, 1]])  # N=4, K=2, E=7
    block_m = 2
    pair_ids, block_expert = moe._group_pairs_by_expert(ids, 7, block_m)
    flat = ids.flatten()
    P = flat.numel()
    assert sorted(p for p in pair_ids.tolist() if p < P) == list(range(P))
    used_blocks = block_expert[block_expert >= 0]
    assert sorted(set(used_blocks.tolist())) == [0, 1, 3, 5]
    for b, e in enumerate(block_expert.tolist()):
        rows = pair_ids[b * block_m:(b + 1) * block_m]
        real = rows[rows < P].long()
        if e < 0:
            assert real.numel() == 0
        else:
            assert real.numel() > 0 and (flat[real] == e).all()
    # expert 3 has 4 pairs -> 2 blocks; experts 0, 1, 5 one block each
    assert used_blocks.tolist().count(3) == 2 and used_blocks.numel() == 5


def test_moe_supports(monkeypatch):
    x = torch.zeros(2, 64, device=DEVICE)
    w = torch.zeros(4, 32, 64, device=DEVICE)
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert moe.supports(x, w) and moe.supports(x.half(), w.half())
    assert moe.supports(x.bfloat16(), w.bfloat16()) == CUDA
    assert not moe.supports(x, w[:, :, :32])
    assert not moe.supports(x.double(), w.double())


# ----------------------------------------------------------------------------------------
# int4 weight-only matmul
# ----------------------------------------------------------------------------------------
def int4_layer(N, K, group_size, dtype, bias=False, seed=0):
    """quantize.py's Int4Linear of a random layer, on DEVICE."""
    return quantize.Int4Linear(linear(N, K, bias, seed, torch.float32), dtype, group_size).to(DEVICE)


INT4_CASES = [  # M, N, K, G: one decode row, a small batch, a prompt; N and K off the block sizes
    (1, 40, 64, 32), (5, 33, 128, 64), (40, 70, 256, 128), (3, 16, 96, 32), (17, 130, 192, 64),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("M,N,K,G", INT4_CASES)
def test_linear_int4(M, N, K, G, bias, dtype):
    layer = int4_layer(N, K, G, dtype, bias)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    args = (layer.qweight, layer.scales, layer.zeros, G, layer.bias)
    ref = int4.linear_int4_reference(x, *args)
    # the kernel's reference reads quantize.py's layout: it equals the layer's own reference exactly
    assert torch.equal(ref, layer.reference(x))
    assert int4.supports(x, layer.qweight)
    out = int4.linear_int4(x, *args)
    assert out.shape == (M, N)
    assert_close(out, ref, dtype)


def test_linear_int4_inside_torch_compile():
    pytest.importorskip("torch._inductor")
    layer = int4_layer(48, 128, 32, torch.float32, bias=True)
    x = torch.randn(3, 128, device=DEVICE)
    compiled = torch.compile(lambda x: int4.linear_int4(x, layer.qweight, layer.scales, layer.zeros, 32,
                                                        layer.bias) * 2, fullgraph=True)
    assert_close(compiled(x), int4.linear_int4_reference(x, layer.qweight, layer.scales, layer.zeros, 32,
                                                         layer.bias) * 2, torch.float32)


def test_int4_supports(monkeypatch):
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    layer = int4_layer(32, 64, 32, torch.float32)
    x = torch.zeros(2, 64, device=DEVICE)
    assert int4.supports(x, layer.qweight) and int4.supports(x.half(), layer.qweight)
    assert int4.supports(x.bfloat16(), layer.qweight) == CUDA
    assert not int4.supports(torch.zeros(2, 32, device=DEVICE), layer.qweight)  # K does not match
    assert not int4.supports(x.double(), layer.qweight)


@needs_cuda
@pytest.mark.parametrize("M", [1, 8, 128])
def test_cuda_int4_layer_takes_the_kernel_bf16(M, monkeypatch):
    """On CUDA an Int4Linear runs qwen_kernels/int4.py (Qwen2-7B's MLP shape), equal to its reference."""
    layer = int4_layer(18944, 3584, 32, torch.bfloat16)
    x = torch.randn(1, M, 3584, device=DEVICE, dtype=torch.bfloat16)
    calls, kernel = [], int4.linear_int4
    monkeypatch.setattr(int4, "linear_int4", lambda *args: calls.append(1) or kernel(*args))
    out = layer(x)
    assert calls and out.shape == (1, M, 18944)
    assert_close(out, layer.reference(x), torch.bfloat16)


# ----------------------------------------------------------------------------------------
# CUDA: bf16 at real model shapes
# ----------------------------------------------------------------------------------------
REAL_ATTN = {"qwen2-0.5b": (14, 2, 64), "qwen2-7b": (28, 4, 128)}  # H, KVH, D


@needs_cuda
@pytest.mark.parametrize("model", list(REAL_ATTN))
def test_cuda_prefill_bf16_real_shapes(model):
    H, KVH, D = REAL_ATTN[model]
    pad = torch.tensor([0, 37], device="cuda")
    for T, S, start, window in [(517, 517, 0, None), (300, 1324, 1024, None), (700, 700, 0, 256)]:
        q, k, v = make_qkv(2, H, KVH, T, S, D, torch.bfloat16, device="cuda")
        out = attn.prefill_attention(q, k, v, start, pad, window)
        assert_close(out, attn.attention_reference(q, k, v, start, pad, window), torch.bfloat16)


@needs_cuda
@pytest.mark.parametrize("model", list(REAL_ATTN))
def test_cuda_decode_bf16_real_shapes(model):
    H, KVH, D = REAL_ATTN[model]
    for B, S, window, pad in [(1, 4096, None, None), (3, 5000, 1024, [0, 100, 4990]),
                              (1, 32768, None, None)]:
        q, k, v = make_qkv(B, H, KVH, 1, S, D, torch.bfloat16, device="cuda")
        pad = None if pad is None else torch.tensor(pad, device="cuda")
        out = attn.decode_attention(q, k, v, S - 1, pad, window)
        assert_close(out, attn.attention_reference(q, k, v, S - 1, pad, window), torch.bfloat16)


REAL_MOE = {"qwen1.5-moe": (60, 4, 2048, 1408), "qwen3-30b-a3b": (128, 8, 2048, 768)}  # E, K, Hd, I


@needs_cuda
@pytest.mark.parametrize("N", [1, 16, 300])
@pytest.mark.parametrize("model", list(REAL_MOE))
def test_cuda_fused_moe_bf16_real_shapes(model, N):
    E, K, Hd, I = REAL_MOE[model]
    x, w_gate_up, w_down, ids, weights = make_moe(N, E, K, Hd, I, torch.bfloat16, device="cuda")
    out = moe.fused_moe(x, w_gate_up, w_down, ids, weights)
    ref = moe.fused_moe_reference(x, w_gate_up, w_down, ids, weights)
    assert_close(out, ref, torch.bfloat16)
