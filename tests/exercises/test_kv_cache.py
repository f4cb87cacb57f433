"""Exercise 5, the KV cache (docs/exercises/kv_cache.md): kv_cache_update against qwen2.KVCache.update,
over a prefill and decode steps."""
import torch

from . import reference
from ._harness import call, compare, fail, function, run

PAGE = "exercises/kv_cache.md"
B, KVH, MAX, D = 2, 2, 12, 4

# the cache slots of each forward: a prefill of 5 tokens, then one-token decode steps
SCHEDULE = [torch.arange(0, 5), torch.tensor([5]), torch.tensor([6]), torch.tensor([7])]


def check(impl):
    kv_cache_update = function(impl, "kv_cache_update")
    gen = torch.Generator().manual_seed(0)
    mine = [torch.zeros(B, KVH, MAX, D), torch.zeros(B, KVH, MAX, D)]
    ref = [torch.zeros(B, KVH, MAX, D), torch.zeros(B, KVH, MAX, D)]
    for n, slots in enumerate(SCHEDULE):
        T = len(slots)
        k, v = torch.randn(B, KVH, T, D, generator=gen), torch.randn(B, KVH, T, D, generator=gen)
        case = f"step {n} ({'prefill' if n == 0 else 'decode'}, slots={slots.tolist()}, k/v {(B, KVH, T, D)})"
        got = call(kv_cache_update, mine[0], mine[1], slots, k.clone(), v.clone(), case=case)
        want = reference.kv_cache_update(ref[0], ref[1], slots, k, v)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            fail(f"{case}: return (keys, values), a pair of tensors")
        end = int(slots[-1]) + 1
        whole = "; return the whole cache, always the same shape (attention takes the slots it reads itself)"
        if n == 0:  # a prefill from slot 0: this step's keys are all the slots written so far
            causes = [(k, "you return only the slots written so far (here, this step's keys and values)"
                          + whole)]
        else:
            causes = [(k, "you return only this step's keys and values" + whole),
                      (ref[0][:, :, :end], "you return only the slots written so far" + whole)]
        compare(got[0], want[0], case + ": keys", causes=causes)
        compare(got[1], want[1], case + ": values", causes=[(v, causes[0][1])] + [(ref[1][:, :, :end], text)
                                                                                   for _, text in causes[1:]])
        compare(mine[0], ref[0], case + ": the cache_k tensor after the call (write the new keys into it, "
                "in place, at their slots)")
        compare(mine[1], ref[1], case + ": the cache_v tensor after the call")


def test_kv_cache(request):
    run(request, check, PAGE)
