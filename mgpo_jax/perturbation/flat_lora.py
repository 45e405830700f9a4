"""Flat-LoRA: filter-wise Gaussian noise on each LoRA module's effective kernel."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mgpo_jax._checks import check_scalar
from mgpo_jax.lora.layer import DenseNoise, column_norms
from mgpo_jax.perturbation.base import WeightPerturbation, cosine_ramp

__all__ = ["FlatLoraState", "flat_lora", "sigma_schedule"]


class FlatLoraState(NamedTuple):
  """State of :func:`flat_lora`: empty. The noise is regenerated from the step's key, never
  stored between steps."""


def sigma_schedule(method: str, sigma: optax.ScalarOrSchedule,
                   total_steps: int | None) -> optax.Schedule:
  """σ_t: a given schedule; or a constant σ ramped by :func:`cosine_ramp` over
  ``total_steps``; or (``total_steps=None``) the constant σ."""
  check_scalar(method, "sigma", sigma, lambda v: v >= 0, "a number >= 0 or a schedule",
         schedule_ok=True)
  if callable(sigma):
    if total_steps is not None:
      raise ValueError(f"{method}: pass total_steps only with a constant sigma (a schedule "
                       "given as sigma is used as is)")
    return sigma
  if total_steps is None:
    return lambda step: jnp.asarray(sigma, jnp.float32)
  return cosine_ramp(float(sigma), total_steps)


def noise_scales(weights, sq_extra, sigma_t) -> jax.Array:
  """Per-column standard deviation ``σ_t sqrt((‖W'_{:,j}‖² + extra_j) / n)``."""
  n = weights.kernel.shape[0]
  sq = column_norms(weights.kernel, weights.lora_a, weights.lora_b, weights.scaling) ** 2
  return sigma_t * jnp.sqrt((sq + sq_extra) / n)


def flat_lora(sigma: optax.ScalarOrSchedule = 0.05, *,
              total_steps: int | None = None) -> WeightPerturbation:
  r"""Flat-LoRA: the gradient of each step taken under random filter-wise weight noise.

  Each LoRA module's effective kernel ``W' = W + s A B`` (n × m, Flax orientation) is
  perturbed for the step's forward and backward pass by

  .. math::

    ε_{ij} = σ_t \frac{\lVert W'_{:,j}\rVert}{\sqrt n} z_{ij},\quad z_{ij} \sim N(0, 1),
    \qquad σ_t = σ \cdot \tfrac12 \big(1 - \cos(π t / T)\big),

  a fresh draw every optimizer step (one key per step: the same ε for every micro-batch),
  held constant (no gradient flows through it). The column norms come from W and the
  adapters without forming W' (:func:`~mgpo_jax.lora.layer.column_norms`); the noise is a
  :class:`~mgpo_jax.lora.DenseNoise` that the layer regenerates from its key in the backward
  pass, so nothing of size n × m is kept. The optimizer (AdamW in the paper) is unchanged.

  Args:
    sigma: σ >= 0, the noise level reached at the end of the ramp; or a schedule of the step
      (then used as is, with ``total_steps=None``). Default 0.05: the paper's value for
      T5-base on GLUE and LLaMA-2-7B (0.15 for CLIP ViT-B/32, 0.1 for SDXL).
    total_steps: T, the run's number of optimizer steps, for the cosine ramp (the paper's);
      ``None`` only with a schedule as ``sigma``.

  Returns:
    A :class:`~mgpo_jax.perturbation.WeightPerturbation` for ``Trainer(...,
    perturbation=...)`` or a hand-written step.

  Raises:
    ValueError: for a negative or non-finite ``sigma`` or a bad ``total_steps``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from mgpo_jax.perturbation import LoraWeights, flat_lora
    >>> wp = flat_lora(0.05, total_steps=100)
    >>> w = LoraWeights(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)), 2.0)
    >>> state = wp.init({"proj": w})
    >>> eps = wp.perturbations(state, {"proj": w}, None, jax.random.key(0), 100)
    >>> eps["proj"].col_scale  # 0.05 * ||W_j|| / sqrt(4) = 0.05 * 2 / 2
    Array([0.05, 0.05, 0.05], dtype=float32)

  References:
    Li, Zhang, Li, Tian, Xu, Zhang, Tian, `Flat-LoRA: Low-Rank Adaptation over a Flat Loss
    Landscape <https://arxiv.org/abs/2409.14396>`_, ICML 2025.
  """
  if total_steps is None and not callable(sigma):
    raise ValueError("flat_lora: total_steps (the run's number of steps, for the cosine ramp) "
                     "is needed with a constant sigma; got None")
  sigma_t = sigma_schedule("flat_lora", sigma, total_steps)

  def init_fn(modules):
    del modules
    return FlatLoraState()

  def perturbations_fn(state, modules, opt_state, key, step):
    del state, opt_state
    s = sigma_t(step)
    return {path: DenseNoise(jax.random.fold_in(key, i), noise_scales(w, 0.0, s))
            for i, (path, w) in enumerate(sorted(modules.items()))}

  def update_fn(state, modules, grads):
    del modules, grads
    return state

  return WeightPerturbation(init_fn, perturbations_fn, update_fn)
