"""The critic model and scorer: heads read the right positions, one pass equals separate scoring,
padding on either side, policy initialisation, checkpoints, sharded scoring."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alphallm_jax.critics.scoring import CriticScorer, aggregate_prm
from alphallm_jax.models import create_model, make_mesh, presets
from alphallm_jax.models.critic import (
    HEAD_INDEX,
    HEADS,
    CriticHeadConfig,
    create_critic,
    critic_from_policy,
    load_critic,
    read_positions,
    save_critic,
)

CFG = presets.get("tiny")  # vocab 256, eos id 2
HEAD_CFG = CriticHeadConfig(hidden=32)
EOS = 2
BLANK = 7  # stands for a newline piece in these tests


@pytest.fixture(scope="module")
def critic():
    c = create_critic(CFG, HEAD_CFG, seed=1)
    # Larger output weights than the init so that heads differ visibly between positions.
    c.heads.w_out_cm.set_value(c.heads.w_out_cm[...] * 300.0)
    return c


def _seqs(seed=0, n=5):
    rng = np.random.default_rng(seed)
    return [rng.integers(10, 250, rng.integers(3, 40)).tolist() for _ in range(n)]


@nnx.jit
def _forward(critic, ids_bs, pos_bs):
    return jax.nn.sigmoid(critic(ids_bs, positions_bs=pos_bs))


def _alone(critic, ids):
    """Reference: one unpadded sequence through the model, sigmoid of every head at every position."""
    ids_bs = jnp.asarray([ids], jnp.int32)
    return np.asarray(_forward(critic, ids_bs, jnp.arange(len(ids), dtype=jnp.int32)[None]))[0]  # [s, c]


def test_one_forward_returns_all_three_heads(critic):
    seq = _seqs()[0]
    out = _forward(critic, jnp.asarray(seq)[None], jnp.arange(len(seq))[None])
    assert out.shape == (1, len(seq), len(HEADS)) and len(HEADS) == 3 and out.dtype == jnp.float32
    scorer = CriticScorer(critic, task="arith", max_batch=64)
    scorer.score(_seqs(n=7))
    assert scorer.calls == 1  # 7 sequences, three heads: one device call


def test_reading_positions_first_equals_reading_every_position(critic):
    """Scoring applies the heads only at the read indices; the logits are those of the full forward."""
    rng = np.random.default_rng(3)
    ids_bs = jnp.asarray(rng.integers(10, 250, (3, 20)), jnp.int32)
    pos_bs = jnp.tile(jnp.arange(20, dtype=jnp.int32), (3, 1))
    read_bk = jnp.asarray([[0, 5, 19], [19, 19, 2], [7, 0, 11]], jnp.int32)
    every_bsc = critic(ids_bs, positions_bs=pos_bs)
    np.testing.assert_allclose(critic(ids_bs, positions_bs=pos_bs, read_bk=read_bk),
                               read_positions(every_bsc, read_bk), rtol=1e-5, atol=1e-5)


def test_heads_read_at_the_right_positions(critic):
    seqs = _seqs()
    seqs[1] = seqs[1] + [BLANK, EOS, EOS]  # trailing blank and EOS tokens
    scorer = CriticScorer(critic, task="arith", max_batch=2, eos_ids={EOS})
    scorer.blank_ids = frozenset({BLANK, EOS})
    ends = [[0, len(s) // 2] for s in seqs]
    ends[1] = [0, 3]
    s = scorer.score(seqs, step_ends=ends)
    v, p, o = HEAD_INDEX["value"], HEAD_INDEX["prm"], HEAD_INDEX["orm"]
    for i, seq in enumerate(seqs):
        ref = _alone(critic, [t for t in seq if t != EOS])
        n = len([t for t in seq if t != EOS])
        last_content = n - 1 if i != 1 else n - 2  # the ORM skips the trailing blank
        np.testing.assert_allclose(s.value[i], ref[n - 1, v], atol=2e-5)
        np.testing.assert_allclose(s.prm[i], ref[n - 1, p], atol=2e-5)
        np.testing.assert_allclose(s.orm[i], ref[last_content, o], atol=2e-5)
        np.testing.assert_allclose(s.value_steps[i], ref[ends[i], v], atol=2e-5)
        np.testing.assert_allclose(s.prm_steps[i], ref[ends[i], p], atol=2e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_on_either_side_reads_the_same_scores(critic, side):
    seqs = _seqs(seed=3)
    length = 48
    ids = np.zeros((len(seqs), length), np.int32)
    pos = np.full((len(seqs), length), -1, np.int32)
    last = np.zeros((len(seqs), 1), np.int32)
    for b, seq in enumerate(seqs):
        lo = 0 if side == "right" else length - len(seq)
        ids[b, lo:lo + len(seq)] = seq
        pos[b, lo:lo + len(seq)] = np.arange(len(seq))
        last[b, 0] = lo + len(seq) - 1
    out = np.asarray(read_positions(_forward(critic, jnp.asarray(ids), jnp.asarray(pos)), jnp.asarray(last)))[:, 0]
    for b, seq in enumerate(seqs):
        np.testing.assert_allclose(out[b], _alone(critic, seq)[-1], atol=2e-5)


def test_one_pass_over_a_trajectory_equals_scoring_each_prefix(critic):
    seq = _seqs(seed=5, n=1)[0] + list(range(20, 40))
    ends = [4, 9, 17, len(seq) - 1]
    scorer = CriticScorer(critic, task="arith")
    whole = scorer.score([seq], step_ends=[ends])
    prefixes = scorer.score([seq[:e + 1] for e in ends])
    np.testing.assert_allclose(whole.value_steps[0], prefixes.value, atol=2e-5)
    np.testing.assert_allclose(whole.prm_steps[0], prefixes.prm, atol=2e-5)


def test_bucketing_limits_recompiles(critic):
    scorer = CriticScorer(critic, task="arith", max_batch=8, len_granule=32)
    before = _cache_size()
    for n in (3, 5, 6, 7):
        scorer.score(_seqs(seed=n, n=n))  # lengths < 40, 3..7 rows: one (8, 64) or (8, 32) shape
    assert _cache_size() - before <= 3


def _cache_size():
    from alphallm_jax.critics import scoring

    return scoring._score_batch._cache_size()


def test_validation_errors(critic):
    scorer = CriticScorer(critic, task="arith", eos_ids={EOS})
    with pytest.raises(ValueError, match="empty"):
        scorer.score([[EOS, EOS]])
    with pytest.raises(ValueError, match="outside"):
        scorer.score([[5, 6, 7]], step_ends=[[3]])
    with pytest.raises(ValueError, match="at most"):
        scorer.score([[5] * (CFG.max_position_embeddings + 1)])


def test_prm_aggregates():
    steps = np.array([0.9, 0.5, 0.8])
    assert aggregate_prm(steps, "min") == 0.5
    assert aggregate_prm(steps, "prod") == pytest.approx(0.36)
    assert aggregate_prm(steps, "mean") == pytest.approx(2.2 / 3)
    assert aggregate_prm(steps, "last") == pytest.approx(0.8)
    assert aggregate_prm(np.zeros(0), "min") == 0.0  # no step, no answer: ranked below any solution


def test_critic_from_policy_copies_the_backbone_without_aliasing():
    policy = create_model(CFG, seed=4)
    critic = critic_from_policy(policy, HEAD_CFG)
    ids = jnp.asarray(_seqs(seed=1, n=1))
    h_policy, _ = policy.hidden_states(ids)
    h_critic, _ = critic.backbone.hidden_states(ids)
    np.testing.assert_array_equal(np.asarray(h_policy), np.asarray(h_critic))
    assert critic.backbone.embed_vd[...] is not policy.embed_vd[...]
    assert critic.backbone.cfg == policy.cfg


def test_save_and_load_roundtrip(critic, tmp_path):
    save_critic(critic, tmp_path / "c")
    back = load_critic(tmp_path / "c")
    ids = jnp.asarray(_seqs(seed=2, n=1))
    pos = jnp.arange(ids.shape[1])[None]
    np.testing.assert_array_equal(np.asarray(_forward(critic, ids, pos)), np.asarray(_forward(back, ids, pos)))
    assert back.head_cfg == critic.head_cfg and back.model_cfg == critic.model_cfg
    with pytest.raises(FileNotFoundError, match="train-critics"):
        load_critic(tmp_path / "missing")


def test_sharded_scoring_matches_single_device(critic):
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded = create_critic(CFG, HEAD_CFG, mesh=mesh, seed=1)
    nnx.update(sharded, jax.device_put(nnx.state(critic), jax.tree.map(lambda x: x.sharding, nnx.state(sharded))))
    assert "fsdp" in str(sharded.heads.w_in_cdm[...].sharding.spec)
    seqs = _seqs(seed=9, n=6)
    want = CriticScorer(critic, task="arith").score(seqs)
    got = CriticScorer(sharded, task="arith", mesh=mesh).score(seqs)
    for name in ("value", "prm", "orm"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), atol=2e-5)


def test_a_critic_from_a_sharded_policy_lives_on_its_mesh(critic):
    """Heads born on the default device beside a backbone on a mesh: the trainer gives the critic back
    where its arrays were, and scoring refused the mix of device sets."""
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    policy = create_model(CFG, mesh=mesh, seed=4)
    sharded = critic_from_policy(policy, HEAD_CFG, mesh=mesh)
    devices = {frozenset(x.sharding.device_set) for x in jax.tree.leaves(nnx.state(sharded))}
    assert devices == {frozenset(mesh.devices.flat)}
    seqs = _seqs(seed=9, n=6)
    got = CriticScorer(sharded, task="arith", mesh=mesh).score(seqs)
    single = critic_from_policy(create_model(CFG, seed=4), HEAD_CFG)
    want = CriticScorer(single, task="arith").score(seqs)
    for name in ("value", "prm", "orm"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), atol=2e-5)
