"""The LoRA layer and the per-step perturbations it can carry.

:class:`LoraLinear` wraps a frozen ``nnx.Linear`` kernel ``W ∈ R^{n×m}`` (Flax orientation,
``y = x W``) with adapters ``A ∈ R^{n×r}``, ``B ∈ R^{r×m}`` (``nnx.LoRAParam``); its effective
kernel is::

  W' = W + s · A B,      s = alpha / r        (rsLoRA: s = alpha / sqrt(r))

and it computes ``y = x W + s · ((dropout(x) A) B) [+ x ε] + b`` without forming ``W'``.
``ε`` is an optional perturbation of the effective kernel for one step (no gradient flows
through it): :class:`LowRank` factors (adds ``(x U) V``) or :class:`DenseNoise` drawn inside
the layer (``y = x (W + ε) + ...`` with ``ε_ij = σ_j z_ij``; the noisy kernel is
rematerialised for the backward pass, never kept). Set it with
:func:`~mgpo_jax.lora.perturb.set_perturbations`.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mgpo_jax.dropout import Dropout
from mgpo_jax.lora.config import LoraConfig
from mgpo_jax.lora.init import init_factors

__all__ = ["LoraLinear", "LowRank", "DenseNoise", "Perturbation", "column_norms",
           "standard_normal"]


class LowRank(NamedTuple):
  """Low-rank perturbation ``ε = U V`` of a LoRA module's effective kernel.

  ``u``: (in, k), ``v``: (k, out). The layer adds ``(x U) V``; cost O(k (in + out)).
  """

  u: jax.Array
  v: jax.Array


class DenseNoise(NamedTuple):
  """Dense Gaussian perturbation ``ε_ij = σ_j z_ij`` drawn inside the layer.

  ``z = standard_normal(key, (in, out), kernel dtype)``; ``col_scale`` is ``σ`` (out,),
  one scale per output column (per output unit). The layer computes ``x (W + z σ)`` in one
  matmul, accumulated over row blocks of the kernel: one block of the noisy kernel exists at
  a time, in the forward pass and again (regenerated from ``key``, a custom VJP) in the
  backward pass; no (in, out) buffer is kept.
  """

  key: jax.Array
  col_scale: jax.Array


_BLOCK_ELEMENTS = 2**18  # the noise is drawn in row blocks of about this many elements


def _row_block(n: int, m: int) -> int:
  """Rows per block of an (n, m) draw: the largest divisor of n with rows·m ≤ 2^18 (≥ 1)."""
  target = max(1, _BLOCK_ELEMENTS // m)
  return max(d for d in range(1, min(n, target) + 1) if n % d == 0)


def _noise_block(key: jax.Array, i, shape: tuple[int, int], dtype, whole: bool) -> jax.Array:
  """Block ``i`` of the draw: ``normal(key)`` for a draw in one block, else
  ``normal(fold_in(key, i))``."""
  return jax.random.normal(key if whole else jax.random.fold_in(key, i), shape, dtype)


def standard_normal(key: jax.Array, shape: tuple[int, int], dtype) -> jax.Array:
  """The standard-normal draw ``z`` (n, m) behind a :class:`DenseNoise` (exposed for tests).

  ``jax.random.normal(key, (n, m), dtype)`` for a kernel of at most 2^18 elements; a larger
  one is drawn in row blocks (about 2^18 elements each, :func:`_row_block` rows), block ``i``
  being ``jax.random.normal(fold_in(key, i), (rows, m), dtype)``, so that the layer can
  regenerate one block at a time."""
  n, m = shape
  rows = _row_block(n, m)
  return jnp.concatenate([_noise_block(key, i, (rows, m), dtype, rows == n)
                          for i in range(n // rows)])


def column_norms(kernel: jax.Array, a: jax.Array, b: jax.Array, scaling: float) -> jax.Array:
  """``‖W'_{:,j}‖`` for every output column j of ``W' = W + s A B``, without forming W'.

  ``‖W'_{:,j}‖² = ‖W_{:,j}‖² + 2 s (Aᵀ W)_{:,j} · B_{:,j} + s² B_{:,j}ᵀ (AᵀA) B_{:,j}``,
  in float32 (or the inputs' wider dtype); cost O(n m r), temporaries O(m r + r²).
  """
  dtype = jnp.result_type(jnp.float32, kernel.dtype, a.dtype, b.dtype)
  w, a, b = kernel.astype(dtype), a.astype(dtype), b.astype(dtype)
  sq = (
    jnp.sum(w * w, axis=0)
    + 2 * scaling * jnp.sum((a.T @ w) * b, axis=0)
    + scaling * scaling * jnp.sum(b * ((a.T @ a) @ b), axis=0)
  )
  return jnp.sqrt(jnp.maximum(sq, 0.0))


def _noisy_matmul_impl(x, w, key, scale, precision):
  """``x (W + z σ)``, accumulated over row blocks of W: one (rows, m) block of the noisy
  kernel exists at a time."""
  n, m = w.shape
  rows = _row_block(n, m)
  scale = scale.astype(w.dtype)

  def block(acc, i):
    w_i = jax.lax.dynamic_slice_in_dim(w, i * rows, rows, axis=0)
    x_i = jax.lax.dynamic_slice_in_dim(x, i * rows, rows, axis=x.ndim - 1)
    k_i = w_i + _noise_block(key, i, (rows, m), w.dtype, rows == n) * scale
    return acc + jnp.matmul(x_i, k_i, precision=precision), None

  y0 = jnp.zeros((*x.shape[:-1], m), jnp.result_type(x.dtype, w.dtype))
  if rows == n:
    return block(y0, 0)[0]
  return jax.lax.scan(block, y0, jnp.arange(n // rows))[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _noisy_matmul(x, w, key, scale, precision):
  """``x (W + z σ)`` (contracting x's last axis). Forward and backward regenerate the noisy
  kernel block by block from ``key`` instead of keeping it. No gradient flows to ``key`` or
  ``σ``."""
  return _noisy_matmul_impl(x, w, key, scale, precision)


def _noisy_matmul_fwd(x, w, key, scale, precision):
  return _noisy_matmul_impl(x, w, key, scale, precision), (x, w, key, scale)


def _noisy_matmul_bwd(precision, residuals, g):
  x, w, key, scale = residuals
  n, m = w.shape
  rows = _row_block(n, m)

  def block(_, i):  # dx[..., rows of block i] = g (W_i + z_i σ)ᵀ
    w_i = jax.lax.dynamic_slice_in_dim(w, i * rows, rows, axis=0)
    k_i = w_i + _noise_block(key, i, (rows, m), w.dtype, rows == n) * scale.astype(w.dtype)
    return None, jnp.matmul(g, k_i.T, precision=precision)

  if rows == n:
    dx = block(None, 0)[1]
  else:
    dx_blocks = jax.lax.scan(block, None, jnp.arange(n // rows))[1]  # (blocks, ..., rows)
    dx = jnp.moveaxis(dx_blocks, 0, -2).reshape(x.shape)
  dw = jnp.matmul(x.reshape(-1, n).T, g.reshape(-1, m), precision=precision)  # unused: DCE'd
  return dx.astype(x.dtype), dw.astype(w.dtype), None, jnp.zeros_like(scale)


_noisy_matmul.defvjp(_noisy_matmul_fwd, _noisy_matmul_bwd)


def _low_rank(x: jax.Array, a: jax.Array, b: jax.Array, precision) -> jax.Array:
  """``(x a) b`` for ``x`` of shape ``(..., in)``, computed on ``x`` flattened to ``(N, in)``.

  Same values as ``x @ a @ b``; the reshape is for XLA:CPU, which otherwise computes the
  backward's ``hᵀ g`` (``h = x a``, contracting over batch AND sequence dims) by first copying
  the output gradient ``g`` into a transposed layout, one copy per adapter per step (in a
  profile of a LoRA Llama step: 99 of 803 ms; see docs/benchmarks.md, section 4).
  Inputs whose middle dims are sharded in their type (an explicit mesh) are left unflattened:
  merging a sharded middle dim is a reshape the sharding rules reject.
  """
  mm = lambda p, q: jnp.matmul(p, q, precision=precision)  # noqa: E731
  spec = tuple(getattr(jax.typeof(x).sharding, "spec", None) or ())
  if x.ndim <= 2 or any(spec[1:x.ndim - 1]):
    return mm(mm(x, a), b)
  rows = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
  return mm(mm(rows, a), b).reshape(*x.shape[:-1], b.shape[-1])


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
    self.dropout = Dropout(
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
    dims = (((inputs.ndim - 1,), (0,)), ((), ()))
    p = self.perturbation.get_value()
    if isinstance(p, DenseNoise):  # x (W + z σ): the noisy kernel is recomputed, never kept
      y = _noisy_matmul(inputs, kernel, p.key, jax.lax.stop_gradient(p.col_scale),
                        self.precision)
    else:
      y = self.dot_general(inputs, kernel, dims, precision=self.precision, **kwargs)
    y = y + self.scaling * _low_rank(self.dropout(inputs), a, b, self.precision)
    if isinstance(p, LowRank):
      u, v = jax.lax.stop_gradient((p.u, p.v))
      y = y + _low_rank(inputs, u.astype(inputs.dtype), v.astype(inputs.dtype), self.precision)
    if bias is not None:
      y = y + bias
    return y

  def delta_kernel(self) -> jax.Array:
    """``s A B`` (in, out), materialised: for merging and tests, not for the forward pass."""
    return self.scaling * (self.lora_a[...] @ self.lora_b[...])

  def column_norms(self) -> jax.Array:
    """``‖W'_{:,j}‖`` for every output column j of ``W' = W + s A B``, without forming W'.

    ``‖W'_{:,j}‖² = ‖W_{:,j}‖² + 2 s (Wᵀ A)_{j,:} B_{:,j} + s² B_{:,j}ᵀ (AᵀA) B_{:,j}``
    (Flat-LoRA's filter-wise noise scale, see docs/lora.md).
    """
    return column_norms(self.kernel[...], self.lora_a[...], self.lora_b[...], self.scaling)
