"""What every exercise checker shares: finding the student's code, running a check, messages.

The student's code is docs/exercises/starter.py, or the file named by QWEN_EXERCISE_IMPL.

When a stub still raises NotImplementedError (the exercise is not done yet), the checker
* FAILS with "not implemented yet" when its file was named on the command line, as in the command
  on each exercise page (`pytest tests/exercises/test_rmsnorm.py`): the student asked for a check;
* SKIPS, with that reason, in any other run (`pytest`, `pytest tests/exercises`), so the repository's
  own test suite stays green with the untouched starter.
QWEN_EXERCISE_STRICT=1 (fail) or 0 (skip) overrides the choice.

A check function takes the student's module (any object with the exercise's functions as
attributes) and raises CheckFailed with a message that says what differs, or NotImplementedError.
tests/test_docs.py calls the check functions directly, with the reference and with wrong code.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STARTER = os.path.join(ROOT, "docs", "exercises", "starter.py")
IMPL_ENV, STRICT_ENV = "QWEN_EXERCISE_IMPL", "QWEN_EXERCISE_STRICT"


class CheckFailed(AssertionError):
    """The student's function runs but gives a wrong answer; the message says how."""


def fail(message: str):
    raise CheckFailed(message)


# ----------------------------------------------------------------------------------------------
# Finding and running the student's code
# ----------------------------------------------------------------------------------------------

def impl_path() -> str:
    path = os.environ.get(IMPL_ENV)
    if not path:
        return STARTER
    for candidate in (os.path.abspath(path), os.path.join(ROOT, path)):
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"{IMPL_ENV}={path}: no such file")


def load(path: str):
    spec = importlib.util.spec_from_file_location(f"student_impl_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def function(impl, name: str):
    """impl.<name>, or NotImplementedError when the student's file does not define it."""
    f = getattr(impl, name, None)
    if f is None:
        raise NotImplementedError(f"{name} is not defined in your file")
    return f


def strict(request) -> bool:
    """Whether an unattempted exercise fails (its checker file was named on the command line)."""
    env = os.environ.get(STRICT_ENV)
    if env in ("0", "1"):
        return env == "1"
    me = os.path.realpath(str(request.node.path))
    params = request.config.invocation_params
    for arg in params.args:
        if not arg.startswith("-") and os.path.realpath(os.path.join(params.dir, arg.split("::")[0])) == me:
            return True
    return False


def run(request, check, page: str):
    """Run `check` on the student's module; `page` is the exercise's docs page (for messages)."""
    path = impl_path()
    shown = os.path.relpath(path, ROOT) if path.startswith(ROOT) else path
    try:
        impl = load(path)
    except Exception as e:  # a syntax error or failing import in the student's file
        problem = f"cannot import {shown}: {type(e).__name__}: {e}"
    else:
        problem = missing = None
        try:
            with torch.no_grad():
                check(impl)
        except NotImplementedError as e:
            missing = str(e) or "a function"
        except CheckFailed as e:
            problem = f"{shown}: {e}"
        if missing and strict(request):
            problem = f"not implemented yet: {missing} (edit {shown}; the task is in docs/{page})"
        elif missing:
            pytest.skip(f"exercise not attempted: {missing} in {shown} still raises NotImplementedError "
                        f"(docs/{page}; run this file alone to check it)")
    if problem:  # outside the except blocks: the report shows the message alone, no traceback chain
        pytest.fail(problem, pytrace=False)


# ----------------------------------------------------------------------------------------------
# Comparing tensors, with messages that say where and by how much
# ----------------------------------------------------------------------------------------------

def describe(t) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" if torch.is_tensor(t) else repr(t)


def mismatch(got, want, atol: float = 0.0, rtol: float = 0.0, allowed: float = 0.0) -> str | None:
    """None when `got` equals `want` within atol + rtol * |want| (a fraction `allowed` of the
    elements may miss that by one rounding step of the dtype); else what differs, in words."""
    if not torch.is_tensor(got):
        return f"returned {type(got).__name__}, expected a tensor"
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    if got.dtype != want.dtype:
        return f"dtype {str(got.dtype)[6:]}, expected {str(want.dtype)[6:]}"  # (without "torch.")
    if want.dtype == torch.bool:
        bad = got != want
        if bad.any():
            idx = tuple(int(i) for i in bad.nonzero()[0])
            return (f"{int(bad.sum())} of {want.numel()} entries differ, the first at index {idx} "
                    f"(yours {bool(got[idx])}, expected {bool(want[idx])})")
        return None
    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    if torch.isnan(g).any() and not torch.isnan(w).any():
        return f"NaN at index {tuple(int(i) for i in torch.isnan(g).nonzero()[0])}, the reference has none"
    both_inf = torch.isinf(g) & torch.isinf(w) & (torch.sign(g) == torch.sign(w))
    diff = torch.where(both_inf, torch.zeros_like(g), (g - w).abs()).nan_to_num(nan=0.0, posinf=float("inf"))
    limit = atol + rtol * w.abs().nan_to_num(posinf=0.0, neginf=0.0)
    bad = diff > limit
    if allowed and want.dtype in (torch.bfloat16, torch.float16):
        step = torch.finfo(want.dtype).eps * w.abs().clamp(min=torch.finfo(want.dtype).tiny) * 1.01
        one_step = bad & (diff <= limit + step)
        if int(one_step.sum()) <= allowed * want.numel():
            bad = bad & ~one_step
    if not bad.any():
        return None
    worst = tuple(int(i) for i in torch.nonzero(diff == diff[bad].max())[0])
    return (f"max abs difference {float(diff[worst]):.3g} at index {worst} (yours {float(g[worst]):.6g}, "
            f"expected {float(w[worst]):.6g}); {int(bad.sum())} of {want.numel()} elements are off by more "
            f"than the tolerance (atol {atol:g}, rtol {rtol:g})")


def compare(got, want, case: str, atol: float = 0.0, rtol: float = 0.0, allowed: float = 0.0, causes=()):
    """Fail with a message naming the case when got != want. causes: (tensor, explanation) pairs of
    known mistakes; when `got` equals one of them, its explanation is added as the likely cause."""
    problem = mismatch(got, want, atol, rtol, allowed)
    if problem is None:
        return
    likely = [why for alt, why in causes
              if torch.is_tensor(got) and mismatch(got, alt, atol, rtol, allowed) is None]
    fail(f"{case}: {problem}." + (f" Likely cause: {likely[0]}" if likely else ""))


def call(f, *args, case: str, **kwargs):
    """f(*args) with the case named when the student's code raises (not NotImplementedError)."""
    try:
        return f(*args, **kwargs)
    except NotImplementedError:
        raise
    except Exception as e:
        fail(f"{case}: {getattr(f, '__name__', 'your function')} raised {type(e).__name__}: {e}")
