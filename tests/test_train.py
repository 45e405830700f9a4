"""Tests of the jitted train / eval steps, accumulation, mixed precision and data parallelism.

The model is a tiny NNX classifier (embedding -> nnx.LoRALinear -> masked sum -> dropout ->
linear head). References are written independently: a pure-jnp forward pass from the params
dicts and a plain ``jax.grad`` + ``tx.update`` + ``apply_updates`` loop.
"""

import functools
import pathlib
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mgpo_jax import mgpo_adamw, mgpo_eval_params
from mgpo_jax.train import Trainer, TrainState, classification_loss, clean_params, make_mesh

VOCAB, SEQ, DIM, CLASSES, RANK = 13, 5, 8, 3, 2
DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "training.md"


class Tiny(nnx.Module):
  def __init__(self, dropout: float, seed: int = 0):
    rngs = nnx.Rngs(seed, dropout=seed + 100)
    self.emb = nnx.Embed(VOCAB, DIM, rngs=rngs)  # its dtype attribute is float32
    self.layer = nnx.LoRALinear(DIM, DIM, lora_rank=RANK, rngs=rngs)
    # B = 0 would make the first gradient of A vanish; use random adapters.
    self.layer.lora.lora_b[...] = 0.3 * jax.random.normal(rngs.params(), (RANK, DIM))
    self.drop = nnx.Dropout(dropout, rngs=rngs)
    self.head = nnx.Linear(DIM, CLASSES, rngs=rngs)

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
    h = jax.nn.gelu(self.layer(self.emb(input_ids)))
    h = jnp.sum(h * attention_mask[..., None].astype(h.dtype), axis=1)
    return self.head(self.drop(h))


def _ref_logits(p, f, batch):
  """Pure-jnp forward pass of Tiny without dropout: ``p`` adapters, ``f`` frozen params."""
  h = f["emb"]["embedding"][batch["input_ids"]]
  a, b = p["layer"]["lora"]["lora_a"], p["layer"]["lora"]["lora_b"]
  z = h @ f["layer"]["kernel"] + f["layer"]["bias"] + (h @ a) @ b
  h = jnp.sum(jax.nn.gelu(z) * batch["attention_mask"][..., None], axis=1)
  return h @ f["head"]["kernel"] + f["head"]["bias"]


@jax.jit
def _ref_loss(p, f, batch):
  logp = jax.nn.log_softmax(_ref_logits(p, f, batch))
  return -jnp.mean(jnp.take_along_axis(logp, batch["labels"][:, None], axis=1))


def _frozen(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _batch(seed: int, size: int = 8):
  rng = np.random.default_rng(seed)
  mask = (rng.random((size, SEQ)) < 0.8).astype(np.int32)
  mask[:, 0] = 1
  return {"input_ids": rng.integers(0, VOCAB, (size, SEQ)).astype(np.int32),
          "attention_mask": mask,
          "labels": rng.integers(0, CLASSES, (size,)).astype(np.int32)}


BATCHES = [_batch(s) for s in range(3)]


def _sam():
  adv = optax.chain(optax.contrib.normalize(), optax.sgd(0.05))
  return optax.contrib.sam(optax.adam(1e-2), adv, opaque_mode=True)


TXS = {"adamw": lambda: optax.adamw(1e-2, weight_decay=0.01),
       "mgpo": lambda: mgpo_adamw(1e-2, rho=0.5),
       "sam": _sam}


def _run(trainer, batches, seed=0):
  state = trainer.init(seed)
  for batch in batches:
    state, metrics = trainer.train_step(state, batch)
  return state, metrics


@functools.cache
def _trained(name: str, dropout: float, accum_steps: int):
  """``(trainer, state, metrics)`` after BATCHES on one device (shared to save compiles)."""
  trainer = Trainer(Tiny(dropout), TXS[name](), accum_steps=accum_steps)
  return (trainer, *_run(trainer, BATCHES))


def _counting(loss_fn):
  """``loss_fn`` that counts how often it is traced (= gradient evaluations per step)."""
  def counted(model, batch):
    counted.calls += 1
    return loss_fn(model, batch)
  counted.calls = 0
  return counted


def _assert_trees_close(x, y, rtol=1e-5, atol=1e-6):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=atol), x, y)


# -- the step against a hand-written reference ----------------------------------------------


@pytest.mark.parametrize("name", TXS)
def test_step_equals_reference_loop(name):
  model, tx = Tiny(dropout=0.0), TXS[name]()
  _, state, metrics = _trained(name, 0.0, 1)

  p, f = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)), _frozen(model)
  s = tx.init(p)

  @jax.jit
  def reference_step(p, s, batch):  # plain jax.grad + tx.update + apply_updates
    loss, g = jax.value_and_grad(_ref_loss)(p, f, batch)
    extra = {"grad_fn": lambda q, _: jax.grad(_ref_loss)(q, f, batch)} if name == "sam" else {}
    u, s = tx.update(g, s, p, **extra)
    return optax.apply_updates(p, u), s, loss

  for batch in BATCHES:
    p, s, loss = reference_step(p, s, batch)

  _assert_trees_close(state.params, p)
  _assert_trees_close(state.opt_state, s)
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
  assert int(state.step) == len(BATCHES)
  assert not np.allclose(state.params["layer"]["lora"]["lora_a"],
                         model.layer.lora.lora_a[...]), "training did not move the adapters"


@pytest.mark.parametrize("name,expected", [("adamw", 1), ("mgpo", 1), ("sam", 2)])
def test_gradient_evaluations_per_step(name, expected):
  loss_fn = _counting(classification_loss)
  trainer = Trainer(Tiny(dropout=0.1), TXS[name](), loss_fn)
  jax.make_jaxpr(trainer._train_step)(trainer.init(0), trainer.rest, BATCHES[0])
  assert loss_fn.calls == expected


def test_classification_loss_weights_match_numpy():
  model = Tiny(dropout=0.0)
  batch = dict(_batch(7), mask=np.random.default_rng(1).random(8).astype(np.float32))
  loss, m = nnx.jit(classification_loss)(model, batch)
  logits = np.asarray(jax.jit(_ref_logits)(nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)),
                                  _frozen(model), batch), np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
      - logits.max(1, keepdims=True)
  ce = -logp[np.arange(8), batch["labels"]]
  w = batch["mask"].astype(np.float64)
  np.testing.assert_allclose(m["loss_sum"], (w * ce).sum(), rtol=1e-5)
  np.testing.assert_allclose(loss, (w * ce).sum() / w.sum(), rtol=1e-5)
  np.testing.assert_allclose(m["correct"], (w * (logits.argmax(1) == batch["labels"])).sum(),
                             rtol=1e-6)
  np.testing.assert_allclose(m["count"], w.sum(), rtol=1e-6)


@pytest.mark.parametrize("change,match", [
    (lambda b: {k: v for k, v in b.items() if k != "labels"}, "has no labels"),
    (lambda b: {**b, "labels": b["labels"].astype(np.float32)}, "must be integer class ids"),
    (lambda b: {**b, "labels": b["labels"][:, None]}, r"of shape \(8,\).*shape \(8, 1\)"),
])
def test_classification_loss_rejects_malformed_labels(change, match):
  with pytest.raises(ValueError, match=match):
    classification_loss(Tiny(dropout=0.0), change(_batch(7)))


@pytest.mark.parametrize("bad", [-1, CLASSES, 100])
def test_classification_loss_is_nan_for_a_label_outside_the_classes(bad):
  """A label outside [0, CLASSES) would silently read another class's logit (-1: the last);
  the loss is NaN instead, and the same batch with valid labels is finite."""
  model, batch = Tiny(dropout=0.0), _batch(7)
  assert np.isfinite(float(nnx.jit(classification_loss)(model, batch)[0]))
  labels = batch["labels"].copy()
  labels[3] = bad
  assert np.isnan(float(nnx.jit(classification_loss)(model, {**batch, "labels": labels})[0]))


# -- accumulation, mixed precision, dropout RNG ---------------------------------------------


@pytest.mark.parametrize("name,k", [("adamw", 2), ("mgpo", 4)])
def test_accumulation_equals_full_batch(name, k):
  _, full, _ = _trained(name, 0.0, 1)
  acc, metrics = _run(Trainer(Tiny(dropout=0.0), TXS[name](), accum_steps=k), BATCHES)
  _assert_trees_close(acc.params, full.params)
  _assert_trees_close(acc.opt_state, full.opt_state)
  assert float(metrics["count"]) == 8.0  # summed over the k micro-batches
  if name == "mgpo":  # one optimizer update (one EMA / perturbation update) per step
    assert int(acc.opt_state.count) == len(BATCHES)


def test_bf16_compute_keeps_adapters_and_optimizer_state_f32():
  seen = []

  def loss_fn(model, batch):
    seen.append(model(batch["input_ids"], batch["attention_mask"]).dtype)
    return classification_loss(model, batch)

  model = Tiny(dropout=0.0)
  trainer = Trainer(model, TXS["mgpo"](), loss_fn, compute_dtype=jnp.bfloat16)
  state, _ = _run(trainer, BATCHES)
  assert set(seen) == {jnp.dtype(jnp.bfloat16)}
  frozen = [x for x in jax.tree.leaves(trainer.rest) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert frozen and all(x.dtype == jnp.bfloat16 for x in frozen)
  float_leaves = [x for x in jax.tree.leaves((state.params, state.opt_state))
                  if jnp.issubdtype(x.dtype, jnp.floating)]
  assert all(x.dtype == jnp.float32 for x in float_leaves)
  assert model.layer.kernel[...].dtype == jnp.float32  # the model object is untouched
  _, ref, _ = _trained("mgpo", 0.0, 1)
  _assert_trees_close(state.params, ref.params, rtol=0.05, atol=0.02)


def test_dropout_rng_is_deterministic_per_step_and_resumable():
  trainer = Trainer(Tiny(dropout=0.5), TXS["adamw"]())
  full, m_full = _run(trainer, BATCHES)
  # Resume from host copies after one step with a fresh Trainer: bit-identical.
  half, _ = _run(trainer, BATCHES[:1])
  half = jax.tree.map(np.asarray, half)
  for batch in BATCHES[1:]:
    half, m_res = trainer.train_step(half, batch)
  chex.assert_trees_all_equal(jax.device_get(half), jax.device_get(full))
  chex.assert_trees_all_equal(m_res, m_full)
  # The masks depend on the seed and on the step, and dropout is active in training.
  state = trainer.init(0)
  loss = lambda s: float(trainer.train_step(s, BATCHES[0])[1]["loss"])  # noqa: E731
  assert loss(state) == loss(state)
  assert loss(state) != loss(trainer.init(1))
  assert loss(state) != loss(state._replace(step=jnp.int32(5)))
  eval_loss = float(trainer.eval_step(state, BATCHES[0])["loss_sum"]) / 8
  assert loss(state) != pytest.approx(eval_loss, rel=1e-4)


def test_rbg_keys_draw_the_masks_and_resume_exactly(tmp_path):
  """Under ``jax.default_prng_impl("rbg")`` (dropout words from XLA's RngBitGenerator, as
  docs/training.md says) the state carries rbg keys, the masks are other than
  threefry's, and a run resumed from a checkpoint repeats the uninterrupted one bit for bit."""
  from mgpo_jax.train.checkpoint import Checkpointer

  model = Tiny(dropout=0.5)
  _, m_fry = _run(Trainer(model, TXS["adamw"]()), BATCHES[:1])
  with jax.default_prng_impl("rbg"):
    trainer = Trainer(model, TXS["adamw"]())
    full, m_full = _run(trainer, BATCHES)
    assert full.rng.shape == (4,)  # rbg's key data; threefry's has 2 words
    half, m_first = _run(trainer, BATCHES[:1])
    assert float(m_first["loss"]) != float(m_fry["loss"])  # same params, other masks
    with Checkpointer(tmp_path, save_every=1) as ckpt:
      assert ckpt.save(1, half)
    with Checkpointer(tmp_path, save_every=1) as ckpt:
      half, _ = ckpt.restore(Trainer(model, TXS["adamw"]()).abstract_state())
    for batch in BATCHES[1:]:
      half, m_res = trainer.train_step(half, batch)
  chex.assert_trees_all_equal(jax.device_get(half), jax.device_get(full))
  chex.assert_trees_all_equal(m_res, m_full)


# -- eval ----------------------------------------------------------------------------------


def test_eval_uses_clean_params_and_masks_padding():
  model = Tiny(dropout=0.3)  # eval mode must switch dropout off
  trainer, state, _ = _trained("mgpo", 0.3, 2)
  theta = mgpo_eval_params(state.opt_state, state.params)
  chex.assert_trees_all_equal(clean_params(state), theta)
  # 10 examples in batches of 4; the last batch is padded with mask 0.
  data = _batch(11, size=10)
  idx = np.minimum(np.arange(12), 9)
  padded = dict({k: v[idx] for k, v in data.items()}, mask=(np.arange(12) < 10).astype(np.float32))
  sums = [trainer.eval_step(state, {k: v[i:i + 4] for k, v in padded.items()}) for i in (0, 4, 8)]
  total = jax.tree.map(lambda *x: sum(x), *sums)
  f = _frozen(model)
  np.testing.assert_allclose(total["loss_sum"], 10 * _ref_loss(theta, f, data), rtol=1e-5)
  assert float(total["count"]) == 10.0
  correct = np.sum(np.argmax(_ref_logits(theta, f, data), axis=1) == data["labels"])
  assert float(total["correct"]) == correct
  shifted = 10 * _ref_loss(state.params, f, data)  # evaluating p = θ + ε is different
  assert abs(float(total["loss_sum"]) - float(shifted)) > 1e-4


def test_clean_params_is_identity_without_mgpo():
  _, state, _ = _trained("adamw", 0.0, 1)
  assert clean_params(state) is state.params


# -- data parallelism ----------------------------------------------------------------------


@pytest.mark.parametrize("devices", [2, 4])
def test_mesh_equals_single_device(devices):
  """With dropout, accumulation and MGPO (whose state depends on the global gradient norm)."""
  mesh = make_mesh(devices)
  trainer = Trainer(Tiny(dropout=0.3), TXS["mgpo"](), accum_steps=2, mesh=mesh)
  state, metrics = _run(trainer, BATCHES)
  ref_trainer, ref_state, ref_metrics = _trained("mgpo", 0.3, 2)
  _assert_trees_close(state.params, ref_state.params)
  _assert_trees_close(metrics, ref_metrics)
  replicated = NamedSharding(mesh, P())
  for x in jax.tree.leaves(state):
    assert x.sharding.is_equivalent_to(replicated, x.ndim)
  batch = trainer.shard_batch(BATCHES[0])
  assert batch["input_ids"].sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 2)
  assert len(batch["input_ids"].addressable_shards) == devices
  evals = trainer.eval_step(state, batch)
  ref_evals = ref_trainer.eval_step(ref_state, BATCHES[0])
  _assert_trees_close(evals, ref_evals)


def test_abstract_state_matches_init():
  trainer = Trainer(Tiny(dropout=0.0), TXS["mgpo"](), mesh=make_mesh(2))
  abstract, state = trainer.abstract_state(), trainer.init(3)
  chex.assert_trees_all_equal_structs(abstract, state)
  jax.tree.map(lambda a, x: (a.shape, a.dtype, a.sharding) == (x.shape, x.dtype, x.sharding)
               or pytest.fail(f"{a} vs {x}"), abstract, state)
  assert isinstance(state, TrainState)


@functools.cache
def _docs_recipe() -> dict:
  blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)
  (code,) = [b for b in blocks if "def pmap_step" in b]
  namespace: dict = {}
  exec(compile(code, str(DOCS), "exec"), namespace)  # noqa: S102
  return namespace


def test_docs_pmap_and_shard_map_recipe_equals_single_device():
  ns = _docs_recipe()
  assert jax.local_device_count() == 4

  def single_device(tx):  # the plain one-device loop over the whole batches
    @jax.jit
    def step(p, s, batch):
      updates, s = tx.update(jax.grad(ns["loss"])(p, batch), s, p)
      return optax.apply_updates(p, updates), s

    p, s = ns["params0"], tx.init(ns["params0"])
    for batch in ns["batches"]:
      p, s = step(p, s, batch)
    return p, s

  p, s = single_device(ns["tx"])
  theta = mgpo_eval_params(s, p)
  _assert_trees_close(ns["theta_pmap"], theta)
  _assert_trees_close(ns["theta_shard_map"], theta)
  q, _ = single_device(optax.adamw(1e-2, weight_decay=0.0))  # the perturbation matters here
  assert not np.allclose(q["a"], theta["a"], rtol=1e-5)


def test_shard_map_grad_of_replicated_input_is_already_summed():
  """Pins the pitfall documented in docs/training.md: pmean of grads in shard_map is n x."""
  ns = _docs_recipe()
  mesh, loss, params, batch = ns["mesh"], ns["loss"], ns["params0"], ns["batches"][0]
  g = jax.jit(jax.shard_map(lambda p, b: jax.lax.pmean(jax.grad(loss)(p, b), "data"),
                            mesh=mesh, in_specs=(P(), P("data")), out_specs=P()))(
      params, jax.device_put(batch, NamedSharding(mesh, P("data"))))
  _assert_trees_close(g, jax.tree.map(lambda x: 4 * x, jax.grad(loss)(params, batch)))


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("devices,accum,size,match", [
    (4, 1, 6, "batch_size 6 is not divisible by the device count 4"),
    (2, 1, 5, "batch_size 5 is not divisible by the device count 2"),
    (2, 3, 8, "accum_steps \\* device count = 3 \\* 2"),
    (None, 3, 8, "batch_size 8 .* accum_steps"),
])
def test_bad_batch_size_raises_before_tracing(devices, accum, size, match):
  loss_fn = _counting(classification_loss)
  mesh = make_mesh(devices) if devices else None
  trainer = Trainer(Tiny(dropout=0.0), TXS["adamw"](), loss_fn, accum_steps=accum, mesh=mesh)
  with pytest.raises(ValueError, match=match):
    trainer.train_step(trainer.init(0), _batch(0, size=size))
  assert loss_fn.calls == 0


def test_bad_arguments():
  with pytest.raises(ValueError, match="tx must be an optax GradientTransformation.*got 0.001"):
    Trainer(Tiny(dropout=0.0), 1e-3)  # a learning rate where the optimizer goes
  with pytest.raises(ValueError, match="accum_steps must be an integer >= 1"):
    Trainer(Tiny(dropout=0.0), TXS["adamw"](), accum_steps=0)
  with pytest.raises(ValueError, match="wrt=.*selects no parameters"):
    Trainer(Tiny(dropout=0.0), TXS["adamw"](), wrt=nnx.BatchStat)
  with pytest.raises(ValueError, match="axis named 'data'"):
    Trainer(Tiny(dropout=0.0), TXS["adamw"](), mesh=jax.make_mesh((2,), ("batch",),
                                                                    devices=jax.devices()[:2]))
  with pytest.raises(ValueError, match="devices must be between 1 and 4"):
    make_mesh(5)
  trainer = Trainer(Tiny(dropout=0.0), TXS["adamw"]())
  with pytest.raises(ValueError, match="same leading"):
    trainer.train_step(trainer.init(0), dict(_batch(0), labels=np.zeros(4, np.int32)))
