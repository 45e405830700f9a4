"""Training: the jitted, data-parallel train step and exact, atomic checkpoints.

``trainer``     :class:`Trainer` (split-once NNX train / eval steps), :class:`TrainState`
``losses``      :func:`classification_loss`, :func:`causal_lm_loss`, :func:`perplexity`
``sharding``    :class:`ShardingRules`, :func:`parse_mesh`: FSDP / tensor-parallel placement
``checkpoint``  :class:`Checkpointer` on orbax (imported on first use)
"""

from __future__ import annotations

from typing import Any

from mgpo_jax.train.losses import causal_lm_loss, classification_loss, perplexity
from mgpo_jax.train.trainer import DATA_AXIS, TrainState, Trainer, clean_params, make_mesh
from mgpo_jax.train.sharding import DEFAULT_RULES, ShardingRules, parse_mesh

__all__ = ["DATA_AXIS", "DEFAULT_RULES", "CheckpointError", "Checkpointer", "ShardingRules",
           "TrainState", "Trainer", "causal_lm_loss", "classification_loss", "clean_params",
           "make_mesh", "parse_mesh", "perplexity"]


def __getattr__(name: str) -> Any:
  if name in ("Checkpointer", "CheckpointError"):  # orbax only when checkpoints are used
    from mgpo_jax.train import checkpoint

    return getattr(checkpoint, name)
  raise AttributeError(f"module 'mgpo_jax.train' has no attribute {name!r}")
