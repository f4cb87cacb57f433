"""mkdocs hook: the docs quote the repository's code as it is now, never a hand-made copy.

Markers, written in any page of docs/ (a block marker alone on its line, possibly indented):

    {{ source("qwen2.py", "RMSNorm") }}            the whole class / function / assignment, with the file's
                                                   own line numbers, a caption "qwen2.py, lines A–B" linking
                                                   to those lines, and a GitHub link when repo_url is set
    {{ signature("qwen2.py", "from_pretrained") }} its header and docstring only (API reference)
    {{ diff("qwen2.py", "Attention", "qwen3_moe.py") }}
                                                   a unified diff of one symbol in two files (a fourth
                                                   argument names a different symbol in the second file);
                                                   "identical" when there is no difference
    {{ copies("qwen2_moe.py") }}                   a table of the blocks the file shares with its siblings, as
                                                   tests/test_copies.py declares them (and holds them to it)
    {{ ref("qwen2.py", "Qwen2Config.window") }}    inline: a link to the lines, labelled `Qwen2Config.window`
    {{ ref("qwen2.py", "Qwen2Config.window", "the rule") }}   ... with a label of your own

Symbols are found with `ast`: a top-level name, or dotted for a method ("Qwen2ForCausalLM.forward").
A marker that names a missing file or symbol logs a warning, so `mkdocs build --strict` fails.
Write `\\{{ ... }}` for a marker that must stay literal text.

The files the markers may quote are listed in mkdocs.yml (`extra.qwen_source.files`); each also gets
a generated page (source/<file>.md) with the whole file and an anchor per line, which the captions
and `ref` links point to, so the links work offline and without a repository host.
"""
from __future__ import annotations

import ast
import difflib
import html
import logging
import os
import re

log = logging.getLogger("mkdocs.plugins.qwen_source")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_DIR = "source"  # generated pages: docs/source/<file>.md (virtual, never written to disk)

BLOCK = re.compile(r'^([ \t]*)(\\?)\{\{\s*(source|signature|diff|copies|readme)\((.*?)\)\s*\}\}[ \t]*$', re.M)
INLINE = re.compile(r'(\\?)\{\{\s*(ref)\((.*?)\)\s*\}\}')
MODEL_CLASS = re.compile(r"\bQwen\w*?(?=Config\b|ForCausalLM\b)")  # the "Qwen2Moe" of Qwen2MoeConfig, ...
LEFTOVER = re.compile(r'(?<!\\)\{\{\s*(source|signature|diff|copies|readme|ref)\(')


class MarkerError(ValueError):
    pass


# ----------------------------------------------------------------------------------------------
# Finding symbols
# ----------------------------------------------------------------------------------------------

_cache: dict[str, tuple[float, list[str], ast.Module]] = {}


def read(path: str) -> tuple[list[str], ast.Module]:
    """The lines and syntax tree of a repository file (relative path), cached until it changes."""
    full = os.path.join(ROOT, path)
    if not os.path.isfile(full):
        raise MarkerError(f"no file {path} in the repository")
    mtime = os.path.getmtime(full)
    if path not in _cache or _cache[path][0] != mtime:
        with open(full, encoding="utf-8") as f:
            text = f.read()
        _cache[path] = (mtime, text.splitlines(), ast.parse(text, filename=path))
    return _cache[path][1], _cache[path][2]


def _named(body, name):
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return node
        targets = node.targets if isinstance(node, ast.Assign) else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return node
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
            return node
    return None


def find(path: str, symbol: str) -> ast.AST:
    """The ast node of `symbol` ("name" or "Class.method") in the file `path`."""
    _, tree = read(path)
    node, body = None, tree.body
    for part in symbol.split("."):
        node = _named(body, part)
        if node is None:
            raise MarkerError(f"{path} has no symbol {symbol!r}" + ("" if "." not in symbol else
                              f" (no {part!r} in {symbol.rsplit('.', 1)[0]})"))
        body = getattr(node, "body", [])
    return node


def span(path: str, symbol: str, header_only: bool = False) -> tuple[int, int]:
    """First and last line (1-based, inclusive) of a symbol, decorators included; with header_only,
    up to the end of its docstring (or of its header when it has none)."""
    node = find(path, symbol)
    start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    end = node.end_lineno
    if header_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        first = node.body[0]
        doc = isinstance(first, ast.Expr) and isinstance(getattr(first.value, "value", None), str)
        end = first.end_lineno if doc else first.lineno - 1
    return start, end


def load_copies():
    """tests/test_copies.py, the declaration of the model files' shared blocks (standard library only)."""
    import importlib.util
    path = os.path.join(ROOT, "tests", "test_copies.py")
    spec = importlib.util.spec_from_file_location("qwen_copies", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def code(path: str, start: int, end: int) -> str:
    lines, _ = read(path)
    return "\n".join(lines[start - 1:end])


def parse_args(text: str) -> list[str]:
    try:
        call = ast.parse(f"f({text})", mode="eval").body
        args = [ast.literal_eval(a) for a in call.args]
    except (SyntaxError, ValueError) as e:
        raise MarkerError(f"cannot read the arguments ({text}): {e}") from None
    if call.keywords or not all(isinstance(a, str) for a in args):
        raise MarkerError(f"arguments must be plain strings: ({text})")
    return args


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------

class Renderer:
    """Turns markers into markdown for one page. `link(path, a, b)` gives the URL of lines a..b."""

    def __init__(self, files: list[str], link=None, repo_link=None):
        self.files = files
        self.link = link or (lambda path, a, b: None)
        self.repo_link = repo_link or (lambda path, a, b: None)

    def check_file(self, path):
        if path not in self.files:
            raise MarkerError(f"{path} is not listed in mkdocs.yml's extra.qwen_source.files")

    def caption(self, path, a, b):
        label = f"{path}, lines {a}–{b}" if a != b else f"{path}, line {a}"
        url = self.link(path, a, b)
        parts = [f'<a href="{html.escape(url)}">{html.escape(label)}</a>' if url else html.escape(label)]
        repo = self.repo_link(path, a, b)
        if repo:
            parts.append(f'<a href="{html.escape(repo)}">view on the repository</a>')
        return f'<p class="qwen-caption">{" · ".join(parts)}</p>'

    def fenced(self, text, lang="python", first_line=None):
        ticks = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", text)), default=0))
        opts = f' linenums="{first_line}"' if first_line else ""
        return f"{ticks}{lang}{opts}\n{text}\n{ticks}"

    def source(self, path, symbol, header_only=False):
        self.check_file(path)
        a, b = span(path, symbol, header_only)
        return self.caption(path, a, b) + "\n\n" + self.fenced(code(path, a, b), first_line=a)

    def signature(self, path, symbol):
        return self.source(path, symbol, header_only=True)

    def diff(self, path_a, symbol, path_b, symbol_b=None):
        symbol_b = symbol_b or symbol
        for p in (path_a, path_b):
            self.check_file(p)
        (a0, a1), (b0, b1) = span(path_a, symbol), span(path_b, symbol_b)
        left, right = code(path_a, a0, a1).splitlines(), code(path_b, b0, b1).splitlines()
        name_a, name_b = f"{path_a}: {symbol}", f"{path_b}: {symbol_b}"
        links = self.caption(path_a, a0, a1) + "\n" + self.caption(path_b, b0, b1)
        same = f'<code>{html.escape(symbol_b)}</code> in {html.escape(path_b)} is identical to ' \
               f'<code>{html.escape(symbol)}</code> in {html.escape(path_a)}'
        if left == right:
            return f'<p class="qwen-same">{same}.</p>\n' + links
        if [MODEL_CLASS.sub("Qwen", s) for s in left] == [MODEL_CLASS.sub("Qwen", s) for s in right]:
            return (f'<p class="qwen-same">{same}, except for the name of its file\'s model classes.</p>\n'
                    + links)
        diff = difflib.unified_diff(left, right, name_a, name_b, n=3, lineterm="")
        return links + "\n\n" + self.fenced("\n".join(diff), lang="diff")

    def copies(self, path):
        declared = load_copies()
        rows = []
        for generic, files in declared.COPIES:
            if path in files:
                others = ", ".join(f for f in files if f != path)
                rows.append(f"| {self.ref(path, declared.symbol_in(path, generic))} | {others} |")
        if not rows:
            raise MarkerError(f"tests/test_copies.py declares no copies in {path}")
        return "| block | written identically in |\n|---|---|\n" + "\n".join(rows)

    def readme(self, heading):
        """The body of the README's section `## heading`: one source for what both say (the set-up)."""
        with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
            text = f.read()
        match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
        if not match:
            raise MarkerError(f"README.md has no section '## {heading}'")
        return match.group(1).strip()

    def ref(self, path, symbol, label=None):
        self.check_file(path)
        a, b = span(path, symbol)
        url = self.link(path, a, b)
        text = f"<code>{html.escape(label or symbol)}</code>"
        title = html.escape(f"{path}, lines {a}–{b}")
        return f'<a href="{html.escape(url)}" title="{title}">{text}</a>' if url else text

    # -- markdown in, markdown out ---------------------------------------------------------------
    def render(self, markdown: str, where: str = "") -> str:
        def block(m):
            indent, escaped, kind, args = m.groups()
            if escaped:
                return m.group(0)
            try:
                out = getattr(self, kind)(*parse_args(args))
            except (MarkerError, TypeError) as e:
                log.warning(f"{where}: {{{{ {kind}({args}) }}}}: {e}")
                out = f'!!! failure "broken marker"\n    {kind}({html.escape(args)}): {html.escape(str(e))}'
            return "\n".join(indent + line if line else line for line in out.splitlines())

        def inline(m):
            escaped, kind, args = m.groups()
            if escaped:
                return m.group(0)
            try:
                return self.ref(*parse_args(args))
            except (MarkerError, TypeError) as e:
                log.warning(f"{where}: {{{{ ref({args}) }}}}: {e}")
                return f"**broken marker: {html.escape(str(e))}**"

        markdown = BLOCK.sub(block, markdown)
        for m in LEFTOVER.finditer(INLINE.sub("", markdown)):
            log.warning(f"{where}: a {m.group(1)}(...) marker must stand alone on its line")
        return INLINE.sub(inline, markdown).replace("\\{{", "{{")  # escaped markers: literal text


def source_page(path: str) -> str:
    return f"{SOURCE_DIR}/{path}.md"


def source_page_markdown(path: str, repo_link=None) -> str:
    lines, _ = read(path)
    repo = repo_link(path, 1, len(lines)) if repo_link else None
    note = f' · <a href="{html.escape(repo)}">view on the repository</a>' if repo else ""
    fence = Renderer([path]).fenced("\n".join(lines), first_line=1)
    return (f"# {path}\n\n<p class=\"qwen-caption\">The whole file as it is in this build, {len(lines)} "
            f"lines; every line has an anchor, which the walkthroughs link to.{note}</p>\n\n{fence}\n")


# ----------------------------------------------------------------------------------------------
# mkdocs events
# ----------------------------------------------------------------------------------------------

def _settings(config):
    s = dict(config.extra.get("qwen_source") or {})
    return list(s.get("files") or []), s.get("branch") or "main"


def _repo_link(config):
    repo_url, (_, branch) = config.repo_url, _settings(config)
    if not repo_url:
        return None
    base = repo_url.rstrip("/")
    return lambda path, a, b: f"{base}/blob/{branch}/{path}#L{a}" + (f"-L{b}" if b != a else "")


def on_config(config):
    """Add a "Source code" section with the generated pages to the nav."""
    files, _ = _settings(config)
    if config.nav is not None and files:
        config.nav.append({"Source code": [{path: source_page(path)} for path in files]})
    return config


STARTER = os.path.join(ROOT, "docs", "exercises", "starter.py")


def answered(path: str) -> list[str]:
    """The functions of an exercise file that no longer end in `raise NotImplementedError` (a
    class's __init__ aside): answers, where the starter has stubs."""
    with open(path) as f:
        tree = ast.parse(f.read())
    done = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name != "__init__":
            last = node.body[-1]
            stub = (isinstance(last, ast.Raise) and isinstance(last.exc, ast.Call)
                    and getattr(last.exc.func, "id", "") == "NotImplementedError")
            if not stub:
                done.append(node.name)
    return done


def on_files(files, config):
    from mkdocs.exceptions import PluginError
    from mkdocs.structure.files import File
    done = answered(STARTER)
    if done:  # the site offers the starter for download: never with answers in it
        raise PluginError(f"docs/exercises/starter.py has answers in it ({', '.join(done)}): the "
                          f"site would publish them. Keep answers in my_answers.py (python "
                          f"docs/exercises/starter.py makes it) and restore the starter with git checkout "
                          f"docs/exercises/starter.py")
    paths, _ = _settings(config)
    for path in paths:
        try:
            content = source_page_markdown(path, _repo_link(config))
        except (MarkerError, SyntaxError) as e:
            log.warning(f"extra.qwen_source.files: {e}")
            continue
        files.append(File.generated(config, source_page(path), content=content))
    return files


def on_page_markdown(markdown, page, config, files):
    from mkdocs.utils import get_relative_url
    paths, _ = _settings(config)
    if page.file.src_uri.startswith(SOURCE_DIR + "/"):
        return markdown

    def link(path, a, b):
        target = files.get_file_from_path(source_page(path))
        if target is None:
            return None
        return f"{get_relative_url(target.url, page.file.url)}#__codelineno-0-{a}"

    return Renderer(paths, link, _repo_link(config)).render(markdown, page.file.src_uri)


def on_serve(server, config, builder):
    """`mkdocs serve` rebuilds when a quoted file changes."""
    for path in _settings(config)[0]:
        server.watch(os.path.join(ROOT, path))
    return server
