"""`alphallm convert`: Hugging Face safetensors <-> orbax checkpoints (tokenizer files travel along)."""

from __future__ import annotations

from absl import flags


def define_flags() -> None:
    flags.DEFINE_string("src", None, "Source checkpoint directory (HF or orbax).", required=True)
    flags.DEFINE_string("dst", None, "Destination directory (must not exist).", required=True)
    flags.DEFINE_enum("to", None, ["hf", "orbax"], "Destination format.", required=True)
    flags.DEFINE_enum("param_dtype", None, ["float32", "bfloat16"], "Dtype of the written weights (default: the source's).")


def main(argv) -> None:
    del argv
    from etils import epath

    from alphallm_jax.models import Tokenizer, check_tokenizer_matches
    from alphallm_jax.models.hf_io import CONFIG_FILE, hf_param_dtype, load_hf_checkpoint, save_hf_checkpoint
    from alphallm_jax.utils.checkpoint import MODEL_CONFIG_FILE, restore_model, save_model

    f = flags.FLAGS
    src = epath.Path(f.src)
    if epath.Path(f.dst).exists():
        raise FileExistsError(f"destination {f.dst} exists; choose a new directory")
    if (src / MODEL_CONFIG_FILE).exists():
        model, cfg = restore_model(src, param_dtype=f.param_dtype)
    elif (src / CONFIG_FILE).exists():
        model, cfg = load_hf_checkpoint(src, param_dtype=f.param_dtype or hf_param_dtype(src))
    else:
        raise FileNotFoundError(f"{src} has neither {CONFIG_FILE} (HF) nor {MODEL_CONFIG_FILE} (orbax)")
    tokenizer = Tokenizer.from_dir(src)
    check_tokenizer_matches(tokenizer, cfg, src)
    if f.to == "hf":
        save_hf_checkpoint(model, cfg, f.dst, tokenizer=tokenizer)
    else:
        save_model(model, cfg, f.dst, tokenizer=tokenizer)
    print(f"wrote {f.to} checkpoint to {f.dst} ({cfg.param_count():,} parameters)")
