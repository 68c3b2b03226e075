"""`alphallm bench sampler`: this engine against transformers' `generate` on the same weights.

A random ~30M-parameter Llama (`bench_30m` preset), fp32, greedy, a fixed prompt length and exactly
`new_tokens` new tokens per row (no EOS), at several batch sizes. Both sides are timed in the same
run on the same machine (medians after warm-up), and the roofline fraction is taken against a matmul
peak measured in the same run.
"""

from __future__ import annotations

import tempfile

import jax
import numpy as np
from tqdm import tqdm

from alphallm_jax.benchmarks.common import machine_info, matmul_peak_flops, median_seconds, usable_cores
from alphallm_jax.models import create_model, presets
from alphallm_jax.sampling import Sampler, SampleRequest
from alphallm_jax.train.xla_flags import FLAG_SETS, apply_xla_flags


def generation_flops(cfg, batch: int, prompt_len: int, new_tokens: int) -> float:
    """Matmul FLOPs of prefilling `prompt_len` tokens and decoding `new_tokens` for `batch` rows."""
    d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    per_token_weights = cfg.num_layers * (2 * d * (cfg.num_heads + 2 * cfg.num_kv_heads) * h
                                          + 2 * cfg.num_heads * h * d + 6 * d * f) + 2 * d * cfg.vocab_size
    # Attention: scores and weighted values, 4 * heads * head_dim FLOPs per (query, key) pair.
    attn_pairs = prompt_len * (prompt_len + 1) / 2 + sum(prompt_len + i for i in range(new_tokens))
    attention = cfg.num_layers * 4 * cfg.num_heads * h * attn_pairs
    # The engine projects only the last prompt position to the vocabulary.
    lm_head_skipped = (prompt_len - 1) * 2 * d * cfg.vocab_size
    return batch * (per_token_weights * (prompt_len + new_tokens) + attention - lm_head_skipped)


def run(*, batch_sizes=(1, 16, 64), prompt_len: int = 128, new_tokens: int = 64, repeats: int = 5,
        compare_hf: bool = True, preset: str = "bench_30m", seed: int = 0,
        xla_cpu_flags: str = "recommended") -> dict:
    """Runs the benchmark and returns the JSON-ready result.

    ``xla_cpu_flags`` names a flag set of ``alphallm_jax.train.xla_flags.FLAG_SETS``; "recommended" is
    the one every other command runs with. It is applied first, which only works before JAX starts its
    backend; the result records what was applied.
    """
    flags_added = apply_xla_flags(FLAG_SETS[xla_cpu_flags])
    cfg = presets.get(preset)
    model = create_model(cfg, seed=seed)
    # No padding of small batches to MIN_ROWS: batch 1 is a latency measurement, and 8 padded rows
    # would cost 8x its prefill compute on CPU.
    sampler = Sampler(model, None, max_len=prompt_len + new_tokens, eos_ids=(), min_rows=1)
    rng = np.random.default_rng(seed)
    peak = matmul_peak_flops()
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
        flops = generation_flops(cfg, batch, prompt_len, new_tokens)
        row["roofline_fraction"] = flops / peak / ours_s
        if hf_model is not None:
            hf_s, hf_all, agree = _time_hf(hf_model, prompts, new_tokens, repeats, ours()[0].token_ids)
            row.update(hf_seconds=hf_s, hf_tokens_per_s=batch * new_tokens / hf_s, hf_all_seconds=hf_all,
                       ratio=hf_s / ours_s, first_row_tokens_agree=agree)
        rows.append(row)
    return {
        "benchmark": "sampler",
        "model": {"preset": preset, "param_count": cfg.param_count(), "dtype": cfg.dtype},
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "decoding": "greedy, exactly new_tokens per row",
        "matmul_peak_flops": peak,
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
