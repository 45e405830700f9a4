"""LoRA-MGPO (momentum-guided perturbation) as an Optax gradient transformation.

The math, the sources of the defaults and a study of where the method converges are in
``docs/mgpo.md``.
"""

from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mgpo_jax._checks import check_scalar

_SCOPES = ("global", "per_module")
_MOMENT_HELP = (
    "mgpo needs a base optimizer that keeps a first moment: scale_by_adam "
    "(optax.adam / optax.adamw) or trace (optax.sgd with momentum)"
)


class MGPOState(NamedTuple):
  """State of :func:`mgpo`; nothing in it is parameter-sized but ``base_state``.

  Attributes:
    count: number of updates applied so far (int32 scalar).
    grad_norm_ema: EMA ``ḡ`` of the gradient norm; a scalar for
      ``scope="global"``, one entry per module for ``scope="per_module"``.
    eps_scale: the coefficient(s) ``c`` with which the current perturbation was
      built, ``ε = c · mu`` (per module for ``scope="per_module"``), so that ε
      is rebuilt exactly from the base state's first moment ``mu``.
    base_state: state of the wrapped base optimizer (holds ``mu``).
  """

  count: jax.Array
  grad_norm_ema: jax.Array
  eps_scale: jax.Array
  base_state: optax.OptState


def _validate(base_optimizer, rho, ema_decay, sign, max_inv_norm, eps, scope) -> None:
  if not (hasattr(base_optimizer, "init") and hasattr(base_optimizer, "update")):
    raise ValueError("mgpo: base_optimizer must be an optax GradientTransformation that keeps "
                     f"a first moment (e.g. optax.adamw(1e-3)); got {base_optimizer!r}")
  if scope not in _SCOPES:
    raise ValueError(f"mgpo: scope must be one of {_SCOPES}; got {scope!r}")
  check_scalar("mgpo", "rho", rho, lambda v: v >= 0.0, "a finite number >= 0 or a schedule",
               schedule_ok=True)
  check_scalar("mgpo", "ema_decay", ema_decay, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")
  check_scalar("mgpo", "sign", sign, lambda v: v in (-1.0, 1.0), "-1 or +1")
  check_scalar("mgpo", "eps", eps, lambda v: v >= 0.0, "a finite number >= 0")
  if max_inv_norm is not None:
    check_scalar("mgpo", "max_inv_norm", max_inv_norm, lambda v: v > 0.0,
                 "None, a finite number > 0 or a schedule", schedule_ok=True)


def _key(path: Sequence[Any]) -> tuple[Hashable, ...]:
  """A leaf's key path without the ``.value`` of a Flax NNX Variable wrapper."""
  path = tuple(path)
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
    path = path[:-1]
  return path


def _keyed_leaves(tree: Any) -> tuple[list[tuple], list[jax.Array]]:
  """The leaves of ``tree`` and their keys (see :func:`_key`)."""
  with_path = jax.tree_util.tree_leaves_with_path(tree)
  return [_key(p) for p, _ in with_path], [x for _, x in with_path]


def _group_ids(keys: Sequence[tuple], scope: str) -> tuple[list[int], int]:
  """Group index of each leaf: one group ("global"), or one per parent node."""
  if scope == "global":
    return [0] * len(keys), 1
  parents: dict[tuple, int] = {}
  ids = [parents.setdefault(k[:-1], len(parents)) for k in keys]
  return ids, len(parents)


def _first_moment(base_state: optax.OptState) -> Any:
  """The base optimizer's first moment: ``ScaleByAdamState.mu``, else ``TraceState.trace``."""
  kinds = (optax.ScaleByAdamState, optax.TraceState)
  nodes = jax.tree.leaves(base_state, is_leaf=lambda x: isinstance(x, kinds))
  for kind, field in ((optax.ScaleByAdamState, "mu"), (optax.TraceState, "trace")):
    found = [getattr(n, field) for n in nodes if isinstance(n, kind)]
    if len(found) > 1:
      raise ValueError(
          f"mgpo found {len(found)} {kind.__name__} in the base optimizer's "
          "state and cannot tell which holds the momentum; wrap each part "
          "separately, e.g. optax.partition({'a': mgpo(optax.adamw(...)), ...})."
      )
    if found:
      return found[0]
  raise ValueError(f"{_MOMENT_HELP}; found neither in the base optimizer's state.")


def _aligned(tree: Any, keys: Sequence[tuple]) -> list[jax.Array]:
  """The leaves of ``tree`` in the order of ``keys`` (matched by key path)."""
  by_key = dict(zip(*_keyed_leaves(tree)))
  missing = [k for k in keys if k not in by_key]
  if missing:
    raise ValueError(
        "mgpo: the first moment of the base optimizer does not cover the params "
        f"at {jax.tree_util.keystr(missing[0])}."
    )
  return [by_key[k] for k in keys]


def _group_norms(leaves: Sequence[jax.Array], ids: Sequence[int], n: int, dtype) -> jax.Array:
  """L2 norm of each group of leaves, computed in ``dtype``, shape ``(n,)``."""
  if not leaves:
    return jnp.zeros((n,), dtype)
  sq = jnp.stack([jnp.sum(jnp.square(x.astype(dtype))) for x in leaves])
  return jnp.sqrt(jax.ops.segment_sum(sq, jnp.asarray(ids), num_segments=n))


def _perturbation(scale: jax.Array, mu: Sequence[jax.Array], ids: Sequence[int]) -> list[jax.Array]:
  """ε per leaf: ``scale[group] · mu`` (in the dtype of ``scale``)."""
  scale = jnp.reshape(scale, (-1,))
  return [scale[i] * m.astype(scale.dtype) for m, i in zip(mu, ids)]


def _stat_dtype(leaves: Sequence[jax.Array]) -> jnp.dtype:
  """float32, or float64 when the params are float64."""
  return jnp.result_type(jnp.float32, *(x.dtype for x in leaves))


def _at(value: Any, count: jax.Array) -> Any:
  """A hyper-parameter's value after ``count`` updates: ``value(count)`` for a schedule."""
  return value(count) if callable(value) else value


def follow_schedule(schedule: optax.Schedule, value: float, peak_value: float) -> optax.Schedule:
  r"""A schedule that is ``value`` where ``schedule`` is ``peak_value``, and follows it.

  .. math::

    ρ(k) = \text{value} \cdot \text{schedule}(k) / \text{peak\_value}

  Used to anneal MGPO's ``rho`` with the learning rate: with a warm-up and cosine
  learning-rate schedule that decays to 0, ρ warms up and decays to 0 with it, and the
  clean iterate of :func:`mgpo` settles on the base optimizer's fixed point.

  Args:
    schedule: an optax schedule, e.g. the learning-rate schedule.
    value: the value to take where ``schedule`` equals ``peak_value``.
    peak_value: the reference value of ``schedule`` (e.g. its peak learning rate), > 0.

  Returns:
    An optax schedule (a callable of the step count).

  Raises:
    ValueError: if ``peak_value`` is not > 0.

  Examples:
    >>> import optax
    >>> from mgpo_jax import follow_schedule, mgpo
    >>> lr = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 30, 1000)
    >>> rho = follow_schedule(lr, 0.05, 1e-3)
    >>> print(f"{rho(0):.3f} {rho(30):.3f} {rho(1000):.3f}")
    0.000 0.050 0.000
    >>> tx = mgpo(optax.adamw(lr), rho=rho)
  """
  if not peak_value > 0:
    raise ValueError(f"follow_schedule: peak_value must be a number > 0, got {peak_value!r}.")
  scale = value / peak_value
  return lambda count: scale * schedule(count)


def mgpo(
    base_optimizer: optax.GradientTransformation,
    *,
    rho: optax.ScalarOrSchedule = 0.05,
    ema_decay: float | jax.Array = 0.9,
    sign: float | jax.Array = -1.0,
    max_inv_norm: optax.ScalarOrSchedule | None = 10.0,
    eps: float = 1e-12,
    scope: str = "global",
) -> optax.GradientTransformationExtraArgs:
  r"""LoRA-MGPO: momentum-guided perturbation around a base optimizer.

  The gradient of each step is taken at a perturbed point :math:`θ_k + ε_k`
  whose direction is the base optimizer's first moment :math:`m` (Adam's
  ``mu``, or SGD's ``trace``) and whose size is set by an EMA :math:`\bar g` of
  gradient norms. The step itself is the base optimizer's step on the clean
  :math:`θ_k`. Update :math:`k = 0, 1, \dots` (the step count, as for an optax
  learning-rate schedule) does

  .. math::

    \begin{align*}
      g_k &= \nabla L(θ_k + ε_k), \\
      θ_{k+1} &= θ_k + Δ_k,\quad Δ_k = \text{base step on } θ_k
                 \text{ with } g_k \text{ (updates } m, v), \\
      \bar g_k &= β\,\bar g_{k-1} + (1-β)\,\lVert g_k\rVert
                 \quad(\bar g_0 = \lVert g_0\rVert), \\
      ε_{k+1} &= s\,ρ(k)\,\frac{m_k}{\lVert m_k\rVert}
             \min\!\Big(\frac{1}{\bar g_k}, c_{\max}(k)\Big),
    \end{align*}

  with :math:`ε_0 = 0` (the first step is unperturbed). Where
  :math:`\lVert m\rVert \le` ``eps`` or the size is not finite, ε = 0.
  ``rho`` and ``max_inv_norm`` may be schedules, evaluated at the number of
  updates so far as optax does for ``learning_rate`` (and as
  :func:`optax.inject_hyperparams` does, so both ways give the same optimizer).

  **Convergence.** As the gradients vanish, :math:`\bar g \to 0` and the size
  of ε grows to :math:`ρ\,c_{\max}`. With :math:`s = +1` (the paper's text) ε
  points along the momentum and the clean iterate settles about one
  :math:`\lVert ε\rVert` short of the minimum; with :math:`s = -1` (the
  default, the authors' released code) ε flips with the momentum and the clean
  iterate converges; with a ``rho`` schedule that decays to 0 (e.g.
  :func:`follow_schedule` of the learning rate) either sign converges.

  **Shifted iterate** (as in :func:`optax.contrib.schedule_free`): the params
  the training loop holds are :math:`p_k = θ_k + ε_k`, so an unmodified loop
  takes every gradient at the perturbed point with one forward/backward pass.
  ``update`` computes :math:`θ_k = p_k - ε_k` (ε rebuilt from the state, never
  stored), passes :math:`θ_k` as ``params`` to the base optimizer (so weight
  decay acts on θ) and returns :math:`u_k = Δ_k - ε_k + ε_{k+1}`. Use
  :func:`mgpo_eval_params` for the clean θ (evaluation, export, checkpoints).

  ``scope="global"`` normalises :math:`m` and keeps :math:`\bar g` over all
  params, as in the paper. ``scope="per_module"`` does both per group of leaves
  sharing a parent node (one LoRA module's ``lora_a`` and ``lora_b``), as the
  authors' released code does per layer. The released code also perturbs the
  frozen kernel in weight space; that variant needs the LoRA layers' help and
  is not what this transform does.

  Args:
    base_optimizer: the optimizer that takes the steps; must keep a first
      moment (``optax.adam``/``optax.adamw``/``scale_by_adam``, or
      ``optax.sgd`` with momentum), also inside chains and wrappers.
    rho: perturbation radius ρ >= 0, a scalar or a schedule. Default 0.05: the
      paper's NLU setting (T5-base on GLUE); the paper uses 0.01 for
      LLaMA-2-7B. ``rho=0`` gives the base optimizer exactly.
    ema_decay: β in [0, 1) of the gradient-norm EMA. Default 0.9: the paper's
      NLU setting (0.8 for LLaMA-2-7B).
    sign: -1 (the default: the authors' released code and Momentum-SAM; moves
      against the momentum, converges with a constant ρ) or +1 (the paper's
      text: moves along the momentum; converges only with a ρ that decays).
    max_inv_norm: cap :math:`c_{\max}` on :math:`1/\bar g`, a scalar or a
      schedule. Default 10, the released code's; ``None`` is the paper's
      literal :math:`1/\bar g`.
    eps: no perturbation where the momentum norm is at most ``eps``. Default
      1e-12, the released code's guard.
    scope: ``"global"`` (the paper's) or ``"per_module"`` (the released code's
      per-layer normalisation).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose ``update``
    requires ``params``.

  Raises:
    ValueError: at construction for a bad hyper-parameter; at ``init`` when the
      base optimizer keeps no first moment.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from mgpo_jax import mgpo, mgpo_eval_params
    >>> loss = lambda p: jnp.sum(jnp.cosh(p["a"] - 1.0))
    >>> tx = mgpo(optax.adamw(0.1), rho=0.01)
    >>> params = {"a": jnp.array([0.0, 2.0])}
    >>> state = tx.init(params)
    >>> for _ in range(50):
    ...   grads = jax.grad(loss)(params)
    ...   updates, state = tx.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> theta = mgpo_eval_params(state, params)
    >>> print(f"{loss(theta):.2f}")  # from 3.09 at the start; the minimum is 2
    2.00

    The paper's literal form, with ρ annealed along a cosine schedule:

    >>> paper = mgpo(optax.adamw(0.1), rho=optax.cosine_decay_schedule(0.05, 50),
    ...              sign=1.0, max_inv_norm=None)

  References:
    Chang, Guo, Chang, Wu, `LoRA-MGPO: Mitigating Double Descent in Low-Rank
    Adaptation via Momentum-Guided Perturbation Optimization
    <https://arxiv.org/abs/2502.14538>`_, EMNLP 2025 Findings.

    Becker, Altrock, Risse, `Momentum-SAM: Sharpness Aware Minimization without
    Computational Overhead <https://arxiv.org/abs/2401.12033>`_, 2024.
  """
  _validate(base_optimizer, rho, ema_decay, sign, max_inv_norm, eps, scope)
  base = optax.with_extra_args_support(base_optimizer)

  def init_fn(params: optax.Params) -> MGPOState:
    base_state = base.init(params)
    _first_moment(base_state)
    keys, leaves = _keyed_leaves(params)
    _, n = _group_ids(keys, scope)
    dtype = _stat_dtype(leaves)
    shape = () if scope == "global" else (n,)
    return MGPOState(
        count=jnp.zeros([], jnp.int32),
        grad_norm_ema=jnp.zeros(shape, dtype),
        eps_scale=jnp.zeros(shape, dtype),
        base_state=base_state,
    )

  def update_fn(updates, state: MGPOState, params=None, **extra_args):
    if params is None:
      raise ValueError("mgpo: update needs params (the loop's p = θ + ε).")
    keys, p_leaves = _keyed_leaves(params)
    treedef = jax.tree.structure(params)
    g_leaves = treedef.flatten_up_to(updates)
    ids, n = _group_ids(keys, scope)
    dtype = state.eps_scale.dtype

    # θ_k = p_k − ε_k, with ε_k rebuilt from m_{k-1} and the scale applied then.
    eps_old = _perturbation(state.eps_scale, _aligned(_first_moment(state.base_state), keys), ids)
    theta = [(p.astype(jnp.promote_types(p.dtype, dtype)) - e).astype(p.dtype)
             for p, e in zip(p_leaves, eps_old)]
    delta, base_state = base.update(
        updates, state.base_state, treedef.unflatten(theta), **extra_args)

    # ḡ_k from ‖g_k‖; ε_{k+1} from m_k, ḡ_k and the schedules at k.
    g_norm = jnp.reshape(_group_norms(g_leaves, ids, n, dtype), state.grad_norm_ema.shape)
    ema = jnp.where(
        state.count == 0, g_norm,
        ema_decay * state.grad_norm_ema + (1.0 - ema_decay) * g_norm,
    ).astype(dtype)
    inv = 1.0 / ema
    if max_inv_norm is not None:
      inv = jnp.minimum(inv, _at(max_inv_norm, state.count))
    mu = _aligned(_first_moment(base_state), keys)
    mu_norm = jnp.reshape(_group_norms(mu, ids, n, dtype), ema.shape)
    scale = sign * _at(rho, state.count) * inv / mu_norm
    scale = jnp.where((mu_norm > eps) & jnp.isfinite(scale), scale, 0.0).astype(dtype)
    eps_new = _perturbation(scale, mu, ids)

    # u_k = Δ_k − ε_k + ε_{k+1}
    u = [(d.astype(jnp.promote_types(d.dtype, dtype)) - eo + en).astype(d.dtype)
         for d, eo, en in zip(treedef.flatten_up_to(delta), eps_old, eps_new)]
    new_state = MGPOState(
        count=optax.safe_increment(state.count),
        grad_norm_ema=ema,
        eps_scale=scale,
        base_state=base_state,
    )
    return treedef.unflatten(u), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def mgpo_eval_params(state: optax.OptState, params: optax.Params) -> optax.Params:
  """The clean params θ = p − ε for evaluation, export and checkpoints.

  Like :func:`optax.contrib.schedule_free_eval_params` for :func:`mgpo`: ε is
  rebuilt from the state. ``state`` may be an :class:`MGPOState` or any
  optimizer state that contains one (``optax.chain``, ``optax.partition``,
  ``optax.MultiSteps``, ``optax.inject_hyperparams``, ``optax.apply_if_finite``);
  params that no MGPO state covers are returned unchanged.

  Args:
    state: an optimizer state containing one or more :class:`MGPOState`.
    params: the params the training loop holds, ``p = θ + ε``.

  Returns:
    The clean params θ, with the structure and dtypes of ``params``.

  Raises:
    ValueError: if ``state`` contains no :class:`MGPOState`.
  """
  found = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, MGPOState))
           if isinstance(s, MGPOState)]
  if not found:
    raise ValueError("mgpo_eval_params needs an optimizer state that contains an MGPOState.")
  for s in found:
    keys, mu = _keyed_leaves(_first_moment(s.base_state))
    ids, _ = _group_ids(keys, "global" if s.eps_scale.ndim == 0 else "per_module")
    eps_by_key = dict(zip(keys, _perturbation(s.eps_scale, mu, ids)))

    def clean(path, p, eps_by_key=eps_by_key):
      e = eps_by_key.get(_key(path))
      if e is None:
        return p
      return (p.astype(jnp.promote_types(p.dtype, e.dtype)) - e).astype(p.dtype)

    params = jax.tree_util.tree_map_with_path(clean, params)
  return params


def mgpo_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    weight_decay: float | jax.Array = 0.0,
    mask: Any = None,
    rho: optax.ScalarOrSchedule = 0.05,
    ema_decay: float | jax.Array = 0.9,
    sign: float | jax.Array = -1.0,
    max_inv_norm: optax.ScalarOrSchedule | None = 10.0,
    scope: str = "global",
) -> optax.GradientTransformationExtraArgs:
  r"""AdamW with LoRA-MGPO: ``mgpo(optax.adamw(...), ...)``.

  The paper's setting: AdamW with weight decay 0 (the default here), Adam's
  :math:`β_1` = 0.9 (its "μ"), a cosine schedule with 3% warm-up for
  ``learning_rate``. See :func:`mgpo` for the update and the MGPO knobs.

  Args:
    learning_rate: a scalar or an ``optax`` schedule.
    b1: Adam's first-moment decay (the paper's μ; 0.8 for LLaMA-2-7B).
    b2: Adam's second-moment decay.
    eps: Adam's ε added to the denominator.
    weight_decay: decoupled weight decay, applied to the clean θ.
    mask: weight-decay mask, as in :func:`optax.adamw`.
    rho: perturbation radius, a scalar or a schedule (paper NLU default 0.05;
      :func:`follow_schedule` anneals it with the learning rate).
    ema_decay: β of the gradient-norm EMA (paper NLU default 0.9).
    sign: -1 (default, released code) or +1 (paper's text); see :func:`mgpo`.
    max_inv_norm: cap on 1/ḡ, a scalar or a schedule (released code: 10;
      ``None``: paper's literal).
    scope: ``"global"`` (paper) or ``"per_module"`` (released code).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from mgpo_jax import mgpo_adamw
    >>> tx = optax.inject_hyperparams(mgpo_adamw)(learning_rate=1e-3, rho=0.05)
    >>> params = {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.zeros((2, 3))}
    >>> state = tx.init(params)
    >>> state.hyperparams["rho"]
    Array(0.05, dtype=float32)

  References:
    Chang, Guo, Chang, Wu, `LoRA-MGPO <https://arxiv.org/abs/2502.14538>`_,
    EMNLP 2025 Findings.
  """
  for name, value, ok, accepted in (
      ("b1", b1, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
      ("b2", b2, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
      ("eps", eps, lambda v: v >= 0.0, "a finite number >= 0"),
      ("weight_decay", weight_decay, lambda v: v >= 0.0, "a finite number >= 0")):
    check_scalar("mgpo_adamw", name, value, ok, accepted)
  return mgpo(
      optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask),
      rho=rho, ema_decay=ema_decay, sign=sign, max_inv_norm=max_inv_norm, scope=scope,
  )
