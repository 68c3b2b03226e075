"""`alphallm generate`: complete a prompt with a checkpoint through the project's sampler."""

from __future__ import annotations

from absl import flags


def define_flags() -> None:
    flags.DEFINE_string("checkpoint", None, "Hugging Face or orbax checkpoint directory.", required=True)
    flags.DEFINE_multi_string("prompt", None, "Prompt text (repeat for a batch).", required=True)
    flags.DEFINE_integer("max_new_tokens", 64, "Most tokens to generate.")
    flags.DEFINE_float("temperature", 0.0, "0 is greedy.")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
    flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0: all).")
    flags.DEFINE_multi_string("stop", [], "Stop string (repeatable); '\\n' is a newline.")
    flags.DEFINE_integer("num_samples", 1, "Completions per prompt.")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
    flags.DEFINE_string("mesh", "", "Shard the model and the batch over a data,fsdp,tensor mesh of this "
                        "host's devices, e.g. 1,1,8 (one size may be -1); empty: one device.")


def unescape(text: str) -> str:
    """A flag value with its backslash escapes read (`\\n` is a newline); any other character, non-ASCII
    included, stays as typed."""
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def mesh_from_flag(text: str):
    """The --mesh value as a mesh over this host's devices, or None for one device."""
    import jax

    from alphallm_jax.models.sharding import mesh_or_none, parse_mesh_shape

    if not text:
        return None
    try:
        return mesh_or_none(parse_mesh_shape(text, jax.local_device_count()), jax.local_devices())
    except ValueError as e:
        raise SystemExit(f"alphallm generate: --mesh: {e}") from None


def main(argv) -> None:
    del argv
    from alphallm_jax import load_pretrained
    from alphallm_jax.sampling import Sampler

    f = flags.FLAGS
    mesh = mesh_from_flag(f.mesh)
    model, tokenizer = load_pretrained(f.checkpoint, dtype=f.dtype, mesh=mesh)
    stops = [unescape(s) for s in f.stop]  # let the shell pass "\n"
    prompt_tokens = max(len(tokenizer.encode(p, add_bos=True)) for p in f.prompt)
    sampler = Sampler(model, tokenizer, max_len=prompt_tokens + f.max_new_tokens, mesh=mesh)
    results = sampler.generate(
        f.prompt, max_new_tokens=f.max_new_tokens, temperature=f.temperature, top_p=f.top_p,
        top_k=f.top_k, stop=stops, num_samples=f.num_samples, seed=f.seed,
    )
    for prompt, completions in zip(f.prompt, results):
        for completion in completions:
            if len(f.prompt) > 1 or f.num_samples > 1:
                print(f"--- [{completion.finish_reason}, {len(completion.token_ids)} tokens] {prompt!r}")
            print(completion.text)
