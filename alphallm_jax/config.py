"""The project's config schema: every field with its default, shared by every config file.

Config files in `configs/` start from `default_config()` and override fields; ml-collections locks
the result, so `--config.eval.limt=5` (a typo) fails instead of being silently ignored, and the CLI
checks the file's own keys against this schema (`unknown_config_keys`).
"""

from __future__ import annotations

import ml_collections


def train_section(values: dict) -> ml_collections.ConfigDict:
    """A training section: every `TrainConfig` field, `values` over the dataclass defaults, so that any
    of them can be set from the command line (`--config.base.train.grad_accum_steps=2`) as well as in a
    config file; a field whose default is None is an empty typed field (`max_steps`, `compute_dtype`)."""
    import dataclasses

    from alphallm_jax.train.trainer import TrainConfig

    scalar = {"int": int, "float": float, "str": str, "bool": bool}
    fields = {}
    for f in dataclasses.fields(TrainConfig):
        kind = scalar.get(str(f.type).split("|")[0].strip())
        if f.name in values:
            fields[f.name] = values[f.name]
        elif kind is not None:  # a dict-valued field (compiler_options) stays settable in config files only
            fields[f.name] = f.default if f.default is not None else _empty_field(kind)
    return ml_collections.ConfigDict(fields)

def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = "arith"  # gsm8k | math | arith: picks the grader and the answer marker

    c.data = ml_collections.ConfigDict()
    c.data.data_dir = ""  # "" -> $ALPHALLM_DATA_DIR or ../shared/data beside the repo
    c.data.prompt_format = "plain"  # plain | fewshot | chat
    c.data.num_exemplars = 4  # for fewshot
    c.data.exemplar_seed = 0
    # The built-in arith task's difficulty knobs (alphallm_jax.data.arith.ArithConfig); the splits are
    # generated from `seed`. `arith_hard` makes the arith:test_hard split.
    c.data.arith = ml_collections.ConfigDict(dict(
        min_steps=2, max_steps=4, operand_min=2, operand_max=20, factor_max=6, value_min=2, value_max=200))
    c.data.arith_hard = ml_collections.ConfigDict(dict(
        min_steps=4, max_steps=6, operand_min=2, operand_max=30, factor_max=9, value_min=2, value_max=500))

    c.model = ml_collections.ConfigDict()
    c.model.checkpoint = ""  # an HF or orbax directory
    c.model.dtype = "float32"  # compute dtype
    c.model.param_dtype = "float32"
    c.model.preset = ""  # a name in alphallm_jax.models.presets: the policy's shape for `alphallm plan`

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.device = ""  # what the mesh runs on, e.g. "TPU v5p" (for `alphallm plan`'s report)
    c.mesh.hbm_gib = 0.0  # memory per device for `alphallm plan`; 0: this machine's device
    # Sequences per device per accumulation step a preset sizes its mesh for (`paper_presets.size_for_mesh`:
    # accumulation, remat, KV pools, sized again after command-line overrides); 0: nothing is sized.
    c.mesh.micro_batch = 0

    c.sampling = ml_collections.ConfigDict()
    c.sampling.max_len = 1024  # longest sequence a cached state may reach
    c.sampling.pool_slots = 256
    c.sampling.max_batch = 64
    # Slots per KV cache chunk; attention skips the chunks no row has reached. 0: 64 on CPU, one chunk
    # on accelerators; -1: always one chunk.
    c.sampling.kv_chunk_slots = 0
    # Rows of a device call go to a power of two, at least this many (`utils.shapes.row_bucket`): each
    # bucket is one more compile of every prefill, decode and row program; smaller ones pad less.
    c.sampling.min_rows = 8
    # Also three quarters of a power of two (..., 96, 128, 192, 256): a third of a call padded at most,
    # not a half, for one more compiled shape per octave (worth it where rows cost compute: CPU).
    c.sampling.fine_row_buckets = False

    # The built-in demo's base policy, trained from scratch on labelled D0 (alphallm train-base).
    c.base = ml_collections.ConfigDict()
    c.base.train_split = "arith:train"
    c.base.dev_split = "arith:dev"
    c.base.num_train = 0  # 0: the whole split
    c.base.num_dev = 0
    # arith D0 only: a systematic slip written into a share of the worked solutions, final answers (labels)
    # kept right (data.arith.with_slips): "summed_product" (3*12=<<3*12=15>>15 in the opening line),
    # "dropped_carry" (27+15=<<27+15=32>>32, 52-17=<<52-17=45>>45), "summed_difference" (18-5=<<18-5=23>>23)
    # or "intermediate_answer" (every line right, `#### N` the result of the line before the last);
    # "none": D0 as generated. slip_fraction: the share of the stories the slip applies to that carry it.
    c.base.slip = "none"
    c.base.slip_fraction = 0.0
    c.base.tokenizer_vocab_size = 768
    # plain and fewshot formats: the loss covers the (last) question too, so imagination can sample questions
    c.base.question_loss = True
    c.base.model = ml_collections.ConfigDict(dict(
        hidden_size=192, intermediate_size=512, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=48,
        rope_theta=10000.0, max_position_embeddings=512, tie_word_embeddings=True))
    c.base.train = train_section(dict(
        learning_rate=3e-3, end_learning_rate=1e-4, warmup_ratio=0.05, schedule="cosine", weight_decay=0.01,
        max_grad_norm=1.0, batch_size=32, epochs=2, max_seq_len=384, pad_to_multiple=32, eval_every=0,
        early_stopping_patience=3, checkpoint_every=100, keep_checkpoints=2, seed=0))
    c.base.eval_methods = ("greedy", "pass@16")

    # The three critics (value, PRM, ORM) and their tools (alphallm train-critics); labels of D0 are used
    # here and nowhere else.
    c.critics = ml_collections.ConfigDict()
    c.critics.policy = ""  # the policy whose rollouts label the data; "" -> WORKDIR/base/policy (trained if missing)
    c.critics.checkpoint = ""  # a trained critic for `alphallm eval` (orm@k, prm@k); "" -> WORKDIR/critics/critic
    c.critics.train_split = "arith:train"
    c.critics.dev_split = "arith:dev"  # calibration and early stopping
    c.critics.num_train_prompts = 256  # 0: the whole split
    c.critics.num_dev_prompts = 100
    c.critics.prm_label = "soft"  # soft: MC fraction of correct outcomes after the step; hard: any correct
    c.critics.value_at_root = True  # also train v(s) on the prompt-only state
    c.critics.rollout_row_fraction = 1.0  # share of MC rollouts (complete solutions) kept as ORM-only training rows
    c.critics.data = ml_collections.ConfigDict(dict(  # alphallm_jax.critics.data.RolloutConfig
        num_solutions=8, num_rollouts=4, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=256,
        max_step_tokens=96, max_steps=16, solution_stop=("\n\n", "\nQuestion:"), prompts_per_chunk=16,
        keep_rollouts=True, pool_slots=1024))
    # Backbone: init="policy" copies the policy's weights; "rollout_policy" the fast-rollout policy's (a
    # separate, smaller model, trained first); "checkpoint" loads `checkpoint` (an HF/orbax decoder sharing
    # the policy's tokenizer); "scratch" builds the sizes below from random weights.
    c.critics.model = ml_collections.ConfigDict(dict(
        init="policy", checkpoint="", head_hidden=256, head_activation="silu", hidden_size=128,
        intermediate_size=384, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, rope_theta=10000.0,
        max_position_embeddings=1024, tie_word_embeddings=True, dtype="float32"))
    # orm_rank_weight > 0: examples are pairs of solutions of one prompt (critics.train.batch_size counts
    # pairs) and a Bradley-Terry term ranks the right one's ORM above the wrong one's.
    c.critics.loss = ml_collections.ConfigDict(dict(value="bce", value_weight=1.0, prm_weight=1.0, orm_weight=1.0,
                                                    orm_rank_weight=0.0))
    c.critics.train = train_section(dict(  # alphallm_jax.train.trainer.TrainConfig
        learning_rate=1e-4, end_learning_rate=1e-5, warmup_ratio=0.05, schedule="cosine", weight_decay=0.01,
        max_grad_norm=1.0, batch_size=32, epochs=2, max_seq_len=1024, pad_to_multiple=64, eval_every=0,
        early_stopping_patience=3, checkpoint_every=200, keep_checkpoints=2, seed=0))
    c.critics.tools = ml_collections.ConfigDict(dict(  # alphallm_jax.critics.tools.ToolConfig
        enabled=True, combine="product", penalty=0.05, mix_weight=0.5, annotations=True, written_equations=True,
        latex=True, rel_tol=0.0, max_latex_checks=8, latex_budget_s=20.0, steps=False,
        question_numbers=False, operand_sources=False))
    c.critics.scoring = ml_collections.ConfigDict(dict(max_batch=64, len_granule=32, min_rows=8, prm_aggregate="min",
                                                       fine_row_buckets=False))
    # bootstrap: resamples of the dev prompts behind each AUROC's 95% interval (0: no intervals).
    c.critics.calibration = ml_collections.ConfigDict(dict(threshold=0.5, num_bins=10, bootstrap=1000))
    # The outcome combiner (critics.combiner): P(right) from the ORM, the tool verdict and the policy's mean
    # token log-probability, a logistic regression (L2 penalty `l2`) fitted on the train trajectories;
    # orm@k reranks by it when the samples carry log-probabilities.
    c.critics.combiner = ml_collections.ConfigDict(dict(enabled=True, l2=1.0))
    # Best-of-k by the critics against greedy and self-consistency, on `eval.split` (0: every problem).
    c.critics.eval_methods = ("greedy", "maj@16", "orm@16", "prm@16", "pass@16")
    c.critics.eval_limit = 0

    # The fast-rollout policy: a second, smaller policy used only for rollouts in the search (the paper
    # rolls out with a 7B model for a 70B policy). Trained like the base policy, on the base tokenizer.
    c.rollout_policy = ml_collections.ConfigDict()
    c.rollout_policy.enabled = False
    c.rollout_policy.checkpoint = ""  # an existing fast policy; "" -> WORKDIR/fast_rollout/policy (trained)
    c.rollout_policy.model = ml_collections.ConfigDict(dict(
        hidden_size=96, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=24,
        rope_theta=10000.0, max_position_embeddings=512, tie_word_embeddings=True))
    c.rollout_policy.train = train_section(dict(
        learning_rate=3e-3, end_learning_rate=1e-4, warmup_ratio=0.05, schedule="cosine", weight_decay=0.01,
        max_grad_norm=1.0, batch_size=32, epochs=2, max_seq_len=384, pad_to_multiple=32, eval_every=0,
        early_stopping_patience=3, checkpoint_every=100, keep_checkpoints=2, seed=0))

    c.eval = ml_collections.ConfigDict()
    c.eval.split = "arith:test"  # a named split (see alphallm_jax.data.loaders) or a JSONL path
    c.eval.limit = 0  # 0: the whole split
    c.eval.methods = ("greedy", "maj@16")
    c.eval.max_new_tokens = 256
    c.eval.temperature = 0.7  # for sampling methods (greedy ignores it)
    c.eval.top_p = 1.0
    c.eval.top_k = 0
    c.eval.stop = ("\n\n", "\nQuestion:")  # a solution ends at EOS or at one of these
    c.eval.batch_size = 64  # problems per sampler call

    # Self-improvement of the policy on search trees (`alphallm train-policy`, alphallm_jax/train/:
    # pairs.py defines the traces and pairs, dpo.py the loss, cpl.py the orderings).
    c.policy_train = ml_collections.ConfigDict()
    c.policy_train.trees_dir = ""  # the search's tree JSONL files, one per problem
    c.policy_train.method = "sft"  # sft (AlphaLLM's round) | dpo (preference learning)
    # Traces and pairs.
    c.policy_train.orm_threshold = 0.5  # an SFT trace is kept when its ORM is at least this
    # best_score (the paper: the best-scored complete trajectory) | answer_vote (the best one reaching the
    # winner of the search's ORM vote, kept when the winner holds min_vote_share of the ORM mass)
    c.policy_train.sft_selection = "best_score"
    c.policy_train.min_vote_share = 0.0
    c.policy_train.sft_traces_per_prompt = 1  # >1: the k best trajectories of distinct text per prompt
    c.policy_train.score_field = "reward"  # critic score choosing SFT traces and best completions
    # The minimum value gap of a pair. The paper's margin is 1 on a value scale it does not state; here a
    # complete trajectory's Q is its ORM (the paper's terminal reward), in [0, 1], where a margin of 1 admits
    # no complete pair (`train.pairs.check_pair_margin` refuses it): half that range, a clear gap.
    c.policy_train.tau = 0.5
    c.policy_train.complete_value_field = "Q"  # the value compared for complete pairs
    c.policy_train.completion = "best_terminal"  # how a step is continued to the end: | greedy_q
    c.policy_train.step_reward_field = "reward"  # per-step critic reward summed into CPL's r_g
    c.policy_train.min_visits = 1  # nodes visited less often are in no pair
    c.policy_train.max_pairs_per_prompt = 0  # per pair kind, largest gaps first; 0: all
    c.policy_train.q_pairs_min_gap = 0.0  # the Q baseline's pairs need a larger gap than this
    c.policy_train.append_eos = True  # end complete trajectories with EOS when their option did not
    c.policy_train.sft_dev_fraction = 0.1  # prompts held out for SFT early stopping
    c.policy_train.dpo_dev_fraction = 0.0  # prompts held out for a DPO dev loss (0: none)
    # Preference learning.
    c.policy_train.ordering = "cpl"  # cpl | shuffle (PL-shuffle) | complete_only (CO) | q_pairs (Q)
    c.policy_train.alpha = 0.5  # CPL: w = r_g + alpha * p_g (paper: 0.5)
    c.policy_train.beta = 0.1  # DPO temperature
    c.policy_train.label_smoothing = 0.0  # conservative DPO; 0: plain DPO
    c.policy_train.preference_loss = "sigmoid"  # sigmoid (DPO) | ipo (squared loss, log-ratio gap 1/(2 beta))
    # > 0: DPO plus this weight times the chosen response's mean token NLL (keeps the winner likely)
    c.policy_train.dpo_nll_weight = 0.0
    c.policy_train.logp_batch_size = 64  # pairs per batch of the reference and p_g passes
    c.policy_train.logits_chunk_size = 0  # >0: vocabulary projection in sequence chunks (large vocabs)
    c.policy_train.save_epoch_policies = True  # DPO: a policy checkpoint after every epoch
    c.policy_train.sft = train_section(dict(
        learning_rate=3e-4, end_learning_rate=3e-5, warmup_ratio=0.1, schedule="cosine", weight_decay=0.0,
        max_grad_norm=1.0, batch_size=32, epochs=3, max_seq_len=384, pad_to_multiple=32, eval_every=0,
        early_stopping_patience=2, checkpoint_every=100, keep_checkpoints=2, seed=0))
    c.policy_train.dpo = train_section(dict(
        learning_rate=5e-5, end_learning_rate=5e-6, warmup_ratio=0.1, schedule="cosine", weight_decay=0.0,
        max_grad_norm=1.0, batch_size=32, epochs=2, max_seq_len=384, pad_to_multiple=32, eval_every=0,
        early_stopping_patience=0, restore_best=False, checkpoint_every=100, keep_checkpoints=2, log_every=1,
        seed=0))
    # eta-MCTS over the policy with the critics (`alphallm search`, the `mcts` and `beam` eval methods).
    c.search = ml_collections.ConfigDict()
    c.search.method = "mcts"  # mcts | beam (the step-level beam baseline) for `alphallm search`
    c.search.split = ""  # the problems to search: a named split or JSONL path; "" -> eval.split
    c.search.limit = 0  # 0: every problem
    c.search.prompts_file = ""  # instead of a split: JSONL of {"question"| "prompt", "id"?, "answer"?}
    c.search.critics = ""  # the critic checkpoint; "" -> critics.checkpoint, else WORKDIR/critics/critic
    c.search.rollout_policy = True  # fast rollouts by the rollout_policy model when rollout_policy.enabled
    c.search.max_len = 0  # the search sampler's sequence length; 0: longest prompt + max_solution_tokens
    c.search.pool_slots = 1024  # cached KV states (tree nodes); least recently used ones are rebuilt
    c.search.max_batch = 0  # rows per device call; 0: sampling.max_batch
    c.search.problems_per_call = 256  # problems handed to one lockstep search (mcts.max_active_trees at once)
    # MCTSConfig (alphallm_jax.search.mcts_config): `preset` names the paper preset; every field left
    # None keeps the preset's value.
    c.search.mcts = ml_collections.ConfigDict(_mcts_section())
    c.search.beam = ml_collections.ConfigDict(dict(  # alphallm_jax.search.baselines.BeamSearchConfig
        beam_width=4, expansions_per_beam=4, max_depth=10, guide="prm", final_selection="guide", max_nodes=0))
    c.search.options = ml_collections.ConfigDict(dict(  # alphallm_jax.search.options.OptionConfig
        separator="", max_option_tokens=64, max_solution_tokens=256, solution_stops=("\nQuestion:",),
        temperature=1.0, top_p=1.0, top_k=0, rollout_temperature=1.0, rollout_top_p=1.0, rollout_top_k=0,
        math_extension=True))
    # The self-improvement loop (`alphallm loop`): base -> critics -> iterations of imagination, search,
    # SFT and CPL -> ablations -> report. Method specs are the evaluation harness's (greedy, maj@k, ...).
    c.loop = ml_collections.ConfigDict()
    c.loop.iterations = 2
    c.loop.base_methods = ("greedy", "maj@16", "orm@16", "mcts")
    c.loop.sft_methods = ("greedy",)
    c.loop.cpl_methods = ("greedy", "mcts")
    c.loop.next_policy = "cpl"  # cpl | sft: the policy the next iteration starts from
    # SFT's traces: "iteration" (the paper: this iteration's trees) | "accumulated" (every iteration's so
    # far); its starting policy: "previous" (the paper: the policy this iteration searched with) | "base"
    # (the base policy every iteration, as STaR and ReST-EM restart their fine-tuning).
    c.loop.sft_traces = "iteration"
    c.loop.sft_init = "previous"
    # Iteration 1's preference stage again with other orderings, from the same SFT policy and trees
    # (CPL vs PL-shuffle vs CO vs Q); empty: no ablations.
    c.loop.ablation_orderings = ()
    c.loop.ablation_seeds = 3
    # eta-MCTS with its components added one at a time in the paper's order (value-only fixed width, +
    # adaptive branching, + PRM, + fast-rollout ORM, + state merging) on the base policy, on the first
    # search_ablation_limit evaluation problems (0: eval.limit).
    c.loop.search_ablation = False
    c.loop.search_ablation_limit = 0

    # Evaluation sweeps (`alphallm sweep`): every checkpoint x method x budget on `eval.split` (`eval.limit`).
    c.sweep = ml_collections.ConfigDict()
    c.sweep.checkpoints = ()  # "NAME=DIR" or "DIR" entries
    c.sweep.loop_workdir = ""  # a loop run: its base, iter_N/sft and iter_N/cpl policies, critics, fast policy
    c.sweep.methods = ("greedy", "maj", "orm", "mcts")  # maj/orm/prm/pass/mcts/beam run once per budget
    c.sweep.budgets = (4, 16)  # samples (maj, orm, prm, pass), simulations (mcts), beam width (beam)

    # Imagination (alphallm_jax/synthesis): the policy writes new unlabelled prompts from D0, filtered for
    # form, test-split overlap and near-duplicates; fields of SynthesisSettings except the three splits.
    c.synthesis = ml_collections.ConfigDict(dict(
        # fewshot (variation of a D0 seed) | prefix (a seed's opening with new numbers, continued) |
        # unconditional ("Question:" continued), or several comma-joined ("prefix,unconditional")
        method="fewshot", num_prompts=64, num_exemplars=4, exemplar_solutions=False,
        instruction="",  # text before the exemplars; "{variation}" -> one of `variations` per prompt
        variations=("new numbers", "new names and objects", "a different asked quantity"),
        unconditional_prefix="Question:", prefix_sentences=1, renumber_prefix=True,
        renumber_draw="d0",  # a prefix's new numbers: D0's own within [v/2, 2v] | uniform in that range
        temperature=1.0, top_p=0.95, top_k=0, max_new_tokens=128, stop=("\n",),
        oversample=2.0, max_rounds=5, seed=0,
        seed_split="",  # D0; "" -> base.train_split (its first base.num_train problems)
        num_seeds=0,  # 0: as D0 above
        test_splits=(),  # () -> every evaluation split of the task plus eval.split
        form=ml_collections.ConfigDict(dict(  # alphallm_jax.synthesis.form.FormRules
            min_chars=20, max_chars=600, min_words=5, banned=("####", "<<", "Answer:", "Question:", "\\boxed"),
            require_question_mark=True, max_questions=1, require_number=True, max_repeats=2, require_grounded=True,
            max_unknown_words=1.0, max_number_quantile=1.0)),
        dedup=ml_collections.ConfigDict(dict(  # character-shingle Jaccard at or above which a prompt is dropped
            shingle_size=5, num_perm=128, test_threshold=0.85, d0_threshold=0.9, synthetic_threshold=0.9)),
    ))
    # The named shapes (alphallm_jax.models.presets) of a preset's critic backbone and fast-rollout policy,
    # so that `alphallm plan` sizes them without their checkpoints; "": the checkpoint's or the sizes above.
    c.critics.model.preset = ""
    c.rollout_policy.model.preset = ""
    return c


def _mcts_section() -> dict:
    """`preset` plus one empty field (None, typed like the field) per MCTSConfig field."""
    import dataclasses

    from alphallm_jax.search.mcts_config import MCTSConfig

    fields = {f.name: _empty_field(type(f.default)) for f in dataclasses.fields(MCTSConfig)}
    return {"preset": "gsm8k_small", **fields}


def unknown_config_keys(cfg, schema=None, prefix: str = "config") -> list[str]:
    """What a config file set that the schema (`default_config()`) lacks: one message per unknown key,
    with the valid keys of its section. A file builds its config unlocked, so `c.loop.iteratons = 3`
    would otherwise add a field nobody reads. Training sections (those with a `learning_rate`) take any
    `TrainConfig` field, which the trainer checks again."""
    schema = default_config() if schema is None else schema
    if "learning_rate" in schema and "batch_size" in schema:
        import dataclasses

        from alphallm_jax.train.trainer import TrainConfig

        valid = sorted(f.name for f in dataclasses.fields(TrainConfig))
    else:
        valid = sorted(schema.keys())
    problems = []
    for key in cfg.keys():
        if key not in valid:
            problems.append(f"{prefix}.{key} is not a field (valid keys of {prefix}: {', '.join(valid)})")
        elif key in schema and hasattr(cfg[key], "keys") and hasattr(schema[key], "keys"):
            problems += unknown_config_keys(cfg[key], schema[key], f"{prefix}.{key}")
    return problems


def load_config_file(spec: str, *, check_keys: bool = True) -> ml_collections.ConfigDict:
    """The config `--config=PATH[:VARIANT]` names, loaded as the CLI loads it: PATH's
    `get_config(VARIANT)`, or `get_config()` without a variant. With `check_keys`, a key the schema
    lacks raises a ValueError naming the file and the valid keys (`unknown_config_keys`)."""
    import importlib.util
    import os

    path, _, variant = str(spec).partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"alphallm_config_{os.path.basename(path)[:-3]}", path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"config file {path} is not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise ValueError(f"config file {path} defines no get_config()")
    cfg = module.get_config(variant) if variant else module.get_config()
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ValueError(f"{path}: get_config returned {type(cfg).__name__}, not a ConfigDict")
    if check_keys:
        problems = unknown_config_keys(cfg)
        if problems:
            raise ValueError(f"{path}: " + "; ".join(problems))
    return cfg


def config_section(cfg, dotted: str) -> tuple[ml_collections.ConfigDict, str]:
    """(the section holding `dotted`'s last key, that key); a missing key raises a KeyError naming it and
    the valid keys where it was looked up."""
    section, prefix = cfg, "config"
    names = dotted.split(".")
    for depth, name in enumerate(names):
        if not hasattr(section, "keys") or name not in section:
            valid = f"; valid keys of {prefix}: {', '.join(sorted(section.keys()))}" if hasattr(section, "keys") else ""
            raise KeyError(f"the config has no key {dotted!r}{valid}")
        if depth < len(names) - 1:
            section, prefix = section[name], f"{prefix}.{name}"
    return section, names[-1]


def mesh_from_config(cfg: ml_collections.ConfigDict):
    """The configured mesh, or None for a single device."""
    from alphallm_jax.models.sharding import mesh_or_none

    return mesh_or_none((cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor))


def _empty_field(kind: type):
    """A config field holding None that a command-line override fills with a value of `kind` (what
    ml-collections' own typed-None helper builds)."""
    from ml_collections import FieldReference

    return FieldReference(None, field_type=kind)
