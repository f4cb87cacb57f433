"""The pictures of the walkthroughs, drawn from a real checkpoint: run it to make docs/img/*.svg again.

    python docs/figures.py --checkpoint ~/.cache/qwen-testdata/qwen2.5-coder-0.5b-instruct

(`python ../shared/tools/make_real_qwen2.py` builds that folder offline.) It writes:

  attention-heads.svg  attention of three heads of the real model over one sentence: a head that
                       looks at the previous token, one that parks on the first token (an
                       attention sink), and one that spreads over the whole past
  rope-wavelengths.svg the wavelength of each rotary dimension pair, default and YaRN-scaled
  next-token.svg       the model's next-token distribution at the first steps of a generation
  moe-routing.svg      expert load and routing entropy per layer of a tiny Qwen2-MoE trained the way
                       the capstone exercise trains its Qwen2, before and after training

The SVG is written by hand (no plotting library): rectangles, lines and text.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from html import escape

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import generate  # noqa: E402
import qwen2  # noqa: E402
import qwen2_moe  # noqa: E402
import qwen_kernels  # noqa: E402

SENTENCE = "The cat sat on the mat because it was tired, so the cat slept all day."
PROMPT = "def fibonacci(n):\n"
FONT = 'font-family="DejaVu Sans, Helvetica, Arial, sans-serif"'


# ----------------------------------------------------------------------------------------------
# A few SVG pieces
# ----------------------------------------------------------------------------------------------

def svg(width: int, height: int, body: list[str]) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
            f'height="{height}" {FONT} font-size="11">\n<rect width="100%" height="100%" fill="white"/>\n'
            + "\n".join(body) + "\n</svg>\n")


def text(x, y, s, anchor="start", size=11, rotate=None, weight="normal") -> str:
    turn = f' transform="rotate({rotate} {x:.1f} {y:.1f})"' if rotate is not None else ""
    return (f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="{size}" '
            f'font-weight="{weight}"{turn}>{escape(s)}</text>')


def rect(x, y, w, h, fill, title=None) -> str:
    tip = f"<title>{escape(title)}</title>" if title else ""
    return (f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(w, 0):.1f}" height="{max(h, 0):.1f}" '
            f'fill="{fill}">{tip}</rect>')


def shade(value: float) -> str:
    """0 -> white, 1 -> deep purple (the site's colour)."""
    v = min(max(value, 0.0), 1.0)
    r, g, b = (int(255 + (c - 255) * v) for c in (74, 20, 140))
    return f"rgb({r},{g},{b})"


def shown(token: str) -> str:
    """A token as a label: spaces as ␣, newlines and other unprintable characters escaped."""
    token = token.replace("\n", "\\n").replace(" ", "\u2423")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in token) or "\u2205"


# ----------------------------------------------------------------------------------------------
# Attention heads
# ----------------------------------------------------------------------------------------------

def attention_maps(model, ids: torch.Tensor) -> torch.Tensor:
    """Attention probabilities of every layer and head for one sequence: (L, H, T, T), recomputed
    from each layer's input the way qwen2.reference_attention computes them."""
    inputs = []
    hooks = [layer.self_attn.register_forward_pre_hook(lambda m, a: inputs.append((m, *a)))
             for layer in model.model.layers]
    with torch.no_grad():
        model(ids)
        maps = []
        for attn, x, step in inputs:
            B, T, _ = x.shape
            q = attn.q_proj(x).view(B, T, attn.n_heads, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(B, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
            q, k = qwen2.apply_rope(q, step.cos, step.sin), qwen2.apply_rope(k, step.cos, step.sin)
            k = k.repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)                # (B, H, T, D)
            scores = (q.float() @ k.float().transpose(-1, -2)) * attn.head_dim ** -0.5
            causal = torch.ones(T, T, dtype=torch.bool).tril()
            maps.append(scores.masked_fill(~causal, float("-inf")).softmax(-1)[0])         # (H, T, T)
    for h in hooks:
        h.remove()
    return torch.stack(maps)


def pick_heads(maps: torch.Tensor) -> list[tuple[str, int, int]]:
    """(label, layer, head) of the clearest previous-token head, attention sink and broad head."""
    T = maps.shape[-1]
    rows = torch.arange(2, T)
    previous = maps[:, :, rows, rows - 1].mean(-1)                                     # (L, H)
    sink = maps[:, :, rows, 0].mean(-1)
    p = maps[:, :, rows].clamp_min(1e-9)
    entropy = -(p * p.log()).sum(-1) / torch.log(rows.float() + 1)                     # 1 = uniform
    broad = entropy.mean(-1) - sink                                                    # spread, not parked
    picks = []
    for label, score in (("previous token (local)", previous), ("first token (attention sink)", sink),
                         ("spread over the past", broad)):
        layer, head = divmod(int(score.argmax()), maps.shape[1])
        picks.append((f"{label}: layer {layer}, head {head}", layer, head))
    return picks


def draw_attention(maps, tokens: list[str]) -> str:
    T, cell, left, top = len(tokens), 15, 78, 100
    body, x0 = [], left
    for label, layer, head in pick_heads(maps):
        m = maps[layer, head]
        body.append(text(x0, 24, label, size=12, weight="bold"))
        for i in range(T):
            body.append(text(x0 - 4, top + i * cell + 11, shown(tokens[i])[:9], anchor="end", size=9))
            body.append(text(x0 + i * cell + 10, top - 4, shown(tokens[i])[:9], rotate=-60, size=9))
            for j in range(i + 1):
                weight = float(m[i, j])
                body.append(rect(x0 + j * cell, top + i * cell, cell - 1, cell - 1, shade(weight ** 0.5),
                                 f"{tokens[i]!r} -> {tokens[j]!r}: {weight:.2f}"))
        x0 += T * cell + left + 20
    body.append(text(10, top + T * cell + 24, "rows: the query token; columns: the key tokens it attends "
                     "to (darker = more weight; square-root scale). Causal: nothing above the diagonal.",
                     size=10))
    return svg(x0, top + T * cell + 36, body)


# ----------------------------------------------------------------------------------------------
# RoPE wavelengths, default and YaRN
# ----------------------------------------------------------------------------------------------

def draw_rope(config) -> str:
    plain = qwen2.rope_frequencies(config)[0]
    scaling = {"factor": 4.0, "original_max_position_embeddings": 32768}  # the Qwen2.5 model cards' setting
    yarn = qwen2.rope_frequencies(qwen2.Qwen2Config(**{**vars(config), "rope_type": "yarn",
                                                       "rope_scaling": scaling}))[0]
    waves = {f"default (rope_theta {config.rope_theta:g})": 2 * math.pi / plain,
             "YaRN, factor 4 from 32,768": 2 * math.pi / yarn}
    W, H, left, top, bottom = 640, 330, 70, 30, 50
    lo, hi = 0.0, math.log10(float(max(w.max() for w in waves.values())) * 2)
    n = len(plain)

    def xy(i, w):
        return (left + i / (n - 1) * (W - left - 20),
                top + (1 - (math.log10(float(w)) - lo) / (hi - lo)) * (H - top - bottom))

    body = []
    for decade in range(0, int(hi) + 1):
        _, y = xy(0, 10 ** decade)
        body.append(f'<line x1="{left}" x2="{W - 20}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        body.append(text(left - 6, y + 4, f"1e{decade}", anchor="end", size=10))
    for tokens_, label in ((32768, "32,768: trained context"), (131072, "131,072: 4x")):
        _, y = xy(0, tokens_)
        body.append(f'<line x1="{left}" x2="{W - 20}" y1="{y:.1f}" y2="{y:.1f}" stroke="#999" '
                    f'stroke-dasharray="4 3"/>')
        body.append(text(W - 24, y - 4, label, anchor="end", size=10))
    for (label, w), colour, dy in zip(waves.items(), ("#4a148c", "#e65100"), (0, 16)):
        points = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(i, w[i]) for i in range(n)))
        body.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>')
        body.append(text(left + 12, top + 14 + dy, label, size=11).replace("<text", f'<text fill="{colour}"'))
    body.append(text((W + left) / 2, H - 12, f"dimension pair i (0 .. {n - 1}) of head_dim {2 * n}",
                     anchor="middle"))
    body.append(text(16, (H - bottom + top) / 2, "wavelength in tokens, 2\u03c0 / inv_freq", anchor="middle",
                     rotate=-90))
    return svg(W, H, body)


# ----------------------------------------------------------------------------------------------
# Next-token distributions
# ----------------------------------------------------------------------------------------------

def draw_next_tokens(model, tok, steps: int = 4, top: int = 8) -> str:
    ids = tok.encode(PROMPT)
    panels = []
    with torch.no_grad():
        for _ in range(steps):
            probs = model(torch.tensor([ids]))[0, -1].float().softmax(-1)
            p, idx = probs.topk(top)
            panels.append((tok.decode(ids), [(tok.decode([int(i)]), float(v)) for i, v in zip(idx, p)]))
            ids.append(int(idx[0]))                                                     # greedy
    W, row, panel_w, left = 300, 16, 300, 90
    body = []
    for n, (context, options) in enumerate(panels):
        x0 = n * panel_w
        body.append(text(x0 + 10, 18, f"step {n + 1}: after \u2026{shown(context[-14:])}", size=10,
                         weight="bold"))
        for r, (token, p) in enumerate(options):
            y = 30 + r * row
            body.append(text(x0 + left - 6, y + 11, shown(token)[:12], anchor="end", size=10))
            body.append(rect(x0 + left, y, p * (W - left - 50), row - 3, "#4a148c" if r == 0 else "#9575cd",
                             f"{token!r}: {p:.3f}"))
            body.append(text(x0 + left + p * (W - left - 50) + 4, y + 11, f"{p:.2f}", size=9))
    return svg(panel_w * len(panels), 30 + top * row + 10, body)


# ----------------------------------------------------------------------------------------------
# Routing in a tiny Qwen2-MoE, before and after training
# ----------------------------------------------------------------------------------------------

def tiny_moe(steps: int, seed: int = 0):
    """A tiny Qwen2-MoE (8 experts, top 2, a shared expert) trained on this repository's bytes as the
    capstone trains its Qwen2 (docs/exercises/train_tiny.py's data and schedule), with the
    load-balancing loss. Returns (untrained copy, trained model, validation batch)."""
    import copy

    sys.path.insert(0, os.path.join(ROOT, "docs", "exercises"))
    import train_tiny
    torch.manual_seed(seed)
    data = torch.frombuffer(bytearray(train_tiny.load_text()), dtype=torch.uint8).long()
    split = int(0.9 * len(data))
    config = qwen2_moe.Qwen2MoeConfig(vocab_size=256, hidden_size=96, intermediate_size=256,
                                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                      num_experts=8, num_experts_per_tok=2, moe_intermediate_size=96,
                                      shared_expert_intermediate_size=192, max_position_embeddings=128,
                                      norm_topk_prob=False, router_aux_loss_coef=0.01,
                                      tie_word_embeddings=True, rope_theta=10000.0)
    model = qwen2_moe.Qwen2MoeForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    untrained = copy.deepcopy(model).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    stream = train_tiny.batches(data[:split], 12, 128, torch.Generator().manual_seed(seed))
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = train_tiny.learning_rate(step, steps, 3e-3, min(30, steps // 10 + 1))
        x = next(stream)
        _, loss = model(x, labels=x, output_router_logits=True)   # cross-entropy + aux loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"tiny MoE step {step}: loss {loss.item():.3f}", flush=True)
    val = next(train_tiny.batches(data[split:], 16, 128, torch.Generator().manual_seed(1)))
    return untrained, model.eval(), val


def routing_stats(model, batch) -> list[tuple[torch.Tensor, float]]:
    """Per sparse layer: (share of the top-k picks each expert got (E,), mean routing entropy)."""
    with torch.no_grad():
        model(batch, output_router_logits=True)
    stats = []
    for logits in model.router_logits:                                                  # (N, E) per layer
        probs = logits.float().softmax(-1)
        picks = probs.topk(model.config.num_experts_per_tok, dim=-1).indices.flatten()
        load = torch.bincount(picks, minlength=probs.shape[-1]).float() / picks.numel()
        entropy = float(-(probs * probs.clamp_min(1e-9).log()).sum(-1).mean())
        stats.append((load, entropy))
    return stats


def draw_routing(before, after, num_experts: int) -> str:
    L, bar, gap, left, top, plot_h = len(before), 9, 24, 50, 46, 120
    group_w = num_experts * bar + gap
    W = left + L * group_w * 2 + 40
    body = [text(left, 16, "share of the top-2 picks per expert (bars; uniform = 1/8, dashed) and mean "
                 "routing entropy (ln 8 = 2.08 is uniform)", size=11, weight="bold")]
    for panel, (title, stats, colour) in enumerate((("random weights (untrained): routing means nothing",
                                                     before, "#9e9e9e"),
                                                    ("after training", after, "#4a148c"))):
        x_panel = left + panel * (L * group_w + 20)
        body.append(text(x_panel, top - 14, title, size=11))
        y_uniform = top + plot_h * (1 - (1 / num_experts) / 0.5)
        body.append(f'<line x1="{x_panel}" x2="{x_panel + L * group_w - gap}" y1="{y_uniform:.1f}" '
                    f'y2="{y_uniform:.1f}" stroke="#e65100" stroke-dasharray="4 3"/>')
        for layer, (load, entropy) in enumerate(stats):
            x0 = x_panel + layer * group_w
            for e in range(num_experts):
                h = plot_h * min(float(load[e]) / 0.5, 1.0)
                body.append(rect(x0 + e * bar, top + plot_h - h, bar - 1, h, colour,
                                 f"layer {layer}, expert {e}: {float(load[e]):.2f}"))
            middle = x0 + num_experts * bar / 2
            body.append(text(middle, top + plot_h + 14, f"layer {layer}", anchor="middle", size=10))
            body.append(text(middle, top + plot_h + 28, f"H = {entropy:.2f}", anchor="middle", size=10))
    body.append(text(left - 6, top + 4, "0.5", anchor="end", size=9))
    body.append(text(left - 6, top + plot_h, "0", anchor="end", size=9))
    return svg(W, top + plot_h + 40, body)


# ----------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a Qwen2 checkpoint folder (the real 0.5B one)")
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "img"), help="where the SVGs go")
    p.add_argument("--moe-steps", type=int, default=400, help="training steps of the tiny MoE")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model, tok, _ = generate.load(args.checkpoint, dtype=torch.float32)
    qwen_kernels.install(model, "reference")
    os.makedirs(args.out, exist_ok=True)

    def write(name, content):
        with open(os.path.join(args.out, name), "w") as f:
            f.write(content)
        print("wrote", os.path.join(args.out, name), flush=True)

    ids = tok.encode(SENTENCE)
    write("attention-heads.svg", draw_attention(attention_maps(model, torch.tensor([ids])),
                                                [tok.decode([i]) for i in ids]))
    write("rope-wavelengths.svg", draw_rope(model.config))
    write("next-token.svg", draw_next_tokens(model, tok))
    untrained, trained, val = tiny_moe(args.moe_steps)
    write("moe-routing.svg", draw_routing(routing_stats(untrained, val), routing_stats(trained, val),
                                          trained.config.num_experts))


if __name__ == "__main__":
    main()
