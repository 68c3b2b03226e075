"""`alphallm bench decode --out FILE.json`: a decode step with the KV cache as one chunk vs in slot
chunks (attention skips the chunks no row has reached), at several cache fills, side by side."""

from __future__ import annotations

from absl import flags


def define_flags() -> None:
    flags.DEFINE_string("out", None, "Write the JSON result here (also printed).")
    flags.DEFINE_string("preset", "demo_policy", "Model preset.")
    flags.DEFINE_integer("rows", 128, "Rows decoded per step.")
    flags.DEFINE_integer("cache_len", 256, "KV cache slots.")
    flags.DEFINE_list("fills", ["32", "96", "160", "250"], "Cached positions per row before the step.")
    flags.DEFINE_integer("chunk_slots", 64, "Slots per chunk of the chunked cache.")
    flags.DEFINE_integer("repeats", 15, "Timed repeats per layout (medians are reported).")
    from alphallm_jax.train.xla_flags import define_flag_set_flag

    define_flag_set_flag()


def main(argv) -> None:
    del argv
    from alphallm_jax.benchmarks.decode_bench import run
    from alphallm_jax.utils.io import atomic_write_json

    f = flags.FLAGS
    result = run(preset=f.preset, rows=f.rows, cache_len=f.cache_len, fills=tuple(int(x) for x in f.fills),
                 chunk_slots=f.chunk_slots, repeats=f.repeats, xla_cpu_flags=f.xla_cpu_flags)
    print(f"{result['model']['preset']}, {f.rows} rows, {f.cache_len} slots, chunks of {f.chunk_slots}:")
    for row in result["fills"]:
        print(f"fill {row['fill']:>4}: one chunk {row['one_chunk_step_seconds'] * 1e3:7.2f} ms  chunked "
              f"{row['chunked_step_seconds'] * 1e3:7.2f} ms  speed-up {row['speedup']:.2f} "
              f"(per pair {row['per_pair_speedup_median']:.2f}); logits differ by "
              f"{row['max_abs_logit_difference']:.1e}")
    if f.out:
        atomic_write_json(f.out, result)
        print(f"wrote {f.out}")
