"""SFT rounds from one policy on controlled data: does a round lift greedy accuracy, and from what?

Each arm fine-tunes a fresh copy of `--policy` with the config's `policy_train.sft` settings (the
loop's SFT round: solution tokens only, cosine from the arm's rate to a tenth of it) and evaluates
greedy on the first `--test_limit` problems of `eval.split` and the first `--dev_limit` of
`base.dev_split`. Arms, written `KIND:N:RATE` (`none` alone for the policy itself):

  ref   reference solutions of N fresh labelled problems (generated from the config's arith knobs,
        disjoint from every named split): what right data does
  d0    the first N problems of D0 (`base.train_split`), which the base was trained on: the control
        for training longer, whatever the data
  self  label-free traces of the policy itself on N other fresh questions: 16 samples each at
        `--temperature`, samples with a wrong calculation dropped (the calculator of `critics.tools`),
        the majority answer of the rest kept when it holds at least `policy_train.min_vote_share` of
        them, one sample with that answer the trace. Labels are read only to count right traces.

`--fresh_eval N` also scores every arm on N held-out fresh problems (their own draw, disjoint from every
split and every arm's problems), written once to OUT/fresh_eval.jsonl and reused by later runs into the
same OUT, so that arms run apart are scored on the same problems.

`--optimizer_from RUN/base/train` starts every arm's Adam state from that trainer's last checkpoint
(the base's own moments) instead of a fresh one.

Results are appended to OUT/results.jsonl, one line per arm; a rerun skips the arms already there.

  python experiments/sft_controls.py --config configs/demo_arith.py --policy RUN/base/policy \\
      --out runs/sft_controls --arm none --arm ref:2000:1e-4 --arm d0:2000:1e-4 --arm self:3000:1e-4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections import Counter
from pathlib import Path

KINDS = ("none", "ref", "d0", "self")


def apply_overrides(cfg, overrides):
    """A copy of ``cfg`` with the ``--set KEY=VALUE`` items, each VALUE read as its key's type (a tuple from
    a Python literal, ast.literal_eval, never eval) through the loop's ``overridden_config``, so an unknown
    key fails naming the valid keys where it was looked up."""
    from alphallm_jax.pipeline.loop import overridden_config

    return overridden_config(cfg, overrides, flag="--set")


def parse_arm(text: str) -> tuple[str, int, float]:
    parts = text.split(":")
    if parts[0] == "none" and len(parts) == 1:
        return "none", 0, 0.0
    if len(parts) != 3 or parts[0] not in KINDS[1:]:
        raise ValueError(f"--arm {text!r}: write KIND:N:RATE with KIND one of {KINDS[1:]}, or 'none'")
    return parts[0], int(parts[1]), float(parts[2])


def named_questions(cfg) -> set[str]:
    """The questions of every named arith split, which fresh problems never repeat."""
    from alphallm_jax.pipeline.evaluation import load_split

    return {p.question for split in ("arith:train", "arith:dev", "arith:test", "arith:test_hard")
            for p in load_split(cfg, split)}


def fresh_problems(cfg, n: int, named: set[str] | None = None):
    """`n` labelled arith problems that no named split holds (`named`, their questions, when the caller
    has them already: building the splits is the slow part)."""
    from alphallm_jax.data.arith import ArithConfig, generate_problems

    return generate_problems(ArithConfig(**cfg.data.arith), n, cfg.seed, split="fresh",
                             exclude_questions=named_questions(cfg) if named is None else named)


def held_out_problems(cfg, n: int, used, named: set[str] | None = None) -> list:
    """`n` labelled arith problems for evaluation (`--fresh_eval`): their own draw (split name
    "fresh_eval"), disjoint from every named split and from the arms' fresh problems `used`."""
    from alphallm_jax.data.arith import ArithConfig, generate_problems

    taken = (named_questions(cfg) if named is None else named) | {p.question for p in used}
    return generate_problems(ArithConfig(**cfg.data.arith), n, cfg.seed, split="fresh_eval", exclude_questions=taken)


def pick_trace(completions, task: str, tools, min_vote_share: float):
    """(answer, completion) for one question's samples, or None: samples cut at the token cap, without
    an answer or with a calculation the tools reject are dropped; the rest vote; the first sample with
    the winning answer is the trace when that answer holds at least `min_vote_share` of the votes."""
    from alphallm_jax.critics.tools import check_solution
    from alphallm_jax.data.grading import extract_answer

    votes = [(extract_answer(c.text, task), c) for c in completions
             if c.finish_reason != "length" and check_solution(c.text, task, tools).ok]
    votes = [(a, c) for a, c in votes if a is not None]
    if not votes:
        return None
    answer, count = Counter(a for a, _ in votes).most_common(1)[0]
    if count < min_vote_share * len(votes):
        return None
    return answer, next(c for a, c in votes if a == answer)


def self_traces(cfg, model, tokenizer, problems, *, temperature: float, num_samples: int = 16):
    """The policy's own label-free traces (see the module docstring) and how many reach the label."""
    from alphallm_jax.critics.tools import ToolConfig
    from alphallm_jax.data.grading import answers_equal
    from alphallm_jax.pipeline.evaluation import prompt_builder
    from alphallm_jax.sampling import Sampler
    from alphallm_jax.train.batching import SFTExample

    prompt_for = prompt_builder(cfg, tokenizer)
    # The calculator's checks only, as every recorded self-trace result used them: the checks that read
    # the question (question_numbers, operand_sources) are off here on purpose, not skipped unseen.
    tools = dataclasses.replace(ToolConfig.from_config(cfg.critics.tools), question_numbers=False,
                                operand_sources=False)
    prompts = [prompt_for(p) for p in problems]
    longest = max(len(tokenizer.encode(p, add_bos=True)) for p in prompts)
    sampler = Sampler(model, tokenizer, max_len=longest + cfg.eval.max_new_tokens, pool_slots=cfg.sampling.pool_slots,
                      max_batch=cfg.sampling.max_batch, kv_chunk_slots=cfg.sampling.kv_chunk_slots)
    examples, right, batch = [], 0, cfg.eval.batch_size
    for start in range(0, len(prompts), batch):
        outs = sampler.generate(prompts[start:start + batch], max_new_tokens=cfg.eval.max_new_tokens,
                                temperature=temperature, stop=list(cfg.eval.stop), num_samples=num_samples,
                                seed=cfg.seed + start)
        for problem, prompt, completions in zip(problems[start:start + batch], prompts[start:start + batch], outs):
            picked = pick_trace(completions, cfg.task, tools, cfg.policy_train.min_vote_share)
            if picked is None:
                continue
            answer, chosen = picked
            response = list(chosen.token_ids)
            if not response or response[-1] not in tokenizer.eos_ids:
                response.append(tokenizer.eos_ids[0])
            examples.append(SFTExample(tokenizer.encode(prompt, add_bos=True), response))
            right += answers_equal(answer, problem.answer, cfg.task)
    return examples, right


def greedy_accuracy(cfg, model, tokenizer, split: str, limit: int, workdir: Path) -> float:
    from alphallm_jax.pipeline.evaluation import eval_context, evaluate_methods

    cfg = cfg.copy_and_resolve_references()
    cfg.eval.split, cfg.eval.limit, cfg.eval.methods = split, limit, ("greedy",)
    problems, ctx = eval_context(cfg, model, tokenizer)
    return evaluate_methods(problems, ctx, ["greedy"], workdir, batch_size=cfg.eval.batch_size)["greedy"]["accuracy"]


def run_arm(cfg, arm: str, policy: str, out: Path, *, epochs: int, test_limit: int, dev_limit: int,
            temperature: float, fresh, self_offset: int, optimizer_from: str | None = None,
            fresh_eval: str | None = None) -> dict:
    """One arm: `fresh(n)` gives the first n fresh problems; `self` arms start at `self_offset`, past
    every `ref` arm's, so that their questions are new to the policy too."""
    from alphallm_jax import load_pretrained
    from alphallm_jax.pipeline.base_policy import sft_examples
    from alphallm_jax.pipeline.evaluation import load_split, prompt_builder

    kind, n, rate = parse_arm(arm)
    model, tokenizer = load_pretrained(policy, dtype=cfg.model.dtype)
    record = {"arm": arm, "kind": kind, "n": n, "learning_rate": rate, "epochs": epochs,
              "optimizer_from": optimizer_from}
    start = time.time()
    if kind != "none":
        if kind == "self":
            questions = fresh(self_offset + n)[self_offset:]
            examples, right = self_traces(cfg, model, tokenizer, questions, temperature=temperature)
            record.update(traces=len(examples), traces_right=right)
        else:
            problems = fresh(n) if kind == "ref" else load_split(cfg, cfg.base.train_split, n)
            examples = sft_examples(problems, tokenizer, prompt_builder(cfg, tokenizer))
        if not examples:  # a self arm whose samples never agreed: the policy is evaluated untrained
            record.update(steps=0, final_train_loss=None)
        else:
            record.update(train_arm(cfg, model, examples, rate, epochs, out / arm.replace(":", "_") / "train",
                                    optimizer_from=optimizer_from))
    record["train_seconds"] = time.time() - start
    arm_dir = out / arm.replace(":", "_")
    record["test_greedy"] = greedy_accuracy(cfg, model, tokenizer, cfg.eval.split, test_limit, arm_dir / "test")
    record["dev_greedy"] = greedy_accuracy(cfg, model, tokenizer, cfg.base.dev_split, dev_limit, arm_dir / "dev")
    if fresh_eval:
        record["fresh_eval_greedy"] = greedy_accuracy(cfg, model, tokenizer, fresh_eval, 0, arm_dir / "fresh_eval")
    return record


def train_arm(cfg, model, examples, rate: float, epochs: int, workdir: Path, *,
              optimizer_from: str | None = None) -> dict:
    """The loop's SFT round settings at the arm's rate and epochs (and optimizer state, when given);
    the model is trained in place."""
    from alphallm_jax.train.losses import make_sft_loss
    from alphallm_jax.train.trainer import TrainConfig, Trainer

    settings = {**TrainConfig.from_config(cfg.policy_train.sft).to_dict(), "learning_rate": rate,
                "end_learning_rate": rate / 10, "epochs": epochs, "checkpoint_every": -1,
                "optimizer_from": optimizer_from}
    fit = Trainer(model, make_sft_loss(None), TrainConfig(**settings), workdir=str(workdir)).fit(examples, None)
    return {"steps": fit.step, "final_train_loss": fit.train_metrics.get("loss")}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="CONFIG.py[:variant]")
    parser.add_argument("--policy", required=True, help="the policy checkpoint every arm starts from")
    parser.add_argument("--out", required=True)
    parser.add_argument("--arm", action="append", required=True, help="KIND:N:RATE, or none")
    parser.add_argument("--epochs", type=int, default=None, help="default: policy_train.sft.epochs")
    parser.add_argument("--test_limit", type=int, default=150)
    parser.add_argument("--dev_limit", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=None, help="self arms; default: eval.temperature")
    parser.add_argument("--fresh_eval", type=int, default=0,
                        help="also greedy on this many held-out fresh problems (OUT/fresh_eval.jsonl)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override (repeatable), e.g. --set eval.max_new_tokens=192")
    parser.add_argument("--optimizer_from", default=None,
                        help="a trainer workdir (e.g. RUN/base/train) whose last optimizer state starts every arm")
    args = parser.parse_args(argv)
    from alphallm_jax.utils.io import append_jsonl, read_jsonl_tolerant_tail

    arms = list(args.arm)
    parsed = [parse_arm(a) for a in arms]  # every arm's spelling checked before any training
    from alphallm_jax.config import load_config_file

    cfg = load_config_file(args.config)
    cfg = apply_overrides(cfg, args.set)
    if cfg.task != "arith":
        raise ValueError(f"--config {args.config}: task {cfg.task!r}; these controls generate arith problems")
    if not Path(args.policy).is_dir():
        raise FileNotFoundError(f"--policy {args.policy}: no such checkpoint directory")
    if args.optimizer_from and not Path(args.optimizer_from).is_dir():
        raise FileNotFoundError(f"--optimizer_from {args.optimizer_from}: no such trainer directory")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    # Arms resume (their trainer checkpoints, their evaluations, results.jsonl): only from this same
    # policy, config and settings.
    from alphallm_jax.utils.io import files_fingerprint
    from alphallm_jax.utils.run_identity import check_run_identity

    check_run_identity(out, {"policy": files_fingerprint(args.policy), "config": cfg.to_dict(),
                             "epochs": args.epochs, "temperature": args.temperature,
                             "test_limit": args.test_limit, "dev_limit": args.dev_limit,
                             "optimizer_from": args.optimizer_from and files_fingerprint(args.optimizer_from)},
                       resumable=())
    done = {r["arm"]: r for r in read_jsonl_tolerant_tail(results_path, repair=True)[0]}  # a killed run's torn line dropped
    self_offset = max([n for kind, n, _ in parsed if kind == "ref"] + [0])
    generated: list = []
    named: set[str] = set()

    def named_once() -> set[str]:
        if not named:
            named.update(named_questions(cfg))
        return named

    def fresh(n: int):  # the generator is sequential: the first n of a longer draw are the same n
        if len(generated) < n:
            generated[:] = fresh_problems(cfg, n, named_once())
        return generated[:n]

    fresh_eval = None
    if args.fresh_eval:
        from alphallm_jax.data.arith import to_gsm8k_row
        from alphallm_jax.utils.io import atomic_write_text

        used = fresh(max([n for kind, n, _ in parsed if kind == "ref"]
                         + [self_offset + n for kind, n, _ in parsed if kind == "self"] + [0]))
        path = out / "fresh_eval.jsonl"
        fresh_eval = str(path)
        if path.exists():  # an earlier run's held-out set: the arms of every run are scored on the same one
            held = [json.loads(line)["question"] for line in path.read_text().splitlines()]
            if len(held) != args.fresh_eval:
                raise ValueError(f"{path} holds {len(held)} problems, not --fresh_eval={args.fresh_eval}")
            if set(held) & {p.question for p in used}:
                raise ValueError(f"{path}: these arms' fresh problems reach into the held-out set; use another --out")
        else:
            atomic_write_text(path, "".join(json.dumps(to_gsm8k_row(p)) + "\n"
                                            for p in held_out_problems(cfg, args.fresh_eval, used, named_once())))
    records = []
    for arm in arms:
        if arm in done:
            records.append(done[arm])
            continue
        record = run_arm(cfg, arm, args.policy, out, epochs=args.epochs or cfg.policy_train.sft.epochs,
                         test_limit=args.test_limit, dev_limit=args.dev_limit,
                         temperature=args.temperature if args.temperature is not None else cfg.eval.temperature,
                         fresh=fresh, self_offset=self_offset, optimizer_from=args.optimizer_from,
                         fresh_eval=fresh_eval)
        print(json.dumps(record), flush=True)
        append_jsonl(results_path, record)
        records.append(record)
    return records


if __name__ == "__main__":
    main()
