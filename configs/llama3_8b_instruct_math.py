"""AlphaLLM-CPL on MATH with LLaMA3-8B-Instruct: AlphaLLM's SFT round, then curriculum preference learning.

Paper (CPL, Table 1): 28.2 -> AlphaLLM SFT 31.0 -> CPL 33.1 on MATH (MATH500 here, the split the project
evaluates on); one round of imagination (5.9k prompts).

  --config.model.checkpoint=DIR   meta-llama/Meta-Llama-3-8B-Instruct as an HF or orbax directory; prompts
                                  use its chat template (data.prompt_format="chat")
  critic                          a copy of the policy's backbone with value/PRM/ORM heads
  fast rollouts                   none: CPL's search is guided by the value network alone

Variants (mesh): v5p-8 (default), v5e-32, gpu-8.
"""

from alphallm_jax.paper_presets import MESHES_7B, apply_mesh, paper_config, value_guided_search


def get_config(variant: str | None = None):
    c = paper_config(task="math", policy_preset="llama3_8b", prompt_format="chat", mcts_preset="math",
                     max_len=2048, max_solution_tokens=1024, train_seq_len=1536,
                     search_batch=64)
    c.critics.model.init = "policy"
    c.loop.iterations = 1
    value_guided_search(c)
    apply_mesh(c, MESHES_7B, variant, "llama3_8b_instruct_math.py")
    return c
