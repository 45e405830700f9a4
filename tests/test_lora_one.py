"""LoRA-One's spectral init (mgpo_jax.lora.lora_one) against float64 numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

from mgpo_jax.lora import (LoraConfig, apply_lora, apply_lora_one, init_lora_one,
                           kernel_gradients, lora_modules, merge_lora)
from mgpo_jax.lora._graph import get
from mgpo_jax.lora.lora_one import GAMMA, lora_one_factors
from tiny_nnx import tiny

D, H, V, C = 8, 6, 13, 3
Tiny = tiny(d=D, h=H, v=V, c=C)
TARGETS = ["query", "value", "dense", "up"]


def _ce(model, batch):
  logits = model(batch["ids"])
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], axis=1)), {}


def _batches(sizes, seed=0):
  rng = np.random.default_rng(seed)
  return [{"ids": rng.integers(0, V, size=(n, 5)), "y": rng.integers(0, C, size=(n,))}
          for n in sizes]


def _reference_update(g, r, alpha):
  """float64 numpy: α/(√r γ) U_r diag(S_r/S_0) V_rᵀ, U S Vᵀ the SVD of −G."""
  u, s, vt = np.linalg.svd(-np.asarray(g, np.float64), full_matrices=False)
  return alpha / (np.sqrt(r) * GAMMA) * (u[:, :r] * (s[:r] / s[0])) @ vt[:r]


def test_initial_update_matches_numpy_and_outputs_move_by_it():
  config = LoraConfig(target_modules=TARGETS, r=2, alpha=16.0, use_rslora=True, init="lora-one")
  base = Tiny(nnx.Rngs(0))
  batches = _batches([4, 4])
  grads = kernel_gradients(base, _ce, batches, config)
  assert sorted(grads) == sorted(f"layers.{i}.{n}" for i in range(2) for n in TARGETS)
  ids = jnp.asarray(_batches([6], seed=1)[0]["ids"])
  base_out = np.asarray(base(ids))
  model = apply_lora_one(Tiny(nnx.Rngs(0)), config, _ce, batches)
  for path, layer in lora_modules(model).items():
    ref = _reference_update(grads[path], config.r, config.alpha)
    delta = np.asarray(layer.delta_kernel(), np.float64)
    assert np.linalg.norm(delta - ref) <= 1e-5 * np.linalg.norm(ref), path
    np.testing.assert_array_equal(layer.kernel[...], get(base, path).kernel[...])  # W kept
  # The outputs are the base model's with W replaced by W + (the reference update).
  shifted = Tiny(nnx.Rngs(0))
  for path in lora_modules(model):
    lin = get(shifted, path)
    lin.kernel[...] = lin.kernel[...] + jnp.asarray(
        _reference_update(grads[path], config.r, config.alpha), jnp.float32)
  out = np.asarray(model(ids))
  np.testing.assert_allclose(out, np.asarray(shifted(ids)), rtol=1e-5, atol=1e-6)
  assert np.max(np.abs(out - base_out)) > 1e-3  # the init is not a no-op
  np.testing.assert_allclose(np.asarray(merge_lora(model)(ids)), out, rtol=1e-5, atol=1e-6)


class Linear1(nnx.Module):
  def __init__(self, n, m):
    self.proj = nnx.Linear(n, m, rngs=nnx.Rngs(3))

  def __call__(self, x):
    return self.proj(x)


def _mse(model, batch):
  return jnp.mean((model(batch["x"]) - batch["t"]) ** 2)


def test_gradient_matches_numpy_and_finite_differences():
  n, m = 5, 4
  rng = np.random.default_rng(0)
  batches = [{"x": rng.normal(size=(5, n)), "t": rng.normal(size=(5, m))} for _ in range(3)]
  batches = [jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), b) for b in batches]
  model = Linear1(n, m)
  config = LoraConfig(target_modules=["proj"], r=2)
  g = np.asarray(kernel_gradients(model, _mse, batches, config, num_examples=8)["proj"])
  # numpy float64: the mean over the first 8 examples of mean_j (x W + b − t)_j²
  w, b = (np.asarray(model.proj.kernel[...], np.float64), np.asarray(model.proj.bias[...],
                                                                      np.float64))
  x = np.concatenate([np.asarray(bt["x"], np.float64) for bt in batches])[:8]
  t = np.concatenate([np.asarray(bt["t"], np.float64) for bt in batches])[:8]
  ref = 2.0 / (8 * m) * x.T @ (x @ w + b - t)
  np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-6)
  loss = lambda w_: np.mean((x @ w_ + b - t) ** 2)  # noqa: E731
  fd = np.zeros_like(w)
  for i in range(n):
    for j in range(m):
      e = np.zeros_like(w)
      e[i, j] = 1e-6
      fd[i, j] = (loss(w + e) - loss(w - e)) / 2e-6
  np.testing.assert_allclose(ref, fd, rtol=1e-6, atol=1e-8)
  # all examples, and with adapters attached (the gradient of W + s A B is ∇_W L)
  g_all = np.asarray(kernel_gradients(model, _mse, batches, config, num_examples=None)["proj"])
  x, t = (np.concatenate([np.asarray(bt[k], np.float64) for bt in batches]) for k in "xt")
  np.testing.assert_allclose(g_all, 2.0 / (15 * m) * x.T @ (x @ w + b - t), rtol=1e-5,
                             atol=1e-6)
  adapted = apply_lora(Linear1(n, m), config, rngs=nnx.Rngs(0))
  g_lora = kernel_gradients(adapted, _mse, batches, num_examples=8)["proj"]
  np.testing.assert_allclose(np.asarray(g_lora), g, rtol=1e-6, atol=1e-7)


def test_one_compilation_and_same_result_on_a_mesh():
  assert len(jax.devices()) >= 4, "tests/conftest.py sets 4 fake CPU devices"
  config = LoraConfig(target_modules=TARGETS, r=2)
  batches = _batches([8, 8, 8])
  single = kernel_gradients(Tiny(nnx.Rngs(0)), _ce, batches, config, num_examples=24)
  mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
  sharded = kernel_gradients(Tiny(nnx.Rngs(0)), _ce, batches, config, num_examples=24,
                             mesh=mesh)
  for k in single:
    np.testing.assert_allclose(np.asarray(sharded[k]), np.asarray(single[k]), rtol=1e-5,
                               atol=1e-7)
  # a batch of 6 does not divide 4 devices: replicated, same answer
  odd = kernel_gradients(Tiny(nnx.Rngs(0)), _ce, _batches([6]), config, num_examples=6,
                         mesh=mesh)
  plain = kernel_gradients(Tiny(nnx.Rngs(0)), _ce, _batches([6]), config, num_examples=6)
  for k in plain:
    np.testing.assert_allclose(np.asarray(odd[k]), np.asarray(plain[k]), rtol=1e-5, atol=1e-7)


def test_only_the_target_kernels_are_differentiated():
  """The jitted step's gradient covers the target kernels alone: its HLO has no output of the
  embedding's or the classifier's shape beyond the inputs."""
  config = LoraConfig(target_modules=["layers.0.query"], r=2)
  grads = kernel_gradients(Tiny(nnx.Rngs(0)), _ce, _batches([8]), config)
  assert list(grads) == ["layers.0.query"] and grads["layers.0.query"].shape == (D, D)


def test_errors():
  config = LoraConfig(target_modules=["query"], r=2, init="lora-one")
  with pytest.raises(ValueError, match="batches is empty"):
    apply_lora_one(Tiny(nnx.Rngs(0)), config, _ce, [])
  with pytest.raises(ValueError, match="fewer than num_examples=8"):
    kernel_gradients(Tiny(nnx.Rngs(0)), _ce, _batches([3]), config)
  with pytest.raises(ValueError, match="num_examples must be a positive int"):
    kernel_gradients(Tiny(nnx.Rngs(0)), _ce, _batches([8]), config, num_examples=0)
  with pytest.raises(ValueError, match="init='lora-one' needs the full gradient"):
    apply_lora(Tiny(nnx.Rngs(0)), config, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"r=9 exceeds min\(in, out\) = 8"):
    apply_lora_one(Tiny(nnx.Rngs(0)), LoraConfig(target_modules=["query"], r=9,
                                                  init="lora-one"), _ce, _batches([8]))
  with pytest.raises(ValueError, match=r"r=3 is larger than the rank min\(in, out\) = 2"):
    lora_one_factors(jnp.ones((2, 5)), 3)
  zero_loss = lambda m, b: 0.0 * jnp.sum(m(b["ids"]))  # noqa: E731
  model = Tiny(nnx.Rngs(0))
  with pytest.raises(ValueError, match="gradient of 'layers.0.query' is all zeros"):
    apply_lora_one(model, config, zero_loss, _batches([8]))
  assert not lora_modules(model)  # an error leaves the model as it was
  with pytest.raises(ValueError, match="needs LoraConfig\\(init='lora-one'\\)"):
    init_lora_one(Tiny(nnx.Rngs(0)), LoraConfig(target_modules=["query"]), {})
  with pytest.raises(ValueError, match="no gradient for target module 'layers.1.query'"), \
       pytest.warns(UserWarning, match="'layers.0.query' has rank below r=2"):
    init_lora_one(Tiny(nnx.Rngs(0)), config, {"layers.0.query": jnp.ones((D, D))})
  with pytest.raises(ValueError, match="pass config="):
    kernel_gradients(Tiny(nnx.Rngs(0)), _ce, _batches([8]))
