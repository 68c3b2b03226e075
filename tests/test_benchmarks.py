"""The sampler benchmark's accounting (FLOPs and bytes per phase, the two-sided roofline) and a tiny
end-to-end run of it against transformers; the decode benchmark (one KV chunk vs slot chunks) end to end."""

import dataclasses
import math

import pytest

from alphallm_jax.benchmarks import decode_bench
from alphallm_jax.benchmarks.common import measure_stream_bandwidth
from alphallm_jax.benchmarks.sampler_bench import generation_phases, roofline, run
from alphallm_jax.models import presets

# d=8, f=16, 2 layers, 2 heads and 1 KV head of size 4, vocabulary 32: small enough to count by hand.
CFG = presets.get("tiny", vocab_size=32, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2,
                  num_kv_heads=1, head_dim=4)


def test_generation_phases_counted_by_hand():
    d, f, h, v, layers = 8, 16, 4, 32, 2
    # Per token: q (d x 2h), k and v (d x h each), o (2h x d), gate/up/down (3 d x f), then the vocabulary.
    per_token = layers * 2 * (d * 2 * h + 2 * d * h + 2 * h * d + 3 * d * f) + 2 * d * v
    per_pair = layers * 4 * 2 * h
    batch, prompt, new = 3, 5, 4
    phases = generation_phases(CFG, batch, prompt, new)
    assert [p["phase"] for p in phases] == ["prefill"] + ["decode"] * (new - 1)

    prefill = batch * (per_token * prompt - (prompt - 1) * 2 * d * v + per_pair * prompt * (prompt + 1) / 2)
    assert phases[0]["flops"] == pytest.approx(prefill)
    for step, phase in enumerate(phases[1:], start=1):
        assert phase["flops"] == pytest.approx(batch * (per_token + per_pair * (prompt + step)))

    # Bytes: the weights but the (gathered) embedding table, 4 bytes each, and the KV cache per token:
    # 2 layers x (k, v) x 1 head x 4 x 4 bytes.
    weights = (CFG.param_count() - v * d) * 4
    kv_per_token = layers * 2 * 1 * h * 4
    assert phases[0]["bytes"] == weights + batch * prompt * kv_per_token
    assert phases[2]["bytes"] == weights + batch * (prompt + 2) * kv_per_token
    assert generation_phases(CFG, batch, prompt, new, prefill_blocks=2)[0]["bytes"] == (
        2 * weights + batch * prompt * kv_per_token)
    tied = dataclasses.replace(CFG, tie_word_embeddings=True)
    assert generation_phases(tied, 1, prompt, 2)[1]["bytes"] == tied.param_count() * 4 + (prompt + 1) * kv_per_token


def test_roofline_takes_the_slower_side_per_phase():
    phases = [{"flops": 100.0, "bytes": 10.0}, {"flops": 1.0, "bytes": 50.0}, {"flops": 4.0, "bytes": 4.0}]
    bound = roofline(phases, peak_flops=10.0, bandwidth_bytes_per_s=5.0)
    assert bound["compute_seconds"] == pytest.approx(10.0 + 0.1 + 0.4)
    assert bound["memory_seconds"] == pytest.approx(2.0 + 10.0 + 0.8)
    assert bound["bound_seconds"] == pytest.approx(10.0 + 10.0 + 0.8)
    assert bound["memory_bound_phases"] == 2


def test_stream_bandwidth_is_measured():
    result = measure_stream_bandwidth(matrices=3, rows=256, cols=512, repeats=3)
    assert result["bytes"] == 3 * 256 * 512 * 4
    assert 0 < result["median_bytes_per_s"] <= result["best_bytes_per_s"] < math.inf


def test_sampler_bench_runs_end_to_end_against_transformers():
    pytest.importorskip("transformers")
    result = run(batch_sizes=(1, 2), prompt_len=8, new_tokens=4, repeats=1, preset="tiny")
    assert [row["batch"] for row in result["rows"]] == [1, 2]
    for row in result["rows"]:
        assert row["first_row_tokens_agree"]
        assert row["ratio"] == pytest.approx(row["hf_seconds"] / row["ours_seconds"])
        bound = row["roofline"]
        assert bound["bound_seconds"] >= max(bound["compute_seconds"], bound["memory_seconds"]) > 0
        assert bound["fraction"] == pytest.approx(bound["bound_seconds"] / row["ours_seconds"])
        assert bound["ratio_ceiling"] == pytest.approx(row["hf_seconds"] / bound["bound_seconds"])
    assert result["stream_bandwidth_bytes_per_s"] > 0


def test_decode_bench_times_both_cache_layouts_on_the_same_contents():
    result = decode_bench.run(preset="tiny", rows=4, cache_len=32, fills=(3, 20), chunk_slots=8, repeats=2,
                              steps_per_repeat=1)
    assert [row["fill"] for row in result["fills"]] == [3, 20]
    for row in result["fills"]:
        assert row["speedup"] == pytest.approx(row["one_chunk_step_seconds"] / row["chunked_step_seconds"])
        assert row["max_abs_logit_difference"] < 1e-4  # the same cache contents, split into 4 chunks
    with pytest.raises(ValueError, match="below cache_len"):
        decode_bench.run(preset="tiny", rows=4, cache_len=32, fills=(32,))


def test_demo_policy_preset_is_the_demo_configs_policy():
    from tests.helpers import load_config

    cfg = load_config("demo_arith", None)
    preset = presets.get("demo_policy")
    assert preset.vocab_size == cfg.base.tokenizer_vocab_size
    for key, value in cfg.base.model.items():
        assert getattr(preset, key) == value, key


def test_search_bench_variants_are_typed_config_overrides_and_typos_name_the_valid_keys():
    from alphallm_jax.commands.bench_search import variant_config
    from alphallm_jax.config import default_config

    cfg = default_config()
    fine = variant_config(cfg, "sampling.fine_row_buckets=true, critics.scoring.fine_row_buckets=1,search.mcts.c_uct=0.5")
    assert fine.sampling.fine_row_buckets is True and fine.critics.scoring.fine_row_buckets is True
    assert fine.search.mcts.c_uct == 0.5 and cfg.sampling.fine_row_buckets is False  # the original is untouched
    with pytest.raises(ValueError, match="no key 'sampling.fine_row_bucket'; valid keys of config.sampling: .*fine_row_buckets"):
        variant_config(cfg, "sampling.fine_row_bucket=true")
    with pytest.raises(ValueError, match="not a boolean"):
        variant_config(cfg, "sampling.fine_row_buckets=maybe")
    with pytest.raises(ValueError, match="not KEY=VALUE"):
        variant_config(cfg, "sampling.fine_row_buckets")
    with pytest.raises(ValueError, match="'sampling=1': a config section, not a value"):
        variant_config(cfg, "sampling=1")


def test_a_pytorch_comparison_without_pytorch_stops_before_timing(monkeypatch):
    import importlib.util

    from alphallm_jax.benchmarks.common import require_torch

    require_torch("compare_hf")  # installed with the test extras: passes
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    with pytest.raises(SystemExit, match=r"--compare_hf times PyTorch .*pip install -e .*or pass --nocompare_hf"):
        require_torch("compare_hf")
