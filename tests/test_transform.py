"""Tests of mgpo_jax.optim.mgpo against an independent float64 numpy reference (the update in docs/mgpo.md)."""

import doctest
import pathlib
import re
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import mgpo_jax.optim.mgpo  # noqa: F401  (the module, read from sys.modules below)
from mgpo_jax import MGPOState, mgpo, mgpo_adamw, mgpo_eval_params

ROOT = pathlib.Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# Two LoRA-like modules and a loose leaf; loss Σ log cosh(A B − T) + Σ log cosh(s − t).


def _problem(seed: int = 0):
  rng = np.random.default_rng(seed)
  shapes = {"l1": {"lora_a": (3, 2), "lora_b": (2, 4)},
            "l2": {"lora_a": (4, 2), "lora_b": (2, 3)}}
  params = {m: {k: rng.normal(size=s) for k, s in d.items()} for m, d in shapes.items()}
  params["scale"] = rng.normal(size=(3,))
  targets = {"l1": 2.0 * rng.normal(size=(3, 4)), "l2": 2.0 * rng.normal(size=(4, 3)),
             "scale": rng.normal(size=(3,))}
  return params, targets


def _jax_loss(targets):
  def loss(p):
    out = jnp.sum(jnp.log(jnp.cosh(p["scale"] - targets["scale"])))
    for m in ("l1", "l2"):
      out += jnp.sum(jnp.log(jnp.cosh(p[m]["lora_a"] @ p[m]["lora_b"] - targets[m])))
    return out
  return loss


def _np_grad(p, targets):
  """Hand-written gradient of the loss above (independent of jax.grad)."""
  g = {"scale": np.tanh(p["scale"] - targets["scale"])}
  for m in ("l1", "l2"):
    a, b = p[m]["lora_a"], p[m]["lora_b"]
    r = np.tanh(a @ b - targets[m])
    g[m] = {"lora_a": r @ b.T, "lora_b": a.T @ r}
  return g


def _flat(tree):
  """(name, group, leaf) for the reference: group = parent module ('' for the root)."""
  out = [("scale", "", tree["scale"])]
  for m in ("l1", "l2"):
    out += [(f"{m}/{k}", m, tree[m][k]) for k in ("lora_a", "lora_b")]
  return out


def _unflat(leaves):
  tree = {"scale": leaves["scale"], "l1": {}, "l2": {}}
  for name, leaf in leaves.items():
    if "/" in name:
      m, k = name.split("/")
      tree[m][k] = leaf
  return tree


def _reference(params, targets, steps, *, lr, rho, sign, max_inv_norm, weight_decay, scope,
               ema_decay=0.9, b1=0.9, b2=0.999, adam_eps=1e-8, clip=None):
  """Two-phase MGPO in float64 numpy: perturb, grad, un-perturb, AdamW step, EMA.

  ``lr`` and ``rho`` are per-step sequences; the ε used at step i+1 is built at the end of
  step i with rho[i] (as a hyper-parameter changed before update i takes effect).
  """
  theta = {n: np.array(x, np.float64) for n, _, x in _flat(params)}
  group = {n: (g if scope == "per_module" else "") for n, g, _ in _flat(params)}
  groups = sorted(set(group.values()))
  m = {n: np.zeros_like(x) for n, x in theta.items()}
  v = {n: np.zeros_like(x) for n, x in theta.items()}
  eps = {n: np.zeros_like(x) for n, x in theta.items()}
  gbar = {}
  for i in range(steps):
    perturbed = _unflat({n: theta[n] + eps[n] for n in theta})
    g = {n: x for n, _, x in _flat(_np_grad(perturbed, targets))}
    if clip is not None:
      gn = np.sqrt(sum(np.sum(x**2) for x in g.values()))
      g = {n: x * min(1.0, clip / gn) for n, x in g.items()}
    for k in groups:
      norm = np.sqrt(sum(np.sum(g[n] ** 2) for n in g if group[n] == k))
      gbar[k] = norm if i == 0 else ema_decay * gbar[k] + (1 - ema_decay) * norm
    t = i + 1
    for n in theta:
      m[n] = b1 * m[n] + (1 - b1) * g[n]
      v[n] = b2 * v[n] + (1 - b2) * g[n] ** 2
      step = (m[n] / (1 - b1**t)) / (np.sqrt(v[n] / (1 - b2**t)) + adam_eps)
      theta[n] = theta[n] - lr[i] * (step + weight_decay * theta[n])
    for k in groups:
      names = [n for n in theta if group[n] == k]
      mnorm = np.sqrt(sum(np.sum(m[n] ** 2) for n in names))
      inv = 1.0 / gbar[k] if gbar[k] > 0 else np.inf
      if max_inv_norm is not None:
        inv = min(inv, max_inv_norm)
      c = sign * rho[i] * inv / mnorm if mnorm > 1e-12 else 0.0
      for n in names:
        eps[n] = c * m[n] if np.isfinite(c) else np.zeros_like(m[n])
  return _unflat(theta)


def _run(tx, params, loss, steps, *, jit=True):
  """The unmodified optax loop; returns (params p = θ + ε, state)."""
  def step(p, s):
    updates, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, updates), s
  step = jax.jit(step) if jit else step
  state = tx.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def _rel_err(a, b):
  a, b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a)]), np.concatenate(
      [np.ravel(x) for x in jax.tree.leaves(b)])
  return np.max(np.abs(a - b)) / np.max(np.abs(b))


# ---------------------------------------------------------------------------------------------
# Equivalence with the two-phase reference.

CASES = [  # rho, sign, max_inv_norm, weight_decay, scope
    (0.05, 1.0, 10.0, 0.0, "global"),
    (0.1, -1.0, None, 0.01, "global"),
    (0.1, 1.0, 10.0, 0.01, "per_module"),
    (0.05, -1.0, 0.5, 0.0, "per_module"),
]


@pytest.mark.parametrize("rho,sign,max_inv_norm,weight_decay,scope", CASES)
def test_matches_two_phase_reference(rho, sign, max_inv_norm, weight_decay, scope):
  steps, lr = 60, 0.05
  params, targets = _problem(1)
  with jax.enable_x64(True):
    tx = mgpo_adamw(lr, weight_decay=weight_decay, rho=rho, sign=sign,
                    max_inv_norm=max_inv_norm, scope=scope)
    p, state = _run(tx, jax.tree.map(jnp.asarray, params), _jax_loss(targets), steps)
    theta = mgpo_eval_params(state, p)
    chex.assert_trees_all_equal_dtypes(theta, jax.tree.map(jnp.asarray, params))
    ref = _reference(params, targets, steps, lr=[lr] * steps, rho=[rho] * steps, sign=sign,
                     max_inv_norm=max_inv_norm, weight_decay=weight_decay, scope=scope)
    unperturbed = _reference(params, targets, steps, lr=[lr] * steps, rho=[0.0] * steps,
                             sign=sign, max_inv_norm=max_inv_norm,
                             weight_decay=weight_decay, scope=scope)
    assert _rel_err(theta, ref) <= 1e-6
    assert _rel_err(unperturbed, ref) > 1e-3  # the perturbation changes the trajectory
    assert _rel_err(p, ref) > 1e-4  # and the loop's params are the perturbed point
    n_groups = 3 if scope == "per_module" else 1
    chex.assert_shape(state.eps_scale, () if scope == "global" else (n_groups,))


def test_rho_zero_is_base_optimizer_bit_for_bit():
  params, targets = _problem(2)
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  loss = _jax_loss(targets)
  grad = jax.jit(jax.grad(loss))

  def run(tx):  # update jitted on its own: whole-step jit may fuse the loss differently
    p, s, update = params, tx.init(params), jax.jit(tx.update)
    for _ in range(10):
      u, s = update(grad(p), s, p)
      p = optax.apply_updates(p, u)
    return p, s

  base = optax.adamw(0.05, weight_decay=0.01)
  p_base, s_base = run(base)
  p_mgpo, s_mgpo = run(mgpo(base, rho=0.0))
  chex.assert_trees_all_equal(p_mgpo, p_base)
  chex.assert_trees_all_equal(s_mgpo.base_state, s_base)
  chex.assert_trees_all_equal(mgpo_eval_params(s_mgpo, p_mgpo), p_base)


def test_first_step_unperturbed_and_state_small():
  params, targets = _problem(3)
  with jax.enable_x64(True):
    params = jax.tree.map(jnp.asarray, params)
    tx = mgpo_adamw(0.05, rho=0.1, scope="per_module")
    state = tx.init(params)
    chex.assert_trees_all_equal(mgpo_eval_params(state, params), params)
    grads = jax.tree.map(jnp.asarray, _np_grad(_problem(3)[0], targets))
    adamw = optax.adamw(0.05, weight_decay=0.0)
    (updates, state1), (base_updates, _) = jax.jit(lambda: (
        tx.update(grads, state, params), adamw.update(grads, adamw.init(params), params)))()
    # θ_2 = θ_1 + Δ_1 is exactly the AdamW step; the update also holds ε_2 ≠ 0.
    p1 = optax.apply_updates(params, updates)
    chex.assert_trees_all_close(mgpo_eval_params(state1, p1),
                                optax.apply_updates(params, base_updates), rtol=1e-12)
    assert np.all(np.asarray(state1.eps_scale) != 0) and _rel_err(p1, params) > 1e-3
  # Nothing parameter-sized beyond the base state (3 groups: root, l1, l2).
  own = state1._replace(base_state=None)
  assert all(np.size(x) <= 3 for x in jax.tree.leaves(own))
  chex.assert_trees_all_equal_structs(state1.base_state, optax.adamw(0.05).init(params))


# ---------------------------------------------------------------------------------------------
# Composition with optax wrappers.


def test_chain_after_clipping_matches_reference():
  steps, lr, clip = 50, 0.05, 0.5
  params, targets = _problem(4)
  with jax.enable_x64(True):
    tx = optax.chain(optax.clip_by_global_norm(clip), mgpo_adamw(lr, rho=0.05, sign=1.0))
    p, state = _run(tx, jax.tree.map(jnp.asarray, params), _jax_loss(targets), steps)
    ref = _reference(params, targets, steps, lr=[lr] * steps, rho=[0.05] * steps, sign=1.0,
                     max_inv_norm=10.0, weight_decay=0.0, scope="global", clip=clip)
    assert _rel_err(mgpo_eval_params(state, p), ref) <= 1e-6


def test_inject_hyperparams_changes_take_effect():
  steps, switch = 50, 20
  params, targets = _problem(5)
  lrs = [0.05] * switch + [0.02] * (steps - switch)
  rhos = [0.05] * switch + [0.2] * (steps - switch)
  with jax.enable_x64(True):
    tx = optax.inject_hyperparams(mgpo_adamw)(learning_rate=lrs[0], rho=rhos[0], sign=1.0)
    loss = _jax_loss(targets)
    step = jax.jit(lambda p, s: (lambda u, s: (optax.apply_updates(p, u), s))(
        *tx.update(jax.grad(loss)(p), s, p)))
    p, state = jax.tree.map(jnp.asarray, params), None
    state = tx.init(p)
    for i in range(steps):
      if i == switch:
        state.hyperparams["learning_rate"] = jnp.asarray(lrs[i])
        state.hyperparams["rho"] = jnp.asarray(rhos[i])
      p, state = step(p, state)
    ref = _reference(params, targets, steps, lr=lrs, rho=rhos, sign=1.0, max_inv_norm=10.0,
                     weight_decay=0.0, scope="global")
    assert _rel_err(mgpo_eval_params(state, p), ref) <= 1e-6


def test_partition_frozen_never_move():
  params, targets = _problem(6)
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  full = {"adapters": {"l1": params["l1"], "l2": params["l2"]}, "frozen": params["scale"]}
  labels = {"adapters": {"l1": {"lora_a": "train", "lora_b": "train"},
                         "l2": {"lora_a": "train", "lora_b": "train"}}, "frozen": "freeze"}
  loss = _jax_loss(targets)
  full_loss = lambda q: loss({**q["adapters"], "scale": q["frozen"]})
  tx = optax.partition({"train": mgpo_adamw(0.05, rho=0.1, scope="per_module"),
                        "freeze": optax.set_to_zero()}, labels)
  p, state = _run(tx, full, full_loss, 12)
  chex.assert_trees_all_equal(p["frozen"], full["frozen"])
  # The adapters follow the same trajectory as MGPO on the adapters alone.
  alone_loss = lambda a: loss({**a, "scale": full["frozen"]})
  p_alone, s_alone = _run(mgpo_adamw(0.05, rho=0.1, scope="per_module"), full["adapters"],
                          alone_loss, 12)
  chex.assert_trees_all_close(p["adapters"], p_alone, rtol=1e-6, atol=1e-6)
  theta = mgpo_eval_params(state, p)
  chex.assert_trees_all_equal(theta["frozen"], full["frozen"])
  chex.assert_trees_all_close(theta["adapters"], mgpo_eval_params(s_alone, p_alone),
                              rtol=1e-6, atol=1e-6)


def _batch_loss(p, x, y):
  h = jnp.tanh(x @ (p["w"] + p["l1"]["lora_a"] @ p["l1"]["lora_b"]))
  return jnp.mean(jnp.log(jnp.cosh(h @ (p["l2"]["lora_a"] @ p["l2"]["lora_b"]) - y)))


def _batch_problem(seed=7, n=8):
  rng = np.random.default_rng(seed)
  f32 = lambda *shape, scale=1.0: jnp.asarray(scale * rng.normal(size=shape), jnp.float32)
  params = {"w": f32(3, 4),
            "l1": {"lora_a": f32(3, 2), "lora_b": f32(2, 4, scale=0.5)},
            "l2": {"lora_a": f32(4, 2), "lora_b": f32(2, 3)}}
  return params, f32(n, 3), f32(n, 3)


def test_multisteps_fixes_perturbation_within_window():
  k = 3
  params, x, y = _batch_problem(n=3 * k)  # equal micro-batches: one compilation
  tx = optax.MultiSteps(mgpo_adamw(0.05, rho=0.1), every_k_schedule=k)
  plain = mgpo_adamw(0.05, rho=0.1)
  step = jax.jit(lambda p, s, xb, yb: tx.update(jax.grad(_batch_loss)(p, xb, yb), s, p))
  grad, plain_update = jax.jit(jax.grad(_batch_loss)), jax.jit(plain.update)
  p, s = params, tx.init(params)
  q, qs = params, plain.init(params)
  for window in range(3):
    grads = []
    for j in range(k):
      xb, yb = x[j::k], y[j::k]
      grads.append(grad(q, xb, yb))
      u, s = step(p, s, xb, yb)
      new_p = optax.apply_updates(p, u)
      if j < k - 1:  # inside the window the loop's p = θ + ε does not move
        chex.assert_trees_all_equal(new_p, p)
      p = new_p
    mean_grads = jax.tree.map(lambda *g: sum(g) / k, *grads)
    u, qs = plain_update(mean_grads, qs, q)
    q = optax.apply_updates(q, u)
    chex.assert_trees_all_close(p, q, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(mgpo_eval_params(s, p), mgpo_eval_params(qs, q),
                              rtol=1e-5, atol=1e-6)


def test_apply_if_finite_nan_changes_nothing():
  params, x, y = _batch_problem()
  tx = optax.apply_if_finite(mgpo_adamw(0.05, rho=0.1), max_consecutive_errors=2)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p))
  p, s = params, tx.init(params)
  for _ in range(3):
    u, s = step(jax.grad(_batch_loss)(p, x, y), s, p)
    p = optax.apply_updates(p, u)
  bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), jax.grad(_batch_loss)(p, x, y))
  u, s_after = step(bad, s, p)
  chex.assert_trees_all_equal(optax.apply_updates(p, u), p)
  chex.assert_trees_all_equal(s_after.inner_state, s.inner_state)
  assert int(s_after.total_notfinite) == 1
  chex.assert_trees_all_equal(mgpo_eval_params(s_after, p), mgpo_eval_params(s, p))


# ---------------------------------------------------------------------------------------------
# jit, dtypes, lax.cond.


def test_jit_and_no_jit_agree():
  params, x, y = _batch_problem()
  loss = lambda p: _batch_loss(p, x, y)
  tx = mgpo_adamw(0.05, rho=0.1, scope="per_module", weight_decay=0.01)
  p_jit, s_jit = _run(tx, params, loss, 3, jit=True)
  p_eager, s_eager = _run(tx, params, loss, 3, jit=False)
  chex.assert_trees_all_close(p_jit, p_eager, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(s_jit, s_eager, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_dtypes_kept_and_state_stable_under_cond(dtype):
  params, x, y = _batch_problem()
  params = jax.tree.map(lambda a: a.astype(dtype), params)
  loss = lambda p: _batch_loss(p, x.astype(dtype), y.astype(dtype))
  tx = mgpo_adamw(0.05, rho=0.1, scope="per_module")
  state0 = tx.init(params)

  @jax.jit
  def step(p, s, do):
    g = jax.grad(loss)(p)
    u, s = jax.lax.cond(do, lambda: tx.update(g, s, p),
                        lambda: (jax.tree.map(jnp.zeros_like, g), s))
    return optax.apply_updates(p, u), s, u

  p, s = params, state0
  for i in range(4):
    p, s, u = step(p, s, i != 2)
    chex.assert_trees_all_equal_dtypes(u, params)
    chex.assert_trees_all_equal_dtypes(p, params)
  chex.assert_trees_all_equal_shapes_and_dtypes(s, state0)
  assert s.grad_norm_ema.dtype == jnp.float32 and s.eps_scale.dtype == jnp.float32
  assert int(s.count) == 3
  chex.assert_trees_all_equal_dtypes(mgpo_eval_params(s, p), params)
  assert all(bool(jnp.all(jnp.isfinite(a.astype(jnp.float32)))) for a in jax.tree.leaves(p))


# ---------------------------------------------------------------------------------------------
# Data parallel: 2 fake CPU devices.


def _single_device_run(tx, params, x, y, steps):
  step = jax.jit(lambda p, s: (lambda u, s: (optax.apply_updates(p, u), s))(
      *tx.update(jax.grad(_batch_loss)(p, x, y), s, p)))
  p, s = params, tx.init(params)
  for _ in range(steps):
    p, s = step(p, s)
  return p, s


@pytest.fixture(scope="module")
def dp_setup():
  assert jax.device_count() >= 2, "conftest must give 4 fake CPU devices"
  params, x, y = _batch_problem(n=8)
  tx = mgpo_adamw(0.05, rho=0.1, scope="per_module")
  return tx, params, x, y, _single_device_run(tx, params, x, y, 3)


def _dp_step(tx, axis, vary=False):
  def step(p, s, xb, yb):
    # In shard_map the gradient of a replicated input would be summed over the axis; take it
    # at a device-varying copy instead, so that it is local and pmean averages it.
    at = jax.lax.pcast(p, axis, to="varying") if vary else p
    grads = jax.lax.pmean(jax.grad(_batch_loss)(at, xb, yb), axis)
    u, s = tx.update(grads, s, p)
    return optax.apply_updates(p, u), s
  return step


def test_data_parallel_jit_named_sharding(dp_setup):
  tx, params, x, y, (p_ref, s_ref) = dp_setup
  mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
  rep, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  step = jax.jit(lambda p, s, xb, yb: (lambda u, s: (optax.apply_updates(p, u), s))(
      *tx.update(jax.grad(_batch_loss)(p, xb, yb), s, p)))
  p, s = jax.device_put(params, rep), jax.device_put(tx.init(params), rep)
  xb, yb = jax.device_put(x, batch), jax.device_put(y, batch)
  for _ in range(3):
    p, s = step(p, s, xb, yb)
  chex.assert_trees_all_close(p, p_ref, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(mgpo_eval_params(s, p), mgpo_eval_params(s_ref, p_ref),
                              rtol=1e-5, atol=1e-6)


def test_data_parallel_pmap(dp_setup):
  tx, params, x, y, (p_ref, s_ref) = dp_setup
  devices = jax.devices()[:2]
  step = jax.pmap(_dp_step(tx, "d"), axis_name="d", devices=devices)
  stack = lambda t: jax.tree.map(lambda a: jnp.stack([a, a]), t)
  p, s = stack(params), stack(tx.init(params))
  xb, yb = x.reshape(2, -1, 3), y.reshape(2, -1, 3)
  for _ in range(3):
    p, s = step(p, s, xb, yb)
  first = lambda t: jax.tree.map(lambda a: a[0], t)
  chex.assert_trees_all_close(first(p), p_ref, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(first(p), jax.tree.map(lambda a: a[1], p))
  chex.assert_trees_all_close(mgpo_eval_params(first(s), first(p)),
                              mgpo_eval_params(s_ref, p_ref), rtol=1e-5, atol=1e-6)


def test_data_parallel_shard_map(dp_setup):
  tx, params, x, y, (p_ref, s_ref) = dp_setup
  mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
  step = jax.jit(jax.shard_map(_dp_step(tx, "data", vary=True), mesh=mesh,
                               in_specs=(P(), P(), P("data"), P("data")), out_specs=(P(), P())))
  p, s = params, tx.init(params)
  for _ in range(3):
    p, s = step(p, s, x, y)
  chex.assert_trees_all_close(p, p_ref, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(mgpo_eval_params(s, p), mgpo_eval_params(s_ref, p_ref),
                              rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Flax NNX: per-module groups from an nnx.State, through nnx.Optimizer.


def test_nnx_optimizer_per_module_groups():
  from flax import nnx

  class Model(nnx.Module):
    def __init__(self):
      self.l1 = nnx.LoRALinear(3, 4, lora_rank=2, rngs=nnx.Rngs(0))
      self.l2 = nnx.LoRALinear(4, 3, lora_rank=2, rngs=nnx.Rngs(1))

    def __call__(self, x):
      return self.l2(jnp.tanh(self.l1(x)))

  _, x, y = _batch_problem()
  model = Model()
  opt = nnx.Optimizer(model, mgpo_adamw(0.05, rho=0.1, scope="per_module"), wrt=nnx.LoRAParam)
  assert opt.opt_state.eps_scale.shape == (2,)  # one group per LoRA module

  @nnx.jit
  def step(model, opt):
    diff = nnx.DiffState(0, nnx.LoRAParam)
    opt.update(model, nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2), argnums=diff)(model))

  before = nnx.as_pure(nnx.state(model, nnx.LoRAParam))
  for _ in range(3):
    step(model, opt)
  p = nnx.as_pure(nnx.state(model, nnx.LoRAParam))
  theta = mgpo_eval_params(nnx.as_pure(opt.opt_state), p)
  chex.assert_trees_all_equal_structs(theta, p)
  assert _rel_err(theta, p) > 1e-5 and _rel_err(p, before) > 1e-3
  # The same clean params when called with the Variable-wrapped trees.
  wrapped = mgpo_eval_params(opt.opt_state, nnx.state(model, nnx.LoRAParam))
  chex.assert_trees_all_close(nnx.as_pure(wrapped), theta)


# ---------------------------------------------------------------------------------------------
# Validation.


@pytest.mark.parametrize("kwargs,name", [
    ({"rho": -0.1}, "rho"),
    ({"ema_decay": 1.0}, "ema_decay"),
    ({"ema_decay": -0.1}, "ema_decay"),
    ({"sign": 0.5}, "sign"),
    ({"sign": 0.0}, "sign"),
    ({"max_inv_norm": 0.0}, "max_inv_norm"),
    ({"max_inv_norm": -1.0}, "max_inv_norm"),
    ({"scope": "layer"}, "scope"),
    ({"rho": float("inf")}, "rho must be a finite number"),  # would silently be plain Adam
    ({"rho": float("nan")}, "rho"),
    ({"rho": "0.05"}, "rho"),  # would fail inside the jitted step
    ({"max_inv_norm": float("inf")}, "max_inv_norm"),
])
def test_bad_hyperparameters_raise(kwargs, name):
  with pytest.raises(ValueError, match=name):
    mgpo(optax.adam(1e-3), **kwargs)
  with pytest.raises(ValueError, match=name):
    mgpo_adamw(1e-3, **kwargs)


@pytest.mark.parametrize("kwargs,name", [
    ({"eps": -1.0}, "mgpo: eps"), ({"eps": float("nan")}, "mgpo: eps"),
])
def test_bad_eps_raises(kwargs, name):
  with pytest.raises(ValueError, match=name):
    mgpo(optax.adam(1e-3), **kwargs)


@pytest.mark.parametrize("kwargs,name", [
    ({"b1": 1.0}, "b1"), ({"b1": -0.5}, "b1"), ({"b2": 1.5}, "b2"),
    ({"weight_decay": -0.1}, "weight_decay"), ({"eps": float("inf")}, "eps"),
])
def test_mgpo_adamw_checks_adams_scalars(kwargs, name):
  """b1 = 1 would silently give NaN updates (Adam's bias correction divides by 1 - b1^t)."""
  with pytest.raises(ValueError, match=f"mgpo_adamw: {name} must be"):
    mgpo_adamw(1e-3, **kwargs)


def test_base_optimizer_must_be_a_transformation():
  with pytest.raises(ValueError, match="base_optimizer must be an optax GradientTransformation"):
    mgpo(1e-3)


def test_injected_bad_value_raises_at_init():
  tx = optax.inject_hyperparams(mgpo_adamw)(learning_rate=1e-3, rho=-1.0)
  with pytest.raises(ValueError, match="rho"):
    tx.init({"a": jnp.ones(3)})


def test_base_without_momentum_raises_at_init():
  params = {"a": jnp.ones(3)}
  for base in (optax.sgd(0.1), optax.chain(optax.scale_by_rms(), optax.scale(-0.1))):
    tx = mgpo(base)
    with pytest.raises(ValueError, match="first moment"):
      tx.init(params)
  mgpo(optax.sgd(0.1, momentum=0.9)).init(params)  # trace is accepted
  mgpo(optax.chain(optax.clip(1.0), optax.inject_hyperparams(optax.adam)(1e-3))).init(params)
  with pytest.raises(ValueError, match="ScaleByAdamState"):
    mgpo(optax.chain(optax.scale_by_adam(), optax.scale_by_adam())).init(params)


def test_update_without_params_and_eval_without_state_raise():
  params = {"a": jnp.ones(3)}
  tx = mgpo_adamw(1e-3)
  with pytest.raises(ValueError, match="params"):
    tx.update(params, tx.init(params))
  with pytest.raises(ValueError, match="MGPOState"):
    mgpo_eval_params(optax.adam(1e-3).init(params), params)


def test_sgd_momentum_fallback_uses_trace():
  params, targets = _problem(8)
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  p, s = _run(mgpo(optax.sgd(0.01, momentum=0.9), rho=0.05), params, _jax_loss(targets), 5)
  trace = s.base_state[0].trace
  eps = jax.tree.map(lambda a, b: a - b, p, mgpo_eval_params(s, p))
  chex.assert_trees_all_close(eps, jax.tree.map(lambda t: s.eps_scale * t, trace), rtol=1e-5,
                              atol=1e-7)
  assert isinstance(s, MGPOState) and float(s.eps_scale) != 0.0


# ---------------------------------------------------------------------------------------------
# Documentation.


def test_docs_training_loop_runs():
  text = (ROOT / "docs" / "mgpo.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, re.S)
  assert blocks, "docs/mgpo.md must contain a ```python block"
  loop = blocks[0]
  assert 10 <= len([l for l in loop.splitlines() if l.strip()]) <= 25
  ns: dict = {}
  exec(compile(loop, "docs/mgpo.md", "exec"), ns)
  start = float(jnp.mean(ns["y"] ** 2))  # the loss at B = 0
  assert float(ns["loss"](ns["theta"])) < 0.5 * start


def test_docstring_examples():
  module = sys.modules["mgpo_jax.optim.mgpo"]  # the attribute is the mgpo function
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0
