"""Sharpness of a loss: the largest Hessian eigenvalue, by power iteration (and Lanczos when a
negative eigenvalue dominates) on Hessian-vector products."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree


def _hvp(loss_fn: Callable[..., jax.Array], params: Any, v: Any, args: tuple) -> Any:
  """``H v`` forward-over-reverse: the JVP of the gradient in direction ``v``."""
  grad_fn = lambda p: jax.grad(loss_fn)(p, *args)
  return jax.jvp(grad_fn, (params,), (v,))[1]


def _vdot(a: Any, b: Any) -> jax.Array:
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _power_iteration(loss_fn, params, args, key, num_iters, tol):
  """The Rayleigh quotient at the dominant eigenvector: the eigenvalue of largest magnitude."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  v = treedef.unflatten(
      [jax.random.normal(k, jnp.shape(x), jnp.result_type(x)) for k, x in zip(keys, leaves)])

  def normalize(u):
    norm = optax.tree.norm(u)
    # Each leaf keeps its dtype (the norm of a mixed-dtype tree is of the widest).
    return jax.tree.map(lambda x: (x / norm).astype(x.dtype), u), norm

  def cond(carry):
    i, _, eigenvalue, previous = carry
    converged = jnp.abs(eigenvalue - previous) <= tol * jnp.abs(eigenvalue)
    return (i < num_iters) & ((i < 2) | ~converged)

  def body(carry):
    i, v, eigenvalue, _ = carry
    hv = _hvp(loss_fn, params, v, args)
    rayleigh = _vdot(v, hv)  # v has unit norm
    hv_unit, hv_norm = normalize(hv)
    # A zero H v (e.g. a loss flat in every direction) keeps v instead of dividing by zero.
    v = jax.tree.map(lambda new, old: jnp.where(hv_norm > 0, new, old), hv_unit, v)
    return i + 1, v, rayleigh, eigenvalue

  v, _ = normalize(v)
  zero = jnp.zeros((), _vdot(v, v).dtype)
  _, _, eigenvalue, _ = jax.lax.while_loop(cond, body, (0, v, zero, zero))
  return eigenvalue


def _lanczos_largest(loss_fn, params, args, key, num_steps):
  """The largest Ritz value of ``num_steps`` Lanczos steps with full reorthogonalisation."""
  flat, unravel = ravel_pytree(params)
  dtype = jnp.promote_types(flat.dtype, jnp.float32)  # the tridiagonal eigensolver's dtypes
  steps = min(num_steps, flat.size)
  # unravel keeps a uniform pytree's dtype only if given it: the tangents must match the params.
  hvp = lambda q: ravel_pytree(
      _hvp(loss_fn, params, unravel(q.astype(flat.dtype)), args))[0].astype(dtype)
  q = jax.random.normal(key, flat.shape, dtype)
  q = q / jnp.linalg.norm(q)
  tiny = 100 * jnp.finfo(flat.dtype).eps

  def step(j, carry):
    basis, alphas, betas, q, q_prev, beta_prev, done = carry
    basis = basis.at[j].set(q)
    w = hvp(q)
    a = q @ w
    w = w - a * q - beta_prev * q_prev
    for _ in range(2):  # twice is enough (Parlett's "twice is enough")
      w = w - basis.T @ (basis @ w)
    b = jnp.linalg.norm(w)
    # After a breakdown the Krylov space is invariant and its Ritz values exact: the remaining
    # diagonal is filled with alphas[0], a Rayleigh quotient of that space (never the largest).
    alphas = alphas.at[j].set(jnp.where(done, alphas[0], a))
    done = done | (b <= tiny * (jnp.abs(a) + beta_prev))
    betas = betas.at[j].set(jnp.where(done, 0.0, b))
    q_next = jnp.where(done, q, w / jnp.where(done, 1.0, b))
    return basis, alphas, betas, q_next, q, jnp.where(done, 0.0, b), done

  zeros = jnp.zeros((steps,), dtype)
  init = (jnp.zeros((steps, flat.size), dtype), zeros, zeros, q, jnp.zeros_like(q),
          zeros[0], jnp.array(False))
  _, alphas, betas, *_ = jax.lax.fori_loop(0, steps, step, init)
  off = betas[:-1]
  tridiagonal = jnp.diag(alphas) + jnp.diag(off, 1) + jnp.diag(off, -1)
  return jnp.linalg.eigvalsh(tridiagonal)[-1]


@functools.partial(jax.jit, static_argnames=("loss_fn", "num_iters"))
def _largest_eigenvalue(loss_fn, params, args, key, num_iters, tol):
  dominant = _power_iteration(loss_fn, params, args, key, num_iters, tol)
  # A dominant negative eigenvalue: the largest one is not dominant, and power iteration (even
  # shifted) approaches it slowly. Lanczos converges at both ends of the spectrum.
  return jax.lax.cond(dominant < 0,
                      lambda: _lanczos_largest(loss_fn, params, args, key,
                                               num_iters).astype(dominant.dtype),
                      lambda: dominant)


def top_hessian_eigenvalue(
    loss_fn: Callable[..., jax.Array],
    params: Any,
    *args: Any,
    key: jax.Array,
    num_iters: int = 100,
    tol: float = 1e-4,
) -> jax.Array:
  r"""The largest eigenvalue of the Hessian of ``loss_fn`` w.r.t. ``params`` (the sharpness).

  Power iteration on Hessian-vector products computed forward-over-reverse
  (``jax.jvp(jax.grad(loss_fn), (params,), (v,))``), so the Hessian is never formed:

  .. math::

    v_0 = z / \|z\|,\ z \sim \mathcal{N}(0, I), \qquad
    \lambda_k = v_k^\top H v_k, \qquad
    v_{k+1} = H v_k / \|H v_k\|,

  stopped after ``num_iters`` products or once :math:`|\lambda_k - \lambda_{k-1}| \le
  \mathrm{tol}\,|\lambda_k|`. The Rayleigh quotient :math:`\lambda_k` converges to the
  eigenvalue of largest *magnitude*, at rate :math:`|\lambda_2 / \lambda_1|` per iteration; at a
  minimum the Hessian is positive semi-definite and this is the largest eigenvalue, the usual
  sharpness measure. Away from a minimum a negative eigenvalue can dominate. Then
  ``min(num_iters, n)`` steps of the Lanczos method (``n`` parameters; a random start from the
  same ``key``; full reorthogonalisation; in at least float32) follow, and the result is the
  largest eigenvalue of the Lanczos tridiagonal matrix :math:`T_k = Q_k^\top H Q_k`: Lanczos converges at both ends of the spectrum, where power
  iteration, even shifted by the negative eigenvalue, would need of the order of
  :math:`|\lambda_\min| / (\lambda_1 - \lambda_2)` iterations. That branch keeps
  ``min(num_iters, n)`` vectors of the size of ``params`` (XLA may reserve that memory even
  when the branch is not taken), has no tolerance, and brings the worst case to
  ``2 * num_iters`` Hessian-vector products. The branch is chosen by the sign of the power
  iteration's estimate: when the two ends of the spectrum are close in magnitude that estimate
  converges slowly, so check the result with more ``num_iters``.

  The computation is jitted, compiled once per ``loss_fn`` object, ``num_iters`` and argument
  shapes (``tol`` is traced): pass the batch and frozen weights through ``*args`` rather than
  closing over them, so they are not baked into the program as constants and later calls
  reuse the compilation.

  Args:
    loss_fn: ``loss_fn(params, *args) -> scalar``, twice differentiable in ``params``.
    params: a pytree of float arrays, the point at which the Hessian is taken (e.g. the LoRA
      adapters; the frozen weights and the batch go in ``*args``).
    *args: further arguments of ``loss_fn``, not differentiated.
    key: PRNG key for the random start vector.
    num_iters: the maximum number of Hessian-vector products of the power iteration, and the
      number of Lanczos steps (at most the number of parameters) when a negative eigenvalue
      dominates; ``>= 1``.
    tol: relative tolerance on the change of the power iteration's estimate, ``>= 0`` (0 runs
      all iterations).

  Returns:
    A scalar: the estimate of the largest eigenvalue, in the params' dtype.

  Raises:
    ValueError: if ``num_iters < 1``, ``tol < 0`` or ``params`` has no leaves.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> # The Hessian is diag(3, 3, 0.5, 0.5, 0.5).
    >>> loss = lambda p: 1.5 * (p["a"] ** 2).sum() + 0.25 * (p["b"] ** 2).sum()
    >>> params = {"a": jnp.ones(2), "b": jnp.ones(3)}
    >>> round(float(top_hessian_eigenvalue(loss, params, key=jax.random.key(0))), 3)
    3.0

  References:
    Lanczos, `An iteration method for the solution of the eigenvalue problem of linear
    differential and integral operators <https://doi.org/10.6028/jres.045.026>`_, 1950.

    Yao et al., `PyHessian: Neural Networks Through the Lens of the Hessian
    <https://arxiv.org/abs/1912.07145>`_, 2020.
  """
  if not isinstance(num_iters, int) or num_iters < 1:
    raise ValueError(f"num_iters must be a positive integer, got {num_iters!r}")
  if not tol >= 0:
    raise ValueError(f"tol must be >= 0, got {tol!r}")
  if not jax.tree.leaves(params):
    raise ValueError("params must have at least one array leaf")
  return _largest_eigenvalue(loss_fn, params, args, key, num_iters, tol)
