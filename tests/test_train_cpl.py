"""Curriculum preference learning: the paper's order on a hand-built buffer, per-epoch reordering
through the shared trainer with exact resume, and train_sft_on_traces / train_preference on trees."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from alphallm_jax.config import default_config
from alphallm_jax.models import create_model
from alphallm_jax.train import cpl, dpo, pairs, policy_training
from alphallm_jax.train.batching import BatchIterator, collate_sft
from alphallm_jax.train.trainer import Trainer
from alphallm_jax.utils.io import read_jsonl
from tests.test_train_dpo import CFG, MODEL_CFG, collate, preference_examples, reference
from tests.test_train_pairs import write_tree


# ------------------------------------------------------------------------------------ ordering
def test_cpl_order_on_hand_built_buffer_is_the_papers_round_robin():
    groups = ["A", "B", "A", "C", "A", "C"]
    r_g = np.array([0.0, 4.0, 2.0, 1.0, 4.0, 3.0])  # normalised: 0, 1, .5, .25, 1, .75
    p_g = np.array([10.0, 0.0, -10.0, 5.0, 0.0, 10.0])  # normalised: 1, .5, 0, .75, .5, 1
    order, w = cpl.cpl_order(groups, r_g, p_g, alpha=0.5)
    np.testing.assert_allclose(w, [0.5, 1.25, 0.5, 0.625, 1.25, 1.25])
    # Within prompts by w: A -> 4, 0, 2 (tie kept in buffer order); B -> 1; C -> 5, 3. Then each
    # prompt's 1st pair (A, B, C in buffer order), each prompt's 2nd pair, the 3rd.
    assert order.tolist() == [4, 1, 5, 0, 3, 2]
    # alpha = 0: the reward gap alone ranks within prompts.
    assert cpl.cpl_order(groups, r_g, p_g, alpha=0.0)[0].tolist() == [4, 1, 5, 2, 3, 0]


def test_normalise():
    np.testing.assert_allclose(cpl.normalise(np.array([2.0, 4.0, 3.0])), [0.0, 1.0, 0.5])
    np.testing.assert_array_equal(cpl.normalise(np.array([3.0, 3.0])), [0.0, 0.0])


def test_batch_iterator_epoch_order():
    it = BatchIterator([([1], [2])] * 5, batch_size=2, collate_fn=collate_sft, seed=0)
    shuffled = [b.tolist() for b in it.epoch_plan(1)]
    it.set_epoch_order(0, [3, 1, 4, 0, 2])
    assert [b.tolist() for b in it.epoch_plan(0)] == [[3, 1], [4, 0], [2]]
    assert it.epoch_order(1) is None and [b.tolist() for b in it.epoch_plan(1)] == shuffled
    with pytest.raises(ValueError, match="permutation"):
        it.set_epoch_order(0, [0, 1, 2, 3, 3])


# --------------------------------------------------------------------- per-epoch order in the trainer
RESUME_CFG = dataclasses.replace(CFG, epochs=3, checkpoint_every=2, keep_checkpoints=2)


class Killed(Exception):
    pass


def host_params(model) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def run(workdir, examples, kill_at=None):
    model = create_model(MODEL_CFG, seed=0)
    orderer = cpl.EpochOrder(examples, "cpl", alpha=0.5, log_path=workdir / "order.jsonl",
                             batch_size=4, collate_fn=collate())
    trainer = Trainer(model, dpo.make_dpo_loss(0.5), RESUME_CFG, workdir=workdir / "train",
                      collate_fn=collate(), length_fn=dpo.preference_length)

    def kill(trainer, step, metrics):
        if step == kill_at:
            raise Killed

    trainer.fit(examples, callbacks=[kill], epoch_order_fn=orderer)
    return model, orderer


@pytest.fixture(scope="module")
def cpl_examples():
    return reference(create_model(MODEL_CFG, seed=0), preference_examples(12, 3, groups=3))


def test_cpl_reorders_every_epoch_and_resumes_exactly(cpl_examples, tmp_path):
    model, orderer = run(tmp_path / "full", cpl_examples)
    assert orderer.calls == [0, 1, 2]
    rows = read_jsonl(tmp_path / "full" / "order.jsonl")
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    groups = [e.group for e in cpl_examples]
    for r in rows:
        order = np.asarray(r["order"])
        w = np.empty(len(order))
        w[order] = r["w"]
        p_g = np.empty(len(order))
        p_g[order] = r["p_g"]
        assert order.tolist() == cpl.round_robin_order(groups, w).tolist()
        np.testing.assert_allclose(w, cpl.cpl_weights(orderer.reward_gap_n, p_g, 0.5))
        assert r["pair_ids"] == [cpl_examples[i].pair_id for i in order]
    # p_g is recomputed from the current policy: after an epoch of DPO the chosen sides gained.
    p0, p1 = (np.asarray(rows[k]["p_g"])[np.argsort(rows[k]["order"])] for k in (0, 1))
    assert not np.allclose(p0, p1)
    assert np.mean(p1) > np.mean(p0)

    # Killed at step 5 (3 steps per epoch): the newest checkpoint (step 4) is mid-epoch 1, whose
    # CPL order the checkpoint holds; the resumed run continues it and orders only epoch 2.
    with pytest.raises(Killed):
        run(tmp_path / "killed", cpl_examples, kill_at=5)
    resumed_model, resumed = run(tmp_path / "killed", cpl_examples)
    assert resumed.calls == [2]
    for x, y in zip(jax.tree.leaves(host_params(resumed_model)), jax.tree.leaves(host_params(model)),
                    strict=True):
        np.testing.assert_array_equal(x, y)
    resumed_rows = read_jsonl(tmp_path / "killed" / "order.jsonl")
    assert [r["order"] for r in resumed_rows] == [r["order"] for r in rows]


@pytest.mark.parametrize("end, trained_epochs", [
    # The first evaluation (end of epoch 0) is the best; the second (end of epoch 1) cannot improve
    # by the min delta: early stopping at an epoch's end, with the next epoch not started.
    (dict(eval_every=0, early_stopping_patience=1, early_stopping_min_delta=1e9), 2),
    (dict(eval_every=2, early_stopping_patience=1, early_stopping_min_delta=1e9), 2),  # stops mid-epoch 1
    (dict(max_steps=6), 2),  # ends at an epoch boundary
    (dict(max_steps=4), 2),
    ({}, 3),  # the last epoch ends at a batch boundary
])
def test_only_epochs_that_train_are_ordered_and_logged(cpl_examples, tmp_path, end, trained_epochs):
    cfg = dataclasses.replace(RESUME_CFG, **end)
    orderer = cpl.EpochOrder(cpl_examples, "cpl", alpha=0.5, log_path=tmp_path / "order.jsonl",
                             batch_size=4, collate_fn=collate())
    trainer = Trainer(create_model(MODEL_CFG, seed=0), dpo.make_dpo_loss(0.5), cfg, workdir=tmp_path / "train",
                      collate_fn=collate(), length_fn=dpo.preference_length)
    result = trainer.fit(cpl_examples, cpl_examples[:4] if "early_stopping_min_delta" in end else None,
                         epoch_order_fn=orderer)
    assert result.stopped_early == ("early_stopping_min_delta" in end)
    assert -(-result.step // 3) == trained_epochs  # 3 steps per epoch
    assert orderer.calls == list(range(trained_epochs))
    assert [r["epoch"] for r in read_jsonl(tmp_path / "order.jsonl")] == list(range(trained_epochs))


# ---------------------------------------------------------------------------- training functions
class ByteTokenizer:
    """Enough of the project's Tokenizer for training on trees: BOS 1, EOS 2, bytes above."""

    vocab_size = 256
    bos_id = 1
    eos_ids = (2,)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return ([1] if add_bos else []) + [3 + ord(c) % 250 for c in text]

    def save(self, directory) -> None:
        pass


def section(**overrides):
    pt = default_config().policy_train
    for name in ("sft", "dpo"):
        getattr(pt, name).update(dict(
            learning_rate=1e-2, end_learning_rate=1e-3, batch_size=4, max_seq_len=64, pad_to_multiple=16,
            checkpoint_every=-1, seed=0, log_every=1, progress_bar=False,
            compiler_options={"xla_backend_optimization_level": 0}))
    pt.sft.update(epochs=2, early_stopping_patience=0)
    pt.dpo.update(epochs=2)
    pt.logp_batch_size = 4
    pt.tau = 1.0  # the hand-built trees (tests/test_train_pairs.py) span Q -1 to 2.5, on the paper's margin
    pt.update(overrides)
    return pt


def test_train_sft_and_cpl_preference_on_trees(tmp_path):
    trees_dir = tmp_path / "trees"
    trees_dir.mkdir()
    for i in range(4):
        write_tree(trees_dir / f"p{i}.jsonl", problem_id=f"p{i}")
    traces, pair_records = pairs.extract_all(pairs.read_trees(trees_dir), pairs.ExtractionConfig())
    tok = ByteTokenizer()
    model = create_model(MODEL_CFG, seed=0)
    before = host_params(model)
    sft = policy_training.train_sft_on_traces(model, tok, traces, section(sft_dev_fraction=0.0),
                                              tmp_path / "work")
    assert (sft["train_traces"], sft["dev_traces"], sft["steps"]) == (4, 0, 2)
    assert any(not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(before), jax.tree.leaves(host_params(model)), strict=True))
    ex = policy_training.trace_examples(traces[:1], tok)[0]
    assert ex.prompt_ids == tuple(tok.encode(traces[0]["prompt"], add_bos=True))
    assert ex.response_ids == (11, 12, 41, 42, 2)  # ends with the sampled EOS, none appended

    out = policy_training.train_preference(model, tok, pair_records, section(ordering="cpl"), tmp_path / "work")
    assert out["ordering"] == "cpl" and out["train_pairs"] == 16 and out["steps"] == 8
    assert out["pair_kinds"] == {"stepwise": 12, "complete": 4, "q_pair": 0}
    assert [r["epoch"] for r in out["epoch_metrics"]] == [1, 2]
    assert len(out["epoch_policies"]) == 2
    rows = read_jsonl(tmp_path / "work" / "dpo" / "order.jsonl")
    assert [r["epoch"] for r in rows] == [0, 1] and all(r["ordering"] == "cpl" for r in rows)
    # Round-robin over the 4 prompts: every window of 4 consecutive pairs in the first rounds
    # holds one pair of each prompt.
    groups = [pid.split("/")[0] for pid in rows[0]["pair_ids"]]
    assert all(sorted(groups[k:k + 4]) == ["p0", "p1", "p2", "p3"] for k in range(0, 16, 4))
    cache = read_jsonl(tmp_path / "work" / "dpo" / "reference_logps.jsonl")
    assert len(cache) == 16 and all(np.isfinite(r["ref_chosen_logp"]) for r in cache)
    # A stop-ended complete trajectory gets EOS appended (node 6 ended at a stop string).
    pe = policy_training.preference_examples(pair_records[:1], tok)[0]
    assert pe.rejected_ids == (21, 22, 61, 62, 2) and pe.chosen_ids == (11, 12, 41, 42, 2)
    assert json.dumps(out)  # the summary is JSON (train_policy.json)


def test_run_policy_training_command(tmp_path):
    """`alphallm train-policy`'s body: checkpoint and trees in, records and a policy out; a rerun skips."""
    from alphallm_jax.models import Tokenizer, save_hf_checkpoint
    from tests.helpers import MISTRAL_TOKENIZER, require_shared_data

    require_shared_data()
    tok = Tokenizer.from_sentencepiece(MISTRAL_TOKENIZER)
    model_cfg = MODEL_CFG.replace(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                  eos_token_ids=tuple(tok.eos_ids), pad_token_id=tok.pad_id)
    save_hf_checkpoint(create_model(model_cfg, seed=0), model_cfg, tmp_path / "init", tokenizer=tok)
    trees_dir = tmp_path / "trees"
    trees_dir.mkdir()
    for i in range(2):
        write_tree(trees_dir / f"p{i}.jsonl", problem_id=f"p{i}")
    cfg = default_config()
    cfg.model.checkpoint = str(tmp_path / "init")
    cfg.policy_train = section(trees_dir=str(trees_dir), ordering="q_pairs", save_epoch_policies=False)
    cfg.policy_train.dpo.epochs = 1
    record = policy_training.run_policy_training(cfg, tmp_path / "run", "dpo")
    assert record["ordering"] == "q_pairs" and record["train_pairs"] == 4 and record["steps"] == 1
    assert record["pairs"] == {"stepwise": 6, "complete": 6, "q_pair": 4}
    assert len(read_jsonl(tmp_path / "run" / "pairs.jsonl")) == 16
    assert (tmp_path / "run" / "policy" / "DONE").exists()
    again = policy_training.run_policy_training(cfg, tmp_path / "run", "dpo")
    assert again["skipped"] and again["steps"] == 1
    # A moved run still skips; another starting policy or other trees are refused, not skipped.
    shutil.copytree(tmp_path / "run", tmp_path / "moved")
    assert policy_training.run_policy_training(cfg, tmp_path / "moved", "dpo")["skipped"]
    # A key only SFT reads is no part of a DPO run's identity; one DPO reads is.
    cfg.policy_train.sft.learning_rate, cfg.policy_train.orm_threshold = 0.5, 0.9
    assert policy_training.run_policy_training(cfg, tmp_path / "moved", "dpo")["skipped"]
    # What a preset sizes for its mesh may change with the mesh (a run resumed on other hosts).
    cfg.policy_train.dpo.grad_accum_steps, cfg.policy_train.dpo.remat = 2, True
    assert policy_training.run_policy_training(cfg, tmp_path / "moved", "dpo")["skipped"]
    cfg.policy_train.dpo.grad_accum_steps, cfg.policy_train.dpo.remat = 1, False
    cfg.policy_train.beta = 0.3
    with pytest.raises(ValueError, match="beta"):
        policy_training.run_policy_training(cfg, tmp_path / "moved", "dpo")
    cfg.policy_train.beta = 0.1
    save_hf_checkpoint(create_model(model_cfg, seed=1), model_cfg, tmp_path / "other", tokenizer=tok)
    cfg.model.checkpoint = str(tmp_path / "other")
    with pytest.raises(ValueError, match="init_policy"):
        policy_training.run_policy_training(cfg, tmp_path / "run", "dpo")
    cfg.model.checkpoint = str(tmp_path / "init")
    write_tree(trees_dir / "p2.jsonl", problem_id="p2")
    with pytest.raises(ValueError, match="trees"):
        policy_training.run_policy_training(cfg, tmp_path / "run", "dpo")


def test_nothing_to_train_on_raises_or_is_recorded_untrained(tmp_path):
    """With pairs too close to pass tau: `train-policy` fails, naming the ordering; the loop's call
    (`allow_untrained`) records why, keeps the initial policy without loading it, and a rerun skips."""
    trees_dir = tmp_path / "trees"
    trees_dir.mkdir()
    write_tree(trees_dir / "p0.jsonl")
    cfg = default_config()
    cfg.model.checkpoint = str(tmp_path / "never_loaded")
    (tmp_path / "never_loaded").mkdir()
    (tmp_path / "never_loaded" / "model.safetensors").write_bytes(b"not a checkpoint")
    cfg.policy_train = section(trees_dir=str(trees_dir), ordering="cpl", tau=100.0)
    with pytest.raises(ValueError, match=r"no pairs for ordering 'cpl'.*largest Q gap between visited "
                                         r"siblings there is 2.5, tau 100"):
        policy_training.run_policy_training(cfg, tmp_path / "strict", "dpo")
    record = policy_training.run_policy_training(cfg, tmp_path / "run", "dpo", allow_untrained=True)
    assert record["untrained"] == "no pairs for ordering 'cpl' passed the thresholds"
    assert record["policy"] == cfg.model.checkpoint and record["steps"] == 0 and record["num_trees"] == 1
    assert (tmp_path / "run" / "pairs.jsonl").exists() and not (tmp_path / "run" / "policy").exists()
    again = policy_training.run_policy_training(cfg, tmp_path / "run", "dpo", allow_untrained=True)
    assert again["skipped"] and again["untrained"] == record["untrained"]


def test_saved_epoch_policies_come_in_epoch_order(tmp_path):
    # epoch_10 after epoch_9 (a string sort puts it after epoch_1); unfinished or foreign folders left out.
    for k in (1, 2, 9, 10, 11):
        (tmp_path / f"epoch_{k}").mkdir()
        (tmp_path / f"epoch_{k}" / policy_training.DONE).write_text("")
    (tmp_path / "epoch_3").mkdir()  # no DONE: unfinished
    (tmp_path / "epoch_x").mkdir()
    (tmp_path / "epoch_x" / policy_training.DONE).write_text("")
    assert policy_training.saved_epoch_policies(tmp_path) == [str(tmp_path / f"epoch_{k}") for k in (1, 2, 9, 10, 11)]
