"""Sharpness of a loss: the top Hessian eigenvalue by power iteration on Hessian-vector products."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax


def _hvp(loss_fn: Callable[..., jax.Array], params: Any, v: Any, args: tuple) -> Any:
  """``H v`` forward-over-reverse: the JVP of the gradient in direction ``v``."""
  grad_fn = lambda p: jax.grad(loss_fn)(p, *args)
  return jax.jvp(grad_fn, (params,), (v,))[1]


def _vdot(a: Any, b: Any) -> jax.Array:
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _power_iteration(loss_fn, params, args, key, num_iters, tol, shift):
  """The Rayleigh quotient of ``H`` at the dominant eigenvector of ``H - shift I``."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  v = treedef.unflatten(
      [jax.random.normal(k, jnp.shape(x), jnp.result_type(x)) for k, x in zip(keys, leaves)])

  def normalize(u):
    norm = optax.tree.norm(u)
    return jax.tree.map(lambda x: x / norm, u), norm

  def cond(carry):
    i, _, eigenvalue, previous = carry
    converged = jnp.abs(eigenvalue - previous) <= tol * jnp.abs(eigenvalue - shift)
    return (i < num_iters) & ((i < 2) | ~converged)

  def body(carry):
    i, v, eigenvalue, _ = carry
    hv = jax.tree.map(lambda h, x: h - shift * x, _hvp(loss_fn, params, v, args), v)
    rayleigh = _vdot(v, hv) + shift  # v has unit norm
    hv_unit, hv_norm = normalize(hv)
    # A zero H v (e.g. a loss flat in every direction) keeps v instead of dividing by zero.
    v = jax.tree.map(lambda new, old: jnp.where(hv_norm > 0, new, old), hv_unit, v)
    return i + 1, v, rayleigh, eigenvalue

  v, _ = normalize(v)
  zero = jnp.zeros((), _vdot(v, v).dtype)
  _, _, eigenvalue, _ = jax.lax.while_loop(cond, body, (0, v, zero + shift, zero + shift))
  return eigenvalue


@functools.partial(jax.jit, static_argnames="loss_fn")
def _largest_eigenvalue(loss_fn, params, args, key, num_iters, tol):
  dominant = _power_iteration(loss_fn, params, args, key, num_iters, tol, 0.0)
  # A dominant negative eigenvalue: iterate again on H - dominant I, whose spectrum is >= 0 and
  # whose dominant eigenvalue is lambda_max - dominant.
  return jax.lax.cond(
      dominant < 0,
      lambda: _power_iteration(loss_fn, params, args, key, num_iters, tol, dominant),
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
    v_{k+1} = (H - sI) v_k / \|(H - sI) v_k\|,

  stopped after ``num_iters`` products or once :math:`|\lambda_k - \lambda_{k-1}| \le
  \mathrm{tol}\,|\lambda_k - s|`. With :math:`s = 0` the Rayleigh quotient converges to the
  eigenvalue of largest *magnitude*, at rate :math:`|\lambda_2 / \lambda_1|` per iteration. At
  a minimum that is the largest eigenvalue; away from one a negative eigenvalue can dominate.
  Then the iteration runs a second time with the shift :math:`s = \lambda_\text{dominant} < 0`:
  the spectrum of :math:`H - sI` is (up to the first run's error) non-negative, its dominant
  eigenvalue is :math:`\lambda_\max - s`, and the Rayleigh quotient of :math:`H` converges to
  :math:`\lambda_\max`, at rate :math:`(\lambda_2 - s) / (\lambda_\max - s)`, with up to
  ``num_iters`` more products.

  The loop is one jitted ``lax.while_loop``, compiled once per ``loss_fn`` object and argument
  shapes (``num_iters`` and ``tol`` are traced): pass the batch and frozen weights through
  ``*args`` rather than closing over them, so they are not baked into the program as constants
  and later calls reuse the compilation.

  Args:
    loss_fn: ``loss_fn(params, *args) -> scalar``, twice differentiable in ``params``.
    params: a pytree of float arrays, the point at which the Hessian is taken (e.g. the LoRA
      adapters; the frozen weights and the batch go in ``*args``).
    *args: further arguments of ``loss_fn``, not differentiated.
    key: PRNG key for the random start vector.
    num_iters: the maximum number of Hessian-vector products, ``>= 1``.
    tol: relative tolerance on the change of the estimate, ``>= 0`` (0 runs all iterations).

  Returns:
    A scalar: the Rayleigh-quotient estimate of the largest eigenvalue, in the params' dtype.

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
