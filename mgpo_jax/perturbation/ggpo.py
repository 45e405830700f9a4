"""LoRA-GGPO (a reconstruction): Flat-LoRA's noise widened by the gradient's column norms."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mgpo_jax._checks import check_scalar
from mgpo_jax.lora.layer import DenseNoise
from mgpo_jax.perturbation.base import (WeightPerturbation, _unchanged_unless_finite,
                                        image_column_sq_norms)
from mgpo_jax.perturbation.flat_lora import noise_scales, sigma_schedule

__all__ = ["GGPOState", "ggpo"]


class GGPOState(NamedTuple):
  """State of :func:`ggpo`: O(m) per module.

  Attributes:
    grad_col_sq: per LoRA module (sorted by path), ``‖G_{:,j}‖²`` (m,) of the latest
      gradient's weight-space image ``G = s (g_A B + A g_B)``; zeros before the first step.
  """

  grad_col_sq: tuple[jax.Array, ...]


def ggpo(sigma: optax.ScalarOrSchedule = 0.03, beta: float = 0.01, *,
         total_steps: int | None = None) -> WeightPerturbation:
  r"""LoRA-GGPO (reconstructed): filter-wise weight noise sized by weight AND gradient norms.

  Each LoRA module's effective kernel ``W' = W + s A B`` (n × m) is perturbed for the step's
  forward and backward pass by

  .. math::

    ε_{ij} = σ_t \sqrt{\frac{\lVert W'_{:,j}\rVert^2 + β \lVert G_{:,j}\rVert^2}{n}}\, z_{ij},
    \quad z_{ij} \sim N(0, 1),\qquad G = s\,(g_A B + A\, g_B),

  with ``G`` the weight-space image of the previous step's adapter gradients (0 at the first
  step). Its column norms come from (2r × 2r) Gram products, never an n × m matrix; the state
  keeps them, O(m) per module. The noise is drawn and regenerated as in
  :func:`~mgpo_jax.perturbation.flat_lora`.

  **A reconstruction.** The body of the GGPO paper (arXiv 2502.14538 v1) could not be read;
  its abstract says the perturbation is built from gradient and weight norms. This form
  (Flat-LoRA's noise plus a gradient-norm term) is the one a third-party implementation
  citing v1's equations uses.

  Args:
    sigma: σ >= 0, or a schedule of the step. Default 0.03 (the reconstruction's).
    beta: β >= 0, the weight of the gradient term. Default 0.01 (the reconstruction's).
    total_steps: ``None`` (default): the constant σ of the reconstruction's formula; an
      integer T: σ ramped as in Flat-LoRA, :math:`σ_t = σ \tfrac12 (1 - \cos(π t / T))`.

  Returns:
    A :class:`~mgpo_jax.perturbation.WeightPerturbation`.

  Raises:
    ValueError: for a negative or non-finite ``sigma`` or ``beta``, or a bad ``total_steps``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from mgpo_jax.perturbation import LoraWeights, ggpo
    >>> wp = ggpo(0.03, beta=0.01)
    >>> w = LoraWeights(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)), 2.0)
    >>> state = wp.init({"proj": w})
    >>> grads = {"proj": (jnp.zeros((4, 2)), jnp.ones((2, 3)))}  # G = 2 A g_B: columns 8
    >>> state = wp.update(state, {"proj": w}, grads)
    >>> state.grad_col_sq[0]
    Array([64., 64., 64.], dtype=float32)

  References:
    Chang, Guo, Chang, Wu, `LoRA-GGPO: Mitigating Double Descent in LoRA Fine-Tuning via
    Gradient-Guided Perturbation Optimization <https://arxiv.org/abs/2502.14538v1>`_, 2025.

    Li et al., `Flat-LoRA <https://arxiv.org/abs/2409.14396>`_, ICML 2025.
  """
  sigma_t = sigma_schedule("ggpo", sigma, total_steps)
  check_scalar("ggpo", "beta", beta, lambda v: v >= 0, "a finite number >= 0")

  def init_fn(modules):
    return GGPOState(tuple(jnp.zeros(w.kernel.shape[1], jnp.float32)
                           for _, w in sorted(modules.items())))

  def perturbations_fn(state, modules, opt_state, key, step):
    del opt_state
    s = sigma_t(step)
    return {path: DenseNoise(jax.random.fold_in(key, i), noise_scales(w, beta * g_sq, s))
            for i, ((path, w), g_sq) in enumerate(zip(sorted(modules.items()),
                                                      state.grad_col_sq))}

  def update_fn(state, modules, grads):
    del state
    return GGPOState(tuple(image_column_sq_norms(w, *grads[path])
                           for path, w in sorted(modules.items())))

  return WeightPerturbation(init_fn, perturbations_fn, _unchanged_unless_finite(update_fn))
