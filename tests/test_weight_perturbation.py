"""Weight perturbations (mgpo_jax.perturbation): Flat-LoRA, LoRA-GGPO and the released-code
LoRA-MGPO, and the train step that drives them.

References are independent float64 numpy code that forms each effective kernel ``W' = W + s A B``
and the perturbation ``ε`` densely; the reference MGPO loop is a plain two-phase loop (perturb
the kernels explicitly, take the gradient, un-perturb, step).
"""

import functools
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from scipy import stats

from mgpo_jax.finetune.config import FinetuneConfig
from mgpo_jax.finetune import job
from mgpo_jax.lora import LoraConfig, apply_lora, lora_modules, set_perturbations
from mgpo_jax.lora.layer import standard_normal
from mgpo_jax.perturbation import (LoraWeights, WeightPerturbation, adapter_pairs, cosine_ramp,
                                   flat_lora, ggpo, lora_weights, mgpo_code)
from mgpo_jax.train import Trainer, classification_loss, make_mesh
from tiny_nnx import tiny

D, H, V, C, R = 8, 6, 11, 3, 2
DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "weight_perturbation.md"
Tiny = tiny(d=D, h=H, v=V, c=C)
TARGETS = ("query", "value", "dense", "up")


def _model(seed: int = 0) -> nnx.Module:
  """Tiny with adapters on all its block linears, random nonzero A and B."""
  model = Tiny(nnx.Rngs(seed))
  apply_lora(model, LoraConfig(target_modules=TARGETS, r=R, alpha=4.0), rngs=nnx.Rngs(seed + 1))
  rng = np.random.default_rng(seed)
  for layer in lora_modules(model).values():
    layer.lora_a[...] = jnp.asarray(0.5 * rng.normal(size=layer.lora_a.shape), jnp.float32)
    layer.lora_b[...] = jnp.asarray(0.5 * rng.normal(size=layer.lora_b.shape), jnp.float32)
  return model


def _batch(seed: int, size: int = 8) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {"input_ids": rng.integers(0, V, (size, 5)).astype(np.int32),
          "labels": rng.integers(0, C, (size,)).astype(np.int32)}


def _f64(x) -> np.ndarray:
  return np.asarray(x, np.float64)


def _dense(w: LoraWeights) -> np.ndarray:
  """float64 ``W' = W + s A B``."""
  return _f64(w.kernel) + w.scaling * _f64(w.lora_a) @ _f64(w.lora_b)


def _image(w: LoraWeights, da, db) -> np.ndarray:
  """float64 ``s (dA B + A dB)`` (n, m), formed densely."""
  return w.scaling * (_f64(da) @ _f64(w.lora_b) + _f64(w.lora_a) @ _f64(db))


def _random_grads(modules, seed):
  rng = np.random.default_rng(seed)
  return {p: (jnp.asarray(rng.normal(size=w.lora_a.shape), jnp.float32),
              jnp.asarray(rng.normal(size=w.lora_b.shape), jnp.float32))
          for p, w in modules.items()}


def _noise_refs(name, modules, grads, sigma_t, beta):
  """float64 per-column standard deviation of ε for each module."""
  out = {}
  for p, w in modules.items():
    n = w.kernel.shape[0]
    var = np.sum(_dense(w) ** 2, axis=0)
    if name == "ggpo":
      var = var + beta * np.sum(_image(w, *grads[p]) ** 2, axis=0)
    out[p] = sigma_t * np.sqrt(var / n)
  return out


def _method(name):
  """``(weight perturbation, σ_t at step 7, β)`` for the noise tests."""
  if name == "flat-lora":
    return flat_lora(0.2, total_steps=10), 0.2 * 0.5 * (1 - math.cos(math.pi * 7 / 10)), 0.0
  return ggpo(0.2, beta=0.3), 0.2, 0.3


# -- Flat-LoRA and GGPO: the noise ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["flat-lora", "ggpo"])
def test_noise_is_the_references_scaling_of_the_draw(name):
  model = _model()
  modules = lora_weights(model)
  wp, sigma_t, beta = _method(name)
  grads = _random_grads(modules, 1)
  state = wp.update(wp.init(modules), modules, grads)
  eps = jax.jit(wp.perturbations)(state, modules, None, jax.random.key(3), jnp.int32(7))
  scales = _noise_refs(name, modules, grads, sigma_t, beta)
  assert list(eps) == sorted(lora_modules(model))
  graphdef, state = nnx.split(model)

  @jax.jit
  def what_each_layer_adds(state, eps):  # on the identity input: x (W' + ε) - x W'
    m = nnx.merge(graphdef, state, copy=True)
    layers = lora_modules(m)
    clean = {p: l(jnp.eye(l.in_features)) for p, l in layers.items()}
    set_perturbations(m, eps)
    return {p: l(jnp.eye(l.in_features)) - clean[p] for p, l in layers.items()}

  added = what_each_layer_adds(state, eps)
  for p, layer in lora_modules(model).items():
    n, m = layer.in_features, layer.out_features
    np.testing.assert_allclose(eps[p].col_scale, scales[p], rtol=1e-5)
    z = _f64(standard_normal(eps[p].key, (n, m), jnp.float32))
    np.testing.assert_allclose(added[p], z * scales[p], rtol=1e-4, atol=2e-6)
  # a different module gets a different draw from the same step key
  keys = [jax.random.key_data(e.key) for e in eps.values()]
  assert len({tuple(np.asarray(k).ravel()) for k in keys}) == len(keys)


@pytest.mark.parametrize("name", ["flat-lora", pytest.param("ggpo", marks=pytest.mark.slow)])
def test_noise_statistics_over_many_keys(name):
  model = _model(1)
  modules = lora_weights(model)
  wp, sigma_t, beta = _method(name)
  grads = _random_grads(modules, 2)
  state = wp.update(wp.init(modules), modules, grads)
  scales = _noise_refs(name, modules, grads, sigma_t, beta)
  draws = 400

  @jax.jit
  @jax.vmap
  def sample(key):
    eps = wp.perturbations(state, modules, None, key, jnp.int32(7))
    return {p: standard_normal(e.key, modules[p].kernel.shape, jnp.float32) * e.col_scale
            for p, e in eps.items()}

  samples = sample(jax.random.split(jax.random.key(11), draws))
  for p, s in samples.items():
    x = _f64(s).transpose(2, 0, 1).reshape(s.shape[2], -1)  # (m, draws · n)
    k = x.shape[1]
    var = scales[p] ** 2
    lo, hi = stats.chi2.ppf([0.0005, 0.9995], k - 1) / (k - 1)
    ratio = x.var(axis=1, ddof=1) / var
    assert np.all((lo <= ratio) & (ratio <= hi)), (p, ratio, lo, hi)
    z = stats.norm.ppf(0.9995)
    assert np.all(np.abs(x.mean(axis=1)) <= z * np.sqrt(var / k)), p


def test_cosine_ramp_runs_from_zero_to_sigma():
  ramp = cosine_ramp(0.05, 40)
  assert float(ramp(0)) == 0.0
  assert float(ramp(40)) == pytest.approx(0.05, rel=1e-6)
  assert float(ramp(20)) == pytest.approx(0.025, rel=1e-6)
  model = _model()
  modules = lora_weights(model)
  wp = flat_lora(0.05, total_steps=40)
  state = wp.init(modules)
  key = jax.random.key(0)
  for e in wp.perturbations(state, modules, None, key, jnp.int32(0)).values():
    assert float(jnp.max(jnp.abs(e.col_scale))) == 0.0
  last = wp.perturbations(state, modules, None, key, jnp.int32(40))
  for p, w in modules.items():
    ref = 0.05 * np.linalg.norm(_dense(w), axis=0) / np.sqrt(w.kernel.shape[0])
    np.testing.assert_allclose(last[p].col_scale, ref, rtol=1e-5)


def test_ggpo_gradient_term_uses_gram_products():
  modules = lora_weights(_model(2))
  grads = _random_grads(modules, 5)
  wp = ggpo()
  state = wp.update(wp.init(modules), modules, grads)
  for (p, w), g_sq in zip(sorted(modules.items()), state.grad_col_sq):
    assert g_sq.shape == (w.kernel.shape[1],)  # O(m) state per module
    np.testing.assert_allclose(g_sq, np.sum(_image(w, *grads[p]) ** 2, axis=0), rtol=1e-5)
  # a non-finite gradient leaves the state as it was, all of it: here one entry of one B makes
  # one column of one module's image non-finite
  other = _random_grads(modules, 7)
  path = sorted(other)[0]
  bad = {**other, path: (other[path][0], other[path][1].at[0, 0].set(jnp.inf))}
  kept = wp.update(state, modules, bad)
  jax.tree.map(np.testing.assert_array_equal, kept, state)


def test_mgpo_code_skips_a_non_finite_step():
  """A non-finite gradient leaves the state unchanged, its step count too: after a NaN first
  step, the first finite gradient still starts the EMA at its own norms."""
  modules = lora_weights(_model(2))
  grads = _random_grads(modules, 6)
  wp = mgpo_code()
  nan = {p: (g[0] * jnp.nan, g[1]) for p, g in grads.items()}
  skipped = wp.update(wp.init(modules), modules, nan)
  jax.tree.map(np.testing.assert_array_equal, skipped, wp.init(modules))
  state = wp.update(skipped, modules, grads)
  assert int(state.count) == 1
  for (p, w), ema in zip(sorted(modules.items()), state.grad_norm_ema):
    np.testing.assert_allclose(ema, np.linalg.norm(_image(w, *grads[p])), rtol=1e-5)


# -- the released-code MGPO against a two-phase float64 reference --------------------------------


def test_mgpo_code_matches_a_two_phase_reference():
  with jax.enable_x64(True):  # the library in float64 too: agreement to 1e-6 over 24 steps
    _mgpo_code_against_reference()


def _mgpo_code_against_reference():
  rho, steps = 0.3, 24
  model = _model(3)
  nnx.update(model, jax.tree.map(lambda x: x.astype(jnp.float64)
                                 if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                 nnx.state(model, nnx.Param)))
  tx = optax.adamw(3e-2)
  wp = mgpo_code(rho)
  trainer = Trainer(model, tx, perturbation=wp)
  batches = [_batch(s) for s in range(steps)]

  # Reference: perturb every kernel explicitly by a dense float64 ε, take the gradient at it,
  # step AdamW from the clean adapters, update the per-module EMA from dense images.
  graphdef, params, rest = nnx.split(model, nnx.LoRAParam, ...)
  params = nnx.to_pure_dict(params)
  paths = sorted(lora_modules(model))
  opt = tx.init(params)
  ema, state = {}, trainer.init(0)

  def ref_loss(params, kernels, batch):
    m = nnx.merge(graphdef, params, rest, copy=True)
    for p, layer in lora_modules(m).items():
      layer.kernel[...] = kernels[p]
    return classification_loss(m, batch)[0]

  @jax.jit
  def library(state, xs):
    m = nnx.merge(graphdef, state.params, rest, copy=True)
    lib = wp.perturbations(state.perturbation_state, lora_weights(m), state.opt_state, None,
                           state.step)
    set_perturbations(m, lib)
    return lib, {p: layer(xs[p]) for p, layer in lora_modules(m).items()}

  @jax.jit
  def ref_step(params, opt, kernels, batch):
    grads = jax.grad(ref_loss)(params, kernels, batch)
    updates, opt = tx.update(grads, opt, params)
    return grads, optax.apply_updates(params, updates), opt

  biases = {p: 0.0 if l.bias is None else _f64(l.bias[...])
            for p, l in lora_modules(model).items()}
  checked = 0
  for t, batch in enumerate(batches):
    modules = lora_weights(nnx.merge(graphdef, params, rest, copy=True))
    mu = adapter_pairs(opt[0].mu, paths)
    eps, size = {}, {}
    for p in paths:
      w = modules[p]
      v = _image(w, *mu[p])
      nv = np.linalg.norm(v)
      size[p] = rho * min(1.0 / ema[p], 10.0) if t > 0 else 0.0
      eps[p] = -size[p] * v / nv if nv > 1e-12 and t > 0 else np.zeros_like(v)
    # The library's perturbation from its own state: the same ε and per-module scale, and the
    # perturbed forward output of each layer against the dense float64 kernel W' + ε.
    xs = {p: jax.random.normal(jax.random.key(t), (3, modules[p].kernel.shape[0]))
          for p in paths}
    lib, outs = library(state, xs)
    for p in paths:
      dense = _f64(lib[p].u) @ _f64(lib[p].v)
      np.testing.assert_allclose(dense, eps[p], rtol=1e-6, atol=1e-7)
      np.testing.assert_allclose(np.linalg.norm(dense), size[p], rtol=1e-6, atol=1e-7)
      checked += size[p] > 0
      ref_out = _f64(xs[p]) @ (_dense(modules[p]) + eps[p]) + biases[p]
      np.testing.assert_allclose(outs[p], ref_out, rtol=1e-6, atol=1e-7)

    kernels = {p: jnp.asarray(_f64(modules[p].kernel) + eps[p]) for p in paths}
    grads, params, opt = ref_step(params, opt, kernels, batch)
    g = adapter_pairs(grads, paths)
    for p in paths:
      gn = np.linalg.norm(_image(modules[p], *g[p]))
      ema[p] = gn if t == 0 else 0.9 * ema[p] + 0.1 * gn
    state, _ = trainer.train_step(state, batch)
    np.testing.assert_allclose(state.perturbation_state.grad_norm_ema,
                               [ema[p] for p in paths], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 state.params, params)
  assert checked >= 20 * len(paths) - len(paths)


def test_mgpo_code_needs_a_first_moment():
  modules = lora_weights(_model())
  params = {p: {"lora_a": w.lora_a, "lora_b": w.lora_b} for p, w in modules.items()}
  wp = mgpo_code()
  with pytest.raises(ValueError, match="first moment"):
    wp.perturbations(wp.init(modules), modules, optax.sgd(0.1).init(params), None, 0)


# -- the train step ------------------------------------------------------------------------------


WPS = {"flat-lora": lambda: flat_lora(lambda t: 0.2),  # constant σ: every step perturbed
       "ggpo": lambda: ggpo(0.1, beta=0.01),
       "mgpo-code": lambda: mgpo_code(0.5)}
BATCHES = [_batch(s) for s in range(4)]


def _run(trainer, batches, state=None):
  state = trainer.init(0) if state is None else state
  for batch in batches:
    state, metrics = trainer.train_step(state, batch)
  return state, metrics


@functools.cache
def _trainer(name, accum_steps=1, devices=1):
  """A trainer (compiled once per module and shared by the tests) and its state after
  ``BATCHES``."""
  trainer = Trainer(_model(), optax.adamw(1e-2), perturbation=WPS[name]() if name else None,
                    accum_steps=accum_steps, mesh=make_mesh(devices) if devices > 1 else None)
  return trainer, _run(trainer, BATCHES)[0]


def _close(x, y, rtol=2e-5, atol=2e-6):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=atol), x, y)


def test_evaluation_is_unperturbed_and_training_is_not():
  batch = BATCHES[0]
  perturbed, trained = _trainer("flat-lora")
  plain, _ = _trainer(None)
  # the step's loss is taken under the noise ...
  _, m_plain = plain.train_step(plain.init(0), batch)
  _, m_pert = perturbed.train_step(perturbed.init(0), batch)
  assert abs(float(m_pert["loss"]) - float(m_plain["loss"])) > 1e-4
  # ... evaluation sees the state's own (clean) params, never the noise
  ref = plain.init(0)._replace(params=trained.params)
  np.testing.assert_array_equal(perturbed.eval_step(trained, batch)["loss_sum"],
                                plain.eval_step(ref, batch)["loss_sum"])
  from mgpo_jax.train import clean_params
  jax.tree.map(np.testing.assert_array_equal, clean_params(trained), trained.params)


@pytest.mark.parametrize("name", ["flat-lora", pytest.param("ggpo", marks=pytest.mark.slow)])
def test_same_noise_for_every_micro_batch(name):
  # Two half-batch micro-batches average to the whole batch's gradient only if both see the
  # same perturbation (one key per step).
  (_, whole), (_, micro) = _trainer(name), _trainer(name, accum_steps=2)
  _close(whole.params, micro.params)
  _close(whole.perturbation_state, micro.perturbation_state, rtol=1e-4)


@pytest.mark.parametrize("name", ["flat-lora", "mgpo-code",
                                  pytest.param("ggpo", marks=pytest.mark.slow)])
def test_resume_is_bit_identical(name, tmp_path):
  from mgpo_jax.train import Checkpointer

  trainer, full = _trainer(name)
  half, _ = _run(trainer, BATCHES[:2])
  with Checkpointer(tmp_path / "ckpt") as ckpt:
    ckpt.save(2, half)
  with Checkpointer(tmp_path / "ckpt") as ckpt:  # as a new process would: from the files
    restored, _ = ckpt.restore(trainer.abstract_state())
  resumed, _ = _run(trainer, BATCHES[2:], restored)
  jax.tree.map(np.testing.assert_array_equal, resumed, full)


def test_one_and_two_devices_agree():
  # Each device regenerates the same noise from the step's key (replicated, not sharded).
  (_, one), (_, two) = _trainer("flat-lora"), _trainer("flat-lora", devices=2)
  _close((one.params, one.perturbation_state), (two.params, two.perturbation_state),
         rtol=1e-5, atol=1e-6)


def test_the_docs_own_loop_recipe_runs():
  text = DOCS.read_text()
  code = text.split("### In your own jitted step")[1].split("```python")[1].split("```")[0]
  model = _model()
  loss_fn = lambda m, batch: classification_loss(m, batch)[0]  # noqa: E731
  scope = {"model": model, "loss_fn": loss_fn}
  exec(code, scope)  # noqa: S102 (the documented recipe, verbatim)
  params, opt_state, wp_state = scope["params"], scope["opt_state"], scope["wp_state"]
  for t, batch in enumerate(BATCHES[:2]):
    params, opt_state, wp_state, value = scope["train_step"](
        params, scope["rest"], opt_state, wp_state, batch, jax.random.key(t), t)
  assert np.isfinite(float(value))


# -- construction errors, registry, config -------------------------------------------------------


@pytest.mark.parametrize("build, needle", [
    (lambda: flat_lora(-0.1, total_steps=10), "flat_lora: sigma"),
    (lambda: flat_lora(0.05, total_steps=None), "flat_lora: total_steps"),
    (lambda: flat_lora(0.05, total_steps=0), "total_steps must be a positive integer"),
    (lambda: ggpo(float("nan")), "ggpo: sigma"),
    (lambda: ggpo(0.03, beta=-1.0), "ggpo: beta"),
    (lambda: mgpo_code(-1.0), "mgpo_code: rho"),
    (lambda: mgpo_code(ema_decay=1.0), "mgpo_code: ema_decay"),
    (lambda: mgpo_code(max_inv_norm=0.0), "mgpo_code: max_inv_norm"),
    (lambda: Trainer(_model(), optax.adamw(1e-3), perturbation=object()), "perturbation must"),
])
def test_bad_arguments_are_clear_errors(build, needle):
  with pytest.raises(ValueError, match=needle):
    build()


def test_registry_builds_each_perturbation_with_its_defaults():
  assert job.build_perturbation(FinetuneConfig(optimizer="adamw")) is None
  for name in ("flat-lora", "ggpo", "mgpo-code"):
    wp = job.build_perturbation(FinetuneConfig(optimizer=name, steps=10))
    assert isinstance(wp, WeightPerturbation)
  modules = lora_weights(_model())
  wp = job.build_perturbation(FinetuneConfig(optimizer="ggpo", sigma=0.5, beta=0.0))
  eps = wp.perturbations(wp.init(modules), modules, None, jax.random.key(0), 0)
  for p, w in modules.items():  # sigma 0.5, constant (the reconstruction's form)
    np.testing.assert_allclose(
        eps[p].col_scale, 0.5 * np.linalg.norm(_dense(w), axis=0) / np.sqrt(w.kernel.shape[0]),
        rtol=1e-5)
  for flag_name, method in (("sigma", "ggpo"), ("beta", "ggpo"), ("rho", "mgpo-code")):
    with pytest.raises(ValueError, match=f"--{flag_name} must be a finite number >= 0"):
      FinetuneConfig(optimizer=method, **{flag_name: -1.0}).validate()
  assert FinetuneConfig().parse_compare("adamw,mgpo,mgpo-code,flat-lora,ggpo,sam") == (
      "adamw", "mgpo", "mgpo-code", "flat-lora", "ggpo", "sam")


# -- memory --------------------------------------------------------------------------------------


def _llama_step_memory(perturbation):
  """XLA temp bytes of one train step of a 1-layer random Llama (hidden 1024, intermediate
  2048) with adapters on all its linear layers, and the largest target kernel's bytes."""
  from transformers import LlamaConfig

  from mgpo_jax.models import LlamaForCausalLM

  config = LlamaConfig(hidden_size=1024, intermediate_size=2048, num_hidden_layers=1,
                       num_attention_heads=8, num_key_value_heads=8, vocab_size=128)
  model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
  apply_lora(model, LoraConfig(target_modules="all-linear", r=8, alpha=16.0),
             rngs=nnx.Rngs(1))

  def lm_loss(model, batch):
    logits = model(batch["input_ids"]).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch["input_ids"][:, 1:])
    return jnp.mean(ce), {"loss_sum": jnp.sum(ce), "count": jnp.asarray(ce.size, jnp.float32)}

  trainer = Trainer(model, optax.adamw(1e-3), lm_loss, perturbation=perturbation)
  batch = {"input_ids": jnp.ones((2, 64), jnp.int32)}
  analysis = trainer.lower(trainer.init(0), batch).compile().memory_analysis()
  largest = max(m.kernel[...].nbytes for m in lora_modules(model).values())
  return analysis.temp_size_in_bytes, largest


@pytest.mark.slow  # two compiles of a hidden-1024 Llama step: about 20 s on 2 cores
def test_flat_lora_step_memory_stays_within_one_kernel_or_two():
  adamw_temp, largest = _llama_step_memory(None)
  flat_temp, _ = _llama_step_memory(flat_lora(0.05, total_steps=100))
  assert flat_temp <= adamw_temp + 2 * largest, (flat_temp, adamw_temp, largest)
