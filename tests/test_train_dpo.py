"""DPO: the loss and its gradient against the formula, the paired forward, the cached reference, and
a short fit on the tiny model."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alphallm_jax.models import create_model, presets
from alphallm_jax.train import dpo, losses
from alphallm_jax.train.dpo import PreferenceExample
from alphallm_jax.train.trainer import TrainConfig, Trainer

FAST = {"xla_backend_optimization_level": 0}
MODEL_CFG = presets.get("tiny")
MAX_LEN, PAD = 32, 16
CFG = TrainConfig(
    learning_rate=1e-2, end_learning_rate=1e-3, warmup_ratio=0.1, schedule="cosine", batch_size=4,
    epochs=6, max_seq_len=MAX_LEN, pad_to_multiple=PAD, bucket_window=1, checkpoint_every=-1,
    eval_every=0, early_stopping_patience=None, log_every=1, seed=0, progress_bar=False,
    compiler_options=FAST)


def preference_examples(n: int, seed: int, groups: int = 3) -> list[PreferenceExample]:
    """Chosen: counting up from the prompt's last token; rejected: random tokens."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt = rng.integers(3, 200, rng.integers(3, 6)).tolist()
        k = int(rng.integers(5, 9))
        chosen = [prompt[-1] + 1 + j for j in range(k)]
        rejected = rng.integers(3, 250, int(rng.integers(5, 9))).tolist()
        out.append(PreferenceExample(pair_id=f"p{i}", group=f"g{i % groups}", prompt_ids=tuple(prompt),
                                     chosen_ids=tuple(chosen), rejected_ids=tuple(rejected),
                                     kind="stepwise", reward_gap=float(rng.normal())))
    return out


def collate():
    return dpo.make_collate(max_seq_len=MAX_LEN, pad_to_multiple=PAD)


def reference(model, examples, **kw):
    return dpo.with_reference(model, examples, batch_size=4, max_seq_len=MAX_LEN, pad_to_multiple=PAD,
                              bucket_window=1, **kw)


# ------------------------------------------------------------------------------------ formula
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_loss_and_gradient_match_formula(eps):
    rng = np.random.default_rng(0)
    pw, pl, rw, rl = (rng.normal(-20.0, 5.0, 7).astype(np.float32) for _ in range(4))
    beta = 0.3
    z = beta * ((pw - rw) - (pl - rl))
    sig = 1.0 / (1.0 + np.exp(-z))
    want = -(1 - eps) * np.log(sig) - eps * np.log(1 - sig)
    loss_b, cr, rr = dpo.dpo_terms(pw, pl, rw, rl, beta=beta, label_smoothing=eps)
    np.testing.assert_allclose(loss_b, want, rtol=1e-5)
    np.testing.assert_allclose(cr, beta * (pw - rw), rtol=1e-6)
    np.testing.assert_allclose(rr, beta * (pl - rl), rtol=1e-6)

    def mean_loss(pw_, pl_):
        return jnp.mean(dpo.dpo_terms(pw_, pl_, rw, rl, beta=beta, label_smoothing=eps)[0])

    gw, gl = jax.grad(mean_loss, argnums=(0, 1))(jnp.asarray(pw), jnp.asarray(pl))
    # d/dz [-(1-e) log s(z) - e log s(-z)] = -(1-e)(1-s) + e s; dz/dpw = beta, dz/dpl = -beta.
    dz = -(1 - eps) * (1 - sig) + eps * sig
    np.testing.assert_allclose(gw, beta * dz / 7, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(gl, -beta * dz / 7, rtol=1e-4, atol=1e-7)


def test_ipo_loss_and_gradient_match_formula():
    rng = np.random.default_rng(1)
    pw, pl, rw, rl = (rng.normal(-20.0, 5.0, 5).astype(np.float32) for _ in range(4))
    beta = 0.25  # target gap 1 / (2 beta) = 2 nats
    h = (pw - rw) - (pl - rl)
    loss_b, cr, rr = dpo.dpo_terms(pw, pl, rw, rl, beta=beta, loss_type="ipo")
    np.testing.assert_allclose(loss_b, (h - 2.0) ** 2, rtol=1e-5)
    np.testing.assert_allclose(cr - rr, beta * h, rtol=1e-5)
    gw, gl = jax.grad(lambda a, b: jnp.mean(dpo.dpo_terms(a, b, rw, rl, beta=beta, loss_type="ipo")[0]),
                      argnums=(0, 1))(jnp.asarray(pw), jnp.asarray(pl))
    np.testing.assert_allclose(gw, 2.0 * (h - 2.0) / 5, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gl, -2.0 * (h - 2.0) / 5, rtol=1e-4, atol=1e-6)
    # A pair already past the target is pushed back toward it, unlike the logistic loss.
    assert float(jax.grad(lambda a: dpo.dpo_terms(a, -10.0, -10.0, -10.0, beta=beta, loss_type="ipo")[0])(
        -5.0)) > 0.0


@pytest.mark.parametrize("loss_type, eps, match", [("hinge", 0.0, "choose from"),
                                                   ("ipo", 0.1, "label_smoothing")])
def test_bad_preference_loss_names_the_key(loss_type, eps, match):
    with pytest.raises(ValueError, match=match) as err:
        dpo.make_dpo_loss(0.1, eps, loss_type=loss_type)
    assert "policy_train." in str(err.value)


def test_paired_forward_equals_separate_passes_and_ignores_filler_rows():
    model = create_model(MODEL_CFG, seed=0)
    examples = reference(model, preference_examples(3, 1))
    examples = [dataclasses.replace(e, ref_chosen_logp=e.ref_chosen_logp - 1.0) for e in examples]
    batch = collate()(examples, 4)  # 3 pairs, one filler row
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape == (4, 16)
    beta = 0.5
    loss, metrics = dpo.dpo_loss(model, {k: jnp.asarray(v) for k, v in batch.items()}, beta=beta)
    sides = {}
    for side in dpo.SIDES:
        one = {"input_ids": batch[f"{side}_input_ids"], "loss_mask": batch[f"{side}_loss_mask"],
               "positions": batch[f"{side}_positions"]}
        sides[side] = np.asarray(losses.sequence_log_probs(model, {k: jnp.asarray(v) for k, v in one.items()}))[:3]
    ref_w = np.array([e.ref_chosen_logp for e in examples])
    ref_l = np.array([e.ref_rejected_logp for e in examples])
    z = beta * ((sides["chosen"] - ref_w) - (sides["rejected"] - ref_l))
    np.testing.assert_allclose(float(loss), np.mean(np.log1p(np.exp(-z))), rtol=1e-4)
    np.testing.assert_allclose(float(metrics["logp_chosen"]), sides["chosen"].mean(), rtol=1e-4)
    assert float(metrics["weight"]) == 3.0
    assert float(metrics["reward_accuracy"]) == 1.0  # the reference was lowered on every chosen side
    # The reference pass itself summed response tokens only: prompt tokens are not scored.
    np.testing.assert_allclose(ref_w + 1.0, sides["chosen"], rtol=1e-4)
    # The NLL term on the winner: plus the weight times its mean per-token NLL (response tokens only).
    n_tokens = np.array([len(e.chosen_ids) for e in examples], np.float64)
    nll = np.mean(-sides["chosen"] / n_tokens)
    loss_nll, metrics_nll = dpo.dpo_loss(model, {k: jnp.asarray(v) for k, v in batch.items()}, beta=beta,
                                         nll_weight=0.7)
    np.testing.assert_allclose(float(metrics_nll["chosen_nll"]), nll, rtol=1e-4)
    np.testing.assert_allclose(float(loss_nll), float(loss) + 0.7 * nll, rtol=1e-4)
    np.testing.assert_allclose(float(metrics_nll["dpo_loss"]), float(loss), rtol=1e-6)


def test_short_fit_learns_policy_moves_reference_stays(tmp_path):
    model = create_model(MODEL_CFG, seed=0)
    cache = tmp_path / "reference_logps.jsonl"
    examples = reference(model, preference_examples(16, 2), cache_path=cache)
    ref_w = np.array([e.ref_chosen_logp for e in examples])
    ref_l = np.array([e.ref_rejected_logp for e in examples])
    trainer = Trainer(model, dpo.make_dpo_loss(0.5), CFG, workdir=tmp_path / "run",
                      collate_fn=collate(), length_fn=dpo.preference_length)
    before = trainer.evaluate(examples)
    assert before["loss"] == pytest.approx(np.log(2.0), abs=1e-4)  # policy == reference at the start
    assert abs(before["margin"]) < 1e-5 and before["reward_accuracy"] < 0.5  # float-noise ties
    trainer.fit(examples)
    after = trainer.evaluate(examples)
    assert after["loss"] < 0.5 * before["loss"] and after["reward_accuracy"] >= 0.9, after
    # The policy moved; the cached reference did not: the examples keep it and the cache is read
    # back even when asked with the trained model.
    pw, pl = dpo.compute_pair_log_probs(model, examples, batch_size=4, collate_fn=collate())
    assert np.mean(pw - ref_w) > 1.0 and np.max(np.abs(pw - ref_w)) > 1.0
    np.testing.assert_array_equal([e.ref_chosen_logp for e in examples], ref_w)
    cached = reference(model, examples, cache_path=cache)
    np.testing.assert_array_equal([e.ref_chosen_logp for e in cached], ref_w)
    np.testing.assert_array_equal([e.ref_rejected_logp for e in cached], ref_l)
    assert not np.allclose(pl, ref_l)
    # Different tokens under a cached pair id: the cache is stale and the pass runs again.
    changed = [dataclasses.replace(examples[0], chosen_ids=examples[0].chosen_ids[:-1])] + examples[1:]
    redone = reference(model, changed, cache_path=cache)
    np.testing.assert_allclose([e.ref_chosen_logp for e in redone[1:]], pw[1:], rtol=1e-5)
