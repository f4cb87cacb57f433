"""CPU kernels for decoding: matrix-vector products with bf16, int8 and int4 weights
(qwen_kernels/cpu_matvec.cpp) and the decode attention (qwen_kernels/cpu_attention.cpp).

    from qwen_kernels import cpu
    if cpu.use(x):                                                        # x (M, K), M small
        y = torch.ops.qwen_cpu.linear_int8(x, qweight, scales, bias)

Decoding reads every weight once per token, so on a CPU it is as fast as its matrix-vector products
stream the weights from memory. cpu_matvec.cpp does only that, in plain C++ loops that the compiler
vectorizes (their vector types are in cpu_simd.h, which cpu_attention.cpp shares). Both are built
on first use into one extension with torch's C++ extension tools (`-O3 -march=native`, about 40 s,
then cached in torch's extension folder, ~/.cache/torch_extensions) and registered as the torch ops
qwen_cpu.linear_bf16 / linear_int8 / linear_int4 / dequantize_int4 / decode_attention, which run
inside torch.compile graphs too.

The seams it fills (qwen_kernels.install puts them in; quantize.py's Int8Linear and Int4Linear call
the ops themselves): the bf16 `nn.Linear` layers become `Linear` below, and the model files'
`Attention.attention_function` becomes `model_attention(...)`, the decode attention for one-token
steps. Each keeps torch's path beside the kernel and takes it when `use(x)` (or `use_attention`)
says False: x not on the CPU, more rows than ROWS (a prompt: torch's matrix multiply is faster
there), QWEN_CPU_KERNELS=0 in the environment, or kernels that could not be built (no C++ compiler;
the reason is in `unavailable_reason`).
"""
from __future__ import annotations

import contextlib
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ROWS = 4          # up to this many rows of x (decode steps, small batches); measured in docs/quantization.md
unavailable_reason = ""
_built: bool | None = None


BUILD_WAIT_S = 180  # another process is building: how long to wait for it before torch's kernels serve


@torch.compiler.assume_constant_result  # torch.compile: run (and build) while tracing, kept as a constant
def available() -> bool:
    """Build (the first time on this machine) and load the kernels, once per process; False, with
    unavailable_reason set, when they cannot be: the callers keep torch's paths, and a later run
    tries again."""
    global _built, unavailable_reason
    if _built is None:
        _built = False
        if os.environ.get("QWEN_CPU_KERNELS") == "0":
            unavailable_reason = "QWEN_CPU_KERNELS=0"
            return False
        try:
            _built = build()
        except Exception as e:  # no compiler, no headers, a failed build
            lines = str(e).strip().splitlines()
            unavailable_reason = f"{type(e).__name__}: {lines[-1] if lines else ''}"
        if _built:
            _register_fakes()
    return _built


def build() -> bool:
    """Compile the extension into torch's extension folder unless it is there, and load it.

    torch's own build lock is a file that a process killed while building (a closed terminal:
    SIGHUP; SIGKILL) leaves behind, and every later build then waits for it forever. So every build
    here first takes a lock of the operating system's (flock), which dies with its process: while
    it is held, a torch lock file in the folder is a dead process's and goes. What an earlier build
    left that no longer builds or loads (objects half written by a killed compiler) is started
    again from an empty folder; a first build that fails raises the compiler's own error. Another
    process building: wait for it up to BUILD_WAIT_S, then serve this run with torch's kernels
    (False)."""
    global unavailable_reason
    import shutil

    from torch.utils.cpp_extension import JIT_EXTENSION_VERSIONER, _get_build_directory, load
    name = build_name()
    folder = _get_build_directory(name, verbose=False)

    def compile_and_load():
        # -march=native: vectorized for this CPU, so the cached build is named after the CPU too
        # (a home folder shared by machines with other CPUs must not load it: illegal instructions).
        load(name, sources(), build_directory=folder, is_python_module=False, verbose=False,
             extra_cflags=["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp"],
             extra_ldflags=["-fopenmp"])

    with os_lock(folder.rstrip(os.sep) + ".lock") as held:
        if not held:
            unavailable_reason = f"another process has been building them for over {BUILD_WAIT_S} s"
            return False
        if os.path.exists(os.path.join(folder, "lock")):  # torch's, left by a process that is gone
            os.remove(os.path.join(folder, "lock"))
        fresh, t0 = not os.path.exists(os.path.join(folder, name + ".so")), time.perf_counter()
        earlier = os.path.exists(os.path.join(folder, "build.ninja"))  # what an earlier build left
        if fresh:
            log("[building the CPU kernels (about 30 s, once per machine)...]")
        try:
            compile_and_load()
        except Exception:
            if not earlier:
                raise  # a first build: the compiler's own error
            shutil.rmtree(folder, ignore_errors=True)  # an earlier build's leftovers: once more, from nothing
            os.makedirs(folder, exist_ok=True)
            JIT_EXTENSION_VERSIONER.entries.pop(name, None)  # (else torch thinks it built it already)
            fresh = True
            log("[building the CPU kernels again, from an empty folder (about 30 s)...]")
            compile_and_load()
        if fresh:
            log(f"[CPU kernels built in {time.perf_counter() - t0:.0f} s]")
    return True


@contextlib.contextmanager
def os_lock(path: str):
    """An exclusive flock on `path`, held until the block ends (the operating system drops it when
    the process dies): yields True once it is held, False after waiting BUILD_WAIT_S. Where there is
    no flock (Windows), it yields True at once."""
    try:
        import fcntl
    except ImportError:
        yield True
        return
    with open(path, "w") as f:
        deadline, waiting = time.monotonic() + BUILD_WAIT_S, False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    yield False
                    return
                if not waiting:
                    log("[another process is building the CPU kernels: waiting for it...]")
                    waiting = True
                time.sleep(0.2)
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def log(message: str):
    """One line on stderr (rank 0's alone under torchrun)."""
    if os.environ.get("RANK", "0") == "0":
        import sys
        print(message, file=sys.stderr, flush=True)


HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ("cpu_matvec.cpp", "cpu_attention.cpp")  # and the header they share, cpu_simd.h


def sources() -> list[str]:
    return [os.path.join(HERE, name) for name in SOURCES]


def build_name() -> str:
    """The extension's name, with a fingerprint of the CPU it is compiled for (its architecture and,
    on Linux, its instruction-set flags: the build uses every one of them) and of the sources, so
    that two checkouts with other sources, or machines with other CPUs, never share a build."""
    import hashlib
    import platform
    cpu = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu += next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    digest = hashlib.sha1(cpu.encode())
    for path in sources() + [os.path.join(HERE, "cpu_simd.h")]:
        with open(path, "rb") as f:
            digest.update(f.read())
    return "qwen_cpu_kernels_" + digest.hexdigest()[:10]


def usable(x: torch.Tensor) -> bool:
    """Can the kernels take x: on the CPU, and built?"""
    return x.device.type == "cpu" and available()


def use(x: torch.Tensor) -> bool:
    """Should this product (x (..., K) times a weight) take a matrix-vector kernel: a few rows?"""
    return x.numel() <= ROWS * x.shape[-1] and usable(x)


def use_attention(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Can qwen_cpu.decode_attention take this attention? One query row (B, H, 1, D) over a cache
    (B, KVH, S, D) on the CPU, head_dim a multiple of 16 up to 256, contiguous along head_dim."""
    D = q.shape[-1]
    return (q.shape[2] == 1 and D % 16 == 0 and D <= 256 and q.stride(-1) == k.stride(-1) == 1
            and q.dtype == k.dtype and usable(q))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """softmax(scale * q K^T) V for q (B, H, 1, D) over the keys of k, v (B, KVH, S, D) that `mask`
    shows ((B or 1, 1, 1, S) booleans; None: every key), key/value head h // (H / KVH) for query head
    h: torch's SDPA with enable_gqa and a boolean mask. A row that sees no key gets zeros (SDPA: NaN)."""
    return torch.ops.qwen_cpu.decode_attention(q, k, v, mask, scale)


def model_attention(fallback):
    """A function for the model files' `Attention.attention_function`, (q, k, v, step, window) -> out:
    the decode attention above for one-token steps on the CPU (about 5x faster than SDPA there: it
    skips the keys the mask hides), else `fallback`."""
    def attention_function(q, k, v, step, window):
        if use_attention(q, k):
            return decode_attention(q, k, v, step.masks[window], q.shape[-1] ** -0.5)
        return fallback(q, k, v, step, window)
    return attention_function


def _register_fakes():
    """Shapes for torch.compile, which traces the ops without running them."""
    def out(x, weight):
        return x.new_empty(x.shape[0], weight.shape[0])

    torch.library.register_fake("qwen_cpu::linear_bf16", lambda x, weight, bias: out(x, weight))
    torch.library.register_fake("qwen_cpu::linear_int8", lambda x, qweight, scales, bias: out(x, qweight))
    torch.library.register_fake("qwen_cpu::linear_int4",
                                lambda x, qweight, scales, zeros, group_size, bias: out(x, qweight))
    torch.library.register_fake("qwen_cpu::dequantize_int4", lambda qweight, scales, zeros, group_size:
                                scales.new_empty(qweight.shape[0], 2 * qweight.shape[1]))
    torch.library.register_fake("qwen_cpu::decode_attention",
                                lambda q, k, v, mask, scale: q.new_empty(q.shape))


class Linear(nn.Linear):
    """nn.Linear with bf16 weights whose decode steps take qwen_cpu.linear_bf16 (same parameters,
    same results within bf16 rounding); everything else goes to F.linear. qwen_kernels.install turns a
    model's bf16 nn.Linear layers on the CPU into this class."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.bfloat16 and self.weight.is_contiguous() and use(x):
            rows = x.reshape(-1, x.shape[-1]).contiguous()                            # (M, K)
            return torch.ops.qwen_cpu.linear_bf16(rows, self.weight, self.bias).view(*x.shape[:-1], -1)
        return F.linear(x, self.weight, self.bias)
