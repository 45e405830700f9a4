"""The LoRA layer and the per-step perturbations it can carry.

:class:`LoraLinear` wraps a frozen ``nnx.Linear`` kernel ``W ∈ R^{n×m}`` (Flax orientation,
``y = x W``) with adapters ``A ∈ R^{n×r}``, ``B ∈ R^{r×m}`` (``nnx.LoRAParam``); its effective
kernel is::

  W' = W + s · A B,      s = alpha / r        (rsLoRA: s = alpha / sqrt(r))

and it computes ``y = x W + s · ((dropout(x) A) B) [+ x ε] + b`` without forming ``W'``.
``ε`` is an optional perturbation of the effective kernel for one step (no gradient flows
through it): :class:`LowRank` factors (adds ``(x U) V``) or :class:`DenseNoise` drawn inside
the layer (adds ``x ε`` with ``ε_ij = σ_j z_ij``). Set it with
:func:`~mgpo_jax.lora.perturb.set_perturbations`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mgpo_jax.lora.config import LoraConfig
from mgpo_jax.lora.init import init_factors

__all__ = ["LoraLinear", "LowRank", "DenseNoise", "Perturbation"]


class LowRank(NamedTuple):
  """Low-rank perturbation ``ε = U V`` of a LoRA module's effective kernel.

  ``u``: (in, k), ``v``: (k, out). The layer adds ``(x U) V``; cost O(k (in + out)).
  """

  u: jax.Array
  v: jax.Array


class DenseNoise(NamedTuple):
  """Dense Gaussian perturbation ``ε_ij = σ_j z_ij`` drawn inside the layer.

  ``z = jax.random.normal(key, (in, out), kernel dtype)``; ``col_scale`` is ``σ`` (out,),
  one scale per output column (per output unit). The layer adds ``(x z) * σ``; ``z`` exists
  only inside the forward pass and is regenerated from ``key`` (e.g. in the backward pass).
  """

  key: jax.Array
  col_scale: jax.Array


class Perturbation(nnx.Variable):
  """Holds a LoRA module's perturbation for one step: ``None``, :class:`LowRank` or
  :class:`DenseNoise`. Not a ``Param``: neither trainable nor frozen weights."""


class LoraLinear(nnx.Module):
  """``nnx.Linear`` with a LoRA adapter: ``y = x W + s ((dropout(x) A) B) [+ x ε] + b``.

  Built from an existing ``nnx.Linear`` by :func:`apply_lora`; the frozen ``kernel`` and
  ``bias`` are the base module's own ``nnx.Param`` variables (same state paths), the adapters
  ``lora_a`` (in, r) and ``lora_b`` (r, out) are ``nnx.LoRAParam``, made by
  :func:`~mgpo_jax.lora.init.init_factors` unless ``factors=(A, B)`` is given. ``perturbation`` (a
  :class:`Perturbation`) optionally adds a constant perturbation ``ε`` of the effective
  kernel for one step; no gradient flows through ``ε``.
  """

  def __init__(self, base: nnx.Linear, config: LoraConfig, *, rngs: nnx.Rngs,
               factors: tuple[jax.Array, jax.Array] | None = None):
    self.in_features, self.out_features = base.in_features, base.out_features
    self.use_bias = base.use_bias
    self.dtype, self.param_dtype = base.dtype, base.param_dtype
    self.precision = base.precision
    self.dot_general = base.dot_general
    self.promote_dtype = base.promote_dtype
    self.preferred_element_type = base.preferred_element_type
    self.r = config.r
    self.scaling = config.scaling

    if factors is None:
      a, b, residual = init_factors(rngs.params(), base.kernel[...], config)
    else:  # given factors (LoRA-One's spectral init); the kernel stays as it is
      a, b, residual = factors[0], factors[1], None
    self.kernel = base.kernel
    if residual is not None:
      self.kernel.set_value(residual)
    self.bias = base.bias
    self.lora_a = nnx.LoRAParam(a)
    self.lora_b = nnx.LoRAParam(b)
    # Built in eval mode, like the shipped models' dropouts: ``model.train()`` turns it on.
    self.dropout = nnx.Dropout(
      config.dropout, deterministic=True, rngs=rngs if config.dropout > 0 else None
    )
    self.perturbation = Perturbation(None)

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    kernel = self.kernel[...]
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias, a, b = self.promote_dtype(
      (inputs, kernel, bias, self.lora_a[...], self.lora_b[...]), dtype=self.dtype
    )
    kwargs = {"out_sharding": out_sharding}
    if self.preferred_element_type is not None:
      kwargs["preferred_element_type"] = self.preferred_element_type
    y = self.dot_general(
      inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())), precision=self.precision,
      **kwargs,
    )
    mm = lambda p, q: jnp.matmul(p, q, precision=self.precision)  # noqa: E731
    y = y + self.scaling * mm(mm(self.dropout(inputs), a), b)
    y = y + self._perturbation_term(inputs, kernel.dtype)
    if bias is not None:
      y = y + bias
    return y

  def _perturbation_term(self, x: jax.Array, dtype) -> jax.Array | float:
    p = self.perturbation.get_value()
    if p is None:
      return 0.0
    mm = lambda p, q: jnp.matmul(p, q, precision=self.precision)  # noqa: E731
    if isinstance(p, LowRank):
      u, v = jax.lax.stop_gradient((p.u, p.v))
      return mm(mm(x, u.astype(x.dtype)), v.astype(x.dtype))
    z = jax.random.normal(p.key, (self.in_features, self.out_features), dtype)
    scale = jax.lax.stop_gradient(p.col_scale).astype(x.dtype)
    return mm(x, jax.lax.stop_gradient(z).astype(x.dtype)) * scale

  def delta_kernel(self) -> jax.Array:
    """``s A B`` (in, out), materialised: for merging and tests, not for the forward pass."""
    return self.scaling * (self.lora_a[...] @ self.lora_b[...])

  def column_norms(self) -> jax.Array:
    """``‖W'_{:,j}‖`` for every output column j of ``W' = W + s A B``, without forming W'.

    ``‖W'_{:,j}‖² = ‖W_{:,j}‖² + 2 s (Wᵀ A)_{j,:} B_{:,j} + s² B_{:,j}ᵀ (AᵀA) B_{:,j}``
    (Flat-LoRA's filter-wise noise scale, see docs/lora.md).
    """
    w, a, b, s = self.kernel[...], self.lora_a[...], self.lora_b[...], self.scaling
    sq = (
      jnp.sum(w * w, axis=0)
      + 2 * s * jnp.sum((w.T @ a) * b.T, axis=1)
      + s * s * jnp.sum(b * ((a.T @ a) @ b), axis=0)
    )
    return jnp.sqrt(jnp.maximum(sq, 0.0))
