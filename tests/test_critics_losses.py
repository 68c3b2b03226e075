"""Critic losses: per-head masks, soft targets, the value loss option, and training through the shared
trainer (the critic plugs into the one trainer loop)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alphallm_jax.critics.losses import (
    bce_with_logits,
    collate_critic,
    critic_example_length,
    critic_loss,
    head_losses,
    make_critic_loss,
    rank_loss,
)
from alphallm_jax.models import presets
from alphallm_jax.models.critic import HEADS, CriticHeadConfig, create_critic
from alphallm_jax.train import step as step_lib
from alphallm_jax.train.trainer import TrainConfig, Trainer


def _batch(b=2, s=6, seed=0):
    rng = np.random.default_rng(seed)
    batch = {"input_ids": rng.integers(3, 250, (b, s)).astype(np.int32),
             "positions": np.tile(np.arange(s, dtype=np.int32), (b, 1)), "row_mask": np.ones(b, np.int32)}
    for h in HEADS:
        batch[f"{h}_target"] = rng.random((b, s)).astype(np.float32)
        batch[f"{h}_mask"] = np.zeros((b, s), np.float32)
    batch["value_mask"][0, [1, 3]] = 1
    batch["value_mask"][1, 5] = 1
    batch["prm_mask"][0, 3] = 1
    batch["orm_mask"][:, 5] = 1
    batch["orm_target"][:, 5] = [1.0, 0.0]
    return batch


def test_bce_with_soft_targets():
    x = jnp.array([-3.0, 0.0, 2.0, 50.0, -50.0])
    t = jnp.array([0.2, 0.5, 1.0, 1.0, 0.0])
    p = jax.nn.sigmoid(x)
    want = -(t * jnp.log(p) + (1 - t) * jnp.log1p(-p))
    np.testing.assert_allclose(bce_with_logits(x[:3], t[:3]), want[:3], rtol=1e-5)
    assert np.all(np.isfinite(bce_with_logits(x, t))) and float(bce_with_logits(x, t)[3]) < 1e-6


def test_each_head_sees_only_its_masked_positions():
    batch = _batch()
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(2, 6, 3)), jnp.float32)
    per_head = head_losses(logits, batch)
    for c, h in enumerate(HEADS):
        m = batch[f"{h}_mask"] > 0
        want = np.mean(np.asarray(bce_with_logits(logits[..., c], batch[f"{h}_target"]))[m])
        np.testing.assert_allclose(per_head[h][0], want, rtol=1e-5)
        assert float(per_head[h][1]) == m.sum()
    # Targets under a zero mask do not matter, nor do other heads' logits.
    changed = dict(batch)
    changed["value_target"] = np.where(batch["value_mask"] > 0, batch["value_target"], 123.0)
    np.testing.assert_allclose(head_losses(logits, changed)["value"][0], per_head["value"][0])
    grads = jax.grad(lambda lg: head_losses(lg, batch)["prm"][0])(logits)
    assert np.count_nonzero(np.asarray(grads)) == 1 and float(grads[0, 3, 1]) != 0


def test_empty_mask_gives_zero_loss_and_mse_option():
    batch = _batch()
    batch["prm_mask"][:] = 0
    logits = jnp.zeros((2, 6, 3))
    assert float(head_losses(logits, batch)["prm"][0]) == 0.0
    mse = head_losses(logits, batch, value_loss="mse")["value"][0]
    m = batch["value_mask"] > 0
    np.testing.assert_allclose(mse, np.mean((0.5 - batch["value_target"][m]) ** 2), rtol=1e-5)
    with pytest.raises(ValueError, match="critics.loss.value"):
        make_critic_loss(value_loss="l1")


def test_weighted_total_and_metrics():
    critic = create_critic(presets.get("tiny"), CriticHeadConfig(hidden=16), seed=0)
    batch = {k: jnp.asarray(v) for k, v in _batch().items()}
    loss, metrics = nnx.jit(functools.partial(critic_loss, head_weights=(1.0, 0.5, 2.0)))(critic, batch)
    want = metrics["value_loss"] + 0.5 * metrics["prm_loss"] + 2.0 * metrics["orm_loss"]
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    assert float(metrics["weight"]) == 2.0 and 0.0 <= float(metrics["orm_accuracy"]) <= 1.0


def _examples(n, seed):
    """ORM label: the last token is 99; value label at every 4th token: that token is >= 50 (local
    features a tiny model learns in a few steps, from the right positions only)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ids = rng.integers(10, 90, rng.integers(8, 20)).astype(np.int32)
        good = i % 2 == 0
        if good:
            ids[-1] = 99
        ex = {"input_ids": ids, "positions": np.arange(len(ids), dtype=np.int32)}
        for h in HEADS:
            ex[f"{h}_target"] = np.zeros(len(ids), np.float32)
            ex[f"{h}_mask"] = np.zeros(len(ids), np.float32)
        ex["orm_target"][-1], ex["orm_mask"][-1] = float(good), 1.0
        ex["value_mask"][3::4] = 1.0
        ex["value_target"][3::4] = (ids[3::4] >= 50).astype(np.float32)
        out.append(ex)
    return out


def test_critic_trains_through_the_shared_trainer(tmp_path):
    critic = create_critic(presets.get("tiny"), CriticHeadConfig(hidden=16), seed=0)
    cfg = TrainConfig(learning_rate=3e-3, end_learning_rate=3e-4, warmup_ratio=0.1, batch_size=8, epochs=12,
                      max_seq_len=32, pad_to_multiple=16, checkpoint_every=-1, eval_every=0,
                      early_stopping_patience=None, log_every=100, progress_bar=False,
                      compiler_options={"xla_backend_optimization_level": 0})
    train, dev = _examples(32, 0), _examples(16, 1)
    trainer = Trainer(critic, make_critic_loss(), cfg, workdir=tmp_path,
                      collate_fn=functools.partial(collate_critic, max_seq_len=32, pad_to_multiple=16),
                      length_fn=critic_example_length)
    before = trainer.evaluate(dev)
    result = trainer.fit(train, dev)
    assert result.dev_metrics["orm_loss"] < 0.5 * before["orm_loss"]
    assert result.dev_metrics["value_loss"] < before["value_loss"]


def test_collate_pads_positions_with_minus_one():
    batch = collate_critic(_examples(3, 2), 4, pad_to_multiple=16)
    lengths = [len(e["input_ids"]) for e in _examples(3, 2)]
    for b, n in enumerate(lengths):
        assert (batch["positions"][b, n:] == -1).all() and (batch["positions"][b, :n] >= 0).all()
        assert batch["orm_mask"][b, n:].sum() == 0
    assert (batch["positions"][3] == -1).all() and batch["row_mask"].tolist() == [1, 1, 1, 0]


def test_rank_loss_by_hand():
    # Pairs (row i, row 2 + i): pair 0 right vs wrong, pair 1 both wrong (not ranked).
    logits = jnp.array([[0.0, 2.0], [0.0, 1.0], [0.0, -1.0], [0.0, 3.0]])
    target = jnp.array([[0.0, 1.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    mask = jnp.array([[0.0, 1.0]] * 4)
    loss, count = rank_loss(logits, target, mask, pairs=2)
    assert float(count) == 1.0
    np.testing.assert_allclose(loss, np.log1p(np.exp(-(2.0 - (-1.0)))), rtol=1e-6)
    loss, _ = rank_loss(logits, target[::-1] * 0 + jnp.array([[0, 0], [0, 0], [0, 1], [0, 0]]), mask, pairs=2)
    np.testing.assert_allclose(loss, np.log1p(np.exp(-(-1.0 - 2.0))), rtol=1e-6)  # the wrong one scored higher


def test_pair_batches_add_the_rank_term_to_the_concatenated_head_losses():
    critic = create_critic(presets.get("tiny"), CriticHeadConfig(hidden=16), seed=0)
    a, b = _batch(seed=0), _batch(seed=1)
    b["orm_target"][:, 5] = [0.0, 0.0]  # pair 0: right vs wrong; pair 1: wrong vs wrong
    pair = {**a, **{f"b_{k}": v for k, v in b.items() if k != "row_mask"}}
    flat = {k: np.concatenate([a[k], b[k]]) for k in a}
    jit_loss = nnx.jit(functools.partial(critic_loss, rank_weight=0.5))
    loss, metrics = jit_loss(critic, {k: jnp.asarray(v) for k, v in pair.items()})
    flat_loss, flat_metrics = nnx.jit(critic_loss)(critic, {k: jnp.asarray(v) for k, v in flat.items()})
    np.testing.assert_allclose(loss, flat_loss + 0.5 * metrics["orm_rank_loss"], rtol=1e-5)
    assert float(metrics["ranked_pairs"]) == 1.0 and float(metrics["weight"]) == 4.0
    np.testing.assert_allclose(metrics["orm_loss"], flat_metrics["orm_loss"], rtol=1e-5)


def test_a_label_free_stand_in_does_not_count_as_a_solution():
    critic = create_critic(presets.get("tiny"), CriticHeadConfig(hidden=16), seed=0)
    a, b = _batch(seed=0), _batch(seed=1)
    for key in b:  # pair 1's second solution is the unlabelled copy pair_within_prompts adds for an odd one out
        if key.endswith("_mask") and key != "row_mask":
            b[key][1] = 0.0
    pair = {**a, **{f"b_{k}": v for k, v in b.items() if k != "row_mask"}}
    _, metrics = nnx.jit(critic_loss)(critic, {k: jnp.asarray(v) for k, v in pair.items()})
    assert float(metrics["weight"]) == 3.0


def _uneven_examples(value_counts, seed):
    """16-token rows holding the given numbers of value labels, 0-3 PRM labels and (two rows in three)
    an ORM label."""
    rng = np.random.default_rng(seed)
    out = []
    for i, k in enumerate(value_counts):
        ex = {"input_ids": rng.integers(3, 250, 16).astype(np.int32), "positions": np.arange(16, dtype=np.int32)}
        for h in HEADS:
            ex[f"{h}_target"] = rng.random(16).astype(np.float32)
            ex[f"{h}_mask"] = np.zeros(16, np.float32)
        ex["value_mask"][:k] = 1.0
        ex["prm_mask"][[3, 7, 11][:i % 4]] = 1.0
        if i % 3 != 2:
            ex["orm_mask"][15], ex["orm_target"][15] = 1.0, float(rng.random() < 0.5)
        out.append(ex)
    return out


@pytest.mark.parametrize("paired", [False, True])
def test_gradient_accumulation_gives_the_whole_batchs_loss_gradient_and_metrics(paired):
    critic = create_critic(presets.get("tiny"), CriticHeadConfig(hidden=16), seed=0)
    graphdef, params, rest = nnx.split(critic, nnx.Param, ...)
    # Away from the initial near-zero logits, where every label costs about log 2 and any weighting fits.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    params = jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype)
                                          for x, k in zip(leaves, keys, strict=True)])
    # Strided microbatches (rows 0, 2, ... and 1, 3, ...) with very different label counts.
    examples = _uneven_examples([10, 1, 10, 1, 7, 0, 12, 2], seed=0)
    if paired:  # pairs are rows, so they stay whole; row 5's partner is a label-free stand-in
        second = _uneven_examples([1, 9, 0, 11, 3, 8, 2, 5], seed=1)
        second[5] = {k: np.zeros_like(v) if k.endswith("_mask") else v for k, v in second[5].items()}
        examples = [{**a, **{f"b_{k}": v for k, v in b.items()}} for a, b in zip(examples, second, strict=True)]
    batch = {k: jnp.asarray(v) for k, v in collate_critic(examples, 8, pad_to_multiple=16).items()}
    loss_fn = make_critic_loss((1.0, 0.5, 2.0), rank_weight=0.7)
    loss_and_grad = step_lib.make_loss_and_grad(graphdef, rest, loss_fn)
    totals_fn = step_lib.batch_totals_fn(loss_fn)

    def run(num_micro, batch_totals=totals_fn):
        return jax.device_get(jax.jit(lambda p, b: step_lib.accumulated_loss_and_grads(
            loss_and_grad, p, b, num_micro, batch_totals=batch_totals))(params, batch))

    (loss1, metrics1), grads1 = run(1)
    if paired:
        assert 0 < metrics1["ranked_pairs"] < 8
    # One microbatch: the loss sees the batch as it is, no totals (bit for bit the loss alone).
    ((alone, alone_metrics), alone_grads) = run(1, None)
    assert loss1 == alone and metrics1 == alone_metrics
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(grads1), jax.tree.leaves(alone_grads),
                                                    strict=True))
    scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads1))
    for n in (2, 4):
        (loss, metrics), grads = run(n)
        np.testing.assert_allclose(loss, loss1, rtol=1e-6)
        assert metrics.keys() == metrics1.keys()
        for k in metrics1:
            np.testing.assert_allclose(metrics[k], metrics1[k], rtol=1e-5, atol=1e-7, err_msg=k)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads1), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale)  # by rows: ~5e-2 * scale
    # Combined by labelled rows instead, as without the totals, the microbatches miss the whole batch.
    (by_rows, _), _ = run(2, None)
    assert abs(float(by_rows) - float(loss1)) > 1e-4


@pytest.mark.parametrize("paired", [False, True])
def test_dev_evaluation_in_batches_gives_the_whole_sets_loss_and_metrics(tmp_path, paired):
    """`Trainer.evaluate` counts a dev set's labels over all of its batches first (the loss's
    `batch_totals`), so batches of 2 rows give the loss of the whole set in one batch; on a 2-device
    data mesh, where every batch is split between the devices."""
    from alphallm_jax.models.sharding import make_mesh

    critic = create_critic(presets.get("tiny"), CriticHeadConfig(hidden=16), seed=3)
    examples = _uneven_examples([10, 1, 10, 1, 7, 0, 12, 2], seed=0)
    if paired:
        second = _uneven_examples([1, 9, 0, 11, 3, 8, 2, 5], seed=1)
        examples = [{**a, **{f"b_{k}": v for k, v in b.items()}} for a, b in zip(examples, second, strict=True)]
    mesh = make_mesh(2, 1, 1, devices=jax.devices()[:2])

    def evaluate(batch_size, loss_fn):
        cfg = TrainConfig(batch_size=8, eval_batch_size=batch_size, max_seq_len=16, pad_to_multiple=16,
                          checkpoint_every=-1, progress_bar=False)
        trainer = Trainer(critic, loss_fn, cfg, mesh=mesh, workdir=tmp_path / f"{batch_size}-{id(loss_fn)}",
                          collate_fn=functools.partial(collate_critic, max_seq_len=16, pad_to_multiple=16),
                          length_fn=critic_example_length)
        return trainer.evaluate(examples)

    loss_fn = make_critic_loss((1.0, 0.5, 2.0), rank_weight=0.7)
    whole, batched = evaluate(8, loss_fn), evaluate(2, loss_fn)
    assert batched.keys() == whole.keys() and whole["weight"] == (16.0 if paired else 8.0)  # solutions
    for k in whole:
        np.testing.assert_allclose(batched[k], whole[k], rtol=1e-5, atol=1e-7, err_msg=k)
    # The same loss without its totals, its batches combined by rows, misses the whole set's.
    by_rows = evaluate(2, functools.partial(critic_loss, head_weights=(1.0, 0.5, 2.0), rank_weight=0.7))
    assert abs(by_rows["loss"] - whole["loss"]) > 1e-4
