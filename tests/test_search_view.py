"""`alphallm view-tree`: a self-contained HTML page, every text escaped, every node present."""

import re
import subprocess
import sys
from pathlib import Path

from alphallm_jax.search.mcts import run_mcts
from alphallm_jax.search.mcts_config import MCTSConfig
from alphallm_jax.search.synthetic import SyntheticBackend
from alphallm_jax.search.tree import SearchProblem, Tree, load_tree
from alphallm_jax.search.view import render_tree_html

REPO_ROOT = Path(__file__).resolve().parents[1]
EVIL = '<script>alert("x")</script> & <b>bold</b>'


def searched_tree() -> Tree:
    cfg = MCTSConfig(c_min0=3, c_max0=3, merge_threshold=5, num_simulations=15, min_terminals=2, max_depth=4)
    tree = run_mcts([SearchProblem("p<0>", f"Q: {EVIL}\n", question=EVIL, seed=1)], SyntheticBackend(), cfg)[0]
    leaf = tree.nodes[tree.chosen_path[-1]]
    leaf.option = EVIL + "\n"
    leaf.answer = "<img src=x onerror=alert(1)>"
    return tree


def test_html_escapes_text_and_contains_every_node(tmp_path):
    tree = searched_tree()
    page = render_tree_html(tree.header(), [n.to_record() for n in tree.nodes])
    assert "<script>alert" not in page and "<img src=x" not in page and "<b>bold" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in page
    assert page.count('<details class="node') == len(tree.nodes)
    for node in tree.nodes:
        assert f'id="n{node.id}"' in page
    chosen = set(re.findall(r'<details class="node chosen[^"]*" id="n(\d+)"', page))
    assert chosen == {str(i) for i in tree.chosen_path}
    assert page.count("<script>") == 1  # only the page's own script
    assert "http://" not in page and "https://" not in page  # self-contained: nothing to fetch
    assert page.count("<details") == page.count("</details>")


def test_view_tree_command_writes_the_page(tmp_path):
    tree = searched_tree()
    tree_path = tmp_path / "tree.jsonl"
    tree.save(tree_path)
    out = tmp_path / "page.html"
    run = subprocess.run([sys.executable, "-m", "alphallm_jax.cli", "view-tree", str(tree_path), "--out", str(out)],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    header, nodes = load_tree(tree_path)
    assert out.read_text(encoding="utf-8") == render_tree_html(header, nodes)


def test_a_chosen_rollout_completes_the_chosen_solution_escaped():
    tree = searched_tree()
    leaf = tree.nodes[tree.chosen_path[-1]]
    leaf.rollouts = [{"text": "so 1<2 & done\n#### 3", "answer": "3", "orm": 0.9}]
    tree.chosen_rollout = 0
    page = render_tree_html(tree.header(), [n.to_record() for n in tree.nodes])
    solution = page.split("<h2>Chosen solution</h2>")[1].split("</pre>")[0]
    assert solution.endswith("so 1&lt;2 &amp; done\n#### 3</b>")
