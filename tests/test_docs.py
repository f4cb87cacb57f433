"""The docs site (docs/, mkdocs.yml): code markers resolve, the commands written in the pages exist,
the pages' Python blocks run, the exercise checkers tell right from wrong, the strict build passes.

Conventions of the pages (docs/about.md): every ```python block runs, page by page in one namespace,
from the repository root; `<!-- docs-test: skip -->` on the line before a block skips it;
`<!-- docs-test: tiny-checkpoint -->` runs it with the hub ids ("Qwen/...") replaced by a tiny checkpoint
(a reward or an embedding model when the id names one).
"""
import ast
import contextlib
import glob
import importlib.util
import io
import logging
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT

DOCS = os.path.join(ROOT, "docs")
ROOT_DOCS_IMG = pathlib.Path(DOCS) / "img"
PAGES = sorted(os.path.relpath(p, DOCS) for p in glob.glob(os.path.join(DOCS, "**", "*.md"), recursive=True))
MARKER = re.compile(r"^<!--\s*docs-test:\s*([\w-]+)\s*-->\s*$")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w-]*)")
HUB_ID = re.compile(r"""(["'])(?:Qwen|Skywork)/[\w.-]+\1""")
# tiny-checkpoint blocks: a hub id naming one of these stands for that tiny checkpoint (conftest's fixtures)
TINY_FIXTURES = {"Reward": "tiny_reward_checkpoint", "Embedding": "tiny_embedding_checkpoint"}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is faster than two, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hooks = load_module("docs_hooks", os.path.join(DOCS, "hooks.py"))


def read(page):
    with open(os.path.join(DOCS, page), encoding="utf-8") as f:
        return f.read()


def code_blocks(text):
    """(language, code, directive, line number) of every fenced block, dedented; directive is the
    docs-test comment on the line before the fence, or None."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = len(m.group(1)), m.group(2), m.group(3)
        prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        directive = MARKER.match(prev.strip())
        body, j = [], i + 1
        while j < len(lines) and not re.match(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[j]):
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        blocks.append((lang, "\n".join(body), directive.group(1) if directive else None, i + 1))
        i = j + 1
    return blocks


def mkdocs_settings():
    """mkdocs.yml as a dict (its !!python/name tags, not needed here, read as None)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)
    with open(os.path.join(ROOT, "mkdocs.yml")) as f:
        config = yaml.load(f, Loader=Loader)
    return config


# ----------------------------------------------------------------------------------------------
# Markers: every {{ source(...) }} etc. names a real symbol; a missing one fails the strict build
# ----------------------------------------------------------------------------------------------

def test_every_marker_resolves(caplog):
    files = mkdocs_settings()["extra"]["qwen_source"]["files"]
    assert all(os.path.isfile(os.path.join(ROOT, f)) for f in files), files
    renderer = hooks.Renderer(files)
    count = 0
    with caplog.at_level(logging.WARNING, logger="mkdocs.plugins.qwen_source"):
        for page in PAGES:
            text = read(page)
            count += len(hooks.BLOCK.findall(text)) + len(hooks.INLINE.findall(text))
            out = renderer.render(text, page)
            assert "broken marker" not in out, page
    assert not caplog.records, "\n".join(r.getMessage() for r in caplog.records)
    assert count > 100  # the walkthroughs, cheat sheet and API reference are made of them


def test_marker_rendering(caplog):
    renderer = hooks.Renderer(["qwen2.py", "qwen3_moe.py"], link=lambda path, a, b: f"src/{path}#L{a}")
    start, end = hooks.span("qwen2.py", "RMSNorm")
    lines = open(os.path.join(ROOT, "qwen2.py")).read().splitlines()
    assert lines[start - 1].startswith("class RMSNorm") and lines[end].strip() == ""
    out = renderer.render('Intro\n\n{{ source("qwen2.py", "RMSNorm") }}\n\nSee {{ ref("qwen2.py", '
                          '"apply_rope") }}.')
    assert f"qwen2.py, lines {start}–{end}" in out and f'href="src/qwen2.py#L{start}"' in out
    assert f'```python linenums="{start}"\nclass RMSNorm' in out
    assert "<code>apply_rope</code>" in out
    signature = renderer.render('{{ signature("qwen2.py", "from_pretrained") }}')
    assert "def from_pretrained" in signature and "model.eval()" not in signature  # header + docstring only
    assert "identical" in renderer.render('{{ diff("qwen2.py", "RMSNorm", "qwen3_moe.py") }}')
    assert "```diff" in renderer.render('{{ diff("qwen2.py", "Attention", "qwen3_moe.py") }}')
    assert renderer.render('\\{{ source("qwen2.py", "Nope") }}') == '{{ source("qwen2.py", "Nope") }}'
    with caplog.at_level(logging.WARNING, logger="mkdocs.plugins.qwen_source"):
        renderer.render('{{ source("qwen2.py", "NoSuchThing") }}\n{{ ref("qwen2.py", "RMSNorm.nope") }}\n'
                        '{{ source("generate.py", "load") }}')
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert len(caplog.records) == 3 and all(r.levelno == logging.WARNING for r in caplog.records)
    assert "has no symbol 'NoSuchThing'" in messages and "(no 'nope' in RMSNorm)" in messages
    assert "generate.py is not listed in mkdocs.yml" in messages


def test_repository_links_follow_repo_url():
    config = types.SimpleNamespace(repo_url="https://github.com/owner/repo/",
                                   extra={"qwen_source": {"branch": "dev"}})
    assert hooks._repo_link(config)("qwen2.py", 3, 9) == "https://github.com/owner/repo/blob/dev/qwen2.py#L3-L9"
    assert hooks._repo_link(types.SimpleNamespace(repo_url=None, extra={})) is None
    renderer = hooks.Renderer(["qwen2.py"], repo_link=hooks._repo_link(config))
    assert "view on the repository" in renderer.render('{{ source("qwen2.py", "rotate_half") }}')


def test_strict_build_fails_on_a_missing_symbol(tmp_path):
    pytest.importorskip("mkdocs")
    from mkdocs.commands.build import build
    from mkdocs.config import load_config
    from mkdocs.exceptions import Abort
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text('# Page\n\n{{ source("qwen2.py", "RMSNormm") }}\n')
    (tmp_path / "mkdocs.yml").write_text(
        f"site_name: t\nhooks: [{os.path.join(DOCS, 'hooks.py')}]\nextra:\n  qwen_source:\n    files: "
        "[qwen2.py]\n")
    config = load_config(str(tmp_path / "mkdocs.yml"), strict=True, site_dir=str(tmp_path / "site"))
    with pytest.raises(Abort):
        build(config)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site, built once as CI builds it: mkdocs build --strict."""
    if importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs-material is not installed: pip install -e '.[docs]' (CI builds the site with "
                    "mkdocs build --strict)")
    site = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    # (no -q: it hides the warnings that --strict turns into a failure)
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return site


def test_site_builds_strict(site):
    page = (site / "walkthrough" / "qwen2" / "index.html").read_text()
    start = hooks.span("qwen2.py", "RMSNorm")[0]
    assert f'href="../../source/qwen2.py/#__codelineno-0-{start}"' in page     # caption links to the line
    source = (site / "source" / "qwen2.py" / "index.html").read_text()
    assert f'id="__codelineno-0-{start}"' in source                           # ... which has an anchor
    assert (site / "exercises" / "starter.py").is_file()                       # downloadable starter
    from html import unescape
    home = unescape(re.sub(r"<[^>]+>", "", (site / "index.html").read_text()))  # README's set-up
    assert 'pip install torch==2.13.0' in home and 'pip install -e ".[test,docs]"' in home, home[:3000]
    assert not list(site.rglob("my_answers.py"))
    steps = (site / "exercises" / "index.html").read_text().split("How it works", 1)[1].split("</ol>", 1)[0]
    assert steps.count("<li>") == 3, "a list item merged into the one before (a missing blank line?)"


def test_the_site_loads_nothing_from_another_host(site):
    """Every script, stylesheet, font and icon comes from the site itself, so the pages render in a
    classroom without internet; and every page with a diagram carries the vendored Mermaid, which
    keeps Material from fetching its own from a CDN."""
    tags = re.compile(r"<(?:script|link|img|iframe|source)\b[^>]*>", re.I)
    resource = re.compile(r"""rel=["'](?:stylesheet|preload|modulepreload|icon|preconnect|dns-prefetch)""")
    pages = list(site.rglob("*.html"))
    assert len(pages) > 20
    for page in pages:
        html = page.read_text(encoding="utf-8")
        for tag in tags.findall(html):
            if tag.lower().startswith("<link") and not resource.search(tag):
                continue  # a hyperlink (canonical, the repository), not something the page loads
            url = re.search(r"""\b(?:src|href)=["']([^"']*)["']""", tag)
            external = url and re.match(r"^(https?:)?//", url[1])
            assert not external, f"{page.relative_to(site)} loads {url[1]}"
        if 'class="mermaid"' in html:
            assert "javascripts/vendor/mermaid/mermaid.min.js" in html, page
    for css in site.rglob("*.css"):
        assert not re.search(r"(@import|url\()\s*[\"']?(https?:)?//", css.read_text(encoding="utf-8")), css
    assert (site / "javascripts" / "vendor" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2").is_dir()


CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)
PROBE = """<script>
const attach = Element.prototype.attachShadow;  // Material draws diagrams in closed shadow roots: open them
Element.prototype.attachShadow = function (init) { return attach.call(this, {...init, mode: "open"}); };
setInterval(() => {
  const drawn = [...document.querySelectorAll("div.mermaid")].filter(d => d.shadowRoot?.querySelector("svg"));
  document.title = `probe mermaid=${drawn.length} math=${document.querySelectorAll("mjx-container").length}`;
}, 100);
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium to render the pages (apt install chromium)")
def test_a_walkthrough_page_renders_offline_in_chromium(site):
    """Headless Chromium with every host name unresolvable opens the qwen2.py walkthrough: the
    diagram is drawn (an SVG) and the formulas typeset, from the site's own files."""
    page = site / "walkthrough" / "qwen2" / "probe.html"
    html = (site / "walkthrough" / "qwen2" / "index.html").read_text()
    page.write_text(html.replace("<head>", "<head>" + PROBE, 1))
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000",
               "--host-resolver-rules=MAP * ~NOTFOUND", "--dump-dom", page.as_uri()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    title = re.search(r"<title>probe mermaid=(\d+) math=(\d+)</title>", result.stdout)
    assert title, result.stdout[:2000] + result.stderr[-2000:]
    assert int(title[1]) >= 1 and int(title[2]) >= 1, title[0]


MATH_PROBE = """<script>
window.addEventListener("load", () => MathJax.startup.promise.then(() => setTimeout(() => {
  const box = document.querySelector("mjx-container[display='true']").getBoundingClientRect();
  const numbers = [box.left, box.top, box.width, box.height].map(Math.round);
  document.title = `math ${numbers.join(" ")}`;
}, 1000)));
</script>"""


def png_pixels(path) -> tuple[int, int, list[bytes], int]:
    """(width, height, rows of raw pixel bytes, bytes per pixel) of an 8-bit RGB or RGBA PNG."""
    import struct
    import zlib
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunks.setdefault(kind, []).append(data[pos + 8:pos + 8 + length])
        pos += 12 + length
    width, height, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][0][:10])
    assert depth == 8 and color in (2, 6), (depth, color)
    bpp = 3 if color == 2 else 4
    raw, stride, rows = zlib.decompress(b"".join(chunks[b"IDAT"])), width * bpp, []
    previous = bytes(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):  # undo the row's filter (PNG: none, sub, up, average, Paeth)
            a, b = line[i - bpp] if i >= bpp else 0, previous[i]
            c = previous[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 255
            elif kind == 2:
                line[i] = (line[i] + b) & 255
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        previous = line
    return width, height, rows, bpp


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium to render the pages (apt install chromium)")
def test_a_formula_has_ink_offline_in_chromium(site):
    """The RMSNorm exercise's formula, typeset offline by the vendored MathJax: its box has a size
    and, in a screenshot, dark pixels (the glyphs) where a formula whose font CSS went missing was
    an empty box of the right size."""
    page = site / "exercises" / "rmsnorm" / "probe.html"
    html = (site / "exercises" / "rmsnorm" / "index.html").read_text()
    page.write_text(html.replace("<head>", "<head>" + MATH_PROBE, 1))
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000",
             "--host-resolver-rules=MAP * ~NOTFOUND", "--window-size=1200,900", "--hide-scrollbars"]
    dom = subprocess.run(flags + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    title = re.search(r"<title>math (-?\d+) (-?\d+) (\d+) (\d+)</title>", dom.stdout)
    assert title, dom.stdout[:2000] + dom.stderr[-2000:]
    x, y, w, h = map(int, title.groups())
    assert w > 50 and h > 10, title[0]
    shot = site / "probe.png"
    subprocess.run(flags + [f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120)
    width, height, rows, bpp = png_pixels(shot)
    assert x + w <= width and y + h <= height, (title[0], width, height)
    ink = sum(1 for row in rows[y:y + h] for i in range(x * bpp, (x + w) * bpp, bpp)
              if sum(row[i:i + 3]) < 3 * 128)  # darker than mid-grey
    assert ink > 100, f"the formula's box ({w} x {h} px) has {ink} dark pixels: drawn blank"


# ----------------------------------------------------------------------------------------------
# Commands written in the docs exist
# ----------------------------------------------------------------------------------------------

def commands():
    """(page, command) for every shell line in ```bash blocks and every inline `pytest ...` / `python ...`."""
    found = []
    for page in PAGES:
        text = read(page)
        for lang, code, _, _ in code_blocks(text):
            if lang in ("bash", "sh", "console"):
                found += [(page, line.strip()) for line in code.splitlines() if line.strip()]
        for span in re.findall(r"(?<!`)`([^`\n]+)`(?!`)", text):
            words = [w for w in span.split() if "=" not in w]
            if words and words[0] in ("pytest", "python") and len(words) > 1:
                found.append((page, span))
    return found


def test_check_commands_exist():
    checked = 0
    for page, line in commands():
        words = shlex.split(line, comments=True)
        while words and re.match(r"^[A-Z_]+=", words[0]):  # VAR=value prefixes
            words.pop(0)
        if words[:1] == ["torchrun"]:  # torchrun's own options, then the script and its flags
            words = ["python", *words[next(i for i, w in enumerate(words) if w.endswith(".py")):]]
        if not words or words[0] not in ("python", "pytest"):
            continue
        if words[:3] == ["python", "-m", "pytest"]:
            words = words[2:]
        where = f"{page}: {line}"
        if words[0] == "pytest":
            for arg in (w for w in words[1:] if not w.startswith("-") and ("/" in w or w.endswith(".py"))):
                path, _, name = arg.partition("::")
                assert os.path.exists(os.path.join(ROOT, path)), f"{where}: {path} does not exist"
                if name:
                    tree = ast.parse(open(os.path.join(ROOT, path)).read())
                    assert name.split("[")[0] in {n.name for n in tree.body if hasattr(n, "name")}, \
                        f"{where}: no test {name} in {path}"
                checked += 1
            continue
        if words[1] == "-m":
            module = words[2]
            path = os.path.join(ROOT, *module.split(".")) + ".py"
            if not os.path.isfile(path):
                assert importlib.util.find_spec(module) is not None, f"{where}: no module {module}"
                continue
        elif words[1].endswith(".py"):
            path = os.path.join(ROOT, words[1])
            assert os.path.isfile(path), f"{where}: {words[1]} does not exist"
        else:
            continue
        source = open(path).read()
        for flag in (w.split("=")[0] for w in words[2:] if w.startswith("--")):
            assert flag == "--help" or f'"{flag}"' in source, \
                f"{where}: {os.path.relpath(path, ROOT)} has no {flag}"
        checked += 1
    assert checked > 20


def test_every_exercise_page_has_one_check_command():
    pages = [p for p in PAGES if p.startswith("exercises/") and p not in ("exercises/index.md",
                                                                           "exercises/teachers.md")]
    assert len(pages) >= 10
    for page in pages:
        section = read(page).split("## Check", 1)[1].split("\n## ", 1)[0]
        runs = [code for lang, code, _, _ in code_blocks(section) if lang == "bash"]
        assert len(runs) == 1 and re.fullmatch(r"pytest tests/exercises/test_\w+\.py", runs[0].strip()), page
        checker = runs[0].split()[1]
        assert os.path.isfile(os.path.join(ROOT, checker)), checker
        assert f"`{runs[0].strip()}`" in read("exercises/index.md"), f"{page}: not in the exercises table"


# ----------------------------------------------------------------------------------------------
# The Python blocks of the pages run
# ----------------------------------------------------------------------------------------------

PY_PAGES = [p for p in PAGES if any(lang == "python" for lang, *_ in code_blocks(read(p)))]


@pytest.mark.parametrize("page", PY_PAGES)
def test_python_blocks_run(page, request, monkeypatch):
    monkeypatch.chdir(ROOT)
    namespace = {"__name__": "__docs__"}
    ran = 0
    for lang, code, directive, line in code_blocks(read(page)):
        if lang != "python" or directive == "skip":
            continue
        assert directive in (None, "tiny-checkpoint"), f"{page}:{line}: unknown directive {directive!r}"
        if directive == "tiny-checkpoint":
            def tiny(m):
                kind = next((k for k in TINY_FIXTURES if k in m.group(0)), None)
                return repr(request.getfixturevalue(TINY_FIXTURES.get(kind, "tiny_chat_checkpoint")))
            code = HUB_ID.sub(tiny, code)
            assert not HUB_ID.search(code), f"{page}:{line}: a hub id left in a tiny-checkpoint block"
        else:
            assert not HUB_ID.search(code), \
                f"{page}:{line}: mark blocks that load a hub id (docs-test comments)"
        torch.manual_seed(0)
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(code, f"docs/{page}:{line}", "exec"), namespace)
        ran += 1
    assert ran


def test_block_parser_sees_directives():
    text = ("x\n<!-- docs-test: skip -->\n```python\nraise SystemExit\n```\n\n"
            "- item\n\n    ```python\n    a = 1\n    ```\n")
    assert code_blocks(text) == [("python", "raise SystemExit", "skip", 3), ("python", "a = 1", None, 9)]


# ----------------------------------------------------------------------------------------------
# Exercise checkers: pass on the reference, fail on the untouched starter and on wrong code
# ----------------------------------------------------------------------------------------------

from exercises import _harness, reference  # noqa: E402

CHECKERS = {name: importlib.import_module(f"exercises.test_{name}") for name in (
    "rmsnorm", "rope", "mask", "attention", "kv_cache", "sampling", "routing", "shared_expert",
    "load_balancing", "int8",
    "stream_decoder", "yarn")}
STARTER = _harness.load(_harness.STARTER)


def with_(**overrides):
    """The reference answers with some functions replaced."""
    names = {n: getattr(reference, n) for n in dir(reference) if not n.startswith("_")}
    return types.SimpleNamespace(**{**names, **overrides})


@pytest.mark.parametrize("name", CHECKERS)
def test_checker_passes_the_reference(name):
    with torch.no_grad():
        CHECKERS[name].check(reference)


@pytest.mark.parametrize("name", CHECKERS)
def test_checker_reports_the_untouched_starter(name):
    with torch.no_grad(), pytest.raises(NotImplementedError):
        CHECKERS[name].check(STARTER)


# Deliberately wrong answers, each with the diagnosis its checker must give.

def rms_weight_first(x, weight, eps=1e-6):
    x32 = x.float()
    return (weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))).to(x.dtype)


def rms_eps_outside(x, weight, eps=1e-6):
    x32 = x.float()
    return weight * (x32 / (x32.pow(2).mean(-1, keepdim=True).sqrt() + eps)).to(x.dtype)


def rotate_interleaved(x):
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def rope_wrong_exponent(positions, head_dim, theta, dtype):
    inv_freq = 1.0 / theta ** (torch.arange(head_dim // 2, dtype=torch.float32) / head_dim)
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def mask_window_too_wide(q_slots, S, window, key_mask=None):
    q, k = q_slots[:, None], torch.arange(S)[None, :]
    visible = (k <= q) if window is None else (k <= q) & (k >= q - window)
    return reference.visibility_mask(q_slots, S, None, key_mask) & visible[None, None]


def mask_ignores_padding(q_slots, S, window, key_mask=None):
    return reference.visibility_mask(q_slots, S, window, None)


def attention_modulo_heads(q, k, v, mask, scale):
    G = q.shape[1] // k.shape[1]
    return reference.gqa_attention(q, k.repeat(1, G, 1, 1), v.repeat(1, G, 1, 1), mask, scale)


def attention_unscaled(q, k, v, mask, scale):
    return reference.gqa_attention(q, k, v, mask, 1.0)


def cache_returns_new_only(cache_k, cache_v, slots, k, v):
    reference.kv_cache_update(cache_k, cache_v, slots, k, v)
    return k, v


def cache_not_in_place(cache_k, cache_v, slots, k, v):
    return reference.kv_cache_update(cache_k.clone(), cache_v.clone(), slots, k, v)


def cache_returns_written_prefix(cache_k, cache_v, slots, k, v):
    keys, values = reference.kv_cache_update(cache_k, cache_v, slots, k, v)
    end = int(slots[-1]) + 1
    return keys[:, :, :end], values[:, :, :end]


def sampling_top_p_first(logits, temperature, top_k=0, top_p=1.0):
    keep = reference.sampling_probs(logits, temperature, 0, top_p) > 0
    return reference.sampling_probs(logits.masked_fill(~keep, float("-inf")), temperature, top_k, 1.0)


def sampling_nucleus_too_small(logits, temperature, top_k=0, top_p=1.0):
    probs = reference.sampling_probs(logits, temperature, top_k, 1.0)
    if top_p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, descending=True)
    keep = sorted_probs.cumsum(-1) <= top_p
    keep[:, 0] = True
    probs = probs * keep.scatter(1, order, keep)
    return probs / probs.sum(-1, keepdim=True)


def route_always_normalised(router_logits, top_k, norm_topk_prob):
    return reference.route(router_logits, top_k, True)


def route_casts_before_renormalising(router_logits, top_k, norm_topk_prob):
    weights, ids = torch.topk(torch.softmax(router_logits, dim=-1, dtype=torch.float32), top_k, dim=-1)
    weights = weights.to(router_logits.dtype)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def route_softmax_in_bf16(router_logits, top_k, norm_topk_prob):
    weights, ids = torch.topk(torch.softmax(router_logits, dim=-1), top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights.to(router_logits.dtype), ids


def moe_ungated(x, router_weight, w_gate_up, w_down, sg, su, sd, shared_expert_gate, top_k, norm):
    routed = reference.moe_block(x, router_weight, w_gate_up, w_down, sg, su, torch.zeros_like(sd),
                                 shared_expert_gate, top_k, norm)
    return routed + F.linear(F.silu(F.linear(x, sg)) * F.linear(x, su), sd)


def moe_without_shared(x, router_weight, w_gate_up, w_down, sg, su, sd, shared_expert_gate, top_k, norm):
    return reference.moe_block(x, router_weight, w_gate_up, w_down, sg, su, torch.zeros_like(sd),
                               shared_expert_gate, top_k, norm)


def lb_without_num_experts(router_logits, num_experts, top_k, token_mask=None):
    return reference.load_balancing_loss(router_logits, num_experts, top_k, token_mask) / num_experts


def lb_ignores_padding(router_logits, num_experts, top_k, token_mask=None):
    return reference.load_balancing_loss(router_logits, num_experts, top_k, None)


class DecodesEachToken:
    def __init__(self, tokenizer, skip_special_tokens=True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens

    def push(self, token_id):
        return self.tokenizer.decode([token_id], skip_special_tokens=self.skip)

    def flush(self):
        return ""


class HoldsEverything(DecodesEachToken):
    ids = None

    def push(self, token_id):
        self.ids = (self.ids or []) + [token_id]
        return ""

    def flush(self):
        return self.tokenizer.decode(self.ids or [], skip_special_tokens=self.skip)


def int8_one_scale(w, dtype):
    q, s = reference.quantize_int8(w, dtype)
    s = (w.float().abs().amax() / 127).expand(len(w)).to(dtype)
    return torch.round(w.float() / s.float()[:, None]).clamp(-127, 127).to(torch.int8), s


def int8_exact_scale(w, dtype):
    exact = w.float().abs().amax(-1) / 127
    return torch.round(w.float() / exact[:, None]).clamp(-127, 127).to(torch.int8), exact.to(dtype)


def yarn_linear(head_dim, theta, factor, original, beta_fast=32.0, beta_slow=1.0):
    inv_freq, scaling = reference.yarn_frequencies(head_dim, theta, factor, original, beta_fast, beta_slow)
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim) / factor, scaling


def yarn_unscaled(head_dim, theta, factor, original, beta_fast=32.0, beta_slow=1.0):
    return reference.yarn_frequencies(head_dim, theta, factor, original, beta_fast, beta_slow)[0], 1.0


WRONG = [  # (checker, wrong answers, the diagnosis expected in the message)
    ("rmsnorm", dict(rms_norm=rms_weight_first), r"bfloat16.*multiply by the weight before casting back"),
    ("rmsnorm", dict(rms_norm=rms_eps_outside), r"eps 1e-05.*eps is added outside the square root"),
    ("rope", dict(rotate_half=rotate_interleaved), r"rotate_half.*interleaved pairs"),
    ("rope", dict(rope_cos_sin=rope_wrong_exponent),
     r"cos: max abs difference.*the exponent is i / head_dim"),
    ("mask", dict(visibility_mask=mask_window_too_wide), r"window 3.*lets each query see 4 keys"),
    ("mask", dict(visibility_mask=mask_ignores_padding), r"left padding.*key_mask is ignored"),
    ("attention", dict(gqa_attention=attention_modulo_heads), r"query head h reads KV head h % 2"),
    ("attention", dict(gqa_attention=attention_unscaled), r"the scores are not scaled"),
    ("kv_cache", dict(kv_cache_update=cache_returns_new_only),
     r"step 0 .*only the slots written so far \(here, this"),
    ("kv_cache", dict(kv_cache_update=cache_not_in_place), r"step 0 .*cache_k tensor after the call"),
    ("kv_cache", dict(kv_cache_update=cache_returns_written_prefix),
     r"step 0 .*you return only the slots written"),
    ("sampling", dict(sampling_probs=sampling_top_p_first), r"top-p is applied before top-k"),
    ("sampling", dict(sampling_probs=sampling_nucleus_too_small), r"top_p=0.9\).*stops before the token"),
    ("routing", dict(route=route_always_normalised),
     r"norm_topk_prob=False.*renormalised to sum to 1 although"),
    ("routing", dict(route=route_casts_before_renormalising),
     r"bfloat16, top_k=8, norm_topk_prob=True\): weights:.*you cast them before renormalising \(Hint 2\)"),
    ("routing", dict(route=route_softmax_in_bf16),
     r"bfloat16.*(softmax runs in the logits' dtype|picks experts)"),
    ("shared_expert", dict(moe_block=moe_ungated), r"the shared expert is not gated"),
    ("shared_expert", dict(moe_block=moe_without_shared), r"the shared expert is missing"),
    ("load_balancing", dict(load_balancing_loss=lb_without_num_experts), r"not multiplied by num_experts"),
    ("load_balancing", dict(load_balancing_loss=lb_ignores_padding),
     r"token_mask.*padded tokens .* are counted"),
    ("stream_decoder", dict(StreamDecoder=DecodesEachToken), r"half a character"),
    ("stream_decoder", dict(StreamDecoder=HoldsEverything),
     r"emit text as soon as it no longer ends in U\+FFFD"),
    ("int8", dict(quantize_int8=int8_one_scale), r": s:.*one scale for the whole matrix"),
    ("int8", dict(quantize_int8=int8_exact_scale), r"bfloat16\): q:.*round it against the scale as stored"),
    ("yarn", dict(yarn_frequencies=yarn_linear), r"inv_freq.*every frequency is divided by factor"),
    ("yarn", dict(yarn_frequencies=yarn_unscaled), r"attention_scaling 1.0, expected 1.1386"),
]


@pytest.mark.parametrize("name, answers, diagnosis", WRONG,
                         ids=[f"{name}-{next(iter(answers.values())).__name__}"
                              for name, answers, _ in WRONG])
def test_checker_diagnoses_wrong_code(name, answers, diagnosis):
    with torch.no_grad(), pytest.raises(_harness.CheckFailed, match=diagnosis):
        CHECKERS[name].check(with_(**answers))


def test_every_checker_has_wrong_answers_tested():
    assert {name for name, _, _ in WRONG} == set(CHECKERS)


# The check commands themselves, as a student runs them (one pytest process per scenario).

def run_pytest(*args, impl=_harness.STARTER, **extra_env):
    """pytest as a student runs it, on `impl` (default the untouched starter, whatever my_answers.py
    this checkout holds)."""
    env = {k: v for k, v in os.environ.items()
           if k not in (_harness.IMPL_ENV, _harness.STRICT_ENV, _harness.ALONE_ENV)}
    env.update(OMP_NUM_THREADS="1", **extra_env)
    env[_harness.IMPL_ENV] = impl
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    return result.returncode, result.stdout + result.stderr


CHECKER_FILES = [f"tests/exercises/test_{name}.py" for name in CHECKERS]


def test_named_checkers_fail_on_the_untouched_starter():
    code, out = run_pytest("tests/exercises/test_rmsnorm.py", "tests/exercises/test_stream_decoder.py")
    assert code == 1 and "2 failed" in out, out
    assert ("not implemented yet: rms_norm (copy the starter with python docs/exercises/starter.py, then "
            "edit my_answers.py; the task is in docs/exercises/rmsnorm.md)") in out
    assert "not implemented yet: StreamDecoder.push" in out


def test_unnamed_checkers_skip_the_untouched_starter():
    code, out = run_pytest("tests/exercises", "--deselect",
                           "tests/exercises/test_train_tiny.py::test_train_tiny_loss_falls")
    assert code == 0 and f"{len(CHECKERS)} skipped" in out, out
    assert ("exercise not attempted: rms_norm in docs/exercises/starter.py still raises "
            "NotImplementedError") in out


def test_checkers_run_on_a_student_file(tmp_path):
    """QWEN_EXERCISE_IMPL: the reference answers pass, a wrong one fails with its diagnosis."""
    student = tmp_path / "answers.py"
    student.write_text(
        "import importlib.util, torch\n"
        "spec = importlib.util.spec_from_file_location('ref', "
        f"{os.path.join(ROOT, 'tests', 'exercises', 'reference.py')!r})\n"
        "ref = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(ref)\n"
        "globals().update({k: v for k, v in vars(ref).items() if not k.startswith('_')})\n\n"
        "def rms_norm(x, weight, eps=1e-6):  # multiplies by the weight before casting back\n"
        "    x32 = x.float()\n"
        "    return (weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))).to(x.dtype)\n")
    code, out = run_pytest(*CHECKER_FILES, impl=str(student))
    assert code == 1 and f"1 failed, {len(CHECKERS) - 1} passed" in out, out
    assert "multiply by the weight before casting back to the input dtype" in out


WRONG_RMSNORM = (
    "import torch\n\n"
    "def rms_norm(x, weight, eps=1e-6):  # eps outside the square root\n"
    "    x32 = x.float()\n"
    "    return weight * (x32 / (x32.pow(2).mean(-1, keepdim=True).sqrt() + eps)).to(x.dtype)\n")


def test_the_suite_stays_green_whatever_the_student_wrote(tmp_path):
    """The repository's own suite (`pytest`, a run that names neither a checker nor tests/exercises)
    does not collect the checkers, so a wrong answer neither fails it nor shows as a skip; named, the
    checker fails."""
    student = tmp_path / "answers.py"
    student.write_text(WRONG_RMSNORM)
    code, out = run_pytest("tests", "--collect-only", "-q", impl=str(student))
    assert code == 0 and "tests/test_qwen2.py" in out and "tests/exercises/" not in out, out[-3000:]
    code, out = run_pytest("tests/exercises", "-k", "test_rmsnorm", impl=str(student))
    assert code == 1 and "eps is added outside the square root" in out, out


def test_alone_mode_refuses_answers_imported_from_the_model_files(tmp_path):
    copied = tmp_path / "answers.py"
    copied.write_text("import torch\nfrom qwen2 import RMSNorm\n\n"
                      "def rms_norm(x, weight, eps=1e-6):\n"
                      "    norm = RMSNorm(x.shape[-1], eps)\n    norm.weight.data = weight\n"
                      "    return norm(x)\n")
    code, out = run_pytest("tests/exercises/test_rmsnorm.py", impl=str(copied))
    assert code == 0, out  # the answer is right: without the flag it passes
    code, out = run_pytest("tests/exercises/test_rmsnorm.py", impl=str(copied), QWEN_EXERCISE_ALONE="1")
    assert code == 1 and "imports qwen2 (line 2): with QWEN_EXERCISE_ALONE=1" in out, out
    for sneaky in ("import importlib\nm = importlib.import_module('qwen2_moe')\n",
                   "from tests.exercises import reference\n", "from . import reference\n"):
        copied.write_text(sneaky)
        assert _harness.forbidden_import(str(copied)), sneaky
    copied.write_text(WRONG_RMSNORM)
    assert _harness.forbidden_import(str(copied)) is None


def test_the_starter_makes_the_answer_file_once(tmp_path):
    target = tmp_path / "my_answers.py"
    command = [sys.executable, os.path.join(DOCS, "exercises", "starter.py"), str(target)]
    first = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0 and target.read_text() == read("exercises/starter.py"), first.stderr
    target.write_text(WRONG_RMSNORM)
    again = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "already exists" in again.stderr
    assert target.read_text() == WRONG_RMSNORM                                # not overwritten


def test_the_site_never_carries_answers(tmp_path):
    assert hooks.answered(hooks.STARTER) == []                                # the tracked starter: stubs
    solved = tmp_path / "starter.py"
    solved.write_text(read("exercises/starter.py").replace(
        '    raise NotImplementedError("rotate_half")', "    return torch.cat((-x[..., x.shape[-1] // 2:], "
        "x[..., :x.shape[-1] // 2]), dim=-1)"))
    assert hooks.answered(str(solved)) == ["rotate_half"]
    assert "my_answers.py" in open(os.path.join(ROOT, ".gitignore")).read().split()
    assert "my_answers.py" in open(os.path.join(ROOT, "mkdocs.yml")).read()   # exclude_docs


def test_the_figures_script_draws_every_picture(tiny_chat_checkpoint, tmp_path):
    """docs/figures.py (which drew docs/img/*.svg from the real checkpoint) runs end to end, here on a
    tiny checkpoint and a 2-step MoE training, and writes well-formed SVG."""
    import xml.etree.ElementTree as ET
    figures = load_module("figures", os.path.join(DOCS, "figures.py"))
    figures.main(["--checkpoint", tiny_chat_checkpoint, "--out", str(tmp_path), "--moe-steps", "2"])
    for name in ("attention-heads", "rope-wavelengths", "next-token", "moe-routing"):
        root = ET.parse(tmp_path / f"{name}.svg").getroot()
        assert root.tag.endswith("svg") and len(root) > 5, name
        assert (ROOT_DOCS_IMG / f"{name}.svg").is_file(), f"docs/img/{name}.svg is not committed"
