"""`alphallm convert`: Hugging Face safetensors <-> orbax checkpoints (tokenizer files travel along)."""

from __future__ import annotations

from absl import flags


def define_flags() -> None:
    flags.DEFINE_string("src", None, "Source checkpoint directory (HF or orbax).", required=True)
    flags.DEFINE_string("dst", None, "Destination directory (must not exist).", required=True)
    flags.DEFINE_enum("to", None, ["hf", "orbax"], "Destination format.", required=True)
    flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16"], "Dtype of the written weights.")


def main(argv) -> None:
    del argv
    from etils import epath

    from alphallm_jax import load_pretrained
    from alphallm_jax.models.hf_io import save_hf_checkpoint
    from alphallm_jax.utils.checkpoint import save_model

    f = flags.FLAGS
    if epath.Path(f.dst).exists():
        raise FileExistsError(f"destination {f.dst} exists; choose a new directory")
    model, tokenizer = load_pretrained(f.src, dtype="float32", param_dtype=f.param_dtype)
    if f.to == "hf":
        save_hf_checkpoint(model, model.cfg, f.dst, tokenizer=tokenizer)
    else:
        save_model(model, model.cfg, f.dst, tokenizer=tokenizer)
    print(f"wrote {f.to} checkpoint to {f.dst} ({model.cfg.param_count():,} parameters)")
