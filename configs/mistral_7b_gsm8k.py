"""AlphaLLM-CPL on GSM8K with Mistral-7B: AlphaLLM's SFT round, then curriculum preference learning.

Paper (CPL, Table 1): 38.5 -> AlphaLLM SFT 46.7 -> CPL 57.3 greedy on GSM8K test (the CPL ablations,
e.g. alpha and the stepwise pairs, are on this setting).

  --config.model.checkpoint=DIR   the policy pi_0: mistralai/Mistral-7B-v0.1 fine-tuned on GSM8K train in
                                  the plain prompt format (HF or orbax directory; sliding window 4096)
  critic                          a copy of the policy's backbone with value/PRM/ORM heads
  fast rollouts                   none: CPL's search is guided by the value network alone

Variants (mesh): v5p-8 (default), v5e-32, gpu-8.
"""

from alphallm_jax.paper_presets import MESHES_7B, apply_mesh, paper_config, value_guided_search


def get_config(variant: str | None = None):
    c = paper_config(task="gsm8k", policy_preset="mistral_7b", prompt_format="plain", mcts_preset="gsm8k_small",
                     max_len=1024, max_solution_tokens=400, train_seq_len=512)
    c.critics.model.init = "policy"
    value_guided_search(c)
    apply_mesh(c, MESHES_7B, variant, "mistral_7b_gsm8k.py")
    return c
