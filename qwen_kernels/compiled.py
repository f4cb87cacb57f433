"""The compiled decode step: generate.py's `--compile` (generate(..., compile=True)).

One decode step for every row, with shapes that do not depend on the position (a tensor of cache
slots: attention reads the whole cache, masked), so torch.compile traces it once per cache length
and model, and on CUDA captures it as a CUDA graph (the Triton kernels run inside as custom ops).
generate.py's `decoder` calls `decode_step(model)` and feeds it the slot and positions as device
tensors; `cache_len` rounds the cache up so that a few compiled steps serve every prompt.
"""
import inspect

import torch


def static_decode_step(model, token, slot, mask, positions) -> torch.Tensor:
    """One decode step with static shapes: token (B,), slot (1,) tensor, mask (B, cache_len) or None,
    positions (B, 1) -> logits (B, vocab). Attention covers the whole cache, so every step has the
    same shapes."""
    return model(token[:, None], attention_mask=mask, position_ids=positions, input_pos=slot)[:, -1]


def cache_len(needed: int, context: int) -> int:
    """KV cache length for the compiled step: `needed` rounded up to a power of two (at least 1024),
    at most the context length. The step is compiled, and its CUDA graph captured, once per cache
    length, so a few sizes serve every prompt instead of one compilation per prompt length."""
    return min(max(1024, 1 << (needed - 1).bit_length()), context)


def decode_step(model):
    """static_decode_step compiled for the model as it stands (on CUDA also captured as a CUDA graph).

    Dynamo normally checks, before every call, that each module, parameter and buffer the step read
    is unchanged: some 4,000 guards, 1.8 ms of a 20 ms step on a 2-core CPU. Here those checks are
    skipped (guard_filter_fn) and done once per generation instead: the compiled steps are kept on
    the model per `signature`, so a changed model (other kernels, cache shape, quantized layers) gets
    its own compilation. On the CPU the inductor size asserts go too (one per tensor and kernel call:
    0.7 ms a step)."""
    steps = model.__dict__.setdefault("_compiled_decode_steps", {})
    key = signature(model)
    if key not in steps:
        options, isolated = {}, {}
        # isolate_recompiles (torch 2.13): this compilation's entries are its own (dynamo otherwise shares
        # them among every torch.compile of static_decode_step, and without module guards another model
        # could match). Older torch keeps its guards.
        if "isolate_recompiles" in inspect.signature(torch.compile).parameters:
            options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
            isolated["isolate_recompiles"] = True
        if model.device.type == "cuda":
            options["triton.cudagraphs"] = True          # = mode="reduce-overhead"
        else:  # (the options this torch's inductor has)
            import torch._inductor.config as inductor
            options.update({name: False for name in ("size_asserts", "alignment_asserts")
                            if hasattr(inductor, name)})
        steps[key] = torch.compile(static_decode_step, fullgraph=True, options=options, **isolated)
    return steps[key]


def signature(model) -> tuple:
    """Everything a compiled step was traced for and does not check itself: every module's type,
    every parameter's and buffer's (the KV caches') name, dtype, shape and device, and the module
    attributes that shape the step (an int or string: the cache length, the kernels installed)."""
    tensors = [(name, t.dtype, t.shape, t.device) for name, t in model.named_parameters()]
    tensors += [(name, t.dtype, t.shape, t.device) for name, t in model.named_buffers()]
    settings = [(name, key, value) for name, m in model.named_modules() for key, value in vars(m).items()
                if isinstance(value, (bool, int, float, str)) and not key.startswith("_")]
    return tuple(type(m) for m in model.modules()), tuple(tensors), tuple(settings)
