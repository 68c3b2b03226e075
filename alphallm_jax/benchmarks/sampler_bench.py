"""`alphallm bench sampler`: this engine against transformers' `generate` on the same weights.

A random ~30M-parameter Llama (`bench_30m` preset), fp32, greedy, a fixed prompt length and exactly
`new_tokens` new tokens per row (no EOS), at several batch sizes. Both sides are timed in the same
run on the same machine (medians after warm-up), and the roofline fraction is taken against a matmul
peak measured in the same run.

`roofline_fraction` counts compute alone (FLOPs over that peak). Decoding a few rows is bound by memory
instead: every step reads all the weights. So each row also carries a two-sided roofline (`roofline`):
each phase (the prefill, each decode step) takes the longer of its FLOPs at the matmul peak and its
bytes at a streaming bandwidth measured in the same run (`generation_phases`), and `ratio_ceiling` is
the ratio to transformers that an engine running exactly at that roofline would show.
"""

from __future__ import annotations

import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from alphallm_jax.benchmarks.common import (
    machine_info,
    matmul_peak_flops,
    measure_stream_bandwidth,
    median_seconds,
    require_torch,
    usable_cores,
)
from alphallm_jax.models import create_model, presets
from alphallm_jax.sampling import Sampler, SampleRequest
from alphallm_jax.train.xla_flags import FLAG_SETS, apply_xla_flags


def _per_token_weight_flops(cfg) -> float:
    """Matmul FLOPs of one token through every layer and the vocabulary projection."""
    d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    return cfg.num_layers * (2 * d * (cfg.num_heads + 2 * cfg.num_kv_heads) * h
                             + 2 * cfg.num_heads * h * d + 6 * d * f) + 2 * d * cfg.vocab_size


def generation_phases(cfg, batch: int, prompt_len: int, new_tokens: int, prefill_blocks: int = 1) -> list[dict]:
    """FLOPs and the fewest bytes any engine must move, per phase of greedy generation: the prefill of
    `prompt_len` tokens per row, then `new_tokens - 1` decode steps (the first new token comes from the
    prefill's logits, the last one is never fed back).

    Bytes: every weight the phase's forward pass multiplies by, read once per pass (a prefill in
    `prefill_blocks` row blocks reads them once per block; the embedding table is gathered, not read,
    unless it doubles as the vocabulary projection), plus the KV cache a step must read (each row's
    context so far, which is all an ideal engine touches) and write. Activations are left out: they stay
    in the caches at these sizes.
    """
    d, h, layers = cfg.hidden_size, cfg.head_dim, cfg.num_layers
    param_bytes = jnp.dtype(cfg.param_dtype).itemsize
    weight_bytes = (cfg.param_count() - (0 if cfg.tie_word_embeddings else cfg.vocab_size * d)) * param_bytes
    kv_bytes_per_token = layers * 2 * cfg.num_kv_heads * h * jnp.dtype(cfg.dtype).itemsize
    attention_per_pair = layers * 4 * cfg.num_heads * h  # scores and weighted values per (query, key)
    per_token = _per_token_weight_flops(cfg)
    # The engine projects only the last prompt position to the vocabulary.
    prefill_flops = batch * (per_token * prompt_len - (prompt_len - 1) * 2 * d * cfg.vocab_size
                             + attention_per_pair * prompt_len * (prompt_len + 1) / 2)
    phases = [{"phase": "prefill", "flops": prefill_flops,
               "bytes": prefill_blocks * weight_bytes + batch * prompt_len * kv_bytes_per_token}]
    for step in range(1, new_tokens):
        context = prompt_len + step  # keys the step's query sees, its own included
        phases.append({"phase": "decode", "flops": batch * (per_token + attention_per_pair * context),
                       "bytes": weight_bytes + batch * context * kv_bytes_per_token})
    return phases


def roofline(phases: list[dict], peak_flops: float, bandwidth_bytes_per_s: float) -> dict:
    """Seconds at the roofline: each phase bound by its compute at `peak_flops` or its bytes at
    `bandwidth_bytes_per_s`, whichever takes longer, summed over phases."""
    compute = [p["flops"] / peak_flops for p in phases]
    memory = [p["bytes"] / bandwidth_bytes_per_s for p in phases]
    return {"compute_seconds": sum(compute), "memory_seconds": sum(memory),
            "bound_seconds": sum(max(c, m) for c, m in zip(compute, memory)),
            "memory_bound_phases": sum(m > c for c, m in zip(compute, memory))}


def run(*, batch_sizes=(1, 16, 64), prompt_len: int = 128, new_tokens: int = 64, repeats: int = 5,
        compare_hf: bool = True, preset: str = "bench_30m", seed: int = 0,
        xla_cpu_flags: str = "recommended") -> dict:
    """Runs the benchmark and returns the JSON-ready result.

    ``xla_cpu_flags`` names a flag set of ``alphallm_jax.train.xla_flags.FLAG_SETS``; "recommended" is
    the one every other command runs with. It is applied first, which only works before JAX starts its
    backend; the result records what was applied.
    """
    if compare_hf:
        require_torch("compare_hf")
    flags_added = apply_xla_flags(FLAG_SETS[xla_cpu_flags])
    cfg = presets.get(preset)
    model = create_model(cfg, seed=seed)
    # No padding of small batches to MIN_ROWS: batch 1 is a latency measurement, and 8 padded rows
    # would cost 8x its prefill compute on CPU.
    sampler = Sampler(model, None, max_len=prompt_len + new_tokens, eos_ids=(), min_rows=1)
    rng = np.random.default_rng(seed)
    peak = matmul_peak_flops()
    bandwidth = measure_stream_bandwidth()["median_bytes_per_s"]
    hf_model = _hf_copy(model, cfg) if compare_hf else None

    rows = []
    for batch in tqdm(batch_sizes, desc="bench sampler"):
        prompts = rng.integers(3, cfg.vocab_size, size=(batch, prompt_len)).tolist()

        def ours(prompts=prompts):
            reqs = [SampleRequest(state=sampler.new_state(p), max_new_tokens=new_tokens, temperature=0.0)
                    for p in prompts]
            out = sampler.sample(reqs, keep_states=False)
            assert all(len(c.token_ids) == new_tokens for c in out)
            return out

        ours_s, ours_all = median_seconds(ours, repeats=repeats, warmup=2)
        row = {"batch": batch, "ours_seconds": ours_s, "ours_tokens_per_s": batch * new_tokens / ours_s,
               "ours_all_seconds": ours_all}
        phases = generation_phases(cfg, batch, prompt_len, new_tokens)
        row["roofline_fraction"] = sum(p["flops"] for p in phases) / peak / ours_s
        bound = roofline(phases, peak, bandwidth)
        row["roofline"] = {**bound, "fraction": bound["bound_seconds"] / ours_s}
        if hf_model is not None:
            hf_s, hf_all, agree = _time_hf(hf_model, prompts, new_tokens, repeats, ours()[0].token_ids)
            row.update(hf_seconds=hf_s, hf_tokens_per_s=batch * new_tokens / hf_s, hf_all_seconds=hf_all,
                       ratio=hf_s / ours_s, first_row_tokens_agree=agree)
            # The ratio an engine running exactly at the roofline would show against this transformers run.
            row["roofline"]["ratio_ceiling"] = hf_s / bound["bound_seconds"]
        rows.append(row)
    return {
        "benchmark": "sampler",
        "model": {"preset": preset, "param_count": cfg.param_count(), "dtype": cfg.dtype},
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "decoding": "greedy, exactly new_tokens per row",
        "matmul_peak_flops": peak,
        "stream_bandwidth_bytes_per_s": bandwidth,
        "rows": rows,
        "xla_cpu_flag_set": xla_cpu_flags,
        "machine": {**machine_info(), "xla_flags_added": flags_added},
    }


def _hf_copy(model, cfg):
    """The same weights in transformers' LlamaForCausalLM, through the project's HF export."""
    import torch
    import transformers

    from alphallm_jax.models.hf_io import save_hf_checkpoint

    torch.set_num_threads(len(jax.devices("cpu")) if jax.default_backend() != "cpu" else usable_cores())
    with tempfile.TemporaryDirectory() as tmp:
        save_hf_checkpoint(model, cfg, tmp)
        hf_model = transformers.LlamaForCausalLM.from_pretrained(tmp, torch_dtype=torch.float32)
    return hf_model.eval()


def _time_hf(hf_model, prompts, new_tokens, repeats, our_first_row):
    import torch

    input_ids = torch.tensor(prompts)
    attention_mask = torch.ones_like(input_ids)

    def hf():
        with torch.inference_mode():
            return hf_model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                                     pad_token_id=0, use_cache=True)

    seconds, all_seconds = median_seconds(hf, repeats=repeats, warmup=1)
    agree = hf()[0, len(prompts[0]):].tolist() == our_first_row
    return seconds, all_seconds, agree
