"""Benchmarks behind `alphallm bench ...`: each measures ours and a reference side by side in one run."""
