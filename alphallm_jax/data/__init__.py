"""Data layer: problems, GSM8K/MATH loaders, the built-in arith task, prompts, grading.

TensorFlow Datasets builders live in :mod:`alphallm_jax.data.tfds_builders` and are not
imported here (TensorFlow is optional).
"""

from alphallm_jax.data.arith import ArithConfig, generate_problems, make_splits, write_splits
from alphallm_jax.data.grading import (
    answers_equal,
    canonical_answer,
    configure_math_verify,
    extract_answer,
    is_correct,
    parse_number,
)
from alphallm_jax.data.loaders import (
    load_dataset,
    load_gsm8k,
    load_math,
    resolve_data_dir,
)
from alphallm_jax.data.problems import Problem
from alphallm_jax.data.prompts import (
    final_answer_marker,
    format_prompt,
    format_solution,
    split_steps,
)

__all__ = [
    "ArithConfig",
    "Problem",
    "answers_equal",
    "canonical_answer",
    "configure_math_verify",
    "extract_answer",
    "final_answer_marker",
    "format_prompt",
    "format_solution",
    "generate_problems",
    "is_correct",
    "load_dataset",
    "load_gsm8k",
    "load_math",
    "make_splits",
    "parse_number",
    "resolve_data_dir",
    "split_steps",
    "write_splits",
]
