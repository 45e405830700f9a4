"""LoRA for plain parameter pytrees (e.g. flax.linen's ``variables["params"]``).

The adapters live in their own dict ``{path: {"lora_a": A, "lora_b": B}}`` and are merged into
the kernels (``W + s A B``) each time the model is applied; train the adapters only.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from mgpo_jax.lora.config import LoraConfig
from mgpo_jax.lora.init import init_factors

__all__ = ["init_lora_params", "merge_lora_params"]


def _kernels(params: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, Any]]:
  for k, v in params.items():
    if isinstance(v, Mapping):
      yield from _kernels(v, (*prefix, str(k)))
    elif k == "kernel" and prefix and jnp.ndim(v) == 2:
      yield ".".join(prefix), v


def _check_pytree_config(config: LoraConfig) -> None:
  unsupported = {
    "init='pissa'": config.init == "pissa",
    "init='lora-one'": config.init == "lora-one",
    "dropout > 0": config.dropout > 0,
    "modules_to_save": bool(config.modules_to_save),
  }
  bad = [k for k, v in unsupported.items() if v]
  if bad:
    raise ValueError(
      f"the pytree path merges adapters into the kernels and does not support {bad}; "
      "use the NNX path (apply_lora) for these"
    )


def init_lora_params(
  params: Mapping[str, Any], config: LoraConfig, key: jax.Array
) -> dict[str, dict[str, jax.Array]]:
  """Adapters ``{path: {"lora_a": (in, r), "lora_b": (r, out)}}`` for the 2-D ``kernel``
  leaves of a parameter dict (e.g. linen's ``variables["params"]``) whose module path
  (dict keys joined by ".", e.g. ``"Dense_0"``) ``config`` targets.

  Supports ``init`` "default" and "gaussian" (not "pissa"), no dropout, no
  ``modules_to_save``. Train the returned adapters; :func:`merge_lora_params` gives the
  params to apply the model with.
  """
  _check_pytree_config(config)
  kernels = dict(_kernels(params))
  chosen = {p: w for p, w in kernels.items() if config.is_target(p)}
  if not chosen:
    raise ValueError(
      f"target_modules={config.target_modules!r} matches no 2-D kernel; the kernels are "
      f"at: {list(kernels)}"
    )
  adapters = {}
  for i, (path, w) in enumerate(sorted(chosen.items())):
    if config.r > min(w.shape):
      raise ValueError(f"r={config.r} exceeds min(in, out) = {min(w.shape)} of {path!r}")
    a, b, _ = init_factors(jax.random.fold_in(key, i), jnp.asarray(w), config)
    adapters[path] = {"lora_a": a, "lora_b": b}
  return adapters


def merge_lora_params(
  params: Mapping[str, Any], adapters: Mapping[str, Mapping[str, jax.Array]], config: LoraConfig
) -> dict[str, Any]:
  """``params`` with each adapted kernel replaced by ``W + s A B`` (differentiable in the
  adapters), for ``model.apply({"params": merge_lora_params(...)}, x)``."""
  _check_pytree_config(config)
  missing = set(adapters) - {p for p, _ in _kernels(params)}
  if missing:
    raise ValueError(f"adapters for paths with no 2-D kernel in params: {sorted(missing)}")

  def merge(tree: Mapping[str, Any], prefix: tuple[str, ...]) -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
      if isinstance(v, Mapping):
        out[k] = merge(v, (*prefix, str(k)))
      elif k == "kernel" and ".".join(prefix) in adapters:
        ad = adapters[".".join(prefix)]
        out[k] = v + (config.scaling * (ad["lora_a"] @ ad["lora_b"])).astype(v.dtype)
      else:
        out[k] = v
    return out

  return merge(params, ())
