"""`alphallm init-model`: a randomly initialised model of a named preset, written as a checkpoint.

Useful to try the tools without any download: e.g. the `tiny` preset with the Mistral tokenizer.
"""

from __future__ import annotations

from absl import flags


def define_flags() -> None:
    flags.DEFINE_string("preset", "tiny", "Model preset name (alphallm_jax.models.presets).")
    flags.DEFINE_string("tokenizer", None, "tokenizer.model (sentencepiece) or a directory with tokenizer files.",
                        required=True)
    flags.DEFINE_string("out", None, "Output directory (must not exist).", required=True)
    flags.DEFINE_enum("format", "hf", ["hf", "orbax"], "Checkpoint format.")
    flags.DEFINE_integer("seed", 0, "Initialisation seed.")


def main(argv) -> None:
    del argv
    from etils import epath

    from alphallm_jax.models import create_model, presets
    from alphallm_jax.models.hf_io import save_hf_checkpoint
    from alphallm_jax.models.tokenizer import Tokenizer
    from alphallm_jax.utils.checkpoint import save_model

    f = flags.FLAGS
    if epath.Path(f.out).exists():
        raise FileExistsError(f"output directory {f.out} exists; choose a new one")
    path = epath.Path(f.tokenizer)
    tokenizer = Tokenizer.from_dir(path) if path.is_dir() else Tokenizer.from_sentencepiece(path)
    cfg = presets.get(f.preset).replace(
        vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id, eos_token_ids=tuple(tokenizer.eos_ids),
        pad_token_id=tokenizer.pad_id)
    model = create_model(cfg, seed=f.seed)
    if f.format == "hf":
        save_hf_checkpoint(model, cfg, f.out, tokenizer=tokenizer)
    else:
        save_model(model, cfg, f.out, tokenizer=tokenizer)
    print(f"wrote a random {f.preset} model ({cfg.param_count():,} parameters) to {f.out}")
