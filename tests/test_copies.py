"""The three model files speak one vocabulary: what they share is written identically.

Each model file stands alone (copied into another project, it needs nothing of this one), so the
code they have in common is written out in each of them. This test holds those copies together, as
transformers' `# Copied from` checks do: COPIES declares every shared function, class and method
and the files that hold it; each copy, after the file's own names are replaced by placeholders
(NAMES), must equal the first file's, character for character. Everything else in a model file is
declared in OWN: written per file on purpose, where the architectures differ (each file's header
says how). A new top-level name, or a method of a shared class, must be declared in one of the two.

docs/hooks.py reads COPIES too: the walkthroughs' table of shared blocks is built from it, and their
side-by-side "what differs" views are allowed only for blocks that are not declared copies.

This module needs only the standard library (the docs hook imports it).
"""
import ast
import difflib
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ALL = ("qwen2.py", "qwen2_moe.py", "qwen3_moe.py")
MOE = ("qwen2_moe.py", "qwen3_moe.py")

# What each file calls the things the copies mention; replaced by the placeholder before comparing.
CLASSES = {"Config": "{Config}", "Model": "{Model}", "ForCausalLM": "{LM}",
           "ForSequenceClassification": "{SeqCls}", "ForTokenClassification": "{TokCls}",
           "ForQuestionAnswering": "{QA}"}
NAMES = {
    "qwen2.py": {**{"Qwen2" + k: v for k, v in CLASSES.items()},
                 "Qwen2 / Qwen2.5": "{family}", "Qwen/Qwen2.5-0.5B-Instruct": "{hub_id}"},
    "qwen2_moe.py": {**{"Qwen2Moe" + k: v for k, v in CLASSES.items()},
                     "Qwen1.5-MoE / Qwen2-MoE": "{family}", "Qwen/Qwen1.5-MoE-A2.7B-Chat": "{hub_id}"},
    "qwen3_moe.py": {**{"Qwen3Moe" + k: v for k, v in CLASSES.items()},
                     "Qwen3-MoE / Qwen3": "{family}", "Qwen/Qwen3-30B-A3B": "{hub_id}"},
}

# (symbol, files that hold it identically), in the order of the files' sections. A symbol is a
# top-level name or "Class.method"; {Config}, {Model}, {LM}, ... stand for each file's class names.
COPIES = [
    # configuration
    ("{Config}.window", ALL),
    ("{Config}.is_sparse", MOE),
    # RMSNorm and rotary position embeddings
    ("RMSNorm", ALL),
    ("rope_frequencies", ALL),
    ("RotaryEmbedding", ALL),
    ("rotate_half", ALL),
    ("apply_rope", ALL),
    # attention
    ("visibility_mask", ALL),
    ("Step", ALL),
    ("reference_attention", ALL),
    ("sdpa_attention", ALL),
    ("KVCache", ALL),
    # feed-forward
    ("MLP", ALL),
    ("route", MOE),
    ("experts_reference", MOE),
    ("Experts", MOE),
    # layer, model, causal LM
    ("DecoderLayer", MOE),
    ("cache_slots", ALL),
    ("{Model}.__init__", ALL),
    ("{Model}.setup_cache", ALL),
    ("{Model}.clear_cache", ALL),
    ("{Model}.make_step", ALL),
    ("{Model}.forward", MOE),
    ("{LM}.__init__", MOE),
    ("{LM}.setup_cache", ALL),
    ("{LM}.clear_cache", ALL),
    ("{LM}.forward", MOE),
    ("{LM}.device", ALL),
    ("{LM}.dtype", ALL),
    # task heads
    ("{SeqCls}", MOE),
    ("{TokCls}", MOE),
    ("last_token_index", ALL),
    ("embed", ALL),
    # losses
    ("causal_lm_loss", ALL),
    ("sequence_classification_loss", ALL),
    ("token_classification_loss", ALL),
    ("question_answering_loss", ALL),
    ("load_balancing_loss", MOE),
    ("decoder_outputs", MOE),
    ("with_aux_loss", MOE),
    # loading
    ("DTYPES", ALL),
    ("HEADS", ALL),
    ("parameter_for", ALL),
    ("EXPERT_KEY", MOE),
    ("set_parameter", ALL),
    ("load_weights", MOE),
    ("from_pretrained", ALL),
]

# Written per file on purpose (the methods of a class listed here are its own unless in COPIES).
OWN = {
    "{Config}": "each architecture's fields, defaults and layer rules",
    "QWEN3_DENSE_DEFAULTS": "dense Qwen3's defaults (qwen3_moe.py only)",
    "Attention": "q/k/v bias rules; Qwen3's q_norm and k_norm",
    "SparseMoeBlock": "Qwen2-MoE's shared expert; Qwen3-MoE has none",
    "DecoderLayer": "qwen2.py: a dense MLP and no router logits",
    "{Model}": "the class docstring; forward in qwen2.py returns no router logits",
    "{LM}": "the class docstring; qwen2.py has no router logits or aux loss",
    "MODEL_TYPES": "the model_type values the file loads",
    "ARCHITECTURES": "the classes each file builds, by their transformers names",
    "{SeqCls}": "qwen2.py: no router logits or aux loss",
    "{TokCls}": "qwen2.py: no router logits or aux loss",
    "{QA}": "the decoder stack's name (transformers: `model` in Qwen2-MoE's, `transformer` elsewhere); "
            "qwen2.py: no router logits or aux loss",
    "Qwen3Model": "dense Qwen3's classes under transformers' dense names (qwen3_moe.py only)",
    "Qwen3ForCausalLM": "(the same)",
    "Qwen3ForSequenceClassification": "(the same)",
    "Qwen3ForTokenClassification": "(the same)",
    "Qwen3ForQuestionAnswering": "(the same)",
    "load_weights": "qwen2.py: no per-expert tensors to stack",
}

SECTIONS = ["Configuration", "RMSNorm and rotary position embeddings", "Attention", "Feed-forward",
            "Layer, model, causal LM",
            "Task heads: sequence classification (reward models), token classification, question answering",
            "Losses", "Loading a checkpoint"]


def symbol_in(file: str, symbol: str) -> str:
    """`symbol` ("{LM}.forward", ...) with file's own class names."""
    for name, placeholder in NAMES.get(file, {}).items():
        if placeholder in CLASSES.values():
            symbol = symbol.replace(placeholder, name)
    return symbol


def normalised(file: str, text: str) -> str:
    """`text` with file's own names replaced by the placeholders."""
    for name, placeholder in NAMES.get(file, {}).items():
        text = re.sub(rf"(?<![\w/.-]){re.escape(name)}(?![\w])", placeholder, text)
    return text


def _tree(file: str):
    with open(os.path.join(ROOT, file), encoding="utf-8") as f:
        text = f.read()
    return text, ast.parse(text)


def _named(body, name):
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
            return node
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return node
    return None


def source_of(file: str, symbol: str) -> str | None:
    """The source text of `symbol` (placeholders allowed) in `file`, normalised; None if absent."""
    text, tree = _tree(file)
    node, body = None, tree.body
    for part in symbol_in(file, symbol).split("."):
        node = _named(body, part)
        if node is None:
            return None
        body = getattr(node, "body", [])
    first = min([d.lineno for d in getattr(node, "decorator_list", [])] + [node.lineno])
    lines = text.splitlines()[first - 1:node.end_lineno]
    indent = len(lines[0]) - len(lines[0].lstrip())
    return normalised(file, "\n".join(line[indent:] for line in lines))


def declared_symbols(file: str) -> set[str]:
    """Every COPIES and OWN symbol that applies to `file`, with its own class names."""
    copies = {symbol_in(file, s) for s, files in COPIES if file in files}
    return copies | {symbol_in(file, s) for s in OWN}


def defined_symbols(file: str) -> list[str]:
    """Top-level names of `file`, and the methods of its classes, in file order."""
    _, tree = _tree(file)
    names = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.append(node.name)
            if isinstance(node, ast.ClassDef):
                names += [f"{node.name}.{m.name}" for m in node.body if isinstance(m, ast.FunctionDef)]
        elif isinstance(node, ast.Assign):
            names += [t.id for t in node.targets if isinstance(t, ast.Name)]
    return names


def drift(symbol: str, files) -> str | None:
    """A unified diff between the first file's copy of `symbol` and the first copy that differs."""
    first = source_of(files[0], symbol)
    for other in files[1:]:
        copy = source_of(other, symbol)
        if copy is None:
            return f"{symbol_in(other, symbol)} is missing from {other}"
        if copy != first:
            return "\n".join(difflib.unified_diff(first.splitlines(), copy.splitlines(), files[0], other,
                                                  lineterm="", n=1))
    return None


# ----------------------------------------------------------------------------------------------
# The tests
# ----------------------------------------------------------------------------------------------

def test_copies_are_identical():
    problems = []
    for symbol, files in COPIES:
        if source_of(files[0], symbol) is None:
            problems.append(f"{symbol_in(files[0], symbol)} is missing from {files[0]}")
            continue
        diff = drift(symbol, files)
        if diff:
            problems.append(f"{symbol} drifted (declared identical in {', '.join(files)}):\n{diff}")
    assert not problems, "\n\n".join(problems)


def test_every_name_is_declared():
    """A new function, class, constant or method of a model file is either a declared copy or its own."""
    for file in ALL:
        declared = declared_symbols(file)  # (a declared class covers its methods)
        for name in defined_symbols(file):
            if name not in declared and not ("." in name and name.split(".")[0] in declared):
                raise AssertionError(f"{file}: {name} is neither in COPIES nor in OWN (tests/test_copies.py)")


def test_shared_blocks_come_in_the_same_order():
    for file in ALL:
        defined = defined_symbols(file)
        shared = [symbol_in(file, s) for s, files in COPIES if file in files]
        positions = [defined.index(s) for s in shared]
        assert positions == sorted(positions), (
            f"{file}: the shared blocks are not in the order of COPIES: "
            f"{[s for _, s in sorted(zip(positions, shared))]}")


def test_sections_are_the_same():
    for file in ALL:
        text, _ = _tree(file)
        headers = re.findall(r"^# -{20,}\n# (.+)\n# -{20,}$", text, re.M)
        assert headers == SECTIONS, f"{file}: sections {headers}, expected {SECTIONS}"


def test_a_one_character_change_is_caught(tmp_path, monkeypatch):
    """The check is not vacuous: change one character of one copy and it reports that block."""
    import shutil
    for file in ALL + ("tokenizer.py",):
        shutil.copy(os.path.join(ROOT, file), tmp_path / file)
    text = (tmp_path / "qwen3_moe.py").read_text()
    changed = text.replace("x32.pow(2).mean(-1, keepdim=True) + self.eps", "x32.pow(2).mean(-1, "
                                                                           "keepdim=True) - self.eps")
    assert changed != text
    (tmp_path / "qwen3_moe.py").write_text(changed)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(tmp_path))
    diff = drift("RMSNorm", ALL)
    changed_line = "+        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) - self.eps)"
    assert diff is not None and changed_line in diff
    assert drift("rotate_half", ALL) is None


def test_docs_diff_views_show_only_blocks_that_differ():
    """The walkthroughs' "what differs" views ({{ diff(...) }}) are for the blocks each file writes its
    own way; the declared copies are listed by the {{ copies(...) }} table instead."""
    marker = re.compile(r'\{\{\s*diff\(\s*"([^"]+)",\s*"([^"]+)",\s*"([^"]+)"(?:,\s*"([^"]+)")?\s*\)\s*\}\}')
    for page in ("walkthrough/qwen2.md", "walkthrough/qwen2_moe.md", "walkthrough/qwen3_moe.md"):
        with open(os.path.join(ROOT, "docs", page), encoding="utf-8") as f:
            for a, symbol, b, other in marker.findall(f.read()):
                if other and other != symbol:
                    continue
                for generic, files in COPIES:
                    if a in files and b in files and symbol_in(a, generic) == symbol:
                        raise AssertionError(f"docs/{page} shows a diff of {symbol} in {a} and {b}, which "
                                             f"COPIES declares identical: use the copies table")
