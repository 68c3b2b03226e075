"""`alphallm bench train --out FILE.json`: SFT training throughput of our trainer vs PyTorch.

Both sides train the same ~30M-parameter Llama (`bench_30m`, float32) on the same batch and
sequence length, in the same process, with the same number of CPU threads:

* ours: `Trainer.fit` (the real loop: host batching, the jitted step with donated state, AdamW
  with clipping, loss on response tokens) on synthetic SFT examples; the time between consecutive
  steps is measured by a callback, so it includes everything the loop does per step;
* torch: transformers' `LlamaForCausalLM` (SDPA attention) loaded from our weights exported with
  `save_hf_checkpoint`, `torch.optim.AdamW`, `clip_grad_norm_`, labels -100 on prompt tokens, the
  same batches in the same order (the per-step losses of both sides are reported and compared).

XLA:CPU flags (`--xla_cpu_flags`, see `alphallm_jax.train.xla_flags`) are applied before JAX starts;
they do not affect torch. The machine may be shared: the load average is recorded, and the matmul
peak is measured before and after the runs (the best is used).

Reported: medians over the timed steps after warm-up, and model-FLOPs utilisation against a matmul
peak measured in the same run (best of several timed 2048x2048 float32 `jnp.matmul`s):

    mfu = (6 * N_matmul + 12 * L * S * H * Dh) * tokens_per_s / peak_flops

N_matmul counts every weight used in a matmul (attention, MLP, LM head; not the embedding lookup);
the second term is the attention score/value matmuls (forward + backward, no causal discount).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time

from absl import flags


def define_flags() -> None:
    flags.DEFINE_string("out", None, "Write the JSON result here (also printed).")
    flags.DEFINE_integer("batch_size", 8, "Sequences per step.")
    flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.")
    flags.DEFINE_integer("steps", 5, "Timed steps per side (the median is reported).")
    flags.DEFINE_integer("warmup", 2, "Untimed steps first (compilation, allocator warm-up).")
    flags.DEFINE_string("preset", "bench_30m", "Model preset.")
    flags.DEFINE_bool("compare_torch", True, "Also time the PyTorch AdamW loop on the same weights.")
    flags.DEFINE_integer("threads", 0, "CPU threads for torch (0: the cores this process may use).")
    from alphallm_jax.train.xla_flags import define_flag_set_flag

    define_flag_set_flag()


def flops_per_token(cfg, seq_len: int) -> tuple[float, int]:
    """(training FLOPs per token, N_matmul) for the formula in the module doc."""
    d, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    attn = d * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    n_matmul = L * (attn + 3 * d * f) + d * cfg.vocab_size
    attn_flops = 12 * L * seq_len * cfg.num_heads * cfg.head_dim
    return 6.0 * n_matmul + attn_flops, n_matmul


def _examples(n: int, seq_len: int, vocab: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    prompt = min(32, seq_len // 4)
    return [(rng.integers(3, vocab, prompt).tolist(), rng.integers(3, vocab, seq_len - prompt).tolist())
            for _ in range(n)]


class _TorchLoop:
    """transformers' LlamaForCausalLM + torch AdamW, stepped one batch at a time."""

    def __init__(self, hf_dir, examples, plan, *, hp, threads):
        import numpy as np
        import torch
        from transformers import LlamaForCausalLM

        torch.set_num_threads(threads)
        torch.manual_seed(0)
        self.torch = torch
        self.hp = hp
        self.model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                      attn_implementation="sdpa")
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=hp["lr"], betas=(0.9, 0.999),
                                     eps=1e-8, weight_decay=hp["weight_decay"])
        self.batches = []
        for rows in plan:
            ids = np.array([examples[i][0] + examples[i][1] for i in rows], np.int64)
            labels = ids.copy()
            for j, i in enumerate(rows):
                labels[j, :len(examples[i][0])] = -100
            self.batches.append((torch.from_numpy(ids), torch.from_numpy(labels)))

    def step(self, i: int) -> float:
        ids, labels = self.batches[i]
        loss = self.model(input_ids=ids, labels=labels).loss
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.hp["max_grad_norm"])
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


def _time_both(model, examples, hf_dir, *, batch_size, seq_len, steps, warmup, hp,
               threads) -> dict:
    """Our `Trainer.fit`, with one torch step run inside each step callback: the two loops
    alternate step by step, so a change in the machine's background load hits both alike.

    Our step time is from the end of one callback to the start of the next (the whole loop
    iteration: batch transfer, dispatch, device step, metrics fetch); torch's is its own step.
    """
    from alphallm_jax.train.losses import sft_loss
    from alphallm_jax.train.trainer import TrainConfig, Trainer

    total = warmup + steps
    cfg = TrainConfig(learning_rate=hp["lr"], end_learning_rate=hp["lr"], warmup_ratio=0.0,
                      schedule="constant", weight_decay=hp["weight_decay"],
                      max_grad_norm=hp["max_grad_norm"], batch_size=batch_size, epochs=1,
                      max_steps=total, max_seq_len=seq_len, fixed_seq_len=True,
                      checkpoint_every=-1, log_every=10 ** 9, progress_bar=False, seed=0)
    ours_times, ours_losses, torch_times, torch_losses = [], [], [], []
    last = {}

    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(model, sft_loss, cfg, workdir=workdir)
        # The batches the trainer will see, in order: the torch loop trains on the same ones.
        plan = trainer._make_iterator(examples, batch_size=batch_size, shuffle=True).epoch_plan(0)
        theirs = (_TorchLoop(hf_dir, examples, [[int(i) for i in b] for b in plan], hp=hp,
                             threads=threads) if hf_dir else None)

        def on_step(trainer, step, metrics):
            now = time.perf_counter()
            ours_times.append(now - last["end"])
            ours_losses.append(metrics["loss"])
            if theirs is not None:
                t0 = time.perf_counter()
                torch_losses.append(theirs.step(step - 1))
                torch_times.append(time.perf_counter() - t0)
            last["end"] = time.perf_counter()

        last["end"] = time.perf_counter()
        trainer.fit(examples, callbacks=[on_step])
    out = {"ours_step_times_s": ours_times[warmup:], "ours_first_step_s": ours_times[0],
           "ours_losses": ours_losses}
    if theirs is not None:
        out.update({"torch_step_times_s": torch_times[warmup:], "torch_first_step_s": torch_times[0],
                    "torch_losses": torch_losses})
    return out


def run(out: str | None = None, batch_size: int = 8, seq_len: int = 256, steps: int = 5,
        warmup: int = 2, preset: str = "bench_30m", compare_torch: bool = True,
        threads: int = 0, xla_cpu_flags: str = "recommended") -> dict:
    """Runs the benchmark; writes the JSON to `out` (when given) and returns it.

    ``xla_cpu_flags`` names a flag set of ``alphallm_jax.train.xla_flags.FLAG_SETS`` ("none",
    "recommended", "fast_math"), applied first; that is only possible before JAX starts its backend,
    and the JSON records what was applied.
    """
    from alphallm_jax.benchmarks.common import require_torch
    from alphallm_jax.train.xla_flags import FLAG_SETS, apply_xla_flags

    if compare_torch:
        require_torch("compare_torch")
    flags_added = apply_xla_flags(FLAG_SETS[xla_cpu_flags])
    import jax

    from alphallm_jax.benchmarks.common import cpu_model, measure_matmul_peak, usable_cores
    from alphallm_jax.models import create_model, presets
    from alphallm_jax.models.hf_io import save_hf_checkpoint
    from alphallm_jax.utils.io import atomic_write_json

    cores = usable_cores()
    threads = threads or cores
    cfg = presets.get(preset)
    if seq_len > cfg.max_position_embeddings:
        raise ValueError(f"seq_len {seq_len} > max_position_embeddings {cfg.max_position_embeddings}")
    hp = {"lr": 1e-4, "weight_decay": 0.01, "max_grad_norm": 1.0}
    examples = _examples(batch_size * (warmup + steps), seq_len, cfg.vocab_size)
    fpt, n_matmul = flops_per_token(cfg, seq_len)
    tokens_per_step = batch_size * seq_len

    peak = measure_matmul_peak()
    model = create_model(cfg, seed=0)
    result: dict = {}
    with tempfile.TemporaryDirectory() as hf_dir:
        if compare_torch:
            save_hf_checkpoint(model, cfg, hf_dir)  # before training: the same initial weights
        timed = _time_both(model, examples, hf_dir if compare_torch else None,
                           batch_size=batch_size, seq_len=seq_len, steps=steps, warmup=warmup,
                           hp=hp, threads=threads)
    result["ours_tokens_per_s"] = tokens_per_step / statistics.median(timed["ours_step_times_s"])
    if compare_torch:
        result["torch_tokens_per_s"] = tokens_per_step / statistics.median(timed["torch_step_times_s"])
        result["ratio"] = result["ours_tokens_per_s"] / result["torch_tokens_per_s"]
    peak_after = measure_matmul_peak()  # the machine may be shared: measure again, keep the best
    peak_flops = max(peak["best_flops"], peak_after["best_flops"])
    result["mfu"] = fpt * result["ours_tokens_per_s"] / peak_flops
    if compare_torch:
        result["torch_mfu"] = fpt * result["torch_tokens_per_s"] / peak_flops
    import importlib.metadata

    import numpy as np

    def version(package: str) -> str | None:  # PyTorch is optional here (--nocompare_torch)
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    result.update({
        "matmul_peak_flops": peak_flops,
        "matmul_peak": {"before": peak, "after": peak_after},
        "mfu_formula": "(6*N_matmul + 12*layers*seq*heads*head_dim) * tokens_per_s / matmul_peak_flops",
        "flops_per_token": fpt,
        "n_matmul_params": n_matmul,
        "n_params": cfg.param_count(),
        "preset": preset,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "tokens_per_step": tokens_per_step,
        "xla_cpu_flag_set": xla_cpu_flags,
        "timed_steps": steps,
        "warmup_steps": warmup,
        **timed,
        "machine": {
            "cpu_count": os.cpu_count(), "usable_cores": cores, "torch_threads": threads,
            "cpu_model": cpu_model(), "platform": platform.platform(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "jax": jax.__version__, "jax_backend": jax.default_backend(),
            "jax_devices": len(jax.devices()), "torch": version("torch"),
            "transformers": version("transformers"), "numpy": np.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "xla_flags_added": flags_added,
        },
    })
    if compare_torch:
        # Same weights, same batches, same AdamW: the loss curves should agree closely (ours does
        # not decay norm weights; weight decay 0.01 * lr 1e-4 makes that invisible here).
        result["max_loss_diff"] = max(abs(a - b) for a, b in zip(timed["ours_losses"], timed["torch_losses"], strict=True))
    if out:
        atomic_write_json(out, result)
    return result


def main(argv) -> None:
    del argv
    f = flags.FLAGS
    result = run(out=f.out, batch_size=f.batch_size, seq_len=f.seq_len, steps=f.steps,
                 warmup=f.warmup, preset=f.preset, compare_torch=f.compare_torch, threads=f.threads,
                 xla_cpu_flags=f.xla_cpu_flags)
    line = f"ours {result['ours_tokens_per_s']:.1f} tok/s"
    if "torch_tokens_per_s" in result:
        line += f"  torch {result['torch_tokens_per_s']:.1f} tok/s  ratio {result['ratio']:.2f}"
    line += (f"  mfu {result['mfu']:.3f} (matmul peak {result['matmul_peak_flops'] / 1e9:.1f} "
             f"GFLOP/s)")
    print(line)
    print(json.dumps({k: v for k, v in result.items()
                      if not k.endswith(("step_times_s", "_losses"))}, indent=2))
    if f.out:
        print(f"wrote {f.out}")
