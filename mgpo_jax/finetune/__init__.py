"""The fine-tune job behind ``mgpo-jax finetune``.

``config``   :class:`FinetuneConfig` (validated without JAX; the CLI's flags come from it)
``job``      the job's steps: :func:`load_data`, :func:`build_model`, :func:`build_optimizer`,
             :func:`build_perturbation`, :func:`train`, :func:`evaluate`, :func:`export`, and :func:`run` /
             :func:`run_compare` that chain them
``run_dir``  run directories owned through a manifest (what ``--overwrite`` may delete)

The job's names are imported on first use, so the command line reads its flags without JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

from mgpo_jax.finetune.config import FinetuneConfig

_JOB = ("LOG_EVERY", "UserError", "build_model", "build_optimizer", "build_perturbation",
        "evaluate", "export", "label_names", "load_base", "load_data", "model_path",
        "plot_curves", "read_metrics", "run", "run_compare", "summary_table", "train")
__all__ = ["FinetuneConfig", *_JOB]


def __getattr__(name: str) -> Any:
  if name in _JOB:
    return getattr(importlib.import_module("mgpo_jax.finetune.job"), name)
  raise AttributeError(f"module 'mgpo_jax.finetune' has no attribute {name!r}")
