"""How a LoRA module's factors start (``LoraConfig.init``), shared by the NNX and pytree paths.

For a frozen kernel ``W ∈ R^{n×m}`` (in, out), rank ``r`` and scaling ``s``:

* ``"default"``: ``A ~ U(-1/sqrt(n), 1/sqrt(n))`` — PEFT's ``kaiming_uniform_(a=sqrt(5))``
  on the (r, n) PyTorch weight — and ``B = 0``;
* ``"gaussian"``: ``A ~ N(0, std = 1/r)`` (PEFT's ``init_lora_weights="gaussian"``), ``B = 0``;
* ``"pissa"`` (Meng et al. 2024, PiSSA): with ``W = U S Vᵀ``, ``A = U_r sqrt(S_r / s)``,
  ``B = sqrt(S_r / s) V_rᵀ``, and ``W`` replaced by the residual ``W − s A B``;
* ``"lora-one"`` (Zhang et al. 2025, LoRA-One): the top-r singular subspace of the negative
  full gradient of ``W``; it needs that gradient, so it is made by
  :mod:`mgpo_jax.lora.lora_one` (:func:`~mgpo_jax.lora.lora_one.apply_lora_one`), not here.

The first two start with ``s A B = 0``; PiSSA moves the top-r part of ``W`` into the
adapters. Either way the model's function is unchanged (up to rounding for PiSSA). LoRA-One
leaves ``W`` as it is and starts with ``s A B ≠ 0``: one rank-r step along the negative
gradient.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
  from mgpo_jax.lora.config import LoraConfig

__all__ = ["INITS", "init_factors"]

#: The accepted values of ``LoraConfig.init``.
INITS = ("default", "gaussian", "pissa", "lora-one")


def init_factors(
  key: jax.Array, w: jax.Array, config: LoraConfig
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """``(A (n, r), B (r, m), W_residual or None)`` for a kernel ``w`` of shape (n, m).

  ``key`` draws ``A`` (unused by PiSSA); the residual is returned only by ``"pissa"``.
  """
  n, m = w.shape
  r, dtype = config.r, w.dtype
  if config.init == "lora-one":
    raise ValueError(
      "init='lora-one' needs the full gradient of each target kernel: use "
      "mgpo_jax.lora.apply_lora_one(model, config, loss_fn, batches), or "
      "kernel_gradients(...) then init_lora_one(...)"
    )
  if config.init == "pissa":
    u, sv, vt = jnp.linalg.svd(w.astype(jnp.float32), full_matrices=False)
    root = jnp.sqrt(sv[:r] / config.scaling)
    a, b = u[:, :r] * root, root[:, None] * vt[:r]
    residual = w.astype(jnp.float32) - config.scaling * (a @ b)
    return a.astype(dtype), b.astype(dtype), residual.astype(dtype)
  if config.init == "gaussian":
    a = jax.random.normal(key, (n, r), dtype) / r
  else:
    bound = 1.0 / math.sqrt(n)
    a = jax.random.uniform(key, (n, r), dtype, -bound, bound)
  return a, jnp.zeros((r, m), dtype), None
