"""Save and load LoRA adapters in Hugging Face PEFT's on-disk layout.

A PEFT LoRA adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``
with keys ``base_model.model.<module path>.lora_A.weight`` (r, in) and ``...lora_B.weight``
(out, r): PyTorch's (out, in) orientation, so each Flax factor is transposed
(``lora_A.weight = Aᵀ``, ``lora_B.weight = Bᵀ``). Parameters of ``modules_to_save`` are stored
under ``base_model.model.<module path>.<torch name>`` (``weight``/``bias``; a Linear's weight
transposed). The names and transposes come from :mod:`mgpo_jax.hf_names`; module paths are the
NNX graph paths, which the shipped models keep equal to the PyTorch module names.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from mgpo_jax import hf_names  # a module import: hf_names itself imports mgpo_jax.lora.layer
from mgpo_jax.lora import _graph
from mgpo_jax.lora.config import ALL_LINEAR, LoraConfig, matches_name
from mgpo_jax.lora.surgery import apply_lora, lora_modules, trainable

__all__ = ["save_adapters", "load_adapters", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# LoRA-One leaves W unchanged: its adapters are plain LoRA adapters (PEFT's default init, then
# the saved A and B are loaded over it).
_INIT_TO_PEFT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "lora-one": True}


def _adapter_tensors(model: nnx.Module) -> dict[str, tuple[nnx.Variable, bool]]:
  """PEFT key -> (variable, transposed) for every trainable tensor of ``model``."""
  return {_PREFIX + name: v for name, v in hf_names.hf_parameters(model, trainable).items()}


def _to_numpy(x: jax.Array, transposed: bool) -> np.ndarray:
  a = np.asarray(x.T if transposed else x)
  if a.dtype not in (np.float16, np.float32, np.float64):
    a = a.astype(np.float32)
  return np.ascontiguousarray(a)


def _peft_config(model: nnx.Module, config: LoraConfig, base_model_name_or_path, task_type):
  targets = config.target_modules
  if targets == ALL_LINEAR:  # PEFT stores the expanded set of module names
    targets = sorted(lora_modules(model))
  return {
    "peft_type": "LORA",
    "task_type": task_type,
    "base_model_name_or_path": (
      None if base_model_name_or_path is None else os.fspath(base_model_name_or_path)
    ),
    "r": config.r,
    "lora_alpha": config.alpha,
    "target_modules": targets if isinstance(targets, str) else list(targets),
    "lora_dropout": config.dropout,
    "use_rslora": config.use_rslora,
    "init_lora_weights": _INIT_TO_PEFT[config.init],
    "modules_to_save": list(config.modules_to_save) or None,
    "bias": "none",
    "fan_in_fan_out": False,
    "inference_mode": True,
    "use_dora": False,
    "lora_bias": False,
    "layers_to_transform": None,
    "layers_pattern": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "exclude_modules": None,
    "revision": None,
  }


def save_adapters(
  path: str | os.PathLike,
  model: nnx.Module,
  config: LoraConfig,
  *,
  base_model_name_or_path: str | os.PathLike | None = None,
  task_type: str | None = None,
) -> None:
  """Writes ``model``'s adapters (and ``modules_to_save`` parameters) in PEFT's layout.

  Only trainable tensors are written. The files are written to a temporary directory next
  to ``path`` first and moved into place only when complete, so a failed save leaves an
  existing adapter directory as it was.

  Args:
   path: the adapter directory (created if missing; other files in it are kept).
   model: a model prepared with :func:`~mgpo_jax.lora.apply_lora` using ``config``.
   config: the :class:`~mgpo_jax.lora.LoraConfig` the adapters were made with.
   base_model_name_or_path: recorded in ``adapter_config.json`` (PEFT's field).
   task_type: PEFT's task type, e.g. ``"SEQ_CLS"`` or ``"CAUSAL_LM"``.
  """
  layers = lora_modules(model)
  if not layers:
    raise ValueError("save_adapters: the model has no LoRA modules (apply_lora first)")
  for p, layer in layers.items():
    if layer.r != config.r or layer.scaling != config.scaling:
      raise ValueError(
        f"save_adapters: config (r={config.r}, scaling={config.scaling}) does not match "
        f"module {p!r} (r={layer.r}, scaling={layer.scaling})"
      )
  tensors = {k: _to_numpy(v[...], t) for k, (v, t) in _adapter_tensors(model).items()}
  meta = _peft_config(model, config, base_model_name_or_path, task_type)

  path = os.path.abspath(os.fspath(path))
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would become the adapter folder's mode
  try:
    save_file(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
      json.dump(meta, f, indent=2, sort_keys=True)
    if not os.path.exists(path):
      os.rename(tmp, path)
      return
    for name in (WEIGHTS_NAME, CONFIG_NAME):
      os.replace(os.path.join(tmp, name), os.path.join(path, name))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _config_from_peft(meta: Mapping[str, Any]) -> LoraConfig:
  if meta.get("peft_type") != "LORA":
    raise ValueError(f"peft_type must be 'LORA', got {meta.get('peft_type')!r}")
  unsupported = {
    "use_dora": meta.get("use_dora", False),
    "fan_in_fan_out": meta.get("fan_in_fan_out", False),
    "lora_bias": meta.get("lora_bias", False),
    "bias": meta.get("bias", "none") != "none",
    "rank_pattern": bool(meta.get("rank_pattern")),
    "alpha_pattern": bool(meta.get("alpha_pattern")),
    "layers_to_transform": meta.get("layers_to_transform") is not None,
    "exclude_modules": bool(meta.get("exclude_modules")),
    "target_parameters": bool(meta.get("target_parameters")),
  }
  bad = [k for k, v in unsupported.items() if v]
  if bad:
    raise ValueError(f"unsupported PEFT LoRA options in {CONFIG_NAME}: {bad}")
  init = meta.get("init_lora_weights", True)
  inits = {True: "default", False: "default", "gaussian": "gaussian", "pissa": "pissa"}
  if init not in inits:
    raise ValueError(
      f"init_lora_weights={init!r} is not supported; accepted: true, false, 'gaussian', "
      "'pissa'"
    )
  missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in meta]
  if missing:
    raise ValueError(f"{CONFIG_NAME} has no {', '.join(missing)} (a PEFT LoRA config names "
                     "r, lora_alpha and target_modules)")
  targets = meta["target_modules"]
  return LoraConfig(
    target_modules=targets if isinstance(targets, str) else tuple(targets),
    r=meta["r"],
    alpha=meta["lora_alpha"],
    dropout=meta.get("lora_dropout", 0.0),
    use_rslora=meta.get("use_rslora", False),
    init=inits[init],
    modules_to_save=tuple(meta.get("modules_to_save") or ()),
  )


def load_adapters(
  path: str | os.PathLike, model: nnx.Module, *, rngs: nnx.Rngs | None = None
) -> tuple[nnx.Module, LoraConfig]:
  """Loads a PEFT LoRA adapter directory into ``model``.

  If ``model`` has no LoRA modules yet, :func:`~mgpo_jax.lora.apply_lora` is applied first
  with the saved config (for ``init_lora_weights="pissa"`` this recomputes the residual
  base kernels, as PEFT does). As in PEFT, a ``modules_to_save`` name that matches no module
  of ``model`` is ignored (PEFT's ``task_type="SEQ_CLS"`` writes ``["classifier", "score"]``
  whatever the head's name). Every expected tensor must be present with the right shape, and
  every saved tensor must have a home in ``model``; all of this is checked before ``model``
  changes (on an abstract copy when the adapters are still to be attached), so an error
  leaves it as it was.

  Args:
   path: a directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
   model: an NNX model whose module paths equal the PyTorch module names of the model the
    adapters were trained on.
   rngs: used only to build the adapter modules (dropout streams); default ``nnx.Rngs(0)``.

  Returns:
   ``(model, config)``; ``model`` is updated in place, and ``config`` is the saved config
   with ``modules_to_save`` reduced to the names that match a module of ``model``.
  """
  path = os.fspath(path)
  with open(os.path.join(path, CONFIG_NAME)) as f:
    config = _config_from_peft(json.load(f))
  modules = _graph.module_paths(model)
  config = dataclasses.replace(config, modules_to_save=tuple(
    n for n in config.modules_to_save if any(matches_name(m, n) for m in modules)
  ))
  tensors = load_file(os.path.join(path, WEIGHTS_NAME))
  attach = not lora_modules(model)
  target = model if not attach else nnx.eval_shape(  # shapes only: nothing is computed
    lambda m: apply_lora(m, config, rngs=nnx.Rngs(0)), model)
  _check_fit(path, target, config, tensors)
  if attach:
    apply_lora(model, config, rngs=rngs if rngs is not None else nnx.Rngs(0))
  for key, (var, transposed) in _adapter_tensors(model).items():
    var[...] = jnp.asarray(tensors[key].T if transposed else tensors[key], var.dtype)
  return model, config


def _check_fit(path: str, model: nnx.Module, config: LoraConfig,
               tensors: Mapping[str, np.ndarray]) -> None:
  """Raises ``ValueError`` unless ``tensors`` are exactly ``model``'s adapter tensors, with
  their shapes, and its LoRA modules have the saved rank and scaling."""
  for p, layer in lora_modules(model).items():
    if layer.r != config.r or not np.isclose(layer.scaling, config.scaling):
      raise ValueError(
        f"load_adapters: module {p!r} has r={layer.r}, scaling={layer.scaling}; the "
        f"saved config has r={config.r}, scaling={config.scaling}"
      )
  expected = _adapter_tensors(model)
  missing = sorted(set(expected) - set(tensors))
  unexpected = sorted(set(tensors) - set(expected))
  if missing or unexpected:
    raise ValueError(
      f"load_adapters: {path} does not fit the model: missing keys {missing}, "
      f"unexpected keys {unexpected}"
    )
  for key, (var, transposed) in expected.items():
    want = var.shape[::-1] if transposed else var.shape
    if tensors[key].shape != tuple(want):
      raise ValueError(
        f"load_adapters: {key} has shape {tensors[key].shape}, the model needs {want}"
      )
