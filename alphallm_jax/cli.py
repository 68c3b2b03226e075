"""The one `alphallm` command: `alphallm SUBCOMMAND [--flags]`.

Each subcommand lives in `alphallm_jax/commands/<name>.py` and exposes `define_flags()` (absl flags,
defined only when that subcommand runs, so subcommands never clash) and `main(argv)`. Flags are parsed
by absl, configs by ml-collections `config_flags` (`--config=configs/x.py[:variant]`, `--config.a.b=v`).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

# name -> (module under alphallm_jax.commands, one-line help). Later stages register theirs here.
COMMANDS: dict[str, tuple[str, str]] = {
    "loop": ("loop", "the self-improvement loop: base, critics, imagination, search, SFT, CPL, report"),
    "generate": ("generate", "complete a prompt with a checkpoint (greedy with --temperature 0)"),
    "convert": ("convert", "convert a checkpoint between Hugging Face safetensors and orbax"),
    "init-model": ("init_model", "write a randomly initialised model of a preset to a directory"),
    "train-base": ("train_base", "train and evaluate the built-in demo's tiny base policy"),
    "train-critics": ("train_critics", "train the value/PRM/ORM critics on policy rollouts; calibrate; rerank best-of-k"),
    "eval": ("eval", "evaluate a checkpoint on a dataset split with the config's methods"),
    "train-policy": ("train_policy", "self-improvement on search trees: --train.method=sft|dpo (CPL orderings)"),
    "search": ("search", "eta-MCTS (or beam search) with the critics over a split or prompts: trees + summary"),
    "view-tree": ("view_tree", "render a search tree (JSONL) as a self-contained HTML page"),
    "synthesize": ("synthesize", "imagination: new prompts from D0 written by a policy, filtered; counts per filter"),
    "sweep": ("sweep", "evaluation methods x budgets x checkpoints (a loop run's policies), sharded: one table, one plot"),
    "plan": ("plan", "per-device memory of every model on the configured mesh, computed abstractly (no memory)"),
    "bench": ("bench", "benchmarks with side-by-side ratios: `alphallm bench {sampler,train,search,decode} --out F.json`"),
}
# `alphallm bench NAME` runs alphallm_jax.commands.bench_NAME.
BENCHMARKS = ("sampler", "train", "search", "decode")


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: alphallm SUBCOMMAND [--flags]   (alphallm SUBCOMMAND --help for its flags)", ""]
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
    # XLA:CPU fusions measured to speed up training (train/xla_flags.py); set before JAX starts, never
    # overriding the user's XLA_FLAGS (benchmarks choose their own flag sets).
    from alphallm_jax.train.xla_flags import apply_xla_flags

    if not name.startswith("bench"):
        apply_xla_flags()
    # JAX probes for a TPU at start-up and logs its absence at INFO; that is noise on CPU and GPU hosts.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    # Compiled programs persist across runs and processes (utils/compile_cache.py; ALPHALLM_COMPILATION_CACHE).
    from alphallm_jax.utils.compile_cache import enable_compilation_cache

    enable_compilation_cache()
    # Join a multi-host runtime when the environment describes one (launch/*.sh), before any backend use.
    from alphallm_jax.utils.distributed import maybe_initialize_distributed

    maybe_initialize_distributed()
    module = importlib.import_module(f"alphallm_jax.commands.{module_name}")

    from absl import app, flags
    from absl import logging as absl_logging
    from ml_collections import config_flags

    def run_quietly(argv):
        # Orbax and absl log every checkpoint at INFO; keep the console for progress bars and
        # summaries unless the user asks for more with --verbosity.
        if not any(a.startswith(("--verbosity", "-v")) for a in rest):
            absl_logging.set_verbosity(absl_logging.WARNING)
        config = flags.FLAGS["config"].value if "config" in flags.FLAGS else None
        from alphallm_jax.utils.io import url_paths

        workdir = flags.FLAGS["workdir"].value if "workdir" in flags.FLAGS else None
        directories = [f"--{f}={flags.FLAGS[f].value}" for f in ("checkpoint", "src", "dst")
                       if f in flags.FLAGS and "://" in str(flags.FLAGS[f].value or "")]
        if urls := url_paths(workdir, config) + directories:
            print(f"alphallm {name}: {', '.join(urls)}: checkpoints and run directories are read and written "
                  f"through the filesystem (orbax, safetensors, SentencePiece); mount the bucket (gcsfuse: "
                  f"`gcsfuse --implicit-dirs BUCKET /mnt/BUCKET` on every host) and pass the mounted path. "
                  f"Data files (JSONL splits, prompts files) may be gs:// URLs.", file=sys.stderr)
            sys.exit(2)
        if config is not None:  # a typo inside the config file itself
            from alphallm_jax.config import unknown_config_keys

            source = config_flags.get_config_filename(flags.FLAGS["config"])
            problems = unknown_config_keys(config)
            if problems:
                print(f"alphallm {name}: {source}: " + "; ".join(problems), file=sys.stderr)
                sys.exit(2)
            # A preset sized its accumulation, remat and KV pools for its mesh before the overrides were
            # applied; an override of the mesh, a batch or a length needs them sized again.
            from alphallm_jax.paper_presets import resize_after_overrides

            # The overrides as absl parsed them (`--config.a=1`, `-config.a 1`, `--noconfig.flag`, flag files).
            overrides = [n[len("config."):] for n in flags.FLAGS if n.startswith("config.") and flags.FLAGS[n].present]
            try:
                resize_after_overrides(config, overrides, f"{source} with the command line's overrides")
            except ValueError as e:
                print(f"alphallm {name}: {e}", file=sys.stderr)
                sys.exit(2)
        return module.main(argv)

    config_path = (_config_spec(rest) or "").partition(":")[0]
    if config_path and not os.path.isfile(config_path):
        print(f"alphallm {name}: --config: no config file at {config_path} (from {os.getcwd()})", file=sys.stderr)
        sys.exit(2)
    if any(a in ("-h", "--help", "-help") for a in rest):
        module.define_flags()
        print(_command_help(name, module))
        sys.exit(0)
    try:
        module.define_flags()  # a default --config is loaded here, with the command line's overrides
        app.run(run_quietly, argv=[f"alphallm {name}", *rest])
    except (KeyError, AttributeError) as e:
        # ml-collections reports an override of a field the config lacks as a bare `'key'` deep in absl's
        # flag parsing; name the override and the valid keys instead.
        if flags.FLAGS.is_parsed() or not any(a.startswith("--config.") for a in rest):
            raise
        print(f"alphallm {name}: {_override_error(rest, e, _config_for_message(rest))}", file=sys.stderr)
        sys.exit(2)


def _command_help(name: str, module) -> str:
    """`alphallm NAME --help`: the command's docstring and the flags this project defines for it (absl's
    own --help lists only the flags of the main module, which are none here)."""
    from absl import flags

    doc = (module.__doc__ or "").strip()
    lines = [doc or f"alphallm {name}", ""]
    for owner in sorted(flags.FLAGS.flags_by_module_dict()):
        if owner.startswith("alphallm_jax"):
            lines.append(flags.FLAGS.module_help(owner).strip())
    lines += ["", "Config fields are set with --config.SECTION.KEY=VALUE; --helpfull lists absl's and JAX's flags too."]
    return "\n".join(lines)


def _config_spec(args: list[str]) -> str | None:
    """The `--config` value on the command line (PATH[:VARIANT]), or None."""
    spec = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), None)
    if spec is None and "--config" in args[:-1]:
        spec = args[args.index("--config") + 1]
    return spec


def _config_for_message(args: list[str]):
    """The config that `--config` (or the demo default) names, loaded again for an error message; None
    when it cannot be."""
    from alphallm_jax.commands import DEMO_CONFIG
    from alphallm_jax.config import load_config_file

    spec = _config_spec(args)
    try:
        return load_config_file(spec or DEMO_CONFIG, check_keys=False)
    except Exception:  # the message goes out without the key list
        return None


def _override_error(args: list[str], error: Exception, config) -> str:
    """The message for a `--config.a.b=v` override whose path the config does not have: the override,
    the missing field and the valid keys where it was looked up."""
    while error.args and isinstance(error.args[0], BaseException):  # AttributeError(KeyError(...))
        error = error.args[0]
    text = str(error.args[0]) if error.args else str(error)
    missing, _, hint = text.partition("\n")
    missing, hint = missing.strip("'\""), hint.strip()
    paths = [a.split("=", 1)[0][len("--config."):] for a in args if a.startswith("--config.")]
    path = next((p for p in paths if missing in p.split(".")), None)
    where = f"--config.{path}" if path else "a --config.* override"
    message = f"{where}: the config has no field {missing!r}" + (f" ({hint})" if hint else "")
    section, prefix = config, "config"
    for key in (path.split(".") if path else []):
        if key == missing or not hasattr(section, "keys") or key not in section:
            break
        section, prefix = section[key], f"{prefix}.{key}"
    if hasattr(section, "keys"):
        message += f"; valid keys of {prefix}: {', '.join(sorted(section.keys()))}"
    return message


if __name__ == "__main__":
    main()
