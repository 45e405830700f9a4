"""optax's battery for contributed optimizers, run over the transforms mgpo-jax ships.

The properties are those of ``optax/contrib/_common_test.py`` (convergence on its four
targets under jit, unexpected extra arguments, no recompilation on the second call,
``inject_hyperparams`` equivalence, dtype preservation, a zero first update under
``MultiSteps``, state dtypes stable under ``lax.cond``, schedule equivalence), written for
MGPO: the end point is the clean iterate ``mgpo_eval_params``, and state stability is also
checked for shardings on a 4-device mesh (tests/conftest.py). Every optimizer is in its
default MGPO settings. Then the ``rho`` schedule: one that reaches 0 recovers the base
optimizer's fixed point, and it behaves the same under jit and ``inject_hyperparams``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mgpo_jax import MGPOState, follow_schedule, mgpo, mgpo_adamw, mgpo_eval_params

# name -> (factory of the MGPO hyper-parameters, base learning rate). The learning rates
# are those at which the base optimizers alone pass optax's convergence check.
OPTIMIZERS = {
    "mgpo_adamw": (lambda lr, **kw: mgpo_adamw(lr, **kw), 1e-2),
    "mgpo(adam)": (lambda lr, **kw: mgpo(optax.adam(lr), **kw), 1e-2),
    "mgpo(adamw)": (lambda lr, **kw: mgpo(optax.adamw(lr), **kw), 1e-2),
    "mgpo(sgd momentum)": (lambda lr, **kw: mgpo(optax.sgd(lr, momentum=0.9), **kw), 1e-3),
}
NAMES = list(OPTIMIZERS)
# The defaults of mgpo / mgpo_adamw, spelled out so that inject_hyperparams injects them.
DEFAULTS = {"rho": 0.05, "ema_decay": 0.9, "sign": -1.0, "max_inv_norm": 10.0}


def _opt(name, **kwargs):
  factory, lr = OPTIMIZERS[name]
  return factory(lr, **kwargs)


def _rng():
  """Fresh random inputs on every run; the seed is in the failure message."""
  seed = int(np.random.default_rng().integers(2**31))
  return seed, np.random.default_rng(seed)


# optax's four convergence targets: (initial params, minimum, loss).
def _parabola():
  x = jnp.array([1.0, -1.0, 1.0])
  return jnp.array([-1.0, 10.0, 1.0]), x, lambda p: jnp.sum((p - x) ** 2)


def _rosenbrock():
  return (jnp.zeros(2), jnp.array([1.0, 1.0]),
          lambda p: (1.0 - p[0]) ** 2 + 100.0 * (p[1] - p[0] ** 2) ** 2)


def _matrix_parabola():
  m = jnp.array([[3.0, -2.0], [1.0, 4.0]])
  return jnp.zeros((2, 2)), m, lambda p: jnp.sum((p - m) ** 2)


def _mixed():
  a, b = jnp.array([1.0, -1.0, 2.0]), jnp.array([[1.0, 0.0], [-1.0, 1.0]])
  return ((jnp.zeros(3), jnp.zeros((2, 2))), (a, b),
          lambda p: jnp.sum((p[0] - a) ** 2) + jnp.sum((p[1] - b) ** 2))


TARGETS = {"parabola": _parabola, "rosenbrock": _rosenbrock,
           "matrix_parabola": _matrix_parabola, "mixed": _mixed}


def _train(tx, params, loss, steps):
  """``steps`` jitted steps in one lax.scan; returns (loop params, state)."""
  def step(carry, _):
    p, s = carry
    u, s = tx.update(jax.grad(loss)(p), s, p)
    return (optax.apply_updates(p, u), s), None

  run = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), length=steps)[0])
  return run(params)


def _assert_close(actual, desired, rtol, atol, msg=""):
  for a, d in zip(jax.tree.leaves(actual), jax.tree.leaves(desired), strict=True):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(d, np.float64),
                               rtol=rtol, atol=atol, err_msg=msg)


# ---------------------------------------------------------------------------------------------
# The battery.


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("name", NAMES)
def test_converges_under_jit(name, target):
  params, minimum, loss = TARGETS[target]()
  tx = _opt(name)
  state = tx.init(params)
  state = optax.tree.map_params(tx, lambda v: v, state)  # a no-op map over the params
  assert isinstance(state, MGPOState)
  p, state = _train(tx, params, loss, 30_000)
  _assert_close(mgpo_eval_params(state, p), minimum, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("target", ["parabola", "matrix_parabola"])
def test_paper_form_misses_the_minimum(target):
  """The paper's literal form (sign +1, constant rho) settles off the minimum: the
  convergence check above can fail, and the default is not the paper's form by accident."""
  params, minimum, loss = TARGETS[target]()
  tx = mgpo_adamw(1e-2, sign=1.0)
  p, state = _train(tx, params, loss, 30_000)
  err = max(float(jnp.max(jnp.abs(a - b))) for a, b in
            zip(jax.tree.leaves(mgpo_eval_params(state, p)), jax.tree.leaves(minimum)))
  assert err > 0.05


@pytest.mark.parametrize("name", NAMES)
def test_extra_args_and_no_recompilation(name):
  seed, rng = _rng()
  tx = _opt(name)
  params0 = jnp.asarray(rng.uniform(-0.5, 0.5, size=2), jnp.float32)
  loss = TARGETS["rosenbrock"]()[2]
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(None)  # runs once per trace
    updates = jax.grad(loss)(params)
    updates, state = tx.update(updates, state, params,
                               unexpected_extra_args_your_optimizer_doesnt_expect=1)
    return optax.apply_updates(params, updates), state

  params, state = params0, tx.init(params0)
  for _ in range(3):
    params, state = step(params, state)
  assert np.all(np.isfinite(np.asarray(params))), f"seed {seed}"
  assert len(traces) == 1, f"seed {seed}: the step was traced {len(traces)} times"
  # optax's check: from a fresh state, the second call does not compile again.
  traces.clear()
  params, state = step(params0, tx.init(params0))
  step(params, state)
  assert len(traces) <= 1, f"seed {seed}: the second call re-traced"


def _inject(name, **hparams):
  if name == "mgpo_adamw":
    return optax.inject_hyperparams(mgpo_adamw)(learning_rate=OPTIMIZERS[name][1], **hparams)
  base = {"mgpo(adam)": optax.adam, "mgpo(adamw)": optax.adamw}.get(name)
  base = base(1e-2) if base else optax.sgd(1e-3, momentum=0.9)
  return optax.inject_hyperparams(functools.partial(mgpo, base))(**hparams)


@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams_equivalence(name):
  seed, rng = _rng()
  params = [jnp.asarray(rng.normal(size=(2, 3)), jnp.float32),
            jnp.asarray(rng.normal(size=(2, 5, 2)), jnp.float32)]
  tx, tx_inject = _opt(name), _inject(name, **DEFAULTS)
  state, state_inject = jax.jit(tx.init)(params), jax.jit(tx_inject.init)(params)
  update, update_inject = jax.jit(tx.update), jax.jit(tx_inject.update)
  for _ in range(3):  # the first update is unperturbed: go on until ε acts
    grads = [jnp.asarray(rng.normal(size=x.shape), jnp.float32) for x in params]
    u, state = update(grads, state, params)
    u_inject, state_inject = update_inject(grads, state_inject, params)
    _assert_close(u_inject, u, rtol=1e-5, atol=1e-7, msg=f"seed {seed}")
    params = optax.apply_updates(params, u)
  _assert_close(state_inject.inner_state, state, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
  assert float(state.eps_scale) != 0.0


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("name", NAMES)
def test_preserve_dtype(name, dtype):
  seed, rng = _rng()
  tx = _opt(name)
  params = jnp.asarray(rng.normal(size=2), dtype)
  state = jax.jit(tx.init)(params)
  update = jax.jit(tx.update)
  for _ in range(3):
    updates, state = update(jax.grad(lambda x: jnp.sum(x**2))(params), state, params)
    assert updates.dtype == params.dtype, f"seed {seed}"
    params = optax.apply_updates(params, updates)
  assert mgpo_eval_params(state, params).dtype == params.dtype


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("name", NAMES)
def test_multisteps_first_update_is_zero(name, dtype):
  seed, rng = _rng()
  tx = optax.MultiSteps(_opt(name), every_k_schedule=4)
  params = jnp.asarray(rng.normal(size=2), dtype)
  grads = jax.grad(lambda x: jnp.sum(x**2))(params)
  state = jax.jit(tx.init)(params)
  updates, _ = jax.jit(tx.update)(grads, state, params)
  assert updates.dtype == params.dtype
  np.testing.assert_array_equal(np.asarray(updates), np.zeros_like(grads),
                                err_msg=f"seed {seed}")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("name", NAMES)
def test_state_dtype_stable_under_cond(name, dtype):
  """As optax's check: update inside a lax.cond whose branches must agree on the state."""
  seed, rng = _rng()
  with jax.enable_x64(dtype == "float64"):
    tx = _opt(name)
    params0, _, loss = _parabola()
    params0 = (params0 + jnp.asarray(rng.normal(size=3))).astype(dtype)

    @jax.jit
    def step(params, state):
      grads = jax.grad(loss)(params)
      cond = jax.random.randint(jax.random.key(seed), (), 0, 2) == 0
      updates, state = jax.lax.cond(cond, lambda: tx.update(grads, state, params),
                                    lambda: (params, state))
      return optax.apply_updates(params, updates), state

    params, state = params0, tx.init(params0)
    for _ in range(2):
      params, new_state = step(params, state)
      assert params.dtype == jnp.dtype(dtype)
      cond = jax.random.randint(jax.random.key(seed + 1), (), 0, 2) == 0
      state = jax.lax.cond(cond, lambda s=state: s, lambda s=new_state: s)


@pytest.mark.parametrize("name", NAMES)
def test_state_dtypes_and_shardings_stable_on_a_mesh(name):
  assert len(jax.devices()) >= 4, "tests/conftest.py sets 4 fake CPU devices"
  seed, rng = _rng()
  mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
  sharded, replicated = NamedSharding(mesh, P("data", None)), NamedSharding(mesh, P())
  target = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
  params = {"a": jax.device_put(jnp.asarray(rng.normal(size=(8, 3)), jnp.float32), sharded),
            "b": jax.device_put(jnp.asarray(rng.normal(size=(3,)), jnp.float32), replicated)}
  loss = lambda p: jnp.sum((p["a"] - target) ** 2) + jnp.sum(p["b"] ** 2)
  tx = _opt(name)

  @jax.jit
  def step(params, state):
    u, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, u), state

  state = jax.jit(tx.init)(params)
  layout = lambda s: [(x.dtype, x.shape, x.sharding) for x in jax.tree.leaves(s)]
  # jit(init) leaves its constants (the counts, the EMA) on one device, as for any optax
  # state; from the first update on the layout must not change.
  assert [(d, s) for d, s, _ in layout(state)] == [
      (d, s) for d, s, _ in layout(step(params, state)[1])]
  params, state = step(params, state)
  before = layout(state)
  for _ in range(3):
    params, state = step(params, state)
  after = layout(state)
  assert len(before) == len(after)
  for (d0, s0, h0), (d1, s1, h1) in zip(before, after):
    assert d0 == d1 and s0 == s1, f"seed {seed}"
    assert h0.is_equivalent_to(h1, len(s0)), f"seed {seed}: {h0} became {h1}"
  assert params["a"].sharding.is_equivalent_to(sharded, 2)
  mu = jax.tree.leaves(state.base_state, is_leaf=lambda x: isinstance(
      x, (optax.ScaleByAdamState, optax.TraceState)))
  assert any(x.shape == (8, 3) and x.sharding.is_equivalent_to(sharded, 2)
             for x in jax.tree.leaves(mu))


@pytest.mark.parametrize("name", NAMES)
def test_schedule_equivalence(name):
  """A constant schedule gives what its constant gives: for the learning rate (as optax's
  check), and for rho and max_inv_norm."""
  seed, rng = _rng()
  params0, _, loss = _parabola()
  params0 = params0 + jnp.asarray(rng.normal(size=3), jnp.float32)
  factory, _ = OPTIMIZERS[name]
  const = optax.constant_schedule
  pairs = [(factory(1e-3), factory(const(1e-3))),
           (factory(1e-3, rho=0.1, max_inv_norm=2.0),
            factory(1e-3, rho=const(0.1), max_inv_norm=const(2.0)))]
  for tx_scalar, tx_schedule in pairs:
    p_scalar, s_scalar = _train(tx_scalar, params0, loss, 10)
    p_schedule, s_schedule = _train(tx_schedule, params0, loss, 10)
    _assert_close(p_schedule, p_scalar, rtol=1e-6, atol=1e-7, msg=f"seed {seed}")
    mgpo_fields = lambda s: (s.count, s.grad_norm_ema, s.eps_scale)  # base states may differ
    _assert_close(mgpo_fields(s_schedule), mgpo_fields(s_scalar), rtol=1e-6, atol=1e-7,
                  msg=f"seed {seed}")


# ---------------------------------------------------------------------------------------------
# The rho schedule.


# mgpo(optax.adamw(...)) is left out: optax.adamw's default weight decay (1e-4) moves its
# fixed point off the minimum so slowly that the base itself has not reached it in 20,000
# steps. mgpo_adamw (weight decay 0, the paper's) covers AdamW.
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("name", ["mgpo_adamw", "mgpo(adam)", "mgpo(sgd momentum)"])
def test_rho_schedule_reaching_zero_recovers_the_base_fixed_point(name, sign):
  seed, rng = _rng()
  x_star = jnp.asarray(rng.uniform(-3.0, 3.0, size=4), jnp.float32)
  params0 = x_star + jnp.asarray(rng.uniform(-3.0, 3.0, size=4), jnp.float32)
  loss = lambda p: jnp.sum((p - x_star) ** 2)
  steps = 20_000
  p_base, _ = _train(_opt(name, rho=0.0), params0, loss, steps)
  rho = optax.cosine_decay_schedule(0.05, steps // 2)  # 0 from step steps/2 on
  p, state = _train(_opt(name, rho=rho, sign=sign), params0, loss, steps)
  theta = mgpo_eval_params(state, p)
  _assert_close(p_base, x_star, rtol=0, atol=1e-3, msg=f"seed {seed}: the base itself")
  _assert_close(theta, p_base, rtol=0, atol=1e-3, msg=f"seed {seed}")
  _assert_close(p, theta, rtol=0, atol=0, msg=f"seed {seed}: ρ = 0 leaves no ε")


def test_schedule_is_evaluated_at_the_step_count():
  """‖p − θ‖ after update k is rho(k) · min(1/ḡ_k, max_inv_norm(k)), for schedules of both."""
  seed, rng = _rng()
  rho = lambda k: 0.01 * (1 + k)
  cap = lambda k: 5.0 / (1 + k)
  tx = mgpo_adamw(1e-2, rho=rho, max_inv_norm=cap)
  params = jnp.asarray(rng.normal(size=5), jnp.float32)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for k in range(6):
    grads = jnp.asarray(rng.normal(size=5) * rng.uniform(0.01, 2.0), jnp.float32)
    u, state = update(grads, state, params)
    params = optax.apply_updates(params, u)
    size = float(jnp.linalg.norm(params - mgpo_eval_params(state, params)))
    expected = rho(k) * min(1.0 / float(state.grad_norm_ema), cap(k))
    np.testing.assert_allclose(size, expected, rtol=1e-4, err_msg=f"seed {seed}, step {k}")


@pytest.mark.parametrize("name", NAMES)
def test_schedule_same_under_jit_and_inject_hyperparams(name):
  seed, rng = _rng()
  rho = optax.warmup_cosine_decay_schedule(0.0, 0.1, 3, 12)
  cap = optax.linear_schedule(10.0, 1.0, 12)
  tx = _opt(name, rho=rho, max_inv_norm=cap)
  tx_inject = _inject(name, **{**DEFAULTS, "rho": rho, "max_inv_norm": cap})
  params = jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)
  s, s_inject = tx.init(params), jax.jit(tx_inject.init)(params)
  update, update_inject = jax.jit(tx.update), jax.jit(tx_inject.update)
  for k in range(12):
    grads = jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)
    u_eager, s_eager = tx.update(grads, s, params)  # no jit
    u, s = update(grads, s, params)
    u_inject, s_inject = update_inject(grads, s_inject, params)
    np.testing.assert_allclose(float(s_inject.hyperparams["rho"]), rho(k), rtol=1e-6)
    _assert_close(u, u_eager, rtol=1e-5, atol=1e-6, msg=f"seed {seed}, step {k}: jit")
    _assert_close(u_inject, u, rtol=1e-5, atol=1e-6, msg=f"seed {seed}, step {k}: inject")
    params = optax.apply_updates(params, u)
  _assert_close(s_inject.inner_state, s, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")


def test_follow_schedule():
  lr = optax.warmup_cosine_decay_schedule(0.0, 3e-4, 10, 100)
  rho = follow_schedule(lr, 0.05, 3e-4)
  for k in (0, 5, 10, 50, 100):
    np.testing.assert_allclose(float(rho(k)), 0.05 * float(lr(k)) / 3e-4, rtol=1e-6)
  np.testing.assert_allclose(float(rho(10)), 0.05, rtol=1e-6)
  assert float(rho(100)) == 0.0
  with pytest.raises(ValueError, match="peak_value"):
    follow_schedule(lr, 0.05, 0.0)


def test_schedules_accepted_and_scalars_checked_at_construction():
  mgpo(optax.adam(1e-3), rho=optax.constant_schedule(-1.0))  # a schedule is not evaluated
  with pytest.raises(ValueError, match="rho must be a finite number >= 0 or a schedule"):
    mgpo(optax.adam(1e-3), rho=-0.1)
  with pytest.raises(ValueError, match="max_inv_norm must be None, a finite number > 0 or a sched"):
    mgpo_adamw(1e-3, max_inv_norm=0.0)
