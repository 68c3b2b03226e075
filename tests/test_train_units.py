"""Unit tests of the trainer's pure pieces: schedules, optimizer, accumulation, batching, losses."""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from alphallm_jax.models import abstract_model, create_model, presets
from alphallm_jax.train import losses
from alphallm_jax.train import step as step_lib
from alphallm_jax.train.batching import (
    BatchIterator,
    IteratorState,
    SFTExample,
    collate_dicts,
    collate_sft,
    default_collate,
    drop_overlong,
    sft_length,
)
from alphallm_jax.train.optim import decay_mask, make_optimizer, make_schedule, warmup_steps_for
from alphallm_jax.train.trainer import TrainConfig, Trainer, nested_to_tree, tree_to_nested

FAST = {"xla_backend_optimization_level": 0}


# ----------------------------------------------------------------------------- schedules
def test_paper_schedule_cosine_with_warmup():
    # Paper SFT: 5e-6 -> 1e-6, 10% warm-up.
    sched = make_schedule(5e-6, 100, end_lr=1e-6, warmup_ratio=0.1, kind="cosine")
    lrs = np.array([float(sched(s)) for s in range(100)])
    np.testing.assert_allclose(lrs[:10], 5e-6 * np.arange(1, 11) / 10, rtol=1e-6)
    assert lrs[10] == pytest.approx(5e-6, rel=1e-6)
    assert lrs[-1] == pytest.approx(1e-6, rel=1e-6)
    assert np.all(np.diff(lrs[10:]) <= 1e-12)  # non-increasing after warm-up
    mid = 10 + (100 - 10 - 1) / 2
    assert float(sched(mid)) == pytest.approx(3e-6, rel=1e-5)  # cosine midpoint


def test_linear_and_constant_schedules():
    lin = make_schedule(1.0, 12, end_lr=0.0, warmup_steps=1, kind="linear")
    np.testing.assert_allclose([float(lin(s)) for s in range(12)],
                               [1.0, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0], atol=1e-6)
    const = make_schedule(2.0, 10, end_lr=0.5, warmup_ratio=0.0, kind="constant")
    assert [float(const(s)) for s in (0, 5, 9)] == [2.0, 2.0, 2.0]
    assert warmup_steps_for(1000, 0.1) == 100 and warmup_steps_for(7, 0.1) == 1
    assert warmup_steps_for(10, 0.5, warmup_steps=3) == 3
    with pytest.raises(ValueError):
        make_schedule(1.0, 10, kind="exp")
    with pytest.raises(ValueError):
        warmup_steps_for(0, 0.1)


# ----------------------------------------------------------------------------- optimizer
def _tiny_params():
    model = create_model(presets.get("tiny"), seed=0)
    return nnx.state(model, nnx.Param)


def test_decay_mask_skips_norms():
    abstract = nnx.state(abstract_model(presets.get("tiny")), nnx.Param)
    mask = nnx.to_pure_dict(decay_mask(abstract))
    assert mask["embed_vd"] and mask["lm_head_dv"] and mask["layers"][0]["q_dnh"]
    assert not mask["final_norm_d"] and not mask["layers"][1]["attn_norm_d"]
    # The critic head's biases, the rank-2 per-critic one included, are not decayed; its weights are.
    from alphallm_jax.models.critic import CriticHeadConfig, create_critic

    critic = nnx.to_pure_dict(decay_mask(nnx.state(create_critic(presets.get("tiny"), CriticHeadConfig(hidden=8)),
                                                   nnx.Param)))
    heads = critic["heads"]
    assert heads["w_in_cdm"] and heads["w_out_cm"] and not heads["b_in_cm"] and not heads["b_out_c"]


def test_adamw_clipping_and_decay_match_a_manual_update():
    params = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "norm": jnp.array([1.0, 1.0])}
    grads = {"w": jnp.array([[3.0, 0.0], [0.0, 4.0]]), "norm": jnp.array([0.0, 0.0])}  # norm 5
    lr, wd, clip = 0.1, 0.5, 1.0
    tx = make_optimizer(learning_rate=lr, weight_decay=wd, max_grad_norm=clip, b1=0.9, b2=0.999,
                        eps=1e-8)
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    g = np.asarray(grads["w"]) / 5.0  # clipped to norm 1
    m, v = 0.1 * g, 0.001 * g * g
    m_hat, v_hat = m / 0.1, v / 0.001
    want = np.asarray(params["w"]) - lr * (m_hat / (np.sqrt(v_hat) + 1e-8) + wd * np.asarray(params["w"]))
    np.testing.assert_allclose(new["w"], want, rtol=1e-6)
    np.testing.assert_allclose(new["norm"], params["norm"])  # zero grad, no decay on norms


def test_the_step_scaling_unit_updates_by_the_schedule_equals_adamw_with_the_schedule():
    # The trainer compiles one step for every schedule and decay: Adam at learning rate 1 without decay;
    # the step adds the decay and scales by the schedule's value, both passed in. Three steps of it must
    # equal optax's AdamW driven by the schedule, with decay on the same parameters.
    model = create_model(presets.get("tiny"), seed=0)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    batch = {k: jnp.asarray(v) for k, v in collate_sft([([5, 6, 7], [8, 9]), ([4], [3, 2, 1])], 2).items()}
    sched = make_schedule(1e-3, 3, end_lr=1e-4, warmup_steps=1, kind="cosine")
    key = jax.random.key_data(jax.random.PRNGKey(0))
    unit_tx = make_optimizer(learning_rate=1.0, weight_decay=0.0)
    step = jax.jit(step_lib.make_train_step(graphdef, losses.sft_loss, unit_tx), compiler_options=FAST)
    p, s = params, unit_tx.init(params)
    for i in range(3):
        p, s, metrics = step(p, s, rest, batch, sched(i), np.float32(0.1), key)
        assert float(metrics["learning_rate"]) == pytest.approx(float(sched(i)))
    tx = make_optimizer(learning_rate=sched, weight_decay=0.1)
    grad_fn = jax.jit(step_lib.make_loss_and_grad(graphdef, rest, losses.sft_loss), compiler_options=FAST)
    q, t = params, tx.init(params)
    for _ in range(3):
        _, grads = grad_fn(q, batch)
        updates, t = tx.update(grads, t, q)
        q = optax.apply_updates(q, updates)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)  # fused vs eager rounding
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(params)))


def test_schedules_give_the_same_rates_on_the_host_and_traced():
    sched = make_schedule(3e-3, 50, end_lr=1e-4, warmup_ratio=0.1, kind="cosine")
    host = np.array([sched(s) for s in range(50)])
    traced = np.asarray(jax.jit(jax.vmap(sched))(jnp.arange(50)))
    assert isinstance(sched(3), np.ndarray) and sched(3).dtype == np.float32
    np.testing.assert_allclose(host, traced, rtol=1e-6)


# ----------------------------------------------------------------------------- accumulation
def test_accumulated_gradients_equal_the_full_batch_token_mean():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(8, 5, 3)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)
    # Very different token counts per row, so an unweighted mean of microbatch means would differ.
    mask = jnp.asarray((np.arange(5)[None, :] < np.array([5, 1, 0, 3, 5, 2, 4, 1])[:, None]),
                       jnp.float32)
    params = {"w": jnp.asarray(rng.normal(size=(3,)), jnp.float32), "b": jnp.float32(0.3)}

    def loss_fn(p, batch):
        err = (batch["x"] @ p["w"] + p["b"] - batch["y"]) ** 2
        count = jnp.sum(batch["mask"])
        loss = jnp.sum(err * batch["mask"]) / jnp.maximum(count, 1.0)
        return loss, {"loss": loss, "weight": count, "mean_pred": jnp.mean(batch["x"] @ p["w"])}

    lg = jax.value_and_grad(loss_fn, has_aux=True)
    batch = {"x": x, "y": y, "mask": mask}
    (full_loss, _), full_grads = lg(params, batch)
    for n in (2, 4, 8):
        (loss, metrics), grads = jax.jit(
            lambda p, b, n=n: step_lib.accumulated_loss_and_grads(lg, p, b, n))(params, batch)
        np.testing.assert_allclose(loss, full_loss, rtol=1e-6)
        assert float(metrics["weight"]) == float(jnp.sum(mask))
        for k in params:
            np.testing.assert_allclose(grads[k], full_grads[k], rtol=1e-5, atol=1e-7)


def test_split_microbatches_is_strided():
    b = {"a": jnp.arange(12).reshape(6, 2)}
    mb = step_lib.split_microbatches(b, 3)["a"]
    assert mb.shape == (3, 2, 2)
    np.testing.assert_array_equal(mb[1], [[2, 3], [8, 9]])  # rows 1 and 4


def test_train_step_with_accumulation_equals_one_big_batch():
    model = create_model(presets.get("tiny"), seed=0)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rng = np.random.default_rng(0)
    exs = [(rng.integers(3, 200, rng.integers(1, 6)).tolist(),
            rng.integers(3, 200, rng.integers(1, 12)).tolist()) for _ in range(8)]
    batch = {k: jnp.asarray(v) for k, v in collate_sft(exs, 8, pad_to_multiple=16).items()}
    # Plain SGD: the parameter change is the (clipped) gradient itself. (Adam's first step is
    # ~lr * sign(g), which would amplify rounding differences of near-zero gradients.)
    tx = optax.chain(optax.clip_by_global_norm(0.5), optax.sgd(1.0))
    outs = []
    for accum in (1, 2):
        step = jax.jit(step_lib.make_train_step(graphdef, losses.sft_loss, tx, accum),
                       compiler_options=FAST)
        p, _, metrics = step(params, tx.init(params), rest, batch, np.float32(1.0), np.float32(0.0),
                             jax.random.key_data(jax.random.PRNGKey(0)))
        outs.append((p, metrics))
    (p1, m1), (p2, m2) = outs
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


class _Linear(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.asarray([0.5, -1.0, 2.0], jnp.float32))

    def __call__(self, x_bs3):
        return x_bs3 @ self.w[...]


def _two_means_loss(model, batch):
    """Two means over differently masked positions: no one weight per microbatch combines them."""
    pred_bs = model(batch["x"])
    totals = batch.get(step_lib.TOTALS_KEY)
    a_count = jnp.sum(batch["a_mask"]) if totals is None else totals["a"]
    b_count = jnp.sum(batch["b_mask"]) if totals is None else totals["b"]
    a_loss = jnp.sum(jnp.square(pred_bs - batch["y"]) * batch["a_mask"]) / jnp.maximum(a_count, 1.0)
    b_loss = jnp.sum(jnp.abs(pred_bs) * batch["b_mask"]) / jnp.maximum(b_count, 1.0)
    return a_loss + b_loss, {"a_loss": a_loss, "b_loss": b_loss, "weight": jnp.sum(batch["row_mask"])}


def test_a_loss_with_batch_totals_accumulates_to_the_whole_batch():
    rng = np.random.default_rng(0)
    lengths = np.array([[5, 0], [1, 4], [0, 2], [3, 5], [5, 1], [2, 0], [4, 3], [1, 1]])  # (a, b) per row
    batch = {"x": jnp.asarray(rng.normal(size=(8, 5, 3)), jnp.float32),
             "y": jnp.asarray(rng.normal(size=(8, 5)), jnp.float32),
             "a_mask": jnp.asarray(np.arange(5)[None, :] < lengths[:, :1], jnp.float32),
             "b_mask": jnp.asarray(np.arange(5)[None, :] < lengths[:, 1:], jnp.float32),
             "row_mask": jnp.ones((8,), jnp.float32)}
    model = _Linear()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.sgd(1.0)  # the parameter change is the gradient itself

    def step(loss_fn, accum):
        fn = jax.jit(step_lib.make_train_step(graphdef, loss_fn, tx, accum))
        return fn(params, tx.init(params), rest, batch, np.float32(1.0), np.float32(0.0),
                  jax.random.key_data(jax.random.PRNGKey(0)))

    with_totals = functools.partial(_two_means_loss)
    with_totals.batch_totals = lambda b: {"a": jnp.sum(b["a_mask"]), "b": jnp.sum(b["b_mask"])}
    p1, _, m1 = step(with_totals, 1)
    for accum in (2, 4):
        p, _, m = step(with_totals, accum)
        for k in ("loss", "a_loss", "b_loss", "grad_norm", "weight"):
            np.testing.assert_allclose(m[k], m1[k], rtol=1e-6, err_msg=k)
        np.testing.assert_allclose(p["w"][...], p1["w"][...], rtol=1e-6)
    # The same loss combined by its weight (rows) is off.
    _, _, by_rows = step(_two_means_loss, 2)
    assert abs(float(by_rows["loss"]) - float(m1["loss"])) > 1e-3


def test_combine_metrics_weights():
    rows = [{"loss": 1.0, "acc": 0.0, "weight": 1.0}, {"loss": 4.0, "acc": 1.0, "weight": 3.0}]
    out = step_lib.combine_metrics(rows)
    assert out == {"loss": 3.25, "acc": 0.75, "weight": 4.0}
    assert step_lib.combine_metrics([{"loss": 1.0}, {"loss": 3.0}]) == {"loss": 2.0}


# ----------------------------------------------------------------------------- batching
def test_collate_sft_layout():
    b = collate_sft([([5, 6], [7, 8, 9]), SFTExample([1], [2])], 3, pad_to_multiple=8, pad_id=0)
    np.testing.assert_array_equal(b["input_ids"][0], [5, 6, 7, 8, 9, 0, 0, 0])
    np.testing.assert_array_equal(b["loss_mask"][0], [0, 0, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(b["positions"][0], [0, 1, 2, 3, 4, -1, -1, -1])
    np.testing.assert_array_equal(b["loss_mask"][1], [0, 1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(b["row_mask"], [1, 1, 0])  # a filler row
    assert b["loss_mask"][2].sum() == 0 and np.all(b["positions"][2] == -1)
    t = collate_sft([([1, 2, 3], [4, 5, 6, 7])], 1, max_seq_len=5, pad_to_multiple=4)
    np.testing.assert_array_equal(t["input_ids"][0], [1, 2, 3, 4, 5])  # cut at max_seq_len
    np.testing.assert_array_equal(t["loss_mask"][0], [0, 0, 0, 1, 1])


def test_collate_dicts_pads_sequences_and_stacks_scalars():
    exs = [{"chosen": np.array([1, 2, 3]), "rejected": np.array([4]), "label": np.float32(1.0)},
           {"chosen": np.array([5]), "rejected": np.array([6, 7]), "label": np.float32(0.0)}]
    b = collate_dicts(exs, 4, pad_to_multiple=4, pad_values={"chosen": -1})
    assert b["chosen"].shape == b["rejected"].shape == (4, 4)
    np.testing.assert_array_equal(b["chosen"][1], [5, -1, -1, -1])
    np.testing.assert_array_equal(b["rejected"][1], [6, 7, 0, 0])
    np.testing.assert_array_equal(b["label"], [1.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(b["row_mask"], [1, 1, 0, 0])
    collate, length = default_collate(exs[0], max_seq_len=None, pad_to_multiple=4)
    assert length(exs[0]) == 3


def _iterator(examples, **kw):
    collate, length = default_collate(examples[0], max_seq_len=64, pad_to_multiple=8)
    return BatchIterator(examples, batch_size=4, collate_fn=collate, length_fn=length, **kw)


def _examples(n=22, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(3, 100, rng.integers(1, 8)).tolist(),
             rng.integers(3, 100, rng.integers(1, 40)).tolist()) for _ in range(n)]


def test_iterator_is_deterministic_covers_each_example_and_resumes():
    exs = _examples()
    it = _iterator(exs, seed=3, bucket_window=2)
    assert it.steps_per_epoch == 6  # 22 / 4, last batch padded with filler rows
    for epoch in (0, 1):
        idx = np.concatenate(it.epoch_plan(epoch))
        assert sorted(idx.tolist()) == list(range(22))
    assert [b.tolist() for b in it.epoch_plan(0)] != [b.tolist() for b in it.epoch_plan(1)]
    seq = [next(it) for _ in range(9)]  # 1.5 epochs
    assert it.state == IteratorState(1, 3)
    resumed = _iterator(exs, seed=3, bucket_window=2)
    resumed.state = IteratorState(0, 5)
    again = [next(resumed) for _ in range(4)]
    for a, b in zip(seq[5:], again, strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    other = _iterator(exs, seed=4, bucket_window=2)
    assert [b.tolist() for b in other.epoch_plan(0)] != [b.tolist() for b in it.epoch_plan(0)]


def test_length_bucketing_reduces_padding():
    exs = _examples(64, 1)

    def padding(it):
        total = 0
        for b in it.iterate_epoch(0):
            total += int(np.sum(b["positions"] < 0))
        return total

    assert padding(_iterator(exs, bucket_window=8)) < 0.6 * padding(_iterator(exs, bucket_window=1))
    lengths = [sft_length(e) for e in exs]
    plan = _iterator(exs, bucket_window=16, shuffle=False).epoch_plan(0)
    first = [lengths[i] for i in plan[0]]
    assert first == sorted(first, reverse=True)  # longest first inside a window


def test_shape_buckets_step_linearly_then_geometrically():
    from alphallm_jax.utils.shapes import bucket_length

    lengths = range(1, 400)
    assert sorted({bucket_length(n, 32) for n in lengths}) == [32, 64, 96, 128, 192, 256, 384, 512]
    assert sorted({bucket_length(n, 32, linear_units=8) for n in lengths}) == [
        32, 64, 96, 128, 160, 192, 224, 256, 384, 512]
    assert all(bucket_length(n, 16) >= n for n in lengths)


def test_row_buckets_are_powers_of_two_or_also_three_quarters_of_one():
    from alphallm_jax.utils.shapes import row_bucket

    ns = range(1, 400)
    assert sorted({row_bucket(n) for n in ns}) == [8, 16, 32, 64, 128, 256, 512]
    assert sorted({row_bucket(n, fine=True) for n in ns}) == [8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]
    # Every bucket stays a multiple of the data-parallel size and at least min_rows.
    assert sorted({row_bucket(n, 8, fine=True) for n in ns})[:4] == [8, 16, 24, 32]
    assert sorted({row_bucket(n, 1, 32, fine=True) for n in ns})[:4] == [32, 48, 64, 96]
    assert all(n <= row_bucket(n, 1, 8, fine=True) <= row_bucket(n) for n in ns)
    assert all(row_bucket(n, fine=True) <= max(8, 1.5 * n) for n in ns)  # at most a third is padding


# ----------------------------------------------------------------------------- losses and masks
class _FixedLogits(nnx.Module):
    """A stand-in model whose logits are a parameter (independent of the input tokens)."""

    def __init__(self, b, s, v):
        self.logits = nnx.Param(jnp.asarray(np.random.default_rng(0).normal(size=(b, s, v)),
                                            jnp.float32))

    def __call__(self, input_ids_bs, positions_bs=None):
        return self.logits[...]


def _loss_and_logit_grads(model, batch):
    graphdef, state = nnx.split(model)

    def f(state):
        return losses.sft_loss(nnx.merge(graphdef, state), batch)[0]

    loss, grads = jax.value_and_grad(f)(state)
    return float(loss), np.asarray(grads["logits"][...])


def test_prompt_and_padding_targets_do_not_touch_the_loss():
    batch = {k: jnp.asarray(v) for k, v in
             collate_sft([([5, 6, 7], [8, 9]), ([1], [2, 3, 4])], 2, pad_to_multiple=8).items()}
    model = _FixedLogits(2, 8, 16)
    loss, g = _loss_and_logit_grads(model, batch)
    # Only logits at positions t whose next token is a response token get gradient.
    target_positions = np.zeros((2, 8), bool)
    target_positions[0, [2, 3]] = True
    target_positions[1, [0, 1, 2]] = True
    assert np.all(g[~target_positions] == 0) and np.all(np.abs(g[target_positions]).sum(-1) > 0)
    # Changing prompt tokens and padding (as targets) changes nothing ...
    ids = np.asarray(batch["input_ids"]).copy()
    ids[0, :3] = [11, 12, 13]
    ids[1, 4:] = 15
    loss2, g2 = _loss_and_logit_grads(model, {**batch, "input_ids": jnp.asarray(ids)})
    assert loss2 == loss and np.array_equal(g2, g)
    # ... while changing a response token does.
    ids[0, 4] = 1
    loss3, _ = _loss_and_logit_grads(model, {**batch, "input_ids": jnp.asarray(ids)})
    assert loss3 != loss
    # The loss is the mean NLL over the 5 target tokens.
    logp = jax.nn.log_softmax(model.logits[...], axis=-1)
    want = -(logp[0, 2, 8] + logp[0, 3, 9] + logp[1, 0, 2] + logp[1, 1, 3] + logp[1, 2, 4]) / 5
    assert loss == pytest.approx(float(want), rel=1e-6)


def test_real_model_loss_ignores_padding_and_chunked_logits_match():
    model = create_model(presets.get("tiny"), seed=0)
    batch = {k: jnp.asarray(v) for k, v in
             collate_sft([([5, 6, 7], [8, 9, 10]), ([1], [2, 3, 4, 5, 6])], 2,
                         pad_to_multiple=16).items()}
    graphdef, state = nnx.split(model)

    @jax.jit(compiler_options=FAST)
    def run(state, batch):
        m = nnx.merge(graphdef, state)
        full, mf = losses.sft_loss(m, batch)
        chunked, mc = losses.make_sft_loss(logits_chunk_size=4)(m, batch)
        # A chunk that does not divide the padded length (16): the paper presets' 256 against batches
        # padded to multiples of 32 failed every SFT and DPO step.
        uneven, mu = losses.make_sft_loss(logits_chunk_size=6)(m, batch)
        return full, chunked, uneven, mf["token_accuracy"], mc["token_accuracy"], mu["token_accuracy"]

    full, chunked, uneven, acc_f, acc_c, acc_u = run(state, batch)
    assert float(chunked) == pytest.approx(float(full), rel=1e-6) and float(acc_f) == float(acc_c)
    assert float(uneven) == pytest.approx(float(full), rel=1e-6) and float(acc_f) == float(acc_u)
    ids = np.asarray(batch["input_ids"]).copy()
    ids[:, 10:] = 77  # padding content
    full2, *_ = run(state, {**batch, "input_ids": jnp.asarray(ids)})
    assert float(full2) == float(full)
    logp = losses.sequence_log_probs(model, batch)
    assert logp.shape == (2,) and np.all(np.asarray(logp) < 0)


# ----------------------------------------------------------------------------- config and state
def test_train_config_from_config_dict():
    cd = ml_collections.ConfigDict({"learning_rate": 1e-5, "batch_size": 16, "grad_accum_steps": 4,
                                    "compute_dtype": "bfloat16"})
    cfg = TrainConfig.from_config(cd)
    assert cfg.learning_rate == 1e-5 and cfg.batch_size == 16 and cfg.compute_dtype == "bfloat16"
    assert TrainConfig.from_config(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        TrainConfig.from_config({"learning_rat": 1.0})
    with pytest.raises(ValueError):
        TrainConfig(batch_size=10, grad_accum_steps=4)
    with pytest.raises(ValueError):
        TrainConfig(compute_dtype="float8")


def test_checkpoint_tree_round_trip():
    params = _tiny_params()
    tx = make_optimizer(learning_rate=1e-3, weight_decay=0.1)
    opt = tx.init(params)
    nested = tree_to_nested(opt)
    # chain(clip: no state, adamw: (ScaleByAdamState(count, mu, nu), ...)); Variables lose ".value".
    assert nested["1"]["0"]["mu"]["layers"]["0"]["q_dnh"].shape == (64, 4, 16)
    back = nested_to_tree(nested, opt)
    assert jax.tree.structure(back) == jax.tree.structure(opt)
    assert math.isclose(float(optax.tree.norm(back)), float(optax.tree.norm(opt)))


def test_master_weights_fp32_with_bf16_compute(tmp_path):
    cfg = presets.get("tiny", param_dtype="bfloat16")
    model = create_model(cfg, seed=0)
    tc = TrainConfig(batch_size=2, compute_dtype="bfloat16", master_dtype="float32",
                     compiler_options=FAST, progress_bar=False)
    trainer = Trainer(model, losses.sft_loss, tc, workdir=tmp_path)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(trainer.params))
    assert model.cfg.dtype == "float32"  # the caller's model is unchanged
    dev = [([5, 6], [7, 8, 9]), ([1], [2, 3])]
    bf16 = trainer.evaluate(dev)["loss"]
    ref = Trainer(create_model(cfg.replace(param_dtype="float32"), seed=0), losses.sft_loss,
                  TrainConfig(batch_size=2, compiler_options=FAST, progress_bar=False),
                  workdir=tmp_path / "ref").evaluate(dev)["loss"]
    assert bf16 == pytest.approx(ref, rel=2e-2)
    trainer._write_back()
    assert model.embed_vd[...].dtype == jnp.bfloat16  # written back in the model's dtype
    assert not os.path.exists(tmp_path / "checkpoints")  # evaluate alone writes nothing


def test_examples_longer_than_the_batch_are_dropped_with_a_warning_not_cut(caplog):
    """A batch keeps a sequence's first tokens: a longer trace would lose its answer and EOS, and a longer
    pair could score two equal cut-offs, so the training stages drop them and say how many."""
    from alphallm_jax.train.dpo import PreferenceExample, collate_preference

    traces = [SFTExample([1, 2], [3, 4]), SFTExample([1, 2, 3], [4, 5, 6]), SFTExample([1], [2, 3, 4])]
    with caplog.at_level("WARNING"):
        kept = drop_overlong(traces, 4, "train SFT traces")
    assert kept == [traces[0], traces[2]]
    assert "dropped 1 of 3 train SFT traces longer than max_seq_len=4 tokens (the longest 6)" in caplog.text
    assert collate_sft(traces, 3, max_seq_len=4, pad_to_multiple=1)["loss_mask"][1].tolist() == [0, 0, 0, 1]
    assert drop_overlong(traces, None, "traces") == traces
    from alphallm_jax.train.batching import drop_overlong_splits

    assert drop_overlong_splits(traces[:2], traces[2:], 4, "traces", "sft.max_seq_len") == ([traces[0]], [traces[2]])
    with pytest.raises(ValueError, match="all 3 train traces are longer than sft.max_seq_len=3"):
        drop_overlong_splits(traces, [], 3, "traces", "sft.max_seq_len")
    pairs = [PreferenceExample(pair_id=str(i), group="p", kind="stepwise", prompt_ids=(1, 2), chosen_ids=c,
                               rejected_ids=(7,), reward_gap=1.0) for i, c in enumerate([(3,), (3, 4, 5)])]
    assert drop_overlong(pairs, 4, "pairs") == pairs[:1]
    assert collate_preference(pairs, 2, max_seq_len=4, pad_to_multiple=1)["chosen_loss_mask"][1].tolist() == [0, 0, 1, 1]
