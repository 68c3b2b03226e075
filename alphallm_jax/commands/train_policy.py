"""`alphallm train-policy --config CONFIG --workdir DIR --train.method=sft|dpo`: self-improvement.

Reads the search's trees from `config.policy_train.trees_dir` and the policy from
`config.model.checkpoint`; `sft` trains on the best trace per prompt (AlphaLLM), `dpo` on trajectory
pairs ordered by `config.policy_train.ordering` (cpl | shuffle | complete_only | q_pairs). Writes the
extracted records, the trainer's run, and the trained policy to `DIR/policy` (resumable).
"""

from __future__ import annotations

from absl import flags

from alphallm_jax.commands import define_run_flags


def define_flags() -> None:
    define_run_flags()
    flags.DEFINE_enum("train.method", None, ["sft", "dpo"],
                      "What to train; default: config.policy_train.method.")


def main(argv) -> None:
    del argv
    from alphallm_jax.config import mesh_from_config
    from alphallm_jax.train.policy_training import run_policy_training

    f = flags.FLAGS
    record = run_policy_training(f.config, f.workdir, f["train.method"].value, mesh=mesh_from_config(f.config))
    if record.get("skipped"):
        print(f"policy: {record['policy']} (already trained)")
        return
    pairs = ", ".join(f"{k} {v}" for k, v in record["pairs"].items())
    print(f"{record['method']}: {record['num_trees']} trees, {record['sft_traces']} SFT traces, pairs: {pairs}")
    print(f"policy: {record['policy']} ({record['steps']} steps, {record['wall_seconds']:.0f} s)")
    for row in record.get("epoch_metrics", []):
        print(f"  epoch {row['epoch']}: loss {row['loss']:.4f}, reward accuracy {row['reward_accuracy']:.3f}, "
              f"margin {row['margin']:.4f}")
