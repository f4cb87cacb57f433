"""Generate text with a Qwen checkpoint: the generation loop, and a command line around it.

    python generate.py --prompt "Write a haiku about the sea"
    python generate.py --model Qwen/Qwen2.5-0.5B-Instruct --chat
    python generate.py --model ./my-checkpoint --raw --prompt "def fib(n):" --temperature 0

Generation runs in two phases (as in gpt-fast): *prefill* pushes the whole prompt through the
model once, filling the KV cache, and *decode* then feeds one new token at a time, each step
reading the cache instead of recomputing the past. stdout carries only the generated text; all
else (progress, timing) goes to stderr.

Python use:
    import generate
    model, tokenizer, defaults = generate.load("Qwen/Qwen2.5-0.5B-Instruct")
    ids = tokenizer.encode_chat([{"role": "user", "content": "Hi!"}])
    for token in generate.generate(model, ids, 64, **defaults):  # the checkpoint's sampling, stop tokens
        print(tokenizer.decode([token]), end="")
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import torch

import checkpoint
import parallel
import qwen_kernels
from qwen_kernels import compiled
from qwen_kernels import cpu as cpu_kernels
from tokenizer import ENDOFTEXT, IM_END, THINK_CLOSE, THINK_OPEN, StreamDecoder, Tokenizer, read_json


class UsageError(ValueError):
    """Bad input from the user: reported as one line, exit code 2."""


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

def load(name_or_path: str, device=None, dtype=None, quantization: str | None = None, group_size: int = 32,
         embeddings: str | None = None, kernels: str = "auto", progress=None):
    """Load (model, tokenizer, generation defaults) from a local folder or a hub id, with the fast
    paths installed (qwen_kernels.install(model, kernels)).

    quantization: "int8" or "int4" quantizes the weights while they load (quantize.py), and
    embeddings ("int8" or "int4") the embedding table too; a folder saved by quantize.save is already
    quantized and loads as it is. Under torchrun, each rank loads its shard (parallel.py).
    progress(done, total): bytes of the checkpoint read so far, and in all."""
    ckpt = checkpoint.open_checkpoint(name_or_path)
    architecture = (ckpt.raw.get("architectures") or [None])[0]  # none named: a causal LM
    if architecture is not None and not architecture.endswith("ForCausalLM"):
        raise UsageError(f"{name_or_path} is a {architecture} checkpoint: generate.py needs a causal LM "
                         f"(...ForCausalLM); load it with {ckpt.module.__name__}.from_pretrained instead")
    saved = ckpt.raw.get("quantization")
    if saved and quantization:
        raise UsageError(f"{name_or_path} is already quantized ({saved.get('scheme')}); drop --quantize")
    if parallel_run():  # under torchrun: this rank's shard, quantized after sharding when asked
        model = parallel.from_pretrained(ckpt.folder, device=device, dtype=dtype, progress=progress)
        if quantization:
            import quantize
            quantize.quantize(model, quantization, group_size, embeddings=embeddings)
    elif saved or quantization:
        import quantize
        model = (quantize.load(ckpt.folder, device=device, dtype=dtype) if saved else
                 quantize.from_pretrained(ckpt.folder, quantization, group_size, device=device, dtype=dtype,
                                          embeddings=embeddings, progress=progress))
    else:
        model = checkpoint.from_pretrained(ckpt.folder, device=device, dtype=dtype, progress=progress)
    qwen_kernels.install(model, kernels)
    tokenizer = Tokenizer(ckpt.folder)
    return model, tokenizer, generation_defaults(ckpt.folder, tokenizer)


def generation_defaults(folder: str, tokenizer, chat: bool = True) -> dict:
    """The checkpoint's settings for `generate`, as its keyword arguments: sampling from
    generation_config.json (greedy when absent), and the tokens that end an answer: its eos_token_id,
    <|endoftext|>, and in the chat format <|im_end|>."""
    cfg = read_json(os.path.join(folder, "generation_config.json"))
    eos = cfg.get("eos_token_id")
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    names = (IM_END, ENDOFTEXT) if chat else (ENDOFTEXT,)
    sampling = cfg.get("do_sample", False)
    return {
        "temperature": float(cfg.get("temperature", 1.0)) if sampling else 0.0,
        "top_k": int(cfg.get("top_k") or 0) if sampling else 0,
        "top_p": float(cfg.get("top_p", 1.0)) if sampling else 1.0,
        "repetition_penalty": float(cfg.get("repetition_penalty", 1.0)),
        "stop_ids": set(eos) | ({tokenizer.token_id(name) for name in names} - {None}),
    }


def parallel_run() -> bool:
    """True in a process that torchrun started as one of several ranks (see parallel.py)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def distributed() -> bool:
    """True once this process has joined a process group (parallel.init)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


# ----------------------------------------------------------------------------------------------
# Sampling (transformers' order: repetition penalty, temperature, top-k, top-p)
# ----------------------------------------------------------------------------------------------

def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make tokens already in the sequence less likely: positive logits / penalty, negative * penalty.
    logits: (B, vocab) float; seen: (B, vocab) bool."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int = 0,
                   top_p: float = 1.0) -> torch.Tensor:
    """The distribution `sample` draws from: (B, vocab) logits -> (B, vocab) probabilities, zero for
    the tokens top-k and top-p drop (temperature > 0).

    top_k > 0 keeps the k most likely tokens (and those tied with the k-th, as transformers does);
    top_p < 1 keeps the smallest set of most likely tokens whose probability adds up to at least top_p.
    """
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)                         # ascending
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= (1 - top_p)
        drop_sorted[:, -1] = False                                                # keep the most likely
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    return logits.softmax(dim=-1)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token of each row. logits: (B, vocab) -> (B,) token ids: greedy (argmax) for
    temperature 0, else a draw from `sampling_probs`."""
    if temperature == 0:
        if logits.device.type == "cpu" and not torch.compiler.is_compiling():
            # the same first-maximum rule; numpy takes 15 us over 151,936 logits where torch's CPU argmax
            # takes 140 us (float32) to 550 us (bf16), 1-2% of a decode step (docs/benchmarks.md)
            return torch.from_numpy(logits.detach().float().numpy().argmax(-1))
        return logits.argmax(dim=-1)
    if top_k > 0 and logits.device.type == "cpu" and not torch.compiler.is_compiling():
        # The same distribution, drawn among the kept tokens only (the top k and their ties): top_p
        # then sorts k numbers, not the whole vocabulary (7 ms over 151,936 logits on the CPU).
        logits = logits.float()
        candidates, ids = logits.topk(min(top_k, logits.shape[-1]), dim=-1)          # (B, k)
        kept = int((logits >= candidates[:, -1:]).sum(-1).max())                     # with the k-th's ties
        if kept > candidates.shape[-1]:
            candidates, ids = logits.topk(kept, dim=-1)                               # (B, kept)
        probs = sampling_probs(candidates, temperature, top_k, top_p)
        return ids.gather(-1, torch.multinomial(probs, 1, generator=generator)).squeeze(-1)
    probs = sampling_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------

def context_length(model) -> int:
    return int(model.config.max_position_embeddings)


def check_lengths(model, prompts: list[list[int]], max_new_tokens: int) -> int:
    """The number of decode steps: max_new_tokens, or fewer where the context length ends first."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UsageError("empty prompt: give at least one token")
    limit, longest = context_length(model), max(len(p) for p in prompts)
    if longest >= limit:
        raise UsageError(f"the prompt has {longest} tokens but the context length is {limit}; shorten it")
    return min(max_new_tokens, limit - longest)


def left_padded(prompts: list[list[int]], pad_id: int, cache_len: int, device):
    """Prompts of different lengths as one batch, right-aligned: tokens (B, longest) and an attention
    mask (B, cache_len) with 0 over the padding, or None when no row is padded."""
    longest = max(len(p) for p in prompts)
    tokens = torch.tensor([[pad_id] * (longest - len(p)) + list(p) for p in prompts], device=device)  # (B, T)
    mask = torch.ones(len(prompts), cache_len, dtype=torch.long, device=device)                       # (B, S)
    for row, p in enumerate(prompts):
        mask[row, :longest - len(p)] = 0
    return tokens, (None if bool(mask.all()) else mask)


def seen_tokens(prompts: list[list[int]], vocab_size: int, device) -> torch.Tensor:
    """(B, vocab) booleans: which tokens each prompt holds (for the repetition penalty)."""
    seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool, device=device)
    for row, p in enumerate(prompts):
        seen[row, torch.tensor(p, device=device).clamp(max=vocab_size - 1)] = True
    return seen


def decode_step(model, token: torch.Tensor, pos: int, mask: torch.Tensor | None) -> torch.Tensor:
    """One decode step: token (B,) at cache slot `pos` -> logits (B, vocab)."""
    return model(token[:, None], attention_mask=mask, input_pos=pos)[:, -1]


def setup_cache(model, batch_size: int, max_len: int):
    """model.setup_cache, unless a cache of that shape is there already: the compiled step keeps its
    cache, where its CUDA graph expects it (a step never reads the slots past its own, so what an
    earlier generation left there is harmless)."""
    cache = model.model.layers[0].self_attn.cache
    if cache is None or (model.model.max_cache_len, cache.k.shape[0], cache.k.dtype, cache.k.device) != (
            max_len, batch_size, model.dtype, model.device):
        model.setup_cache(batch_size, max_len)


def decoder(model, batch_size: int, mask: torch.Tensor | None, compile: bool):
    """The decode step generate_tokens calls, (token (B,), slot int) -> logits (B, vocab): eager, or
    the compiled static-shape step, fed the slot and the positions as device tensors. Call it after
    model.setup_cache: the compiled step is chosen for the cache's shape."""
    if not compile:
        return lambda token, pos: decode_step(model, token, pos, None if mask is None else mask[:, :pos + 1])
    if getattr(model, "kernels", None) is None:  # a model as its file built it: the compiled step needs the
        qwen_kernels.install(model)                # fast paths (the file's expert loop depends on the data)
    step, device = compiled.decode_step(model), model.device
    pads = (torch.zeros(batch_size, 1, dtype=torch.long, device=device) if mask is None
            else (mask == 0).sum(-1, keepdim=True))                         # (B, 1) padding slots per row
    slot = torch.zeros(1, dtype=torch.long, device=device)

    def compiled_step(token, pos):
        slot.fill_(pos)  # in place: no new host-to-device tensor per step
        torch.compiler.cudagraph_mark_step_begin()  # the last step's logits are used up: reuse their memory
        return step(model, token, slot, mask, slot[None] - pads)
    return compiled_step


PREFILL_CHUNK = 1024  # prompt tokens per forward of the prefill (a long prompt reports its progress)


def generate_tokens(model, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 0.0,
                    top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                    stop_ids=(), pad_id: int = 0, generator: torch.Generator | None = None,
                    compile: bool = False, stats: dict | None = None, progress=None):
    """The generation loop for a batch of prompts; yields a (B,) tensor of new tokens per step.

    Prompts of different lengths are left-padded; an attention mask hides the padding and
    positions count real tokens only, so each row gets the result it would get alone. Finished rows
    (stop token seen) keep yielding `pad_id`. Stops when every row has finished, after
    max_new_tokens, or at the model's context length (then stats["context_limit"] is True). A prompt
    longer than PREFILL_CHUNK is prefilled a chunk at a time, progress(done, total) told after each.
    """
    steps = check_lengths(model, prompts, max_new_tokens)
    stats = {} if stats is None else stats
    stats.update(prompt_tokens=sum(len(p) for p in prompts), new_tokens=0, context_limit=False)
    if steps <= 0:
        return
    device, B, longest = model.device, len(prompts), max(len(p) for p in prompts)
    cache_len = compiled.cache_len(longest + steps, context_length(model)) if compile else longest + steps
    tokens, mask = left_padded(prompts, pad_id, cache_len, device)          # (B, T), (B, cache_len) or None
    penalise = repetition_penalty != 1.0
    seen = seen_tokens(prompts, model.config.vocab_size, device) if penalise else None  # (B, vocab)
    stop = torch.tensor(sorted(set(stop_ids)) or [-1], device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)

    def pick(logits):  # logits (B, vocab) -> (B,) next tokens
        if penalise:
            logits = apply_repetition_penalty(logits.float(), seen, repetition_penalty)
        token = sample(logits, temperature, top_k, top_p, generator)
        if distributed():  # every rank takes rank 0's token (their samplers' states may differ)
            torch.distributed.broadcast(token, src=0)
        return token

    setup_cache(model, B, cache_len)
    step = decoder(model, B, mask, compile)
    try:
        with torch.inference_mode():
            t0 = time.perf_counter()
            for start in range(0, longest, PREFILL_CHUNK):  # each chunk attends to the cache so far
                end = min(start + PREFILL_CHUNK, longest)
                logits = model(tokens[:, start:end], attention_mask=None if mask is None else mask[:, :end],
                               input_pos=start, logits_to_keep=1)[:, -1]                # (B, vocab)
                if progress and longest > PREFILL_CHUNK:
                    progress(end, longest)
            token = pick(logits)
            stats["prefill_s"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            for i in range(steps):
                token = torch.where(done, torch.full_like(token, pad_id), token)
                if penalise:
                    seen[torch.arange(B, device=device), token] = True
                stats["new_tokens"] = i + 1
                stats["decode_s"] = time.perf_counter() - t1
                yield token
                if stop_ids:  # (without stop tokens, no step waits on the device to decide)
                    done |= torch.isin(token, stop)
                    if bool(done.all()):
                        break
                if i == steps - 1:
                    stats["context_limit"] = steps < max_new_tokens  # stopped by the context, not the user
                    break
                t_step = time.perf_counter()
                token = pick(step(token, longest + i))
                if i == 0:  # (compiled: the first step compiles, or looks up, the step)
                    stats["first_step_s"] = time.perf_counter() - t_step
            stats["decode_s"] = time.perf_counter() - t1
    finally:
        if not compile:  # the compiled step keeps its cache (and so its CUDA graph) for the next call
            model.clear_cache()


def generate(model, prompt_ids: list[int], max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, repetition_penalty: float = 1.0, stop_ids=(), seed: int | None = None,
             compile: bool = False, stats: dict | None = None, progress=None):
    """Yield new token ids one at a time for one prompt (stop token included, then stop)."""
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)
    for token in generate_tokens(model, [list(prompt_ids)], max_new_tokens, temperature=temperature,
                                 top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                                 stop_ids=stop_ids, generator=generator, compile=compile, stats=stats,
                                 progress=progress):
        yield int(token[0])


def generate_batch(model, prompts: list[list[int]], max_new_tokens: int, *, pad_id: int = 0, stop_ids=(),
                   seed: int | None = None, **sampling) -> list[list[int]]:
    """Generate for several prompts at once; returns each row's new tokens (up to its stop token)."""
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)
    out = [[] for _ in prompts]
    finished = [False] * len(prompts)
    stop = set(stop_ids)
    for step in generate_tokens(model, prompts, max_new_tokens, stop_ids=stop_ids, pad_id=pad_id,
                                generator=generator, **sampling):
        for row, token in enumerate(step.tolist()):
            if not finished[row]:
                out[row].append(token)
                finished[row] = token in stop
    return out


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print the whole usage)
        raise UsageError(f"{message} (see python generate.py --help)")


def parse_args(argv=None):
    p = Parser(description="Generate text with a Qwen2 / Qwen2.5 / Qwen2-MoE / Qwen3 checkpoint.")
    p.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct", help="hub id or local checkpoint folder")
    p.add_argument("--prompt", help="the user message (or, with --raw, the text to continue)")
    p.add_argument("--system", help="system prompt (default: the checkpoint template's)")
    p.add_argument("--raw", action="store_true", help="no chat template: plain text completion")
    p.add_argument("--chat", action="store_true", help="interactive multi-turn chat (Ctrl-D to quit)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, help="0 = greedy (default from generation_config.json)")
    p.add_argument("--top-k", type=int, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, help="nucleus sampling threshold in (0, 1]")
    p.add_argument("--repetition-penalty", type=float, help="> 1 discourages repeats (1 = off)")
    p.add_argument("--seed", type=int, help="random seed for sampling")
    p.add_argument("--device", help="cuda, mps or cpu (default: the first available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on cpu, else the checkpoint's")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantization (quantize.py)")
    p.add_argument("--group-size", type=int, choices=[32, 64, 128], default=32, help="int4's group size")
    p.add_argument("--quantize-embeddings", choices=["int8", "int4"],
                   help="with --quantize: the embedding table too (default: kept in the activation dtype)")
    p.add_argument("--kernels", choices=["auto", "triton", "torch"], default="auto",
                   help="the fast paths (qwen_kernels.install): auto = Triton on CUDA, the C++ kernels on "
                        "CPU; triton = Triton wherever it runs; torch = torch's own paths everywhere")
    think = p.add_mutually_exclusive_group()
    think.add_argument("--think", dest="think", action="store_true", default=None,
                       help="Qwen3: let the model reason in <think> first (the template's default)")
    think.add_argument("--no-think", dest="think", action="store_false", help="Qwen3: answer directly")
    args = p.parse_args(argv)
    if args.temperature is not None and args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k < 0:
        raise UsageError(f"--top-k must be >= 0, got {args.top_k}")
    if args.repetition_penalty is not None and args.repetition_penalty <= 0:
        raise UsageError(f"--repetition-penalty must be > 0, got {args.repetition_penalty}")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.chat and (args.prompt is None or not args.prompt.strip()):
        raise UsageError("empty prompt: pass --prompt TEXT (or --chat for a conversation)")
    if args.raw and args.chat:
        raise UsageError("--raw and --chat do not go together")
    if args.quantize_embeddings and not args.quantize:
        raise UsageError("--quantize-embeddings goes with --quantize int8|int4")
    if args.device is not None:
        try:
            torch.device(args.device)
        except RuntimeError:
            raise UsageError(f"unknown --device {args.device!r} (use cuda, mps or cpu)") from None
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError("--device cuda but no CUDA GPU is available")
    return args


QUIET = False  # ranks other than 0 of a torchrun group print nothing


def log(message: str):
    if not QUIET:
        print(message, file=sys.stderr, flush=True)


class Progress:
    """progress(done, total) of a long wait, on stderr: nothing in its first 2 s; then, on a terminal,
    one bar redrawn in place, elsewhere a plain line at each tenth."""

    def __init__(self, what: str, unit: str, scale: float = 1.0):
        self.what, self.unit, self.scale = what, unit, scale
        self.t0, self.shown, self.tty = time.perf_counter(), -1, sys.stderr.isatty()

    def __call__(self, done: int, total: int):
        early = time.perf_counter() - self.t0 < 2.0 and self.shown < 0  # (a wait over within 2 s: nothing)
        if QUIET or total <= 0 or early or self.shown == 10:
            return
        tenth = 10 * done // total
        if not self.tty and tenth <= self.shown:
            return
        self.shown = tenth
        amount = f"{done * self.scale:,.0f} of {total * self.scale:,.0f} {self.unit}"
        if self.tty:
            bar = "#" * (20 * done // total) + "." * (20 - 20 * done // total)
            end = "\n" if done >= total else ""
            sys.stderr.write(f"\r[{self.what} {bar} {100 * done // total:3d}% ({amount})]{end}")
            sys.stderr.flush()
        else:
            log(f"[{self.what}: {100 * done // total}% ({amount})]")


def description(model) -> str:
    """What was loaded, for the load line: "bfloat16", "bfloat16, int4 weights in groups of 32, int8
    embeddings", ..."""
    parts, q = [str(model.dtype).removeprefix("torch.")], getattr(model, "quantization", None)
    if q:
        groups = f" in groups of {q['group_size']}" if q["scheme"] == "int4" else ""
        parts.append(f"{q['scheme']} weights{groups}")
        parts += [f"{q['embeddings']} embeddings"] if q.get("embeddings") else []
    return ", ".join(parts)


class Printer:
    """Streams decoded text to stdout; Qwen3's <think>...</think> goes to stderr (dim on a terminal)."""

    def __init__(self, tokenizer):
        self.decoder = StreamDecoder(tokenizer)
        self.think_open, self.think_close = tokenizer.token_id(THINK_OPEN), tokenizer.token_id(THINK_CLOSE)
        self.thinking = False
        self.dim = sys.stderr.isatty()

    def write(self, text: str):
        if not text or QUIET:
            return
        if self.thinking:
            sys.stderr.write(f"\033[2m{text}\033[0m" if self.dim else text)
            sys.stderr.flush()
        else:
            sys.stdout.write(text)
            sys.stdout.flush()

    def push(self, token: int):
        if token in (self.think_open, self.think_close):
            self.write(self.decoder.flush())
            self.thinking = token == self.think_open
            return
        self.write(self.decoder.push(token))

    def close(self):
        self.write(self.decoder.flush())
        self.thinking = False


def peak_memory_gb(device) -> float:
    """The most memory held since the start (or bench.reset_peak_memory): on CUDA what torch's
    allocator handed out; on the CPU the process' resident memory (Linux: its high-water mark)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024 / 1e9
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def answer(model, tokenizer, prompt_ids, settings, args) -> list[int]:
    """Stream one answer to stdout; returns its tokens (without the stop token)."""
    printer, stats, new = Printer(tokenizer), {}, []
    if args.compile and not getattr(model, "_compiled_decode_steps", None):
        log("[--compile: the first decode step compiles the step (10 to 30 s on a CPU, once per model "
            "and cache size)]")
    try:
        for token in generate(model, prompt_ids, args.max_new_tokens, stats=stats, seed=args.seed,
                              compile=args.compile, progress=Progress("prefill", "tokens"), **settings):
            if token in settings["stop_ids"]:
                break
            new.append(token)
            printer.push(token)
    except KeyboardInterrupt:
        if not args.chat or distributed():  # under torchrun Ctrl-C has ended the other ranks: stop
            raise
        log("\n[answer stopped]")  # Ctrl-C in --chat ends this answer; the conversation goes on
    finally:
        printer.close()
        sys.stdout.write("\n")
        sys.stdout.flush()
        if stats.get("new_tokens"):
            prefill, decode, steps = stats["prefill_s"], stats.get("decode_s", 0.0), stats["new_tokens"] - 1
            compiling = ""
            if args.compile and stats.get("first_step_s", 0.0) > 1.0 and steps > 1:  # it compiled
                compiling = f" after {stats['first_step_s']:.1f}s compiling"
                decode, steps = decode - stats["first_step_s"], steps - 1
            log(f"[{stats['prompt_tokens']} prompt tokens, {stats['prompt_tokens'] / prefill:.1f} tok/s | "
                f"{stats['new_tokens']} new tokens, {steps / decode if decode > 0 else 0.0:.1f} tok/s"
                f"{compiling} | peak memory {peak_memory_gb(model.device):.2f} GB]")
        if stats.get("context_limit"):
            log(f"[stopped at the context length of {context_length(model)} tokens]")
    return new


def run(args) -> int:
    device = torch.device(args.device or default_device())
    if parallel_run():  # torchrun: join the group; rank 0 alone prints and reads the keyboard
        global QUIET
        device, QUIET = parallel.join_from_the_command_line(args.device)
    log(f"loading {args.model} on {device}...")
    t0 = time.perf_counter()
    # On CPU, bfloat16 measured fastest (real 0.5B, 2 cores: decode 1.7x, prefill 2x float32;
    # docs/benchmarks.md).
    dtype = args.dtype or ("bfloat16" if device.type == "cpu" else None)
    model, tokenizer, defaults = load(args.model, device=device, dtype=dtype, quantization=args.quantize,
                                      group_size=args.group_size, embeddings=args.quantize_embeddings,
                                      kernels=args.kernels, progress=Progress("loading", "MB", 1e-6))
    tied = model.config.tie_word_embeddings and not parallel_run()  # (torchrun: lm_head is sliced, untied)
    if args.quantize and not args.quantize_embeddings and tied:
        log("[tied embeddings: the table stays in full precision beside lm_head's quantized copy; "
            "--quantize-embeddings int8 keeps one int8 table for both]")
    if device.type == "cpu" and args.kernels != "torch" and not cpu_kernels.available():  # built here, once
        log(f"[CPU kernels unavailable, torch's kernels serve (slower): {cpu_kernels.unavailable_reason}]")
    log(f"loaded in {time.perf_counter() - t0:.1f}s ({description(model)})")
    chat_format = not args.raw and tokenizer.has_chat_template
    defaults = defaults if chat_format else generation_defaults(tokenizer.folder, tokenizer, chat=False)
    settings = {
        "temperature": defaults["temperature"] if args.temperature is None else args.temperature,
        "top_k": defaults["top_k"] if args.top_k is None else args.top_k,
        "top_p": defaults["top_p"] if args.top_p is None else args.top_p,
        "repetition_penalty": (defaults["repetition_penalty"] if args.repetition_penalty is None
                               else args.repetition_penalty),
        "stop_ids": defaults["stop_ids"],
    }
    messages = [{"role": "system", "content": args.system}] if args.system else []

    def prompt_ids(user_text):
        if not chat_format:
            return tokenizer.encode(user_text)
        return tokenizer.encode_chat(messages + [{"role": "user", "content": user_text}],
                                     enable_thinking=args.think)

    if not args.chat:
        answer(model, tokenizer, prompt_ids(args.prompt), settings, args)
        return 0
    log(f"chat: type a message, Enter to send; Ctrl-C {'ends' if distributed() else 'stops an answer'}, "
        f"Ctrl-D quits")
    first = args.prompt
    while True:
        try:
            user_text = first if first else parallel.read_line("> ")
        except (EOFError, KeyboardInterrupt) as e:
            if isinstance(e, KeyboardInterrupt) and distributed():
                raise
            log("")
            return 0
        first = None
        if not user_text.strip():
            continue
        try:
            new = answer(model, tokenizer, prompt_ids(user_text), settings, args)
        except UsageError as e:  # e.g. the conversation outgrew the context: say so, keep chatting
            log(f"error: {e}")
            continue
        messages.append({"role": "user", "content": user_text})
        messages.append({"role": "assistant", "content": tokenizer.decode(new, skip_special_tokens=False)})


def main(argv=None) -> int:
    try:
        code = run(parse_args(argv))
        if distributed():  # all ranks done: leave the group together (not after an error: a rank may be gone)
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        return code
    except (UsageError, ValueError, FileNotFoundError) as e:  # the same on every rank: rank 0 says it
        log(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        if distributed():  # torchrun, interrupted too, now ends the others: one message is enough
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        log("interrupted")
        return 130
    except parallel.GroupStopped as e:
        log(f"error: {e}")
        return 1
    except Exception as e:  # never a raw traceback from the CLI
        if os.environ.get("QWEN_DEBUG"):
            raise
        if distributed() and isinstance(e, torch.distributed.DistError):  # a rank stopped: rank 0 says so
            log(f"error: another process of the group stopped ({str(e).splitlines()[0]})")
        elif QUIET:  # an error of this rank alone: it speaks, with its rank
            print(f"error (rank {torch.distributed.get_rank()}): {type(e).__name__}: {e}", file=sys.stderr)
        else:
            log(f"error: {type(e).__name__}: {e} (set QWEN_DEBUG=1 to see the traceback)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
