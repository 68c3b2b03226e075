"""The trainer loop end to end on the tiny model: learning, exact resume, NaN stop, sharding, early
stopping.

Every Trainer here shares one TrainConfig and one loss function, so the jitted train step is
compiled once for one device and once for the 8-device mesh (the trainer caches compiled steps).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from alphallm_jax.models import create_model, make_mesh, presets
from alphallm_jax.train import losses
from alphallm_jax.train.trainer import NonFiniteLossError, TrainConfig, Trainer

POISON = 255  # a token id no clean example uses: its presence makes the loss NaN


def poisonable_sft_loss(model, batch):
    """SFT loss, NaN for a batch that contains the POISON token (a stand-in for a diverged step)."""
    loss, metrics = losses.sft_loss(model, batch)
    bad = jnp.any(batch["input_ids"] == POISON)
    return jnp.where(bad, jnp.nan, loss), metrics


MODEL_CFG = presets.get("tiny")
CFG = TrainConfig(
    learning_rate=1e-2, end_learning_rate=1e-3, warmup_ratio=0.1, schedule="cosine",
    weight_decay=0.01, max_grad_norm=1.0, batch_size=4, grad_accum_steps=1, epochs=20,
    max_seq_len=32, pad_to_multiple=16, bucket_window=2, checkpoint_every=5, keep_checkpoints=3,
    eval_every=5, early_stopping_patience=2, log_every=1, seed=0, progress_bar=False,
    compiler_options={"xla_backend_optimization_level": 0})
STEPS = 40  # 8 examples / batch 4 = 2 steps per epoch, 20 epochs


def counting_examples(n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """A random prompt, then a response counting up from the prompt's last token."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        prompt = rng.integers(3, 200, rng.integers(3, 7)).tolist()
        out.append((prompt, [prompt[-1] + 1 + i for i in range(rng.integers(6, 11))]))
    return out


def random_examples(n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    rng = np.random.default_rng(seed)
    return [(rng.integers(3, 250, rng.integers(3, 7)).tolist(),
             rng.integers(3, 250, rng.integers(6, 11)).tolist()) for _ in range(n)]


TRAIN = counting_examples(8, 0)
DEV = random_examples(8, 1)  # unrelated sequences: memorising TRAIN overfits them


class Killed(Exception):
    pass


def kill_at(step: int):
    def callback(trainer, s, metrics):
        if s == step:
            raise Killed(f"killed after step {s}")
    return callback


def host_params(model) -> dict:
    from flax import nnx
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def assert_trees_close(a, b, atol=0.0):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb, strict=True):
        if atol == 0.0:
            np.testing.assert_array_equal(x, y)
        else:
            np.testing.assert_allclose(x, y, atol=atol, rtol=0)


def read_rows(workdir, split="train"):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """An uninterrupted single-device run; records the parameters after step 5."""
    workdir = tmp_path_factory.mktemp("baseline")
    model = create_model(MODEL_CFG, seed=0)
    initial = host_params(model)
    at5 = {}

    def record(trainer, step, metrics):
        if step == 5:
            at5["params"] = jax.tree.map(np.asarray, jax.device_get(trainer.params))

    result = Trainer(model, poisonable_sft_loss, CFG, workdir=workdir).fit(TRAIN, callbacks=[record])
    return {"workdir": str(workdir), "result": result, "params": host_params(model),
            "initial": initial, "at5": at5["params"]}


def test_loss_decreases_and_metrics_are_written(baseline):
    rows = read_rows(baseline["workdir"])
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    first, last = rows[0]["loss"], rows[-1]["loss"]
    assert last < 0.2 * first, (first, last)
    assert rows[-1]["token_accuracy"] > 0.9
    assert baseline["result"].step == STEPS
    assert abs(rows[-1]["learning_rate"] - CFG.end_learning_rate) < 1e-9
    tb = os.listdir(os.path.join(baseline["workdir"], "tensorboard"))
    assert any(name.startswith("events.out.tfevents") for name in tb)
    mngr = ocp.CheckpointManager(os.path.join(baseline["workdir"], "checkpoints"))
    assert mngr.latest_step() == STEPS and len(mngr.all_steps()) == CFG.keep_checkpoints


def test_resume_mid_epoch_equals_uninterrupted(baseline, tmp_path):
    workdir = tmp_path / "run"
    with pytest.raises(Killed):
        Trainer(create_model(MODEL_CFG, seed=0), poisonable_sft_loss, CFG,
                workdir=workdir).fit(TRAIN, callbacks=[kill_at(17)])
    # The newest checkpoint is step 15: the next batch is epoch 7, batch 1 of 2 (mid-epoch).
    meta = json.loads((workdir / "checkpoints" / "15" / "meta" / "metadata").read_text())
    assert meta["data"] == {"epoch": 7, "step": 1}
    model = create_model(MODEL_CFG, seed=0)
    result = Trainer(model, poisonable_sft_loss, CFG, workdir=workdir).fit(TRAIN)
    assert result.step == STEPS
    assert_trees_close(host_params(model), baseline["params"])
    # metrics.jsonl holds each step once: rows of the killed steps 16-17 were replaced.
    assert [r["step"] for r in read_rows(workdir)] == list(range(1, STEPS + 1))


def test_nan_stops_with_step_named_and_good_checkpoint_kept(tmp_path):
    # One epoch of 40 batches (the same 40 steps, so the compiled step is shared): the poisoned
    # example is seen once, in batch 7, i.e. step 8.
    cfg = dataclasses.replace(CFG, epochs=1)
    data = [list(x) for x in counting_examples(4 * STEPS, 2)]
    trainer = Trainer(create_model(MODEL_CFG, seed=0), poisonable_sft_loss, cfg,
                      workdir=tmp_path / "run")
    victim = int(trainer._make_iterator(data, batch_size=cfg.batch_size, shuffle=True)
                 .epoch_plan(0)[7][0])
    data[victim] = [data[victim][0], data[victim][1][:-1] + [POISON]]
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 8") as err:
        trainer.fit(data)
    assert err.value.step == 8 and err.value.last_good_step == 5
    mngr = ocp.CheckpointManager(tmp_path / "run" / "checkpoints")
    assert mngr.all_steps() == [5]
    restored = mngr.restore(5, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(restored["state"]))
    # The bad update was not applied: the model holds the finite parameters after step 7.
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(host_params(trainer.model)))
    rows = read_rows(tmp_path / "run")
    assert rows[-1]["step"] == 7


def test_sharded_training_equals_one_device(baseline, tmp_path):
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    model = create_model(MODEL_CFG, mesh=mesh, seed=0)
    assert_trees_close(host_params(model), baseline["initial"], atol=1e-6)
    with pytest.raises(Killed):
        Trainer(model, poisonable_sft_loss, CFG, mesh=mesh, workdir=tmp_path / "run").fit(
            TRAIN, callbacks=[kill_at(5)])
    emb = model.embed_vd[...]
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    # Parameters agree to ~1e-5. Adam divides each gradient by its own RMS, so an element whose
    # gradient is ~0 (summed in a different order over shards) can move by up to ~lr per step:
    # a handful of such elements may differ by a few 1e-5, so the bound is on the 99.9th
    # percentile and the maximum is only bounded by lr.
    diffs = np.concatenate([np.abs(x - y).ravel() for x, y in zip(
        jax.tree.leaves(host_params(model)), jax.tree.leaves(_nested_params(baseline["at5"])), strict=True)])
    assert np.quantile(diffs, 0.999) < 1e-5 and diffs.max() < CFG.learning_rate * 1e-2
    rows = read_rows(tmp_path / "run")
    base = read_rows(baseline["workdir"])[:5]
    np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in base], rtol=1e-5)


def _nested_params(state) -> dict:
    from flax import nnx
    return jax.tree.map(np.asarray, nnx.to_pure_dict(state))


def test_early_stopping_keeps_best_params(tmp_path):
    model = create_model(MODEL_CFG, seed=0)
    trainer = Trainer(model, poisonable_sft_loss, CFG, workdir=tmp_path / "run")
    result = trainer.fit(TRAIN, DEV)
    dev = read_rows(tmp_path / "run", "dev")
    losses_ = [r["loss"] for r in dev]
    best = int(np.argmin(losses_))
    assert result.best_step == dev[best]["step"]
    assert result.best_dev_loss == pytest.approx(losses_[best])
    # Random dev sequences: memorising the train set overfits, so the run stops early.
    assert result.stopped_early and len(dev) - 1 - best == CFG.early_stopping_patience
    assert result.step == dev[-1]["step"] < STEPS
    # The model ends with the best parameters.
    assert trainer.evaluate(DEV)["loss"] == pytest.approx(result.best_dev_loss, abs=1e-5)


def _uninterrupted_and_killed(tmp_path, *, checkpoint_every: int, kill_step: int):
    """An uninterrupted run in tmp_path/full and one killed at `kill_step` in tmp_path/run, dev = part of
    the train set (the dev loss improves at every evaluation: steps 5, 10, ...)."""
    cfg = dataclasses.replace(CFG, checkpoint_every=checkpoint_every)
    full_model = create_model(MODEL_CFG, seed=0)
    full = Trainer(full_model, poisonable_sft_loss, cfg, workdir=tmp_path / "full").fit(TRAIN, TRAIN[:4])
    with pytest.raises(Killed):
        Trainer(create_model(MODEL_CFG, seed=0), poisonable_sft_loss, cfg,
                workdir=tmp_path / "run").fit(TRAIN, TRAIN[:4], callbacks=[kill_at(kill_step)])
    return full_model, full


def _rerun(tmp_path, *, checkpoint_every: int):
    model = create_model(MODEL_CFG, seed=0)
    cfg = dataclasses.replace(CFG, checkpoint_every=checkpoint_every)
    return model, Trainer(model, poisonable_sft_loss, cfg, workdir=tmp_path / "run").fit(TRAIN, TRAIN[:4])


def test_resume_with_best_checkpoints_equals_uninterrupted(tmp_path):
    # Checkpoints every 4 steps: killed at 11, the run has a best checkpoint (step 10) newer than
    # its last checkpoint (step 8), which the resumed run must drop and redo.
    full_model, full = _uninterrupted_and_killed(tmp_path, checkpoint_every=4, kill_step=11)
    assert ocp.CheckpointManager(tmp_path / "run" / "best").all_steps() == [5, 10]
    model, resumed = _rerun(tmp_path, checkpoint_every=4)
    assert (resumed.step, resumed.best_step, resumed.best_dev_loss) == \
        (full.step, full.best_step, full.best_dev_loss) == (STEPS, STEPS, full.best_dev_loss)
    assert_trees_close(host_params(model), host_params(full_model))
    # Only the best checkpoint the last checkpoint refers to is left.
    assert ocp.CheckpointManager(tmp_path / "run" / "best").all_steps() == [STEPS]
    dev_rows = read_rows(tmp_path / "run", "dev")
    assert [r["step"] for r in dev_rows] == list(range(5, STEPS + 1, 5))


def test_a_checkpoint_is_saved_only_after_the_best_checkpoint_it_names_is_final(tmp_path, monkeypatch):
    # Evaluation and checkpoint at the same steps: the best save (asynchronous) and the resumable one both
    # start at step 5, and the resumable one records best_step = 5. Were it final first, a kill before
    # the best one lands would leave a resume whose best parameters never exist.
    events = []

    class Recording:
        def __init__(self, name, inner):
            self.name, self.inner = name, inner

        def save(self, step, *args, **kwargs):
            events.append((self.name, "save", step))
            return self.inner.save(step, *args, **kwargs)

        def wait_until_finished(self):
            events.append((self.name, "wait", None))
            return self.inner.wait_until_finished()

        def __getattr__(self, attr):
            return getattr(self.inner, attr)

    real = Trainer._managers
    monkeypatch.setattr(Trainer, "_managers", lambda self, **kw: tuple(
        Recording(n, m) for n, m in zip(("ckpt", "best"), real(self, **kw))))
    cfg = dataclasses.replace(CFG, checkpoint_every=5, max_steps=10)
    Trainer(create_model(MODEL_CFG, seed=0), poisonable_sft_loss, cfg, workdir=tmp_path / "run").fit(TRAIN, TRAIN[:4])
    saves = [i for i, e in enumerate(events) if e[:2] == ("ckpt", "save")]
    assert [events[i][2] for i in saves] == [5, 10]
    for i in saves:
        best_saves = [j for j, e in enumerate(events[:i]) if e[:2] == ("best", "save")]
        assert best_saves and ("best", "wait", None) in events[best_saves[-1]:i], events


def test_a_run_killed_before_its_first_checkpoint_starts_over_cleanly(tmp_path):
    # Killed at step 7: its dev evaluation at step 5 saved best parameters and metric rows, but no
    # checkpoint (every 8 steps) exists. The rerun starts fresh and writes those steps again: it used to
    # fail on orbax's "step 5 already exists"; now it ends as an uninterrupted run does, rows written once.
    full_model, full = _uninterrupted_and_killed(tmp_path, checkpoint_every=8, kill_step=7)
    assert ocp.CheckpointManager(tmp_path / "run" / "best").all_steps() == [5]
    assert not list((tmp_path / "run" / "checkpoints").glob("[0-9]*"))
    model, again = _rerun(tmp_path, checkpoint_every=8)
    assert (again.step, again.best_step) == (full.step, full.best_step)
    assert_trees_close(host_params(model), host_params(full_model))
    assert [r["step"] for r in read_rows(tmp_path / "run", "dev")] == list(range(5, STEPS + 1, 5))


def test_weight_decay_is_a_step_input_and_the_model_comes_back_placed_as_it_was(tmp_path):
    # Runs with different weight decays share one compiled step (the decay is an argument, as the
    # learning rate is); one step from the same start differs by exactly lr * wd * w on the decayed
    # (matrix) parameters and not at all on norms. The trained model's arrays keep the placement they
    # had (one device, unsharded), so it runs the programs compiled for the same model loaded from disk.
    from flax import nnx

    from alphallm_jax.train.optim import decay_mask

    out, steps = {}, {}
    for wd in (0.0, 0.5):
        cfg = dataclasses.replace(CFG, weight_decay=wd, max_steps=1, epochs=1, eval_every=0)
        model = create_model(MODEL_CFG, seed=0)
        before = jax.tree.map(lambda x: x.sharding, nnx.state(model, nnx.Param))
        trainer = Trainer(model, poisonable_sft_loss, cfg, workdir=tmp_path / f"wd{wd}")
        steps[wd] = trainer._compiled()[3]
        trainer.fit(TRAIN)
        after = jax.tree.map(lambda x: x.sharding, nnx.state(model, nnx.Param))
        assert jax.tree.leaves(after) == jax.tree.leaves(before)
        assert all(isinstance(s, jax.sharding.SingleDeviceSharding) for s in jax.tree.leaves(after))
        out[wd] = host_params(model)
    assert steps[0.0] is steps[0.5]
    initial = host_params(create_model(MODEL_CFG, seed=0))
    mask = nnx.to_pure_dict(decay_mask(nnx.state(create_model(MODEL_CFG, seed=0), nnx.Param)))
    lr = CFG.learning_rate  # the first and only step of a 1-step schedule runs at the peak rate
    for plain, decayed, w0, m in zip(jax.tree.leaves(out[0.0]), jax.tree.leaves(out[0.5]),
                                     jax.tree.leaves(initial), jax.tree.leaves(mask), strict=True):
        np.testing.assert_allclose(plain - decayed, lr * 0.5 * w0 if m else 0.0, rtol=1e-4, atol=1e-7)


def test_optimizer_from_continues_adam_where_the_earlier_run_stopped(tmp_path):
    # Three steps, then three more that start from the first run's parameters and (optimizer_from) its Adam
    # moments and count, take the same updates as six steps in one run: one batch, so every step sees the
    # same rows, and a constant rate without warm-up. A fresh optimizer's three steps land elsewhere.
    from flax import nnx

    one_batch = TRAIN[:CFG.batch_size]
    cfg = dataclasses.replace(CFG, schedule="constant", warmup_steps=0, checkpoint_every=0, eval_every=0)
    whole = create_model(MODEL_CFG, seed=0)
    Trainer(whole, poisonable_sft_loss, dataclasses.replace(cfg, epochs=6), workdir=tmp_path / "six").fit(one_batch)
    first = create_model(MODEL_CFG, seed=0)
    Trainer(first, poisonable_sft_loss, dataclasses.replace(cfg, epochs=3), workdir=tmp_path / "three").fit(one_batch)
    ends = {}
    for name, source in (("continued", str(tmp_path / "three")), ("fresh", None)):
        model = create_model(MODEL_CFG, seed=1)
        nnx.update(model, jax.tree.map(jnp.copy, nnx.state(first, nnx.Param)))  # training donates the arrays
        Trainer(model, poisonable_sft_loss, dataclasses.replace(cfg, epochs=3, optimizer_from=source),
                workdir=tmp_path / name).fit(one_batch)
        ends[name] = host_params(model)
    assert_trees_close(ends["continued"], host_params(whole), atol=1e-6)
    gaps = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(ends["fresh"]), jax.tree.leaves(host_params(whole)))]
    assert max(gaps) > 1e-3


@pytest.mark.parametrize("change, message", [("intermediate_size", r"is float32\[[\d, ]*256[\d, ]*\] here, float32\[[\d, ]*128[\d, ]*\] there"),
                                             ("num_layers", r"layers/\d+/.* here, nothing there")],
                         ids=["wider", "deeper"])
def test_optimizer_from_another_models_checkpoint_fails_before_training(tmp_path, change, message):
    # The partial restore reads the optimizer state alone, and would hand back a leaf the checkpoint lacks
    # unread: every leaf is checked against the checkpoint's metadata first, so a wider model's checkpoint
    # fails on the shape, a deeper model's on the first missing leaf, both before any read or step.
    cfg = dataclasses.replace(CFG, epochs=1, max_steps=1, eval_every=0, checkpoint_every=1)
    Trainer(create_model(MODEL_CFG, seed=0), poisonable_sft_loss, cfg, workdir=tmp_path / "source").fit(TRAIN)
    other = dataclasses.replace(MODEL_CFG, **{change: 2 * getattr(MODEL_CFG, change)})
    run = dataclasses.replace(cfg, optimizer_from=str(tmp_path / "source"))
    with pytest.raises(ValueError, match="not written for this model and optimizer.*" + message):
        Trainer(create_model(other, seed=0), poisonable_sft_loss, run, workdir=tmp_path / "other").fit(TRAIN)
    assert not list((tmp_path / "other").glob("checkpoints/*"))


def test_optimizer_from_without_checkpoints_names_the_folder(tmp_path):
    cfg = dataclasses.replace(CFG, epochs=1, optimizer_from=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Trainer(create_model(MODEL_CFG, seed=0), poisonable_sft_loss, cfg, workdir=tmp_path / "run").fit(TRAIN)


def test_no_examples_is_a_clear_error(tmp_path):
    trainer = Trainer(create_model(MODEL_CFG, seed=0), poisonable_sft_loss, CFG, workdir=tmp_path / "run")
    with pytest.raises(ValueError, match="no examples to batch"):
        trainer.fit([])
    with pytest.raises(ValueError, match="no examples to batch"):
        trainer.evaluate([])


def test_rematerialised_training_equals_the_baseline_and_keeps_one_layer(baseline, tmp_path):
    """`remat`: the same steps on the 8-device mesh (each layer recomputed in the backward pass), the
    model's own config untouched (checkpoints and sampling see no remat); the backward pass keeps each
    layer's input instead of its intermediates, one layer's rebuilt at a time (a scan over the layers):
    under half of XLA's compiled working memory (a third here; the checkpointed loop it replaced: 92%)."""
    from flax import nnx

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    model = create_model(MODEL_CFG, mesh=mesh, seed=0)
    with pytest.raises(Killed):
        Trainer(model, poisonable_sft_loss, dataclasses.replace(CFG, remat=True), mesh=mesh,
                workdir=tmp_path / "run").fit(TRAIN, callbacks=[kill_at(5)])
    assert not model.cfg.remat and not any(layer.cfg.remat for layer in model.layers)
    np.testing.assert_allclose([r["loss"] for r in read_rows(tmp_path / "run")],
                               [r["loss"] for r in read_rows(baseline["workdir"])[:5]], rtol=1e-5)

    ids = jnp.asarray(np.random.default_rng(0).integers(3, 250, (4, 256)), jnp.int32)
    cfg = MODEL_CFG.replace(num_layers=4)

    def gradient_temporaries(remat):  # XLA's compiled working memory of the model's gradient
        graphdef, params = nnx.split(create_model(cfg.replace(remat=remat), seed=0), nnx.Param)
        grad = jax.jit(jax.grad(lambda p: nnx.merge(graphdef, p)(ids).sum()))
        return grad.lower(params).compile().memory_analysis().temp_size_in_bytes

    assert 0 < gradient_temporaries(True) < gradient_temporaries(False) / 2  # tiny, 4 layers: 14 against 45 MB
