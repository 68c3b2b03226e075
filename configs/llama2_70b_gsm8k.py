"""AlphaLLM's main setting: LLaMA2-70B on GSM8K, full eta-MCTS (value, PRM, ORM of fast rollouts).

Paper (AlphaLLM): greedy 57.8 -> 73.7 after two rounds of self-improvement (6.4k and 7.9k synthetic
prompts); 92.0 with eta-MCTS decoding.

  --config.model.checkpoint=DIR               meta-llama/Llama-2-70b-hf (HF or orbax directory); few-shot
                                              prompts (4 exemplars from GSM8K train)
  --config.critics.model.checkpoint=DIR       the critic backbone: a Llama-2-13B (meta-llama/Llama-2-13b-hf,
                                              the paper's separate value model size) sharing the policy's
                                              tokenizer, with value/PRM/ORM heads trained on pi_0's rollouts
  --config.rollout_policy.checkpoint=DIR      the fast-rollout policy: Abel-7B-002 (GAIR/Abel-7B-002, a
                                              Llama-2-7B fine-tuned for math), 4 rollouts per new node

Variants (mesh): v5p-128 (default), v5p-64, v5e-256, gpu-64 (8 hosts x 8 H100).
"""

from alphallm_jax.paper_presets import MESHES_70B, apply_mesh, paper_config


def get_config(variant: str | None = None):
    c = paper_config(task="gsm8k", policy_preset="llama2_70b", prompt_format="fewshot", mcts_preset="gsm8k_large",
                     max_len=2048, max_solution_tokens=400, train_seq_len=1536)
    c.data.num_exemplars = 4
    c.critics.model.init = "checkpoint"
    c.critics.model.preset = "llama2_13b"
    c.rollout_policy.enabled = True
    c.rollout_policy.model.preset = "llama2_7b"
    c.search.rollout_policy = True
    c.search.mcts.num_rollouts = 4
    apply_mesh(c, MESHES_70B, variant, "llama2_70b_gsm8k.py")
    return c
