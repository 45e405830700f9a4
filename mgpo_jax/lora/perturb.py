"""Per-step perturbations of the LoRA modules' effective kernels, set from outside the model.

Flat-minima methods (Flat-LoRA, LoRA-GGPO, the released-code MGPO) evaluate the gradient with
each LoRA module's effective kernel perturbed, ``W' + ε``, for one forward/backward pass.
``ε`` (a :class:`~mgpo_jax.lora.layer.LowRank` or :class:`~mgpo_jax.lora.layer.DenseNoise`)
is held in the layer's ``perturbation`` slot, never written into ``W``, and receives no
gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import jax.numpy as jnp
from flax import nnx

from mgpo_jax.lora.layer import DenseNoise, LowRank
from mgpo_jax.lora.surgery import lora_modules

__all__ = ["set_perturbations", "clear_perturbations", "perturbed"]


def set_perturbations(
  model: nnx.Module, perturbations: Mapping[str, LowRank | DenseNoise]
) -> None:
  """Sets, for the next forward/backward pass(es), a perturbation ``ε`` of the effective
  kernel of each named LoRA module (dotted path → :class:`LowRank` or :class:`DenseNoise`).

  Modules not named keep their current perturbation. Usable inside ``jax.jit`` (on a model
  from ``nnx.merge``) as well as outside. Shapes are checked here.
  """
  layers = lora_modules(model)
  for path, p in perturbations.items():
    if path not in layers:
      raise ValueError(f"no LoRA module at {path!r}; LoRA modules are: {list(layers)}")
    layer = layers[path]
    n, m = layer.in_features, layer.out_features
    if isinstance(p, LowRank):
      ok = p.u.ndim == 2 and p.v.ndim == 2 and p.u.shape[0] == n and p.v.shape[1] == m
      ok = ok and p.u.shape[1] == p.v.shape[0]
      if not ok:
        raise ValueError(
          f"LowRank for {path!r} needs u (in={n}, k) and v (k, out={m}); got "
          f"{p.u.shape} and {p.v.shape}"
        )
    elif isinstance(p, DenseNoise):
      if jnp.shape(p.col_scale) != (m,):
        raise ValueError(
          f"DenseNoise.col_scale for {path!r} must have shape ({m},), got "
          f"{jnp.shape(p.col_scale)}"
        )
    else:
      raise ValueError(f"perturbation for {path!r} must be LowRank or DenseNoise, got {p!r}")
    layer.perturbation.set_value(p)


def clear_perturbations(model: nnx.Module) -> None:
  """Removes the perturbation of every LoRA module."""
  for layer in lora_modules(model).values():
    layer.perturbation.set_value(None)


@contextlib.contextmanager
def perturbed(
  model: nnx.Module, perturbations: Mapping[str, LowRank | DenseNoise]
) -> Iterator[nnx.Module]:
  """``with perturbed(model, {...}): loss = loss_fn(model)`` — sets the perturbations and
  clears every perturbation on exit."""
  set_perturbations(model, perturbations)
  try:
    yield model
  finally:
    clear_perturbations(model)
