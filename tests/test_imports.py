"""Imports point down, with no cycles: the project's modules in layers, each importing only from the
layers below it (qwen_kernels' modules also from each other).

    0  qwen2, qwen2_moe, qwen3_moe, tokenizer    each stands alone
    1  checkpoint, qwen_kernels                 the checkpoint reader; the fast paths
    2  quantize, parallel                       the add-ons, rewriting a loaded model from outside
    3  generate                                 the generation library and its command line
    4  bench                                    speed measurements

Every import statement counts, inside functions too (a lazy import is still an edge).
"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LAYERS = [
    ("qwen2", "qwen2_moe", "qwen3_moe", "tokenizer"),
    ("checkpoint", "qwen_kernels"),
    ("quantize", "parallel"),
    ("generate",),
    ("bench",),
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def project_modules() -> dict[str, str]:
    """Top-level module name -> its files' sources joined (a package: all its .py files)."""
    out = {}
    for name in LAYER:
        path = os.path.join(ROOT, name)
        files = ([os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".py")]
                 if os.path.isdir(path) else [path + ".py"])
        out[name] = [(f, open(f, encoding="utf-8").read()) for f in files]
    return out


def imported(source: str) -> set[str]:
    """The top-level names of every module an import statement in `source` names (relative imports
    stay inside their package and are left out)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {a.name.partition(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    return names


def violations(modules: dict) -> list[str]:
    """Each import of a project module that does not point to a lower layer."""
    problems = []
    for name, files in modules.items():
        for path, source in files:
            for target in sorted(imported(source) & set(LAYER)):
                if target != name and LAYER[target] >= LAYER[name]:
                    direction = "up" if LAYER[target] > LAYER[name] else "sideways"
                    problems.append(f"{os.path.relpath(path, ROOT)} imports {target}: layer {LAYER[name]} -> "
                                    f"{LAYER[target]} ({direction})")
    return problems


def test_every_project_module_is_in_a_layer():
    """A new top-level module must be placed in LAYERS (pyproject.toml installs these)."""
    from test_install import our_top_level_names
    assert our_top_level_names() == set(LAYER), our_top_level_names() ^ set(LAYER)


def test_imports_point_down():
    problems = violations(project_modules())
    assert not problems, "\n".join(problems)


def test_the_check_sees_an_upward_and_a_sideways_import():
    """The check can fail: a model file importing generate (up), quantize importing parallel (sideways),
    and the same inside a function."""
    modules = {"qwen2": [("qwen2.py", "import torch\nimport generate\n")],
               "quantize": [("quantize.py", "def f():\n    from parallel import shard\n")],
               "generate": [("generate.py", "import checkpoint\nimport qwen_kernels.cpu\n")]}
    assert violations(modules) == ["qwen2.py imports generate: layer 0 -> 3 (up)",
                                   "quantize.py imports parallel: layer 2 -> 2 (sideways)"]
