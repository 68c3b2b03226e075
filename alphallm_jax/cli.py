"""The one `alphallm` command: `alphallm SUBCOMMAND [--flags]`.

Each subcommand lives in `alphallm_jax/commands/<name>.py` and exposes `define_flags()` (absl flags,
defined only when that subcommand runs, so subcommands never clash) and `main(argv)`. Flags are parsed
by absl, configs by ml-collections `config_flags` (`--config=configs/x.py[:variant]`, `--config.a.b=v`).
"""

from __future__ import annotations

import importlib
import logging
import sys

# name -> (module under alphallm_jax.commands, one-line help). Later stages register theirs here.
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("generate", "complete a prompt with a checkpoint (greedy with --temperature 0)"),
    "convert": ("convert", "convert a checkpoint between Hugging Face safetensors and orbax"),
    "init-model": ("init_model", "write a randomly initialised model of a preset to a directory"),
    "train-base": ("train_base", "train and evaluate the built-in demo's tiny base policy"),
    "eval": ("eval", "evaluate a checkpoint on a dataset split with the config's methods"),
    "bench": ("bench", "benchmarks with side-by-side ratios: `alphallm bench {sampler,train} --out F.json`"),
}
# `alphallm bench NAME` runs alphallm_jax.commands.bench_NAME.
BENCHMARKS = ("sampler", "train")


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: alphallm SUBCOMMAND [--flags]   (alphallm SUBCOMMAND --helpfull for its flags)", ""]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(_usage())
        sys.exit(0 if len(argv) >= 2 else 2)
    name = argv[1]
    if name not in COMMANDS:
        print(f"alphallm: unknown subcommand {name!r}\n\n{_usage()}", file=sys.stderr)
        sys.exit(2)
    rest = argv[2:]
    module_name = COMMANDS[name][0]
    if name == "bench":
        if not rest or rest[0] not in BENCHMARKS:
            print(f"usage: alphallm bench {{{','.join(BENCHMARKS)}}} [--flags]", file=sys.stderr)
            sys.exit(2)
        module_name, name, rest = f"bench_{rest[0]}", f"bench {rest[0]}", rest[1:]
    # JAX probes for a TPU at start-up and logs its absence at INFO; that is noise on CPU and GPU hosts.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    module = importlib.import_module(f"alphallm_jax.commands.{module_name}")
    module.define_flags()

    from absl import app

    app.run(module.main, argv=[f"alphallm {name}", *rest])


if __name__ == "__main__":
    main()
