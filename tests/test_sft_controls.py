"""experiments/sft_controls.py: the arms' data, the label-free trace rule, and one run on a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from alphallm_jax.critics.tools import ToolConfig
from alphallm_jax.sampling import Completion
from experiments import sft_controls
from tests.helpers import MISTRAL_TOKENIZER, REPO_ROOT, load_config, require_shared_data


def _completion(text: str, reason: str = "eos") -> Completion:
    return Completion(text=text, token_ids=(1, 2), logprobs=(-0.1, -0.2), finish_reason=reason)


RIGHT = "Tom has 3*4=<<3*4=12>>12 pens.\n#### 12"
WRONG_CALC = "Tom has 3*4=<<3*4=13>>13 pens.\n#### 13"
OTHER = "Tom has 3+4=<<3+4=7>>7 pens.\n#### 7"


def test_the_trace_rule_drops_wrong_calculations_and_cut_samples_then_votes():
    tools = ToolConfig()
    # Three wrong calculations would outvote two right ones; the calculator drops them first.
    picked = sft_controls.pick_trace([_completion(WRONG_CALC)] * 3 + [_completion(RIGHT)] * 2 + [_completion(OTHER)],
                                     "arith", tools, 0.6)
    assert picked is not None and picked[0] == "12" and picked[1].text == RIGHT
    # A split vote (2 of 3 = 0.67 >= 0.6 passes; 1 of 2 does not).
    assert sft_controls.pick_trace([_completion(RIGHT), _completion(OTHER)], "arith", tools, 0.6) is None
    # Samples cut at the token cap or without an answer never vote.
    assert sft_controls.pick_trace([_completion(RIGHT, "length"), _completion("no answer here")], "arith",
                                   tools, 0.6) is None


def test_arms_are_spelled_and_fresh_problems_are_new_and_prefix_stable():
    assert sft_controls.parse_arm("ref:800:1e-4") == ("ref", 800, 1e-4)
    assert sft_controls.parse_arm("none") == ("none", 0, 0.0)
    for bad in ("ref:800", "gold:8:1e-4", "none:1:1"):
        with pytest.raises(ValueError, match="KIND:N:RATE"):
            sft_controls.parse_arm(bad)
    cfg = load_config("demo_arith")
    short, long = sft_controls.fresh_problems(cfg, 20), sft_controls.fresh_problems(cfg, 60)
    assert [p.question for p in long[:20]] == [p.question for p in short]
    from alphallm_jax.pipeline.evaluation import load_split

    named = {p.question for s in ("arith:train", "arith:dev", "arith:test") for p in load_split(cfg, s)}
    assert not named & {p.question for p in long}
    # The held-out evaluation problems (--fresh_eval) are new to every split and to the arms' problems.
    held = sft_controls.held_out_problems(cfg, 40, long)
    assert len(held) == 40 and not {p.question for p in held} & (named | {p.question for p in long})
    assert [p.question for p in held] == [p.question for p in sft_controls.held_out_problems(cfg, 40, long)]


def test_config_overrides_are_literals_on_known_keys():
    cfg = sft_controls.apply_overrides(load_config("demo_arith"), [
        "eval.temperature=1.0", "eval.stop=('\\n',)", "policy_train.ordering=shuffle", "policy_train.sft.epochs=5"])
    assert (cfg.eval.temperature, tuple(cfg.eval.stop), cfg.policy_train.ordering) == (1.0, ("\n",), "shuffle")
    assert cfg.policy_train.sft.epochs == 5
    assert sft_controls.apply_overrides(cfg, []).to_dict() == cfg.to_dict()  # no --set: the config as it is
    with pytest.raises(ValueError, match=r"no key 'eval.temprature'; valid keys of config.eval: .*temperature"):
        sft_controls.apply_overrides(cfg, ["eval.temprature=1.0"])
    with pytest.raises(ValueError, match="no key 'eval.temperature.x'"):
        sft_controls.apply_overrides(cfg, ["eval.temperature.x=1"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        sft_controls.apply_overrides(cfg, ["eval.temperature"])
    with pytest.raises(ValueError, match=r"no key .__import__\(.*valid keys of config: "):
        sft_controls.apply_overrides(cfg, ["__import__('os').system('x')=1"])
    # Values are typed as their keys: a tuple key takes a literal tuple, never an expression.
    with pytest.raises(ValueError, match="eval.stop=__import__.*not a Python literal of a tuple"):
        sft_controls.apply_overrides(cfg, ["eval.stop=__import__('os')"])
    with pytest.raises(ValueError, match="not a tuple"):
        sft_controls.apply_overrides(cfg, ["eval.stop='x'"])
    with pytest.raises(ValueError, match="'policy_train.sft.epochs=two'.*invalid literal for int"):
        sft_controls.apply_overrides(cfg, ["policy_train.sft.epochs=two"])


@pytest.mark.slow
def test_controls_run_end_to_end_on_a_tiny_model_and_resume(tmp_path):
    require_shared_data()
    ckpt = tmp_path / "tiny"
    made = subprocess.run([sys.executable, "-m", "alphallm_jax.cli", "init-model", "--preset=tiny",
                           f"--tokenizer={MISTRAL_TOKENIZER}", f"--out={ckpt}"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stderr[-2000:]
    out = tmp_path / "controls"
    args = ["--config=configs/demo_arith.py:quick", f"--policy={ckpt}", f"--out={out}", "--arm=none",
            "--arm=d0:8:1e-3", "--arm=self:2:1e-3", "--epochs=1", "--test_limit=2", "--dev_limit=2",
            "--fresh_eval=3"]
    command = [sys.executable, "experiments/sft_controls.py", *args]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["arm"] for r in records] == ["none", "d0:8:1e-3", "self:2:1e-3"]
    assert records[1]["steps"] >= 1 and records[0].get("steps") is None
    # A random model's samples rarely agree on a checked answer; a self arm without traces trains no step.
    assert (records[2]["steps"] > 0) == (records[2]["traces"] > 0)
    for r in records:
        assert 0.0 <= r["test_greedy"] <= 1.0 and 0.0 <= r["dev_greedy"] <= 1.0
        right = r["fresh_eval_greedy"] * 3  # a count of the 3 held-out problems
        assert 0 <= right <= 3 and abs(right - round(right)) < 1e-9
    assert len((out / "fresh_eval.jsonl").read_text().splitlines()) == 3
    again = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and again.stdout == ""  # every arm read back, nothing retrained
    bad = subprocess.run([sys.executable, "experiments/sft_controls.py", *args[:3], "--arm=gold:1:1"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "KIND:N:RATE" in bad.stderr
    # Another policy into the same OUT would resume its arms and evaluations: refused, naming the policy.
    (ckpt / "config.json").write_text((ckpt / "config.json").read_text() + "\n")
    other = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert other.returncode != 0 and "holds results of another run" in other.stderr and "policy" in other.stderr
