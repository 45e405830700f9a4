"""Hypothesis properties of mgpo over random pytrees, shapes, gradients and hyper-parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mgpo_jax import mgpo, mgpo_adamw, mgpo_eval_params

SETTINGS = settings(max_examples=15, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_shape = st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple)
_module = st.one_of(
    _shape,  # a leaf directly under the root
    st.dictionaries(st.sampled_from(["lora_a", "lora_b", "bias"]), _shape, min_size=1),
    st.lists(_shape, min_size=1, max_size=2),  # a list node (SequenceKey paths)
)
_structure = st.dictionaries(st.sampled_from(["q", "k", "v", "out", "w"]), _module,
                             min_size=1, max_size=3)
_hyper = st.fixed_dictionaries({
    "rho": st.floats(0.0, 0.5),
    "ema_decay": st.floats(0.0, 0.99),
    "sign": st.sampled_from([-1.0, 1.0]),
    "max_inv_norm": st.one_of(st.none(), st.floats(0.1, 20.0)),
    "scope": st.sampled_from(["global", "per_module"]),
    "weight_decay": st.sampled_from([0.0, 0.05]),
})


def _tree(structure, rng, scale=1.0):
  return jax.tree.map(lambda s: scale * rng.normal(size=s), structure,
                      is_leaf=lambda x: isinstance(x, tuple))


def _reference(theta, grads_seq, *, lr, rho, ema_decay, sign, max_inv_norm, scope, weight_decay,
               b1=0.9, b2=0.999, adam_eps=1e-8):
  """Float64 numpy MGPO driven by given gradients: returns (θ, ε, ḡ per group)."""
  paths, theta = zip(*jax.tree_util.tree_leaves_with_path(theta))
  group = [jax.tree_util.keystr(p[:-1]) if scope == "per_module" else "" for p in paths]
  theta = [np.array(x) for x in theta]
  m = [np.zeros_like(x) for x in theta]
  v = [np.zeros_like(x) for x in theta]
  eps = [np.zeros_like(x) for x in theta]
  gbar = {}
  for t, grads in enumerate(grads_seq, start=1):
    g = jax.tree.leaves(grads)
    for k in set(group):
      norm = np.sqrt(sum(np.sum(x**2) for x, gk in zip(g, group) if gk == k))
      gbar[k] = norm if t == 1 else ema_decay * gbar[k] + (1 - ema_decay) * norm
    for i in range(len(theta)):
      m[i] = b1 * m[i] + (1 - b1) * g[i]
      v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
      step = m[i] / (1 - b1**t) / (np.sqrt(v[i] / (1 - b2**t)) + adam_eps)
      theta[i] = theta[i] - lr * (step + weight_decay * theta[i])
    for k in set(group):
      idx = [i for i, gk in enumerate(group) if gk == k]
      mnorm = np.sqrt(sum(np.sum(m[i] ** 2) for i in idx))
      inv = 1.0 / gbar[k] if gbar[k] > 0 else np.inf
      inv = inv if max_inv_norm is None else min(inv, max_inv_norm)
      c = sign * rho * inv / mnorm if mnorm > 1e-12 else 0.0
      for i in idx:
        eps[i] = c * m[i] if np.isfinite(c) else np.zeros_like(m[i])
  return theta, eps, {k: gbar[k] for k in group}, group


@SETTINGS
@given(structure=_structure, hyper=_hyper, steps=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_clean_params_and_perturbation_match_reference(structure, hyper, steps, seed):
  rng = np.random.default_rng(seed)
  theta0 = _tree(structure, rng)
  grads_seq = [_tree(structure, rng, scale=float(rng.uniform(0.05, 3.0))) for _ in range(steps)]
  lr = 0.03
  with jax.enable_x64(True):
    tx = mgpo_adamw(lr, **hyper)
    update = jax.jit(tx.update)
    p = jax.tree.map(jnp.asarray, theta0)
    state = tx.init(p)
    for grads in grads_seq:
      u, state = update(jax.tree.map(jnp.asarray, grads), state, p)
      p = optax.apply_updates(p, u)
    clean = [np.asarray(x) for x in jax.tree.leaves(mgpo_eval_params(state, p))]
    loop = [np.asarray(x) for x in jax.tree.leaves(p)]
  theta, eps, gbar, group = _reference(theta0, grads_seq, lr=lr, **hyper)
  for c, t in zip(clean, theta):
    np.testing.assert_allclose(c, t, rtol=1e-9, atol=1e-12)
  for x, t, e in zip(loop, theta, eps):
    np.testing.assert_allclose(x, t + e, rtol=1e-9, atol=1e-12)
  # ‖ε‖ per group is ρ · min(1/ḡ, max_inv_norm): the momentum is non-zero after any step.
  for k, gb in gbar.items():
    norm = np.sqrt(sum(np.sum((x - c) ** 2) for x, c, gk in zip(loop, clean, group) if gk == k))
    size = 1.0 / gb if hyper["max_inv_norm"] is None else min(1.0 / gb, hyper["max_inv_norm"])
    np.testing.assert_allclose(norm, hyper["rho"] * size, rtol=1e-6, atol=1e-12)


@SETTINGS
@given(structure=_structure, steps=st.integers(1, 3), seed=st.integers(0, 2**16),
       scope=st.sampled_from(["global", "per_module"]),
       momentum=st.sampled_from(["adam", "sgd"]))
def test_rho_zero_is_identity_on_the_base(structure, steps, seed, scope, momentum):
  rng = np.random.default_rng(seed)
  p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), _tree(structure, rng))
  base = optax.adamw(0.01, weight_decay=0.01) if momentum == "adam" else optax.sgd(0.01, 0.9)
  tx = mgpo(base, rho=0.0, scope=scope)
  s_base, s_mgpo = base.init(p), tx.init(p)
  for _ in range(steps):
    g = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), _tree(structure, rng))
    u_base, s_base = base.update(g, s_base, p)
    u_mgpo, s_mgpo = tx.update(g, s_mgpo, p)
    for a, b in zip(jax.tree.leaves(u_mgpo), jax.tree.leaves(u_base)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    p = optax.apply_updates(p, u_base)
  for a, b in zip(jax.tree.leaves(s_mgpo.base_state), jax.tree.leaves(s_base)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(mgpo_eval_params(s_mgpo, p)), jax.tree.leaves(p)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
