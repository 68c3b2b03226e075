"""A tree file as one self-contained HTML page: inline CSS and JS, no network, every text escaped.

Nodes are nested `<details>` elements (collapsible without script); the chosen path is highlighted
and open. Each node shows its option text, N, Q, the critic scores, and terminal/merged badges.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from typing import Any

from alphallm_jax.search.tree import load_tree
from alphallm_jax.utils.io import PathLike, atomic_write_text

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #1d1d1f; background: #fafafa; }
h1 { font-size: 1.3em; } h2 { font-size: 1.05em; margin-top: 1.4em; }
pre { white-space: pre-wrap; word-break: break-word; margin: 0.2em 0; font-size: 0.92em; }
.meta td { padding: 0.1em 0.8em 0.1em 0; vertical-align: top; }
.meta td:first-child { color: #666; }
.controls button { margin-right: 0.5em; }
details.node { margin-left: 1.3em; border-left: 1px solid #ccc; padding-left: 0.5em; }
details.node > summary { cursor: pointer; padding: 0.15em 0; list-style-position: outside; }
details.leaf > summary { list-style: none; }
details.chosen { border-left: 3px solid #1a7f37; }
details.chosen > summary .nid { background: #dafbe1; font-weight: bold; }
.nid { font-family: monospace; padding: 0 0.3em; border-radius: 3px; }
.stats { font-family: monospace; color: #333; }
.scores { font-family: monospace; color: #666; font-size: 0.88em; }
.badge { font-size: 0.75em; border-radius: 3px; padding: 0 0.4em; margin-left: 0.3em; color: white; }
.badge.terminal { background: #8250df; } .badge.merged { background: #bf8700; }
.badge.completion { background: #0969da; } .badge.chosen { background: #1a7f37; }
.answer { font-family: monospace; margin-left: 0.5em; color: #8250df; }
.option { display: block; white-space: pre-wrap; word-break: break-word; font-family: monospace;
  font-size: 0.92em; background: #fff; border: 1px solid #e5e5e5; padding: 0.2em 0.4em; margin: 0.2em 0; }
"""

_JS = """
function setAll(open) { document.querySelectorAll('details.node').forEach(d => { d.open = open; }); }
function chosenOnly() {
  document.querySelectorAll('details.node').forEach(d => { d.open = d.classList.contains('chosen'); });
}
"""


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{float(x):.3f}"


def _node_summary(node: dict[str, Any], chosen: bool) -> str:
    esc = html.escape
    parts = [f'<span class="nid">#{int(node["id"])}</span>',
             f'<span class="stats">d={int(node["depth"])} N={int(node["N"])} Q={_fmt(node["Q"])}</span>']
    scores = " ".join(f"{name}={_fmt(node.get(key))}" for name, key in
                      (("v", "value"), ("prm", "prm"), ("orm", "orm"), ("ro", "rollout_orm"), ("r", "reward")))
    parts.append(f'<span class="scores">{esc(scores)}</span>')
    if node.get("terminal"):
        parts.append('<span class="badge terminal">terminal</span>')
    if node.get("merged"):
        parts.append(f'<span class="badge merged">merged, {int(node.get("resamples", 0))} resamples</span>')
    if node.get("completion"):
        parts.append('<span class="badge completion">completion</span>')
    if chosen:
        parts.append('<span class="badge chosen">chosen</span>')
    if node.get("answer") is not None:
        parts.append(f'<span class="answer">answer: {esc(str(node["answer"]))}</span>')
    if node.get("finish_reason"):
        parts.append(f'<span class="scores">[{esc(str(node["finish_reason"]))}]</span>')
    option = node.get("option") or ""
    # A block-styled span: <summary> may hold phrasing content only.
    text = f'<span class="option">{esc(option)}</span>' if option else ""
    return " ".join(parts) + text


def _tree_html(nodes: Sequence[dict[str, Any]], chosen: set[int]) -> str:
    """Nested <details>, built with an explicit stack (no recursion limit on deep trees)."""
    out: list[str] = []
    stack: list[tuple[str, int]] = [("open", 0)] if nodes else []
    while stack:
        event, node_id = stack.pop()
        if event == "close":
            out.append("</div></details>")
            continue
        node = nodes[node_id]
        classes = ["node"] + (["chosen"] if node_id in chosen else []) + ([] if node["children"] else ["leaf"])
        is_open = node_id == 0 or node_id in chosen
        out.append(f'<details class="{" ".join(classes)}" id="n{node_id}"{" open" if is_open else ""}>'
                   f"<summary>{_node_summary(node, node_id in chosen)}</summary><div class=\"children\">")
        stack.append(("close", node_id))
        for child in reversed(node["children"]):
            stack.append(("open", int(child)))
    return "".join(out)


def render_tree_html(header: dict[str, Any], nodes: Sequence[dict[str, Any]]) -> str:
    """The page for one tree (a header and its node records, as `load_tree` returns them)."""
    esc = html.escape
    chosen_path = [int(i) for i in header.get("chosen_path") or []]
    solution = "".join(nodes[i]["option"] for i in chosen_path[1:]) if chosen_path else ""
    if chosen_path and header.get("chosen_rollout") is not None:  # the answer came from a fast rollout
        solution += (nodes[chosen_path[-1]].get("rollouts") or [])[int(header["chosen_rollout"])]["text"]
    rows = [("problem", header.get("problem_id")), ("task", header.get("task")),
            ("reference", header.get("reference")), ("answer", header.get("answer")),
            ("answer method", header.get("answer_method")), ("nodes", header.get("num_nodes")),
            ("simulations", header.get("simulations")), ("generated tokens", header.get("generated_tokens")),
            ("seed", header.get("seed"))]
    meta = "".join(f"<tr><td>{esc(k)}</td><td>{esc(str(v))}</td></tr>" for k, v in rows)
    config = json.dumps(header.get("config", {}), indent=2, sort_keys=True, ensure_ascii=False)
    title = f"search tree: {header.get('problem_id', '')}"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{esc(title)}</h1><table class=\"meta\">{meta}</table>"
        f"<h2>Question</h2><pre>{esc(str(header.get('question', '')))}</pre>"
        f"<h2>Chosen solution</h2><pre>{esc(str(header.get('prompt', '')))}<b>{esc(solution)}</b></pre>"
        "<h2>Tree</h2><div class=\"controls\"><button type=\"button\" onclick=\"setAll(true)\">expand all</button>"
        "<button type=\"button\" onclick=\"setAll(false)\">collapse all</button>"
        "<button type=\"button\" onclick=\"chosenOnly()\">chosen path only</button></div>"
        f"<div class=\"tree\">{_tree_html(nodes, set(chosen_path))}</div>"
        f"<h2>Config</h2><details><summary>search config</summary><pre>{esc(config)}</pre></details>"
        f"<script>{_JS}</script></body></html>\n"
    )


def write_tree_html(tree_path: PathLike, out_path: PathLike) -> None:
    """Render the tree file at `tree_path` to `out_path` (written atomically)."""
    header, nodes = load_tree(tree_path)
    atomic_write_text(out_path, render_tree_html(header, nodes))
