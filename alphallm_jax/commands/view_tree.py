"""`alphallm view-tree TREE.jsonl --out tree.html`: one search tree as a self-contained HTML page."""

from __future__ import annotations

import os

from absl import app, flags


def define_flags() -> None:
    flags.DEFINE_string("out", None, "HTML file to write (default: the tree file with .html).")


def main(argv) -> None:
    if len(argv) != 2:
        raise app.UsageError("usage: alphallm view-tree TREE.jsonl [--out tree.html]")
    from alphallm_jax.search.view import write_tree_html

    tree_path = argv[1]
    out = flags.FLAGS.out or os.path.splitext(tree_path)[0] + ".html"
    write_tree_html(tree_path, out)
    print(out)
