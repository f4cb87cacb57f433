"""Exercise 5, the KV cache (docs/exercises/kv_cache.md): kv_cache_update against qwen2.KVCache.update,
over a prefill and decode steps, with int slots and with the static tensor-slot path."""
import torch

from . import reference
from ._harness import call, compare, fail, function, run

PAGE = "exercises/kv_cache.md"
B, KVH, MAX, D = 2, 2, 12, 4

# (input_pos, T): a prefill of 5 tokens, then decode steps; int slots, then tensor slots
SCHEDULES = {"int input_pos": [(0, 5), (5, 1), (6, 1), (7, 1)],
             "tensor input_pos (static shapes)": [(torch.arange(0, 5), 5), (torch.tensor([5]), 1), (torch.tensor([6]), 1)]}


def check(impl):
    kv_cache_update = function(impl, "kv_cache_update")
    gen = torch.Generator().manual_seed(0)
    for path, schedule in SCHEDULES.items():
        mine = [torch.zeros(B, KVH, MAX, D), torch.zeros(B, KVH, MAX, D)]
        ref = [torch.zeros(B, KVH, MAX, D), torch.zeros(B, KVH, MAX, D)]
        for n, (input_pos, T) in enumerate(schedule):
            k, v = torch.randn(B, KVH, T, D, generator=gen), torch.randn(B, KVH, T, D, generator=gen)
            pos = input_pos.tolist() if torch.is_tensor(input_pos) else input_pos
            case = f"{path}, step {n} ({'prefill' if n == 0 else 'decode'}, input_pos={pos}, k/v {(B, KVH, T, D)})"
            got = call(kv_cache_update, mine[0], mine[1], input_pos, k.clone(), v.clone(), case=case)
            want = reference.kv_cache_update(ref[0], ref[1], input_pos, k, v)
            if not isinstance(got, (tuple, list)) or len(got) != 2:
                fail(f"{case}: return (keys, values), a pair of tensors")
            end = (input_pos[-1] + 1 if torch.is_tensor(input_pos) else input_pos + T)
            causes = [(k, "you return only this step's keys and values; attention needs every slot written so far "
                          "(the cache up to input_pos + T)"),
                      (ref[0][:, :, :end + 1], "you return one slot too many: slots 0 .. input_pos + T - 1"),
                      (ref[0][:, :, :end], "with a tensor input_pos, return the whole cache (static shapes: "
                                           "the mask hides the slots not written yet)")]
            compare(got[0], want[0], case + ": keys", causes=causes)
            compare(got[1], want[1], case + ": values", causes=causes[:1] + [(ref[1][:, :, :end], causes[2][1])])
            compare(mine[0], ref[0], case + ": the cache_k tensor after the call (write the new keys into it, "
                    "in place, at their slots)")
            compare(mine[1], ref[1], case + ": the cache_v tensor after the call")


def test_kv_cache(request):
    run(request, check, PAGE)
