"""``load_model``: the right NNX model class for a local HF checkpoint folder and a task.

Dispatch is on ``config.json``'s ``model_type``; :data:`SUPPORTED` lists what loads exactly.
Llama-like types whose differences are not implemented (``mistral``: sliding-window attention;
``qwen2``: biases on q/k/v but not o_proj; ``gemma``, ``phi3``, ...) are refused rather than
loaded approximately. Nothing is fetched from a hub.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

from mgpo_jax.models import _hf
from mgpo_jax.models.bert import BertForSequenceClassification
from mgpo_jax.models.llama import LlamaForCausalLM, LlamaForSequenceClassification

__all__ = ["SUPPORTED", "TASKS", "load_model", "model_type"]

TASKS = ("classification", "causal-lm")

#: model_type -> {task: model class}
SUPPORTED: dict[str, dict[str, type[nnx.Module]]] = {
  "bert": {"classification": BertForSequenceClassification},
  "llama": {"classification": LlamaForSequenceClassification, "causal-lm": LlamaForCausalLM},
}


def _supported() -> str:
  return "; ".join(f"{t} ({', '.join(tasks)})" for t, tasks in SUPPORTED.items())


def model_type(path: str | Path) -> str:
  """``model_type`` from a local folder's ``config.json`` (``FileNotFoundError`` if the folder
  or the file is missing, ``ValueError`` if it has no ``model_type``)."""
  directory = _hf.local_dir(path)
  config = directory / "config.json"
  if not config.is_file():
    raise FileNotFoundError(f"no config.json in {str(directory)!r}")
  value = json.loads(config.read_text()).get("model_type")
  if not value:
    raise ValueError(f"config.json in {str(directory)!r} has no model_type; supported "
                     f"model_types: {_supported()}")
  return value


def load_model(
  path: str | Path,
  *,
  task: str = "classification",
  num_labels: int | None = None,
  param_dtype: Any = jnp.float32,
  dtype: Any = None,
  rngs: nnx.Rngs | None = None,
  shardings: _hf.ShardingsFn | None = None,
  **kwargs: Any,
) -> nnx.Module:
  """Loads a local HF checkpoint folder as the model for ``task``.

  Args:
    path: a local folder with ``config.json`` and ``model.safetensors`` or a sharded
      ``model.safetensors.index.json`` (read shard by shard).
    task: ``"classification"`` (``BertForSequenceClassification`` or
      ``LlamaForSequenceClassification``; a head absent from the checkpoint is initialised
      from ``rngs``) or ``"causal-lm"`` (``LlamaForCausalLM``).
    num_labels: classes of a classifier (default: the config's); must be ``None`` for
      ``"causal-lm"``.
    param_dtype: parameter storage dtype, e.g. ``jnp.bfloat16`` for frozen weights; each tensor
      is converted as it is read.
    dtype: computation dtype (``None``: from inputs and parameters).
    rngs: seeds new heads and dropout (default ``nnx.Rngs(0)``).
    shardings: ``(NNX path, shape) -> sharding``, e.g.
      ``mgpo_jax.train.sharding.load_shardings(mesh)``: each checkpoint tensor goes straight
      into its sharding, every device receiving only its slice, so a base larger than one
      device loads without ever being whole on one (default: the default device).
    **kwargs: passed to the class's ``from_pretrained`` (e.g. ``pooling`` for BERT).

  Raises:
    FileNotFoundError: ``path`` is not a local folder, or lacks config.json / weights.
    ValueError: an unknown ``task``, a ``model_type`` not in :data:`SUPPORTED` or one without
      ``task`` (the message names the folder and lists the supported types), or ``num_labels``
      with ``"causal-lm"``.
  """
  if task not in TASKS:
    raise ValueError(f"task={task!r}; accepted values: {TASKS}")
  kind = model_type(path)
  classes = SUPPORTED.get(kind, {})
  if task not in classes:
    raise ValueError(
      f"model_type={kind!r} (config.json in {str(_hf.local_dir(path))!r}) is not supported "
      f"for task={task!r}; supported model_types: {_supported()}"
    )
  kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, shardings=shardings, **kwargs)
  if task == "causal-lm":
    if num_labels is not None:
      raise ValueError(f"num_labels={num_labels} applies to task='classification' only")
    return classes[task].from_pretrained(path, **kw)
  return classes[task].from_pretrained(path, num_labels=num_labels, **kw)
