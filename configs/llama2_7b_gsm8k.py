"""AlphaLLM-CPL on GSM8K with LLaMA2-7B: AlphaLLM's SFT round, then curriculum preference learning.

Paper (CPL, Table 1): 14.6 -> AlphaLLM SFT 26.5 -> CPL 36.5 greedy on GSM8K test.

  --config.model.checkpoint=DIR   the policy pi_0: meta-llama/Llama-2-7b-hf fine-tuned on GSM8K train
                                  (the paper's 7.5k labelled problems) in the plain prompt format, as an
                                  HF or orbax directory (alphallm convert turns one into the other)
  critic                          a copy of the policy's backbone with value/PRM/ORM heads
                                  (critics.model.init="policy"), trained on pi_0's rollouts over D0
  fast rollouts                   none: CPL's search is guided by the value network alone

Variants (mesh): v5p-8 (default), v5e-32, gpu-8. `alphallm plan --config configs/llama2_7b_gsm8k.py:v5p-8`
prints what every device holds.
"""

from alphallm_jax.paper_presets import MESHES_7B, apply_mesh, paper_config, value_guided_search


def get_config(variant: str | None = None):
    c = paper_config(task="gsm8k", policy_preset="llama2_7b", prompt_format="plain", mcts_preset="gsm8k_small",
                     max_len=1024, max_solution_tokens=400, train_seq_len=512)
    c.critics.model.init = "policy"
    value_guided_search(c)
    apply_mesh(c, MESHES_7B, variant, "llama2_7b_gsm8k.py")
    return c
