"""LoRA-MGPO as the authors' released code does it: a low-rank weight-space perturbation along
each module's momentum image."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mgpo_jax._checks import check_scalar
from mgpo_jax.lora.layer import LowRank
from mgpo_jax.optim.mgpo import _first_moment
from mgpo_jax.perturbation.base import (WeightPerturbation, _factors,
                                        _unchanged_unless_finite, adapter_pairs, image_sq_norm)

__all__ = ["MGPOCodeState", "mgpo_code"]


class MGPOCodeState(NamedTuple):
  """State of :func:`mgpo_code`: two numbers per module, nothing parameter-sized.

  Attributes:
    count: optimizer steps folded in so far (int32 scalar).
    grad_norm_ema: ``ḡ_l`` per LoRA module (sorted by path), the EMA of
      ``‖s (g_A B + A g_B)‖_F`` (float32, shape (modules,)).
  """

  count: jax.Array
  grad_norm_ema: jax.Array


def mgpo_code(rho: float = 0.05, *, ema_decay: float = 0.9, max_inv_norm: float = 10.0,
              eps: float = 1e-12) -> WeightPerturbation:
  r"""LoRA-MGPO, released-code form: each module's kernel moved against its momentum image.

  Per LoRA module ``l`` with ``W_l' = W_l + s A_l B_l``, before step t:

  .. math::

    v_l = s\,(m_A B + A\, m_B),\qquad
    ε_l = -ρ \min\!\Big(\frac{1}{\bar g_l}, c_{\max}\Big) \frac{v_l}{\lVert v_l\rVert_F},

  with ``(m_A, m_B)`` the base optimizer's first moment (Adam's ``mu``, read from its state:
  no second copy) and ``ḡ_l`` a per-module EMA of ``‖s (g_A B + A g_B)‖_F`` (set to the
  first value at the first step). A module whose ``‖v_l‖ ≤ eps`` or whose ε is not finite is
  not perturbed, and neither is the first step (``m = 0``). ``ε_l`` is a rank-2r
  :class:`~mgpo_jax.lora.LowRank` ``(s c [m_A, A]) [B; m_B]``: the layer adds
  ``(x U) V``, O(r) per token like the adapter itself; the norms come from (2r × 2r) Gram
  products. The optimizer steps from the clean adapters with the gradient taken at
  ``W' + ε``.

  It differs from the paper's form (:func:`mgpo_jax.mgpo`): the sign is −, the frozen
  kernel is perturbed in weight space rather than the adapters, and direction and size are
  per module.

  Args:
    rho: ρ >= 0. Default 0.05: the MGPO paper's NLU setting (T5-base on GLUE).
    ema_decay: β in [0, 1) of the gradient-norm EMA. Default 0.9 (paper, NLU).
    max_inv_norm: the cap ``c_max`` > 0 on ``1/ḡ_l``. Default 10 (released code).
    eps: no perturbation where ``‖v_l‖ ≤ eps``. Default 1e-12 (released code).

  Returns:
    A :class:`~mgpo_jax.perturbation.WeightPerturbation` whose ``perturbations`` needs an
    optimizer state that keeps Adam's ``mu`` (or SGD's ``trace``).

  Raises:
    ValueError: for a bad hyper-parameter; at ``perturbations``, for an optimizer state
      without a first moment.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from mgpo_jax.perturbation import LoraWeights, mgpo_code
    >>> wp = mgpo_code(rho=0.05)
    >>> w = LoraWeights(jnp.zeros((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)), 2.0)
    >>> params = {"proj": {"lora_a": w.lora_a, "lora_b": w.lora_b}}
    >>> opt_state = optax.adam(1e-3).init(params)
    >>> state = wp.init({"proj": w})
    >>> eps = wp.perturbations(state, {"proj": w}, opt_state, jax.random.key(0), 0)
    >>> float(jnp.abs(eps["proj"].u).max())  # m = 0 at the first step: no perturbation
    0.0

  References:
    Chang, Guo, Chang, Wu, `LoRA-MGPO: Mitigating Double Descent in Low-Rank Adaptation via
    Momentum-Guided Perturbation Optimization <https://arxiv.org/abs/2502.14538>`_, EMNLP
    2025 Findings (and the authors' released code).
  """
  check_scalar("mgpo_code", "rho", rho, lambda v: v >= 0, "a finite number >= 0")
  check_scalar("mgpo_code", "ema_decay", ema_decay, lambda v: 0 <= v < 1, "a number in [0, 1)")
  check_scalar("mgpo_code", "max_inv_norm", max_inv_norm, lambda v: v > 0, "a finite number > 0")
  check_scalar("mgpo_code", "eps", eps, lambda v: v >= 0, "a finite number >= 0")

  def init_fn(modules):
    return MGPOCodeState(jnp.zeros((), jnp.int32), jnp.zeros((len(modules),), jnp.float32))

  def perturbations_fn(state, modules, opt_state, key, step):
    del key, step
    mu = adapter_pairs(_first_moment(opt_state), list(modules))
    size = jnp.where(state.count > 0, jnp.minimum(1.0 / state.grad_norm_ema, max_inv_norm), 0.0)
    out = {}
    for i, (path, w) in enumerate(sorted(modules.items())):
      x, y = _factors(w, *mu[path])
      v_norm = jnp.sqrt(image_sq_norm(w, *mu[path]))
      c = -rho * size[i] / v_norm
      c = jnp.where((v_norm > eps) & jnp.isfinite(c), c, 0.0)
      out[path] = LowRank(c * w.scaling * x, y)
    return out

  def update_fn(state, modules, grads):
    g_norm = jnp.stack([jnp.sqrt(image_sq_norm(w, *grads[path]))
                        for path, w in sorted(modules.items())])
    ema = jnp.where(state.count == 0, g_norm,
                    ema_decay * state.grad_norm_ema + (1.0 - ema_decay) * g_norm)
    return MGPOCodeState(optax.safe_increment(state.count), ema)

  return WeightPerturbation(init_fn, perturbations_fn, _unchanged_unless_finite(update_fn))
