"""The weight-perturbation interface shared by Flat-LoRA, LoRA-GGPO and the released-code MGPO.

A :class:`WeightPerturbation` is to the forward pass what an optax transform is to the update:
a ``NamedTuple`` of pure functions and a state (a pytree of arrays, checkpointed with the rest
of the train state). Each step it turns (its state, every LoRA module's clean adapters and
frozen kernel, the optimizer state, a PRNG key, the step) into one perturbation ``ε_l`` of
each module's effective kernel ``W_l' = W_l + s A_l B_l``; the train step applies them for the
forward and backward pass only; ``update`` then folds in what the step learned (its adapter
gradients). The math of each method is in ``docs/weight_perturbation.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mgpo_jax.lora.layer import DenseNoise, LowRank
from mgpo_jax.lora.surgery import lora_modules

__all__ = ["LoraWeights", "WeightPerturbation", "adapter_pairs", "cosine_ramp", "lora_weights",
           "image_column_sq_norms", "image_sq_norm"]

PerturbationState = Any
"""A weight perturbation's state: a pytree of arrays (a ``NamedTuple`` named ``...State``)."""


class LoraWeights(NamedTuple):
  """One LoRA module's tensors: frozen ``kernel`` W (n, m), adapters ``lora_a`` A (n, r) and
  ``lora_b`` B (r, m), and the scale ``scaling`` s of ``W' = W + s A B``."""

  kernel: jax.Array
  lora_a: jax.Array
  lora_b: jax.Array
  scaling: float


Modules = Mapping[str, LoraWeights]
"""Every LoRA module by dotted path (:func:`lora_weights`)."""
AdapterGrads = Mapping[str, tuple[jax.Array, jax.Array]]
"""``(g_A, g_B)`` of every LoRA module by dotted path (:func:`adapter_pairs`)."""
Perturbations = dict[str, LowRank | DenseNoise]
"""One perturbation per LoRA module, for :func:`mgpo_jax.lora.set_perturbations`."""


class WeightPerturbation(NamedTuple):
  """A per-step perturbation of every LoRA module's effective kernel (optax-like).

  Attributes:
    init: ``init(modules) -> state``.
    perturbations: ``perturbations(state, modules, opt_state, key, step) -> {path: ε}``,
      with ``modules`` the clean weights (:func:`lora_weights`), ``opt_state`` the base
      optimizer's state (read, never written), ``key`` ONE key for the whole step (every
      micro-batch sees the same ``ε``) and ``step`` the number of optimizer steps taken
      (int32 scalar). The result is a constant: no gradient flows through it.
    update: ``update(state, modules, grads) -> state``, with ``grads`` the step's adapter
      gradients (:func:`adapter_pairs`); a non-finite gradient leaves the state unchanged.
  """

  init: Callable[[Modules], PerturbationState]
  perturbations: Callable[[PerturbationState, Modules, optax.OptState, jax.Array, jax.Array],
                          Perturbations]
  update: Callable[[PerturbationState, Modules, AdapterGrads], PerturbationState]


def lora_weights(model: nnx.Module) -> dict[str, LoraWeights]:
  """The weights of every :class:`~mgpo_jax.lora.LoraLinear` of ``model``, by dotted path
  (sorted), as the arrays the model holds now (use it on the clean, unperturbed model)."""
  return {path: LoraWeights(m.kernel[...], m.lora_a[...], m.lora_b[...], m.scaling)
          for path, m in sorted(lora_modules(model).items())}


def adapter_pairs(tree: Any, paths: Sequence[str]) -> dict[str, tuple[jax.Array, jax.Array]]:
  """``(tree[path].lora_a, tree[path].lora_b)`` for each dotted ``path``: picks the adapter
  leaves out of a tree in the trainable params' layout (gradients, Adam's ``mu``), as a
  nested dict (``nnx.to_pure_dict`` layout) or an ``nnx.State``."""
  if isinstance(tree, nnx.State):
    tree = nnx.to_pure_dict(tree)
  out = {}
  for path in paths:
    node = tree
    for part in path.split("."):
      if part not in node and part.isdigit() and int(part) in node:
        part = int(part)
      if part not in node:
        raise ValueError(f"no adapters at {path!r} in the given tree (its keys at this level: "
                         f"{sorted(map(str, node))})")
      node = node[part]
    out[path] = (node["lora_a"], node["lora_b"])
  return out


def _stat(x: jax.Array) -> jax.Array:
  return x.astype(jnp.result_type(jnp.float32, x.dtype))


def _factors(w: LoraWeights, da: jax.Array, db: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``X = [dA, A]`` (n, 2r) and ``Y = [B; dB]`` (2r, m), so that ``dA B + A dB = X Y``."""
  x = jnp.concatenate([_stat(da), _stat(w.lora_a)], axis=1)
  y = jnp.concatenate([_stat(w.lora_b), _stat(db)], axis=0)
  return x, y


def image_sq_norm(w: LoraWeights, da: jax.Array, db: jax.Array) -> jax.Array:
  """``‖s (dA B + A dB)‖_F²``, the weight-space image of adapter directions ``(dA, dB)``,
  from (2r × 2r) Gram products: ``s² tr((XᵀX)(YYᵀ))`` with ``X = [dA, A]``, ``Y = [B; dB]``."""
  x, y = _factors(w, da, db)
  return jnp.maximum(w.scaling ** 2 * jnp.sum((x.T @ x) * (y @ y.T)), 0.0)


def image_column_sq_norms(w: LoraWeights, da: jax.Array, db: jax.Array) -> jax.Array:
  """``‖G_{:,j}‖²`` for every column j of ``G = s (dA B + A dB)``, shape (m,), without
  forming G: ``s² Y_{:,j}ᵀ (XᵀX) Y_{:,j}`` with the (2r × 2r) Gram matrix ``XᵀX``."""
  x, y = _factors(w, da, db)
  return jnp.maximum(w.scaling ** 2 * jnp.sum(y * ((x.T @ x) @ y), axis=0), 0.0)


def cosine_ramp(value: float, total_steps: int) -> optax.Schedule:
  r"""Flat-LoRA's noise ramp from 0 to ``value`` over ``total_steps``.

  .. math::

    σ_t = σ \cdot \tfrac12 \big(1 - \cos(π \min(t, T) / T)\big)

  Args:
    value: σ, the value reached at ``t = total_steps``.
    total_steps: T, a positive integer (the run's number of optimizer steps).

  Returns:
    An optax schedule (a callable of the step).

  Examples:
    >>> from mgpo_jax.perturbation import cosine_ramp
    >>> ramp = cosine_ramp(0.05, 100)
    >>> print(f"{ramp(0):.3f} {ramp(50):.3f} {ramp(100):.3f} {ramp(200):.3f}")
    0.000 0.025 0.050 0.050
  """
  _check_int("cosine_ramp", "total_steps", total_steps)

  def schedule(step):
    t = jnp.minimum(jnp.asarray(step, jnp.float32), total_steps)
    return value * 0.5 * (1.0 - jnp.cos(jnp.pi * t / total_steps))

  return schedule


def _check_int(method: str, name: str, value: Any) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{method}: {name} must be a positive integer; got {value!r}")


def _unchanged_unless_finite(update: Callable) -> Callable:
  """``update``, except that a step whose adapter gradients, or the state computed from them
  (e.g. a norm that overflows), are not all finite leaves the state as it was (as
  :func:`optax.apply_if_finite` skips such a step)."""

  def guarded(state, modules, grads):
    new = update(state, modules, grads)
    checked = jax.tree.leaves(grads) + [x for x in jax.tree.leaves(new)
                                        if jnp.issubdtype(x.dtype, jnp.inexact)]
    finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in checked] or [True]))
    return jax.tree.map(lambda n, old: jnp.where(finite, n, old).astype(old.dtype), new, state)

  return guarded
