"""`alphallm bench sampler [--compare_hf] --out FILE.json`: tokens/s of the sampler vs transformers."""

from __future__ import annotations

from absl import flags


def define_flags() -> None:
    flags.DEFINE_string("out", None, "Write the JSON result here (also printed).")
    flags.DEFINE_bool("compare_hf", True, "Also time transformers' generate on the same weights.")
    flags.DEFINE_list("batch_sizes", ["1", "16", "64"], "Batch sizes.")
    flags.DEFINE_integer("prompt_len", 128, "Prompt tokens per row.")
    flags.DEFINE_integer("new_tokens", 64, "New tokens per row.")
    flags.DEFINE_integer("repeats", 5, "Timed repeats per side (the median is reported).")
    flags.DEFINE_string("preset", "bench_30m", "Model preset.")
    from alphallm_jax.train.xla_flags import define_flag_set_flag

    define_flag_set_flag()


def main(argv) -> None:
    del argv
    from alphallm_jax.benchmarks.sampler_bench import run
    from alphallm_jax.utils.io import atomic_write_json

    f = flags.FLAGS
    result = run(batch_sizes=tuple(int(b) for b in f.batch_sizes), prompt_len=f.prompt_len,
                 new_tokens=f.new_tokens, repeats=f.repeats, compare_hf=f.compare_hf, preset=f.preset,
                 xla_cpu_flags=f.xla_cpu_flags)
    for row in result["rows"]:
        line = f"batch {row['batch']:>3}: ours {row['ours_tokens_per_s']:9.1f} tok/s"
        if "hf_tokens_per_s" in row:
            line += f"  hf {row['hf_tokens_per_s']:9.1f} tok/s  ratio {row['ratio']:5.2f}"
        line += f"  roofline fraction {row['roofline_fraction']:.3f} (compute), {row['roofline']['fraction']:.3f}"
        line += " (compute and memory)"
        if "ratio_ceiling" in row["roofline"]:
            line += f"; ratio at that roofline {row['roofline']['ratio_ceiling']:.2f}"
        print(line)
    print(f"matmul peak {result['matmul_peak_flops'] / 1e9:.0f} GFLOP/s, streaming "
          f"{result['stream_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s")
    if f.out:
        atomic_write_json(f.out, result)
        print(f"wrote {f.out}")
