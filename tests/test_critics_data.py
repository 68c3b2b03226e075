"""Critic data: MC labels on a hand-built rollout tree, training examples, and building data through the
real sampler (with prefix forking) on a tiny random model, resumably."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alphallm_jax.critics.data import (
    RolloutConfig,
    build_rollout_data,
    critic_example,
    critic_examples,
    pair_within_prompts,
    rollout_chunk,
    trajectory_read_points,
)
from alphallm_jax.critics.positions import blank_token_ids, orm_index, step_end_indices, strip_trailing
from alphallm_jax.data.problems import Problem
from alphallm_jax.sampling import Completion, SeqState

EOS = 2
# Token -> text of the scripted "policy": a, b are steps; 20 and 21 write a right and a wrong answer; 12 and
# 13 half a step each; 30 a blank line, 31 an invented next question, 32 text after an answer's line.
TEXT = {10: "a\n", 11: "b\n", 12: "c ", 13: "d\n", 20: "#### 1", 21: "#### 2", 22: "#### 1\n", 30: "\n",
        31: "Question: q2\n", 32: "more\n", EOS: ""}


class ScriptedTreeSampler:
    """Answers each request from a per-(state, kind) queue of token lists, in call order."""

    def __init__(self, script):
        self.script = {k: list(v) for k, v in script.items()}
        self.requests = []

    def new_state(self, prompt):
        return SeqState(tokens=(1, 5))

    def sample(self, requests, *, keep_states=True):
        out = []
        for r in requests:
            kind = "step" if "\n" in r.stop else "rollout"  # steps end at their line, rollouts at the end
            self.requests.append((r.state.tokens, kind, r.stop))
            ids = self.script[(r.state.tokens, kind)].pop(0)
            text = "".join(TEXT[t] for t in ids)
            stop = next((s for s in r.stop if text.endswith(s)), None)
            reason = "eos" if ids[-1] == EOS else "stop" if stop else "length"
            out.append(Completion(text=text, token_ids=list(ids), logprobs=[-0.5] * len(ids), finish_reason=reason,
                                  stop_string=stop,
                                  state=SeqState(tokens=r.state.tokens + tuple(ids), parent=r.state) if keep_states else None))
        return out

    def cut(self, context, token_ids, chars):
        ids, text = [], ""
        for t in token_ids:
            if len(text) >= chars:
                break
            ids.append(t)
            text += TEXT[t]
        return ids, text


def test_mc_labels_on_a_hand_built_tree():
    # Two trajectories, three outcomes per distinct intermediate state (trajectories through it + rollouts):
    #   root -a-> s1 (both trajectories, so one rollout from s1: "b #### 1", right)
    #   traj 0: s1 -> "#### 1" (right, terminal);  traj 1: s1 -b-> s2 -> "#### 2" (wrong)
    #   s2 has one trajectory through it: two rollouts, "#### 1", "#### 1" (both right)
    script = {
        ((1, 5), "step"): [[10], [10]],
        ((1, 5, 10), "rollout"): [[11, 20, EOS]],
        ((1, 5, 10), "step"): [[20, EOS], [11]],
        ((1, 5, 10, 11), "rollout"): [[20, EOS], [20, EOS]],
        ((1, 5, 10, 11), "step"): [[21, EOS]],
    }
    sampler = ScriptedTreeSampler(script)
    problem = Problem(id="p0", question="q", answer="1", solution=None, task="arith")
    cfg = RolloutConfig(num_solutions=2, num_rollouts=3, max_new_tokens=32, max_step_tokens=8, max_steps=6)
    rows, counters = rollout_chunk(sampler, [problem], ["q"], cfg, task="arith", eos_ids={EOS}, seed=0)
    assert all(not v for v in sampler.script.values())  # the whole script was used
    trajs = [r for r in rows if r["kind"] == "trajectory"]
    rolls = [r for r in rows if r["kind"] == "rollout"]
    assert counters["rollouts"] == len(rolls) == 3
    assert [r["correct"] for r in trajs] == [True, False]
    assert trajs[0]["step_ids"] == [[10], [20]] and trajs[1]["step_ids"] == [[10], [11], [21]]
    # root: 1 of 2 trajectories right; s1: 1 of 1 rollout + 1 of 2 trajectories; s2: 2 of 2 rollouts + traj 1.
    assert trajs[0]["state_hits"] == [1, 2, 1] and trajs[0]["state_counts"] == [2, 3, 1]
    assert trajs[1]["state_hits"] == [1, 2, 2, 0] and trajs[1]["state_counts"] == [2, 3, 3, 1]
    assert sorted(r["correct"] for r in rolls) == [True, True, True]
    assert {tuple(map(tuple, r["step_ids"][:-1])) for r in rolls} == {((10,),), ((10,), (11,))}

    blank = blank_token_ids([TEXT.get(i, "x") for i in range(30)], {EOS})
    soft = critic_example(trajs[1], blank_ids=blank)
    ends, n = trajectory_read_points(trajs[1])
    assert ends == [1, 2, 3, 4] and n == 5
    np.testing.assert_allclose(soft["value_target"], [0, 0.5, 2 / 3, 2 / 3, 0])
    np.testing.assert_array_equal(soft["value_mask"], [0, 1, 1, 1, 1])
    np.testing.assert_allclose(soft["prm_target"], [0, 0, 2 / 3, 2 / 3, 0])
    np.testing.assert_array_equal(soft["prm_mask"], [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(soft["orm_mask"], [0, 0, 0, 0, 1])
    assert soft["orm_target"][4] == 0.0
    hard = critic_example(trajs[1], blank_ids=blank, prm_label="hard", value_at_root=False)
    np.testing.assert_array_equal(hard["prm_target"], [0, 0, 1, 1, 0])
    assert hard["value_mask"][1] == 0
    roll = critic_example(rolls[0], blank_ids=blank)
    assert roll["value_mask"].sum() == roll["prm_mask"].sum() == 0 and roll["orm_mask"].sum() == 1
    assert len(critic_examples(rows, blank_ids=blank, kinds=("trajectory",))) == 2
    assert len(critic_examples(rows, blank_ids=blank, max_seq_len=4)) == 1  # 5-token rows are dropped


def test_the_last_step_allowed_runs_to_the_end_as_the_search_rolls_out_its_deepest_node():
    # max_steps 2: the second step is sampled to the end of the solution ("b", "#### 1" in one sample), as the
    # search rolls out a node at its maximum depth; cut after "b" and graded unfinished, the trajectory's
    # outcome (wrong) would have gone into labels whose rollouts all run to the end (right).
    script = {
        ((1, 5), "step"): [[10]],
        ((1, 5, 10), "rollout"): [[11, 20, EOS], [11, 20, EOS]],
        ((1, 5, 10), "rollout_last"): [[11, 20, EOS]],
    }

    class LastStepSampler(ScriptedTreeSampler):
        def sample(self, requests, *, keep_states=True):
            for r in requests:  # a step request with the end stops only: the last step
                if "\n" not in r.stop and r.state.tokens == (1, 5, 10) and keep_states:
                    self.script[(r.state.tokens, "rollout")].insert(0, self.script.pop((r.state.tokens, "rollout_last"))[0])
            return super().sample(requests, keep_states=keep_states)

    sampler = LastStepSampler(script)
    problem = Problem(id="p0", question="q", answer="1", solution=None, task="arith")
    cfg = RolloutConfig(num_solutions=1, num_rollouts=3, max_new_tokens=32, max_step_tokens=8, max_steps=2)
    rows, _ = rollout_chunk(sampler, [problem], ["q"], cfg, task="arith", eos_ids={EOS}, seed=0)
    (traj,) = [r for r in rows if r["kind"] == "trajectory"]
    assert traj["step_ids"] == [[10], [11, 20]] and traj["complete"] and traj["correct"]
    assert traj["state_hits"] == traj["state_counts"] == [1, 3, 1]


def test_samples_end_where_the_search_would_end_them():
    """As the search's options do (`search.options.option_end`): a step cut by the token cap is an
    ordinary step; a blank step, an invented next question or the final answer's line end the
    solution, and what follows is cut off with its tokens."""
    script = {
        ((1, 5), "step"): [[12], [10], [10]],  # "c " hits the step cap: the trajectory goes on
        ((1, 5, 12), "rollout"): [[20, 30, 31], [30, 31]],  # an answer, then a question; a question alone
        ((1, 5, 10), "rollout"): [[11, 22, 32]],  # text after the answer's line
        ((1, 5, 12), "step"): [[13]],
        ((1, 5, 10), "step"): [[30], [21, EOS]],  # a blank line ends the solution
        ((1, 5, 12, 13), "rollout"): [[22, EOS], [21, EOS]],
        ((1, 5, 12, 13), "step"): [[22, 32]],
    }
    sampler = ScriptedTreeSampler(script)
    problem = Problem(id="p0", question="q", answer="1", solution=None, task="arith")
    cfg = RolloutConfig(num_solutions=3, num_rollouts=3, max_new_tokens=32, max_step_tokens=8, max_steps=6)
    rows, _ = rollout_chunk(sampler, [problem], ["q"], cfg, task="arith", eos_ids={EOS}, seed=0)
    assert all(not v for v in sampler.script.values())
    trajs = [r for r in rows if r["kind"] == "trajectory"]
    rolls = [r for r in rows if r["kind"] == "rollout"]
    assert [r["step_ids"] for r in trajs] == [[[12], [13], [22]], [[10], [30]], [[10], [21]]]
    assert [r["text"] for r in trajs] == ["c d\n#### 1\n", "a\n\n", "a\n#### 2"]
    assert [r["correct"] for r in trajs] == [True, False, False] and all(r["complete"] for r in trajs)
    assert [r["step_logprobs"] for r in trajs] == [[-0.5] * 3, [-0.5] * 2, [-0.5] * 2]  # kept tokens only
    assert [r["step_ids"][-1] for r in rolls] == [[20, 30], [30], [11, 22], [22], [21]]
    assert [r["text"] for r in rolls] == ["c #### 1\n", "c \n", "a\nb\n#### 1\n", "c d\n#### 1\n", "c d\n#### 2"]
    assert [r["correct"] for r in rolls] == [True, False, True, True, False]
    assert [r["step_logprobs"][-1] for r in rolls] == [-1.0, -0.5, -1.0, -0.5, -0.5]
    assert {stop for _, kind, stop in sampler.requests if kind == "step"} == {("\n", "\n\n", "\nQuestion:")}
    assert {stop for _, kind, stop in sampler.requests if kind == "rollout"} == {("\n\n", "\nQuestion:")}


def test_math_rollouts_run_past_paragraphs():
    """MATH's steps are paragraphs: a rollout to the end must not stop at the first blank line."""
    from alphallm_jax.critics.data import trajectory_stops

    cfg = RolloutConfig(solution_stop=("\n\n", "\nQuestion:"))
    assert trajectory_stops(cfg, "math") == (("\n\n", "\nQuestion:"), ("\nQuestion:",))
    assert trajectory_stops(cfg, "gsm8k") == (("\n", "\n\n", "\nQuestion:"), ("\n\n", "\nQuestion:"))


def test_positions_helpers():
    texts = ["", "", "", "x", " y", "\n", "z\n", "\n\n", "w"]
    blank = blank_token_ids(texts, {2})
    assert blank == {2, 5, 7}
    assert strip_trailing([3, 4, 2, 2], {2}) == [3, 4]
    assert orm_index([3, 4, 5, 2], blank) == 1
    assert step_end_indices([3, 5, 4, 6, 8], texts, "\n") == [1, 3, 4]  # "x\n y z\n w"
    assert step_end_indices([3, 5, 4, 5], texts, "\n", start=1) == [1, 3]
    assert step_end_indices([3, 7, 4, 7], texts, "\n\n") == [1, 3]  # a separator inside one piece
    assert step_end_indices([3, 5, 5, 4], texts, "\n\n") == [2, 3]  # a separator split over two pieces


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    from alphallm_jax.data.arith import ArithConfig, generate_problems
    from alphallm_jax.data.prompts import format_prompt, format_solution
    from alphallm_jax.data.spm_training import SPECIAL_IDS, train_sentencepiece
    from alphallm_jax.models import ModelConfig, Tokenizer, create_model

    problems = generate_problems(ArithConfig(), 60, seed=0, split="train")
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    train_sentencepiece([format_prompt(p, "plain") + format_solution(p.solution, p.task, p.answer) for p in problems],
                        path, vocab_size=384)
    tokenizer = Tokenizer.from_sentencepiece(path)
    cfg = ModelConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=16, max_position_embeddings=256, tie_word_embeddings=True,
                      bos_token_id=SPECIAL_IDS["bos_id"], eos_token_ids=(SPECIAL_IDS["eos_id"],),
                      pad_token_id=SPECIAL_IDS["pad_id"])
    model = create_model(cfg, seed=0)
    # A policy that likes newlines and EOS, so random steps stay short and trajectories end: a large
    # shared component in every embedding dominates the normed hidden state, and with tied embeddings
    # the logit of token v is about sqrt(d) * emb[v, 0].
    newline = tokenizer.encode("\n")[-1]
    emb = np.array(model.embed_vd[...])
    emb[:, 0] += 5.0
    emb[newline, 0] = 6.0
    emb[SPECIAL_IDS["eos_id"], 0] = 5.6
    model.embed_vd.set_value(jnp.asarray(emb))
    return model, tokenizer, problems


def test_build_data_through_the_sampler_with_forking_and_resume(tiny_policy, tmp_path):
    from alphallm_jax.sampling import Sampler

    model, tokenizer, problems = tiny_policy
    problems = problems[:4]
    cfg = RolloutConfig(num_solutions=3, num_rollouts=2, max_new_tokens=24, max_step_tokens=8, max_steps=4,
                        prompts_per_chunk=2, pool_slots=64)
    sampler = Sampler(model, tokenizer, max_len=160, pool_slots=64, max_batch=32)
    out = tmp_path / "data"
    rows = build_rollout_data(sampler, problems, lambda p: f"Question: {p.question}\nAnswer:\n", cfg, out,
                              task="arith", seed=0)
    trajs = [r for r in rows if r["kind"] == "trajectory"]
    rolls = [r for r in rows if r["kind"] == "rollout"]
    assert len(trajs) == 12 and (out / "DONE").exists() and len(list((out / "parts").iterdir())) == 2
    for r in trajs:
        assert r["state_counts"][0] == 3  # the root's outcomes are its three trajectories
        assert len(r["state_counts"]) == len(r["step_ids"]) + 1
        assert all(0 <= h <= c for h, c in zip(r["state_hits"], r["state_counts"]))
        assert all(c >= 1 for c in r["state_counts"])
        assert sum(len(s) for s in r["step_ids"]) <= 24
    assert rolls, "intermediate states were rolled out"
    # Each step's summed token log-probability under the policy, as a forward pass over the row computes it.
    for r in (trajs[0], trajs[5], rolls[0]):
        assert len(r["step_logprobs"]) == len(r["step_ids"])
        ids = list(r["prompt_ids"]) + [t for s in r["step_ids"] for t in s]
        logp = np.asarray(jax.nn.log_softmax(model(jnp.asarray([ids], jnp.int32))[0].astype(jnp.float32), -1))
        pos = len(r["prompt_ids"])
        for step, got in zip(r["step_ids"], r["step_logprobs"]):
            want = sum(float(logp[pos + i - 1, t]) for i, t in enumerate(step))
            assert got == pytest.approx(want, abs=1e-3 + 1e-4 * abs(want))
            pos += len(step)
    # Forking: a rollout prefills only its state's pending token, never the prefix again.
    stats = sampler.stats
    prompt_tokens = sum(len(tokenizer.encode(f"Question: {p.question}\nAnswer:\n", add_bos=True)) for p in problems)
    assert stats.prefilled_tokens < prompt_tokens + stats.device_calls * 32
    assert stats.cache_hits > 0 and stats.rebuilds == 0
    stats_file = json.loads((out / "stats.json").read_text())
    assert stats_file["trajectory_rows"] == 12

    # Resume: a finished build is read back; a half-finished one recomputes only missing chunks.
    (out / "DONE").unlink()
    (out / "parts" / "chunk_00001.jsonl").unlink()
    again = build_rollout_data(sampler, problems, lambda p: f"Question: {p.question}\nAnswer:\n", cfg, out,
                               task="arith", seed=0)
    assert again == rows  # same seeds, same rows
    with pytest.raises(ValueError, match="other settings"):
        (out / "DONE").unlink()
        build_rollout_data(sampler, problems, lambda p: f"Question: {p.question}\nAnswer:\n",
                           RolloutConfig(num_solutions=2, max_new_tokens=24), out, task="arith", seed=0)


def test_pairs_within_prompts_put_right_against_wrong_and_use_each_solution_once():
    def ex(i, correct):
        e = {"input_ids": np.array([i, i], np.int32), "orm_target": np.array([0.0, float(correct)], np.float32),
             "orm_mask": np.array([0.0, 1.0], np.float32)}
        return e

    examples = [ex(0, 1), ex(1, 0), ex(2, 0), ex(3, 0), ex(4, 1), ex(5, 0), ex(6, 0)]
    pids = ["p", "p", "p", "p", "q", "q", "p"]
    pairs = pair_within_prompts(examples, pids, seed=0)
    assert len(pairs) == 4  # p: (right, wrong), (wrong, wrong), (wrong, label-free copy); q: (right, wrong)
    firsts = [int(p["input_ids"][0]) for p in pairs]
    seconds = [int(p["b_input_ids"][0]) for p in pairs]
    used = sorted(firsts + [s for p, s in zip(pairs, seconds) if p["b_orm_mask"].sum() > 0])
    assert used == [0, 1, 2, 3, 4, 5, 6]
    ranked = [p for p in pairs if p["orm_target"][1] != p["b_orm_target"][1] and p["b_orm_mask"].sum() > 0]
    assert len(ranked) == 2 and all(p["input_ids"][0] in (0, 4) for p in ranked)
    lone = [p for p in pairs if p["b_orm_mask"].sum() == 0]
    assert len(lone) == 1 and lone[0]["input_ids"][0] == lone[0]["b_input_ids"][0]
