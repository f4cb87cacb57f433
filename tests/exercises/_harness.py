"""What every exercise checker shares: finding the student's code, running a check, messages.

The student's code is the file named by QWEN_EXERCISE_IMPL, else my_answers.py at the repository
root (ignored by git; `python docs/exercises/starter.py` creates it from the starter), else the
untouched starter docs/exercises/starter.py. Answers never live in a tracked file, so `git pull`
never conflicts and the site (built from docs/) never contains them.

Whether a checker looks at the student's code depends on what the run names:
* the checker's file (`pytest tests/exercises/test_rmsnorm.py`, the command on each exercise page):
  the student asked for this check; a stub that still raises NotImplementedError FAILS with
  "not implemented yet";
* the folder tests/exercises (`pytest tests/exercises -rs`): every exercise attempted is checked,
  the others SKIP with that reason;
* anything else: the checkers SKIP without reading the student's file. The repository's own suite
  (`pytest`) does not even collect them (pyproject.toml's norecursedirs), so it stays green, with
  no skips, whatever a student has solved or got wrong.
QWEN_EXERCISE_STRICT=1 (check, fail when not implemented) or 0 (check, skip when not implemented)
overrides the choice. QWEN_EXERCISE_ALONE=1 refuses an answer file that imports the project's
model files or transformers (the answer would be copied, not written): for grading.

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
ANSWERS = os.path.join(ROOT, "my_answers.py")  # the default answer file (.gitignore lists it)
EXERCISES = os.path.join(ROOT, "tests", "exercises")
IMPL_ENV, STRICT_ENV, ALONE_ENV = "QWEN_EXERCISE_IMPL", "QWEN_EXERCISE_STRICT", "QWEN_EXERCISE_ALONE"
# What an answer may not import under QWEN_EXERCISE_ALONE=1: the project's modules and the oracle.
FORBIDDEN = {"qwen2", "qwen2_moe", "qwen3_moe", "tokenizer", "generate", "quantize", "parallel",
             "qwen_kernels", "transformers", "reference", "tests"}


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
        return ANSWERS if os.path.isfile(ANSWERS) else STARTER
    for candidate in (os.path.abspath(os.path.expanduser(path)), os.path.join(ROOT, path)):
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"{IMPL_ENV}={path}: no such file")


def forbidden_import(path: str) -> str | None:
    """The first import of a project module or transformers in the file at `path` (import
    statements, importlib.import_module / __import__ of a constant name, or loading a file by its
    path), as "name (line N)"; None when there is none."""
    import ast
    with open(path) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = ["." if node.level else node.module or ""]
        elif isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name)):
            called = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
            if called == "spec_from_file_location":
                return f"a file by its path (line {node.lineno})"
            constant = node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value
            by_name = called in ("import_module", "__import__") and isinstance(constant, str)
            names = [constant] if by_name else []
        else:
            continue
        for name in names:
            if name.startswith(".") or name.split(".")[0] in FORBIDDEN:
                return f"{name} (line {node.lineno})"
    return None


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


def mode(request) -> str:
    """"strict" (check; not implemented fails), "lenient" (check; not implemented skips) or "off"
    (do not read the student's file), from what the run names (see the module docstring)."""
    env = os.environ.get(STRICT_ENV)
    if env in ("0", "1"):
        return "strict" if env == "1" else "lenient"
    me = os.path.realpath(str(request.node.path))
    params = request.config.invocation_params
    named = {os.path.realpath(os.path.join(params.dir, arg.split("::")[0]))
             for arg in params.args if not arg.startswith("-")}
    if me in named:
        return "strict"
    return "lenient" if os.path.realpath(EXERCISES) in named else "off"


def run(request, check, page: str):
    """Run `check` on the student's module; `page` is the exercise's docs page (for messages)."""
    how = mode(request)
    if how == "off":
        this = os.path.relpath(str(request.node.path), ROOT)
        pytest.skip(f"exercise checks run when asked: pytest {this}, or pytest tests/exercises -rs (all)")
    path = impl_path()
    shown = os.path.relpath(path, ROOT) if path.startswith(ROOT) else path
    copied = forbidden_import(path) if os.environ.get(ALONE_ENV) == "1" and path != STARTER else None
    if copied:
        pytest.fail(f"{shown} imports {copied}: with {ALONE_ENV}=1 the answers must be written, not imported "
                    f"from the model files", pytrace=False)
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
        edit = (f"edit {shown}" if path != STARTER else
                "copy the starter with python docs/exercises/starter.py, then edit my_answers.py")
        if missing and how == "strict":
            problem = f"not implemented yet: {missing} ({edit}; the task is in docs/{page})"
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
