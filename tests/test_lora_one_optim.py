"""LoRA-One's r×r preconditioner (mgpo_jax.optim.lora_one): float64 numpy references, its
composition with Adam and MGPO under jit, and optax's battery of properties for contributed
optimizers (as tests/test_optax_battery.py runs it over MGPO), on LoRA-structured params."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mgpo_jax.lora import LoraConfig, apply_lora
from mgpo_jax.optim import (PreconditionLoraState, lora_one_adamw, lora_pairs, mgpo,
                            mgpo_eval_params, precondition_lora)

LAM = 1e-6


def _np_precondition(g_a, g_b, a, b, lam=LAM):
  """float64 numpy: ĝ_A = g_A (B Bᵀ + λI)⁻¹, ĝ_B = (AᵀA + λI)⁻¹ g_B, by np.linalg.solve."""
  g_a, g_b, a, b = (np.asarray(x, np.float64) for x in (g_a, g_b, a, b))
  eye = np.eye(a.shape[-1])
  ga = np.swapaxes(np.linalg.solve(b @ np.swapaxes(b, -1, -2) + lam * eye,
                                   np.swapaxes(g_a, -1, -2)), -1, -2)
  gb = np.linalg.solve(np.swapaxes(a, -1, -2) @ a + lam * eye, g_b)
  return ga, gb


def _lora_tree(rng, n=6, r=3, m=5, lead=(), dtype=np.float32):
  f = lambda *s: jnp.asarray(rng.normal(size=(*lead, *s)), dtype)  # noqa: E731
  return {"layer": {"q": {"lora_a": f(n, r), "lora_b": f(r, m)}},
          "head": {"kernel": f(n, 2)}}


@pytest.mark.parametrize("lead", [(), (2,)], ids=["2d", "stacked"])
def test_matches_numpy_solve_and_leaves_other_leaves(lead):
  rng = np.random.default_rng(0)
  params, grads = _lora_tree(rng, lead=lead), _lora_tree(rng, lead=lead)
  out, state = jax.jit(precondition_lora().update)(grads, PreconditionLoraState(), params)
  ga, gb = _np_precondition(grads["layer"]["q"]["lora_a"], grads["layer"]["q"]["lora_b"],
                            params["layer"]["q"]["lora_a"], params["layer"]["q"]["lora_b"])
  np.testing.assert_allclose(out["layer"]["q"]["lora_a"], ga, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out["layer"]["q"]["lora_b"], gb, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(out["head"]["kernel"], grads["head"]["kernel"])
  assert state == PreconditionLoraState() and not jax.tree.leaves(state)


def test_float64_exact():
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    params, grads = _lora_tree(rng, dtype=np.float64), _lora_tree(rng, dtype=np.float64)
    out, _ = precondition_lora().update(grads, PreconditionLoraState(), params)
    ga, gb = _np_precondition(grads["layer"]["q"]["lora_a"], grads["layer"]["q"]["lora_b"],
                              params["layer"]["q"]["lora_a"], params["layer"]["q"]["lora_b"])
    assert out["layer"]["q"]["lora_a"].dtype == jnp.float64
    np.testing.assert_allclose(out["layer"]["q"]["lora_a"], ga, rtol=1e-10)
    np.testing.assert_allclose(out["layer"]["q"]["lora_b"], gb, rtol=1e-10)


def test_b_zero_is_finite_and_adam_steps_are_finite():
  """The default init (B = 0): B Bᵀ + λI = λI, so ĝ_A = g_A / λ; nothing is NaN or Inf."""
  rng = np.random.default_rng(2)
  params = _lora_tree(rng)
  params["layer"]["q"]["lora_b"] = jnp.zeros((3, 5))
  grads = _lora_tree(rng)
  out, _ = precondition_lora().update(grads, PreconditionLoraState(), params)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))
  np.testing.assert_allclose(out["layer"]["q"]["lora_a"], grads["layer"]["q"]["lora_a"] / LAM,
                             rtol=1e-5)
  tx = lora_one_adamw(1e-3)
  u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))


def _np_spd(rng, lead, r, rank, lam):
  """A random ``F Fᵀ + λI`` (F of the given rank) and a right-hand side, float64."""
  f = rng.normal(size=(*lead, r, rank))
  return f @ np.swapaxes(f, -1, -2) + lam * np.eye(r), rng.normal(size=(*lead, r, 7))


@pytest.mark.parametrize("solve", ["cholesky_xla", "dispatch"])
@pytest.mark.parametrize("r", [1, 8, 32])
def test_solves_match_numpy(solve, r):
  """The Cholesky solve written in XLA operations, and the per-platform dispatch the
  preconditioner calls (that Cholesky on CPU, the backend's solve on GPU/TPU), against float64
  numpy, batched, in float32 and float64."""
  from mgpo_jax.optim.lora_one import _cholesky_solve, _solve

  fn = _cholesky_solve if solve == "cholesky_xla" else _solve
  rng = np.random.default_rng(r)
  gram, rhs = _np_spd(rng, (3,), r, r + 2, 0.1)
  x = jax.jit(fn)(jnp.asarray(gram, jnp.float32), jnp.asarray(rhs, jnp.float32), 0.1)
  np.testing.assert_allclose(x, np.linalg.solve(gram, rhs), rtol=2e-4, atol=2e-5)
  with jax.enable_x64(True):
    x = fn(jnp.asarray(gram), jnp.asarray(rhs), 0.1)
    np.testing.assert_allclose(x, np.linalg.solve(gram, rhs), rtol=1e-10)


@pytest.mark.parametrize("rank", [0, 3])
def test_cholesky_of_rank_deficient_grams_is_finite_and_backward_stable(rank):
  """F of rank < r and λ = 1e-6 (cond ≈ 1e6, B = 0 for rank 0): finite, and the float32
  residual is at rounding level, ‖gram x − rhs‖ ≤ 1e-5 ‖gram‖ ‖x‖."""
  from mgpo_jax.optim.lora_one import _cholesky_solve

  rng = np.random.default_rng(rank)
  gram, rhs = _np_spd(rng, (4,), 8, rank, LAM)
  x = np.asarray(jax.jit(_cholesky_solve)(jnp.asarray(gram, jnp.float32),
                                          jnp.asarray(rhs, jnp.float32), LAM), np.float64)
  assert np.all(np.isfinite(x))
  residual = np.linalg.norm(gram @ x - rhs, axis=(-2, -1))
  scale = np.linalg.norm(gram, 2, axis=(-2, -1)) * np.linalg.norm(x, axis=(-2, -1))
  assert np.all(residual <= 1e-5 * scale), residual / scale


def test_modules_of_different_shapes_and_dtypes_and_no_lapack_on_cpu():
  """Modules of several widths, a stacked one and a bfloat16 one (solved in float32 with the
  float32 modules of its shape) are each preconditioned as numpy does it; on CPU the program
  calls no LAPACK kernel (no custom call at all)."""
  rng = np.random.default_rng(4)
  f = lambda *s, dtype=jnp.float32: jnp.asarray(rng.normal(size=s), dtype)  # noqa: E731
  tree = lambda: {"q": {"lora_a": f(6, 3), "lora_b": f(3, 5)},  # noqa: E731
                  "k": {"lora_a": f(6, 3), "lora_b": f(3, 4)},
                  "v": {"lora_a": f(6, 3), "lora_b": f(3, 5)},
                  "mlp": {"lora_a": f(2, 9, 4), "lora_b": f(2, 4, 6)},
                  "bf": {"lora_a": f(6, 3, dtype=jnp.bfloat16),
                         "lora_b": f(3, 5, dtype=jnp.bfloat16)}}
  params, grads = tree(), tree()
  update = jax.jit(precondition_lora().update)
  out, _ = update(grads, PreconditionLoraState(), params)
  for name in params:
    ga, gb = _np_precondition(np.asarray(grads[name]["lora_a"], np.float32),
                              np.asarray(grads[name]["lora_b"], np.float32),
                              np.asarray(params[name]["lora_a"], np.float32),
                              np.asarray(params[name]["lora_b"], np.float32))
    tol = 1e-2 if name == "bf" else 1e-4
    assert out[name]["lora_a"].dtype == grads[name]["lora_a"].dtype
    np.testing.assert_allclose(np.asarray(out[name]["lora_a"], np.float32), ga, rtol=tol,
                               atol=tol * np.abs(ga).max())
    np.testing.assert_allclose(np.asarray(out[name]["lora_b"], np.float32), gb, rtol=tol,
                               atol=tol * np.abs(gb).max())
  if jax.default_backend() == "cpu":
    assert "custom-call" not in update.lower(grads, PreconditionLoraState(), params).compile(
        ).as_text()


def test_pairs_follow_nnx_state():
  """On an NNX model's state (Variables), each LoraLinear's lora_a/lora_b is one pair."""

  class Net(nnx.Module):
    def __init__(self):
      self.q, self.v = nnx.Linear(4, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 4, rngs=nnx.Rngs(1))
      self.head = nnx.Linear(4, 2, rngs=nnx.Rngs(2))

  net = apply_lora(Net(), LoraConfig(target_modules=["q", "v"], r=2,
                                     modules_to_save=["head"]), rngs=nnx.Rngs(0))
  for tree in (nnx.state(net, nnx.LoRAParam), nnx.to_pure_dict(nnx.state(net, nnx.LoRAParam))):
    leaves = jax.tree.leaves(tree)
    pairs = lora_pairs(tree)
    assert len(pairs) == 2
    assert all(leaves[a].shape == (4, 2) and leaves[b].shape == (2, 4) for a, b in pairs)


def test_errors():
  with pytest.raises(ValueError, match="damping must be a number > 0"):
    precondition_lora(0.0)
  with pytest.raises(ValueError, match=r"\['lora_a'\] but not both"):
    precondition_lora().init({"q": {"lora_a": jnp.ones((3, 2))}})
  with pytest.raises(ValueError, match=r"are not \(\.\.\., n, r\) and \(\.\.\., r, m\)"):
    precondition_lora().init({"q": {"lora_a": jnp.ones((3, 2)), "lora_b": jnp.ones((3, 2))}})
  with pytest.raises(ValueError, match="update needs params"):
    precondition_lora().update({}, PreconditionLoraState())
  with pytest.raises(ValueError, match="must be bools"):
    lora_one_adamw(1e-3, sequential=1)


def _np_adam(g, m, v, t, lr, b1=0.9, b2=0.999, eps=1e-8, correct=True):
  m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
  mh, vh = (m / (1 - b1**t), v / (1 - b2**t)) if correct else (m, v)
  return -lr * mh / (np.sqrt(vh) + eps), m, v


@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("sequential", [False, True])
def test_lora_one_adamw_matches_numpy(bias_correction, sequential):
  """Three steps of the paper's form and the released code's variants vs float64 numpy."""
  rng = np.random.default_rng(3)
  lr = 1e-2
  params = _lora_tree(rng)
  tx = lora_one_adamw(lr, bias_correction=bias_correction, sequential=sequential)
  state, update = tx.init(params), jax.jit(tx.update)
  ref = {"a": params["layer"]["q"]["lora_a"], "b": params["layer"]["q"]["lora_b"],
         "h": params["head"]["kernel"]}
  ref = {k: np.asarray(x, np.float64) for k, x in ref.items()}
  mom = {k: (np.zeros_like(x), np.zeros_like(x)) for k, x in ref.items()}
  for t in range(1, 4):
    grads = _lora_tree(rng)
    g = {"a": grads["layer"]["q"]["lora_a"], "b": grads["layer"]["q"]["lora_b"],
         "h": grads["head"]["kernel"]}
    g = {k: np.asarray(x, np.float64) for k, x in g.items()}
    ga, gb = _np_precondition(g["a"], g["b"], ref["a"], ref["b"])
    new = {}
    for k, gk in (("a", ga), ("h", g["h"])):
      d, *mom[k] = _np_adam(gk, *mom[k], t, lr, correct=bias_correction)
      new[k] = ref[k] + d
    if sequential:
      gb = _np_precondition(g["a"], g["b"], new["a"], ref["b"])[1]
    d, *mom["b"] = _np_adam(gb, *mom["b"], t, lr, correct=bias_correction)
    new["b"] = ref["b"] + d
    u, state = update(grads, state, params)
    params = optax.apply_updates(params, u)
    ref = new
    np.testing.assert_allclose(params["layer"]["q"]["lora_a"], ref["a"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(params["layer"]["q"]["lora_b"], ref["b"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(params["head"]["kernel"], ref["h"], rtol=1e-5, atol=1e-7)


def test_composes_inside_mgpo_with_the_clean_factors():
  """mgpo(chain(precondition_lora(), adamw)): the preconditioner sees the CLEAN θ = p − ε
  (MGPO hands its base θ), not the loop's p; jit gives what eager gives; the state holds
  nothing parameter-sized beyond Adam's."""
  rng = np.random.default_rng(4)
  params = _lora_tree(rng)
  seen = []
  pre = precondition_lora()

  def spy_update(updates, state, params=None, **extra):
    seen.append(params)
    return pre.update(updates, state, params, **extra)

  spy = optax.GradientTransformationExtraArgs(pre.init, spy_update)
  combo = mgpo(optax.chain(spy, optax.adamw(1e-2)))
  state = combo.init(params)
  sizes = lambda s: sorted(x.size for x in jax.tree.leaves(s))  # noqa: E731
  assert sizes(state) == sizes(mgpo(optax.adamw(1e-2)).init(params))
  p, p_jit, s_jit = params, params, state
  for _ in range(4):
    grads = _lora_tree(rng)
    theta = mgpo_eval_params(state, p)
    u, state = combo.update(grads, state, p)
    for x, y in zip(jax.tree.leaves(seen[-1]), jax.tree.leaves(theta)):
      np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    u_jit, s_jit = jax.jit(combo.update)(grads, s_jit, p_jit)
    p, p_jit = optax.apply_updates(p, u), optax.apply_updates(p_jit, u_jit)
    for x, y in zip(jax.tree.leaves(p), jax.tree.leaves(p_jit)):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  assert float(state.eps_scale) != 0.0  # ε acted, so θ and p differ
  assert not np.allclose(jax.tree.leaves(mgpo_eval_params(state, p))[0], jax.tree.leaves(p)[0])


# ---------------------------------------------------------------------------------------------
# optax's battery (optax/contrib/_common_test.py), on a LoRA factorisation target.

OPTIMIZERS = {
    "chain(precondition, adam)": lambda lr, **kw: optax.chain(precondition_lora(**kw),
                                                              optax.adam(lr)),
    "lora_one_adamw": lambda lr, **kw: lora_one_adamw(lr, **kw),
    "lora_one_adamw(released)": lambda lr, **kw: lora_one_adamw(
        lr, bias_correction=False, sequential=True, **kw),
    "mgpo(chain(precondition, adamw))": lambda lr, **kw: mgpo(
        optax.chain(precondition_lora(**kw), optax.adamw(lr, weight_decay=0.0))),
}
NAMES = list(OPTIMIZERS)


def _target():
  """‖A B − M‖² + ‖h − c‖² with M of rank r (a minimum with loss 0) and a head leaf."""
  rng = np.random.default_rng(11)
  m = jnp.asarray(rng.normal(size=(6, 2)) @ rng.normal(size=(2, 5)) / 2, jnp.float32)
  c = jnp.asarray(rng.normal(size=3), jnp.float32)
  params = {"q": {"lora_a": jnp.asarray(rng.normal(size=(6, 2)) / 2, jnp.float32),
                  "lora_b": jnp.asarray(rng.normal(size=(2, 5)) / 2, jnp.float32)},
            "h": jnp.zeros(3)}
  loss = lambda p: (jnp.sum((p["q"]["lora_a"] @ p["q"]["lora_b"] - m) ** 2)  # noqa: E731
                    + jnp.sum((p["h"] - c) ** 2))
  return params, loss


def _train(tx, params, loss, steps):
  def step(carry, _):
    p, s = carry
    u, s = tx.update(jax.grad(loss)(p), s, p)
    return (optax.apply_updates(p, u), s), None

  return jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), length=steps)[0])(params)


@pytest.mark.parametrize("name", NAMES)
def test_battery_converges_under_jit(name):
  params, loss = _target()
  p, state = _train(OPTIMIZERS[name](1e-2), params, loss, 3000)
  if name.startswith("mgpo"):
    p = mgpo_eval_params(state, p)
  assert float(loss(p)) < 1e-3, float(loss(p))


@pytest.mark.parametrize("name", NAMES)
def test_battery_extra_args_no_recompilation_and_dtype(name):
  params, loss = _target()
  tx = OPTIMIZERS[name](1e-2)
  traces = []

  @jax.jit
  def step(p, s):
    traces.append(None)
    u, s = tx.update(jax.grad(loss)(p), s, p, unexpected_extra_arg=1)
    return optax.apply_updates(p, u), s

  p, s = params, tx.init(params)
  for _ in range(3):
    p, s = step(p, s)
  assert len(traces) == 1
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(p))
  bf = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  u, _ = jax.jit(tx.update)(jax.grad(lambda q: loss(q).astype(jnp.float32))(bf), tx.init(bf), bf)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u))


def test_battery_inject_hyperparams_equivalence():
  params, loss = _target()
  tx = lora_one_adamw(1e-2, damping=1e-3)
  tx_inject = optax.inject_hyperparams(lora_one_adamw)(learning_rate=1e-2, damping=1e-3)
  s, s_inject = tx.init(params), tx_inject.init(params)
  p = params
  for _ in range(3):
    g = jax.grad(loss)(p)
    u, s = jax.jit(tx.update)(g, s, p)
    u_inject, s_inject = jax.jit(tx_inject.update)(g, s_inject, p)
    for x, y in zip(jax.tree.leaves(u), jax.tree.leaves(u_inject)):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    p = optax.apply_updates(p, u)


@pytest.mark.parametrize("name", NAMES)
def test_battery_multisteps_first_update_is_zero(name):
  params, loss = _target()
  tx = optax.MultiSteps(OPTIMIZERS[name](1e-2), every_k_schedule=4)
  u, _ = jax.jit(tx.update)(jax.grad(loss)(params), tx.init(params), params)
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(u))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float64"])
@pytest.mark.parametrize("name", NAMES)
def test_battery_state_dtype_stable_under_cond(name, dtype):
  with jax.enable_x64(dtype == "float64"):
    params, loss = _target()
    params = jax.tree.map(lambda x: x.astype(dtype), params)
    tx = OPTIMIZERS[name](1e-2)

    @jax.jit
    def step(p, s, flip):
      u, s = jax.lax.cond(flip, lambda: tx.update(jax.grad(loss)(p), s, p), lambda: (p, s))
      return optax.apply_updates(p, u), s

    p, s = params, tx.init(params)
    for flip in (True, False, True):
      p, s = step(p, s, flip)
      assert all(x.dtype == jnp.dtype(dtype) for x in jax.tree.leaves(p))


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_battery_state_and_shardings_stable_on_a_mesh(name):
  """A sharded on its input axis and B on its output axis (qwix's rule) keep their shardings
  through the update; the state's layout does not change from step to step."""
  assert len(jax.devices()) >= 4, "tests/conftest.py sets 4 fake CPU devices"
  mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
  params, loss = _target()
  params = {"q": {"lora_a": jnp.concatenate([params["q"]["lora_a"]] * 2) / 2,  # n = 12
                  "lora_b": params["q"]["lora_b"]}, "h": params["h"]}
  loss = lambda p: jnp.sum((p["q"]["lora_a"] @ p["q"]["lora_b"]) ** 2)  # noqa: E731
  shard = {"q": {"lora_a": NamedSharding(mesh, P("data", None)),
                 "lora_b": NamedSharding(mesh, P(None, None))}, "h": NamedSharding(mesh, P())}
  params = jax.device_put(params, shard)
  tx = OPTIMIZERS[name](1e-2)

  @jax.jit
  def step(p, s):
    u, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, u), s

  p, s = step(params, jax.jit(tx.init)(params))
  layout = lambda t: [(x.dtype, x.shape, x.sharding) for x in jax.tree.leaves(t)]  # noqa: E731
  before = layout(s)
  for _ in range(2):
    p, s = step(p, s)
  for (d0, s0, h0), (d1, s1, h1) in zip(before, layout(s), strict=True):
    assert d0 == d1 and s0 == s1 and h0.is_equivalent_to(h1, len(s0))
  assert p["q"]["lora_a"].sharding.is_equivalent_to(shard["q"]["lora_a"], 2)


def test_battery_schedule_equivalence():
  params, loss = _target()
  a, _ = _train(lora_one_adamw(1e-3), params, loss, 10)
  b, _ = _train(lora_one_adamw(optax.constant_schedule(1e-3)), params, loss, 10)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)

