"""Top Hessian eigenvalue by power iteration, against known spectra and dense float64 Hessians."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from mgpo_jax.analysis import top_hessian_eigenvalue

SHAPES = {"a": (3, 4), "b": (5,), "c": {"d": (2, 2)}}  # 21 parameters over three leaves


def _random_params(rng, dtype):
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), dtype), SHAPES,
                      is_leaf=lambda s: isinstance(s, tuple))


def _quadratic_loss(params, hessian):
  x = ravel_pytree(params)[0]
  return 0.5 * x @ hessian @ x


def _hessian(rng, top, *, negative=None, rest=(-2.0, 2.0)):
  """H = Q diag(lam) Q^T with a random orthogonal Q and lam = (top, the rest uniform in
  ``rest``), plus a dominant ``negative`` eigenvalue when given."""
  n = 21
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  rest = rng.uniform(*rest, n - 1 - (negative is not None))
  lam = np.concatenate([[top], [] if negative is None else [negative], rest])
  return (q * lam) @ q.T


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quadratic_known_spectrum_float64(seed):
  rng = np.random.default_rng(seed)
  top = rng.uniform(4.0, 8.0)  # fresh value, gap ratio <= 0.5
  with jax.enable_x64(True):
    hessian = _hessian(rng, top)
    params = _random_params(rng, jnp.float64)
    est = top_hessian_eigenvalue(_quadratic_loss, params, jnp.asarray(hessian),
                                 key=jax.random.key(seed), num_iters=200, tol=0.0)
    assert est.dtype == jnp.float64
  np.testing.assert_allclose(float(est), np.linalg.eigvalsh(hessian)[-1], rtol=1e-10)
  np.testing.assert_allclose(float(est), top, rtol=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("top", [3.0, -0.5])
def test_dominant_negative_eigenvalue_gives_the_largest_not_the_dominant(seed, top):
  """A saddle whose most negative eigenvalue dominates in magnitude: the answer is the largest
  eigenvalue (the shifted second iteration), not the dominant one (what plain power iteration
  converges to). ``top = -0.5``: every eigenvalue may be negative."""
  rng = np.random.default_rng(seed)
  negative = -rng.uniform(10.0, 40.0)
  with jax.enable_x64(True):
    hessian = _hessian(rng, top, negative=negative, rest=(-2.0, 2.0) if top > 0 else (-3.0, -1.0))
    est = top_hessian_eigenvalue(_quadratic_loss, _random_params(rng, jnp.float64),
                                 jnp.asarray(hessian), key=jax.random.key(seed), num_iters=1000,
                                 tol=0.0)
  eigvals = np.linalg.eigvalsh(hessian)
  assert abs(eigvals[0]) > 3 * abs(eigvals[-1]), "the test needs a dominant negative eigenvalue"
  np.testing.assert_allclose(float(est), eigvals[-1], rtol=1e-8)


@pytest.mark.parametrize("seed", [0, 1])
def test_dominant_negative_eigenvalue_lanczos_in_fewer_steps_than_parameters(seed):
  """400 parameters, 60 Lanczos steps: the largest eigenvalue of a saddle whose negative end
  dominates 10x, in float32 (the default dtype) and float64, from the public function and
  through ``jax.jit``."""
  rng = np.random.default_rng(seed)
  n = 400
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  top = rng.uniform(3.0, 5.0)
  lam = np.concatenate([[top, -10 * top], rng.uniform(-top, 0.5 * top, n - 2)])
  hessian = (q * lam) @ q.T
  loss = lambda p, h: 0.5 * p["w"] @ h @ p["w"]
  for dtype, rtol in ((jnp.float64, 1e-8), (jnp.float32, 1e-4)):
    with jax.enable_x64(dtype == jnp.float64):
      params = {"w": jnp.asarray(rng.normal(size=n), dtype)}
      h = jnp.asarray(hessian, dtype)
      est = top_hessian_eigenvalue(loss, params, h, key=jax.random.key(seed), num_iters=60)
      jitted = jax.jit(lambda p, h: top_hessian_eigenvalue(loss, p, h, key=jax.random.key(seed),
                                                           num_iters=60))(params, h)
      assert est.dtype == dtype
      np.testing.assert_allclose(float(est), top, rtol=rtol)
      np.testing.assert_allclose(float(jitted), float(est), rtol=rtol)


def test_quadratic_float32_defaults():
  rng = np.random.default_rng(10)
  top = rng.uniform(4.0, 8.0)
  hessian = jnp.asarray(_hessian(rng, top), jnp.float32)
  est = top_hessian_eigenvalue(_quadratic_loss, _random_params(rng, jnp.float32), hessian,
                               key=jax.random.key(1))
  assert est.dtype == jnp.float32
  np.testing.assert_allclose(float(est), top, rtol=1e-3)


def _mlp_loss(params, x, y):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  logits = h @ params["w2"] + params["b2"]
  return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[:, None], -1)[:, 0])


def test_small_mlp_matches_dense_hessian():
  rng = np.random.default_rng(5)
  with jax.enable_x64(True):
    params = {"w1": rng.normal(size=(3, 4)), "b1": rng.normal(size=4) * 0.1,
              "w2": rng.normal(size=(4, 2)), "b2": np.zeros(2)}
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    flat, unravel = ravel_pytree(params)
    dense_hessian = jax.jit(jax.hessian(lambda f, x, y: _mlp_loss(unravel(f), x, y)))
    for batch_seed in (0, 1):  # two batches through *args, one compiled loop
      b = np.random.default_rng(100 + batch_seed)
      x, y = jnp.asarray(b.normal(size=(16, 3))), jnp.asarray(b.integers(0, 2, 16))
      dense = np.asarray(dense_hessian(flat, x, y))
      eigvals = np.linalg.eigvalsh(0.5 * (dense + dense.T))
      reference = eigvals[-1]
      assert abs(eigvals[-2]) < 0.9 * abs(reference), "test needs a spectral gap"
      est = top_hessian_eigenvalue(_mlp_loss, params, x, y, key=jax.random.key(batch_seed),
                                   num_iters=1000, tol=1e-13)
      np.testing.assert_allclose(float(est), reference, rtol=1e-6)


def test_flat_loss_gives_zero_not_nan():
  params = _random_params(np.random.default_rng(0), jnp.float32)
  est = top_hessian_eigenvalue(lambda p: 3.0 * ravel_pytree(p)[0].sum(), params,
                               key=jax.random.key(0), num_iters=5)
  assert float(est) == 0.0


@pytest.mark.parametrize("kwargs,match", [({"num_iters": 0}, "num_iters"), ({"tol": -1.0}, "tol")])
def test_bad_arguments(kwargs, match):
  params = _random_params(np.random.default_rng(0), jnp.float32)
  with pytest.raises(ValueError, match=match):
    top_hessian_eigenvalue(lambda p: 0.0, params, key=jax.random.key(0), **kwargs)


def test_empty_params():
  with pytest.raises(ValueError, match="params"):
    top_hessian_eigenvalue(lambda p: 0.0, {}, key=jax.random.key(0))


def test_lanczos_breakdown_fills_without_raising_the_answer():
  """Four distinct eigenvalues, all negative: the Krylov space is invariant after 4 of the 20
  Lanczos steps, and the filler of the remaining steps must not become the answer (-1)."""
  d = jnp.asarray([-10.0, -10.0, -1.0, -1.0, -2.0, -2.0] + [-3.0] * 30)
  loss = lambda p: 0.5 * jnp.sum(d * p["w"] ** 2)
  params = {"w": jnp.asarray(np.random.default_rng(3).normal(size=d.size), jnp.float32)}
  est = top_hessian_eigenvalue(loss, params, key=jax.random.key(0), num_iters=20)
  np.testing.assert_allclose(float(est), -1.0, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("negative", [False, True])
def test_half_precision_params(dtype, negative):
  """16-bit params: the Lanczos branch (traced either way) runs in float32 on tangents cast back
  to the params' dtype; the answer is the largest eigenvalue (3), to within the Hessian-vector
  products' rounding (bfloat16 keeps 8 bits: errors of a few % of |lambda_min| = 12)."""
  d = jnp.asarray([3.0, 1.0, 0.5, 0.25] + ([-12.0] if negative else []) + [0.125] * 11)
  loss = lambda p: 0.5 * jnp.sum(d.astype(p["w"].dtype) * p["w"] ** 2)
  params = {"w": jnp.asarray(np.random.default_rng(4).normal(size=d.size), dtype)}
  est = top_hessian_eigenvalue(loss, params, key=jax.random.key(0), num_iters=100, tol=0.0)
  assert est.dtype == dtype
  np.testing.assert_allclose(float(est), 3.0, rtol=0.1 if dtype == jnp.bfloat16 else 0.01)


@pytest.mark.parametrize("negative", [False, True])
def test_mixed_dtype_params(negative):
  """A float32 leaf beside a bfloat16 one (e.g. a float32 head on a bfloat16 model): each
  tangent keeps its leaf's dtype, and the answer (3, in the float32 leaf) is found either way."""
  da = jnp.asarray([3.0, 1.0, 0.5, 0.25])
  db = jnp.asarray(([-12.0] if negative else []) + [0.125] * 11, jnp.bfloat16)
  loss = lambda p: (0.5 * jnp.sum(da * p["a"] ** 2)
                    + 0.5 * jnp.sum(db * p["b"] ** 2).astype(jnp.float32))
  rng = np.random.default_rng(4)
  params = {"a": jnp.asarray(rng.normal(size=da.size), jnp.float32),
            "b": jnp.asarray(rng.normal(size=db.size), jnp.bfloat16)}
  est = top_hessian_eigenvalue(loss, params, key=jax.random.key(0), num_iters=100, tol=0.0)
  assert est.dtype == jnp.float32
  np.testing.assert_allclose(float(est), 3.0, rtol=0.01)
