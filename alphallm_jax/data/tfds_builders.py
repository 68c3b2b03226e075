"""TensorFlow Datasets builders for GSM8K and MATH read from local (or ``gs://``) files.

Optional: for users whose data pipeline lives in TFDS/GCS. The project's own path never
needs TensorFlow; ``tensorflow_datasets`` is imported only when a builder is requested
(``pip install 'alphallm_jax[tfds]'``).

The raw files are the ones :mod:`alphallm_jax.data.loaders` reads (same layout as the
data root: ``gsm8k/train.jsonl``, ``math/math500_test.jsonl`` ...); TFDS finds them in
the *manual directory*::

    from alphallm_jax.data.tfds_builders import build_tfds
    builder = build_tfds("gsm8k", raw_dir="/path/to/shared/data", data_dir="/tmp/tfds")
    ds = builder.as_dataset(split="test")

or, by hand, ``get_builder_class("math")(data_dir=...)`` then
``download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=raw))``.

Every example carries ``id``, ``question``, ``answer`` (normalised final answer) and
``solution`` ("" when the source has none); MATH examples also ``level`` (-1 when
unknown) and ``subject``. Rows are parsed by the project's loaders, so the same
validation (file and line in every error) applies.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from alphallm_jax.data.loaders import NAMED_FILES, load_gsm8k, load_math

TFDS_INSTALL_HINT = (
    "tensorflow_datasets is not installed; the TFDS builders are optional. Install the "
    "extra with: pip install 'alphallm_jax[tfds]' (tensorflow-datasets and tensorflow-cpu)."
)

# TFDS split name -> named split in alphallm_jax.data.loaders
GSM8K_SPLITS = {"train": "gsm8k:train", "test": "gsm8k:test", "test_socratic": "gsm8k:test_socratic"}
MATH_SPLITS = {
    "test": "math:math500",
    "test5000": "math:test5000",
    "train": "math:train4500",
    "train_answers": "math:train_answers",
}

_CLASSES: dict[str, type] = {}


def _import_tfds():
    try:
        import tensorflow_datasets as tfds  # noqa: PLC0415  (lazy on purpose)
    except ImportError as e:
        raise ImportError(TFDS_INSTALL_HINT) from e
    return tfds


def _define_classes() -> dict[str, type]:
    if _CLASSES:
        return _CLASSES
    tfds = _import_tfds()

    manual_help = (
        "Point the download config's manual_dir at the data root holding "
        "gsm8k/{train,test,test_socratic}.jsonl and math/{math500_test,"
        "math_test_full5000,math_train7500_answers_only}.jsonl."
    )

    class AlphallmGsm8k(tfds.core.GeneratorBasedBuilder):
        """GSM8K (openai/grade-school-math) from local JSONL files."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "GSM8K from local JSONL via alphallm_jax loaders."}
        MANUAL_DOWNLOAD_INSTRUCTIONS = manual_help

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description="GSM8K grade-school math word problems (question, solution, final answer).",
                features=tfds.features.FeaturesDict(
                    {
                        "id": tfds.features.Text(),
                        "question": tfds.features.Text(),
                        "answer": tfds.features.Text(),
                        "solution": tfds.features.Text(),
                    }
                ),
                supervised_keys=("question", "solution"),
                homepage="https://github.com/openai/grade-school-math",
            )

        def _split_generators(self, dl_manager):
            root = dl_manager.manual_dir
            return {
                name: self._generate_examples(path=root / NAMED_FILES[named][1], split=name)
                for name, named in GSM8K_SPLITS.items()
                if (root / NAMED_FILES[named][1]).exists()
            }

        def _generate_examples(self, path, split):
            for p in load_gsm8k(path, split=split):
                yield (
                    p.id,
                    {
                        "id": p.id,
                        "question": p.question,
                        "answer": p.answer,
                        "solution": p.solution or "",
                    },
                )

    class AlphallmMath(tfds.core.GeneratorBasedBuilder):
        """Hendrycks MATH (MATH500 test, full test, train) from local JSONL files."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "MATH from local JSONL via alphallm_jax loaders."}
        MANUAL_DOWNLOAD_INSTRUCTIONS = manual_help

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description=(
                    "MATH competition problems. test = MATH500 (Lightman et al.), test5000 = "
                    "full test set, train = test5000 minus MATH500 (with solutions), "
                    "train_answers = the 7500 train problems (answers only)."
                ),
                features=tfds.features.FeaturesDict(
                    {
                        "id": tfds.features.Text(),
                        "question": tfds.features.Text(),
                        "answer": tfds.features.Text(),
                        "solution": tfds.features.Text(),
                        "level": tfds.features.Scalar(dtype=np.int32),
                        "subject": tfds.features.Text(),
                    }
                ),
                supervised_keys=("question", "answer"),
                homepage="https://github.com/hendrycks/math",
            )

        def _split_generators(self, dl_manager):
            root = dl_manager.manual_dir
            gens = {}
            test_path = root / NAMED_FILES["math:math500"][1]
            full_path = root / NAMED_FILES["math:test5000"][1]
            train_ans_path = root / NAMED_FILES["math:train_answers"][1]
            if test_path.exists():
                gens["test"] = self._generate_examples(path=test_path, split="math500", exclude_path=None)
            if full_path.exists():
                gens["test5000"] = self._generate_examples(path=full_path, split="test5000", exclude_path=None)
                if test_path.exists():
                    gens["train"] = self._generate_examples(path=full_path, split="train4500", exclude_path=test_path)
            if train_ans_path.exists():
                gens["train_answers"] = self._generate_examples(
                    path=train_ans_path, split="train_answers", exclude_path=None
                )
            return gens

        def _generate_examples(self, path, split, exclude_path):
            exclude = set()
            if exclude_path is not None:
                exclude = {p.question for p in load_math(exclude_path, split="exclude")}
            for p in load_math(path, split=split, exclude_questions=exclude):
                yield (
                    p.id,
                    {
                        "id": p.id,
                        "question": p.question,
                        "answer": p.answer,
                        "solution": p.solution or "",
                        "level": -1 if p.meta.get("level") is None else int(p.meta["level"]),
                        "subject": p.meta.get("subject") or "",
                    },
                )

    _CLASSES["gsm8k"] = AlphallmGsm8k
    _CLASSES["math"] = AlphallmMath
    return _CLASSES


def get_builder_class(task: str) -> type:
    """The TFDS builder class for ``"gsm8k"`` or ``"math"`` (imports TFDS lazily).

    Registered in TFDS as ``alphallm_gsm8k`` and ``alphallm_math``.
    """
    classes = _define_classes()
    if task not in classes:
        raise ValueError(f"no TFDS builder for {task!r}; expected one of {sorted(classes)}")
    return classes[task]


def build_tfds(task: str, raw_dir: Any, data_dir: Any, **download_and_prepare_kwargs: Any):
    """Construct the builder for ``task``, prepare it from ``raw_dir`` into ``data_dir``.

    Returns the prepared builder (``builder.as_dataset(split=...)`` /
    ``builder.as_data_source(...)``).
    """
    tfds = _import_tfds()
    builder = get_builder_class(task)(data_dir=str(data_dir))
    config = tfds.download.DownloadConfig(manual_dir=str(raw_dir))
    builder.download_and_prepare(download_config=config, **download_and_prepare_kwargs)
    return builder
