"""`alphallm` subcommands: each module defines `define_flags()` and `main(argv)`."""

from __future__ import annotations

import os


def _demo_config() -> str:
    """The built-in demo's config: from the working directory (the repository root, as the README runs
    it), else beside the installed package's sources (a run from another directory)."""
    local = os.path.join("configs", "demo_arith.py")
    packaged = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), local)
    return local if os.path.isfile(local) or not os.path.isfile(packaged) else packaged


DEMO_CONFIG = _demo_config()


def define_config_flag(default: str | None = None) -> None:
    """`--config=configs/x.py[:variant]` (ml-collections, locked: a typo in `--config.a.b` fails and names
    the key); required when there is no default."""
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", default, "Config file (configs/*.py[:variant]).", lock_config=True)
    if default is None:
        flags.mark_flag_as_required("config")


def define_run_flags(default_config: str | None = None, workdir_help: str = "Output directory (resumable).") -> None:
    """`--config` as above and the required `--workdir`."""
    from absl import flags

    define_config_flag(default_config)
    flags.DEFINE_string("workdir", None, workdir_help, required=True)
