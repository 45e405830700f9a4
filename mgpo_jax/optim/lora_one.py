"""LoRA-One's r×r preconditioner of the adapter gradients, as an Optax gradient transformation.

The math, the defaults and their sources, and how it composes with MGPO are in
``docs/lora_one.md``.
"""

from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

_A, _B = "lora_a", "lora_b"


class PreconditionLoraState(NamedTuple):
  """State of :func:`precondition_lora`: empty. The Gram matrices are rebuilt from the params
  at every update, so nothing parameter-sized (nothing at all) is stored."""


def _name(key: Any) -> Any:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return getattr(key, attr)
  return key


def _key(path: Sequence[Any]) -> tuple[Hashable, ...]:
  """A leaf's key path without the ``.value`` of a Flax NNX Variable wrapper."""
  path = tuple(path)
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
    path = path[:-1]
  return path


def lora_pairs(params: Any) -> list[tuple[int, int]]:
  """``(index of A, index of B)`` in ``jax.tree.leaves(params)`` for every LoRA module.

  A LoRA module is a node of the tree with a leaf named ``lora_a`` and a leaf named
  ``lora_b`` (dict keys or attributes; a Flax NNX Variable's ``.value`` is looked through):
  the layout of :class:`~mgpo_jax.lora.LoraLinear`'s state, of the Trainer's params
  (``nnx.to_pure_dict``) and of :func:`~mgpo_jax.lora.init_lora_params`. It is the grouping of
  :func:`~mgpo_jax.optim.mgpo`'s ``scope="per_module"`` (leaves sharing a parent node). ``A``
  has shape ``(..., n, r)`` and ``B`` ``(..., r, m)`` with the same leading (e.g. stacked
  layer) axes. Every other leaf is not in a pair.

  Raises:
    ValueError: a node with only one of ``lora_a``/``lora_b``, or shapes that do not pair.
  """
  with_path = jax.tree_util.tree_leaves_with_path(params)
  groups: dict[tuple, dict[str, int]] = {}
  for i, (path, _) in enumerate(with_path):
    key = _key(path)
    if key and _name(key[-1]) in (_A, _B):
      groups.setdefault(key[:-1], {})[_name(key[-1])] = i
  pairs = []
  for parent, found in groups.items():
    where = jax.tree_util.keystr(parent) or "the root"
    if len(found) != 2:
      raise ValueError(f"precondition_lora: {where} has {sorted(found)} but not both "
                       f"{_A!r} and {_B!r}")
    a, b = with_path[found[_A]][1], with_path[found[_B]][1]
    sa, sb = jnp.shape(a), jnp.shape(b)
    if len(sa) < 2 or len(sa) != len(sb) or sa[:-2] != sb[:-2] or sa[-1] != sb[-2]:
      raise ValueError(f"precondition_lora: at {where}, lora_a {sa} and lora_b {sb} are not "
                       "(..., n, r) and (..., r, m)")
    pairs.append((found[_A], found[_B]))
  return pairs


def _swap(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, -1, -2)


def _cholesky_solve(gram: jax.Array, rhs: jax.Array, damping: Any) -> jax.Array:
  """``gram⁻¹ rhs`` for ``gram = F + λ I`` with F symmetric positive semi-definite,
  ``gram`` (..., r, r) and ``rhs`` (..., r, m): the Cholesky factor ``gram = L Lᵀ``, then
  ``L y = rhs`` and ``Lᵀ x = y``, each a loop over the r rows written in XLA operations.

  Every pivot ``L_jj²`` of such a matrix is at least λ (it is ``1 / [(gram_{≤j})⁻¹]_jj`` and
  ``gram_{≤j} ⪰ λ I``), so pivots are floored at λ: rounding cannot make one negative, and a
  rank-deficient F (``B = 0`` at the default init) gives finite results."""
  hi = jax.lax.Precision.HIGHEST
  r = gram.shape[-1]
  rows = jnp.arange(r)
  floor = jnp.asarray(damping, gram.dtype)

  def factor_column(j, low):  # low holds L's columns < j, zeros elsewhere
    row = low[..., j, :]
    pivot = jnp.sqrt(jnp.maximum(gram[..., j, j] - jnp.sum(row * row, -1), floor))
    col = (gram[..., :, j] - jnp.einsum("...ik,...k->...i", low, row, precision=hi))
    col = jnp.where(rows > j, col / pivot[..., None], jnp.where(rows == j, pivot[..., None], 0))
    return low.at[..., :, j].set(col)

  low = jax.lax.fori_loop(0, r, factor_column, jnp.zeros_like(gram))

  def forward(i, y):  # L y = rhs; rows >= i of y are still 0
    y_i = rhs[..., i, :] - jnp.einsum("...k,...km->...m", low[..., i, :], y, precision=hi)
    return y.at[..., i, :].set(y_i / low[..., i, i, None])

  def backward(k, x):  # Lᵀ x = y, from the last row up; rows <= i of x are still 0
    i = r - 1 - k
    x_i = y[..., i, :] - jnp.einsum("...k,...km->...m", low[..., :, i], x, precision=hi)
    return x.at[..., i, :].set(x_i / low[..., i, i, None])

  y = jax.lax.fori_loop(0, r, forward, jnp.zeros_like(rhs))
  return jax.lax.fori_loop(0, r, backward, jnp.zeros_like(rhs))


def _solve(gram: jax.Array, rhs: jax.Array, damping: Any) -> jax.Array:
  """``gram⁻¹ rhs`` (see :func:`_cholesky_solve`). On CPU, in XLA operations: LAPACK's calls
  there wake OpenBLAS threads that compete with XLA's for the cores (measured: a MiniLM step
  1.3x slower, ``benchmarks/overhead.py --lora-one-solvers``); on GPU and TPU, the backend's
  own LU solve."""
  return jax.lax.platform_dependent(
      gram, rhs, damping, cpu=_cholesky_solve,
      default=lambda gram, rhs, _: jnp.linalg.solve(gram, rhs))


def _gram_solve(f: jax.Array, rhs: jax.Array, damping: Any) -> jax.Array:
  """``(fᵀ f + λ I)⁻¹ rhs`` by r×r solves, for f (..., k, r) and rhs (..., r, m)."""
  gram = jnp.matmul(_swap(f), f, precision=jax.lax.Precision.HIGHEST)
  damping = jnp.asarray(damping, gram.dtype)
  return _solve(gram + damping * jnp.eye(gram.shape[-1], dtype=gram.dtype), rhs, damping)


def _check_damping(damping: Any) -> None:
  if callable(damping) or isinstance(damping, jax.core.Tracer):
    return
  if not float(damping) > 0:
    raise ValueError(f"precondition_lora: damping must be a number > 0, got {damping!r}")


def precondition_lora(damping: float | jax.Array = 1e-6) -> optax.GradientTransformationExtraArgs:
  r"""LoRA-One's r×r preconditioner: rescales each LoRA module's gradients by Gram matrices.

  For every LoRA module (``A ∈ R^{n×r}``, ``B ∈ R^{r×m}``, Flax orientation; pairs found by
  :func:`lora_pairs`) with gradients :math:`g_A, g_B`:

  .. math::

    \hat g_A = g_A\,(B B^\top + λ I_r)^{-1}, \qquad
    \hat g_B = (A^\top A + λ I_r)^{-1}\,g_B,

  both from the current (pre-update) ``A`` and ``B`` (the paper's simultaneous form), with
  r×r linear solves, never an inverse: a Cholesky solve written in XLA operations on CPU, the
  backend's solve on GPU/TPU, one batched solve per group of equally shaped modules. Leaves
  outside a pair (a trained head) pass unchanged. The preconditioned gradient is the
  Riemannian gradient of LoRA's quotient manifold (Zhang & Pilanci 2024): the step it gives
  does not depend on how ``A B`` is split between the factors. Place it **before** Adam:
  ``optax.chain(precondition_lora(), optax.adamw(lr))``; with MGPO, inside its base,
  ``mgpo(optax.chain(precondition_lora(), optax.adamw(lr)))``, so that the Gram matrices are
  those of the clean θ (MGPO hands its base the clean params, the loop holds θ + ε).

  With the default init ``B = 0``: ``B Bᵀ + λ I = λ I``, so :math:`\hat g_A = g_A / λ`
  (finite; Adam's normalisation removes the scale) until ``B`` moves.

  Args:
    damping: λ > 0 (default 1e-6, the paper's and released code's). A scalar or an
      ``optax.inject_hyperparams`` value.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose ``update`` requires ``params``;
    its state is an empty :class:`PreconditionLoraState`.

  Raises:
    ValueError: at construction for ``damping <= 0``; at ``init``/``update`` for a node
      with only one of ``lora_a``/``lora_b`` or shapes that do not pair; ``update`` without
      ``params``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from mgpo_jax.optim import precondition_lora
    >>> target = jnp.array([[1.0, 0, 2], [0, 1, 1], [1, 1, 3], [2, -1, 3]]) / 4  # rank 2
    >>> a = jax.random.normal(jax.random.key(0), (4, 2)) / 2
    >>> b = jax.random.normal(jax.random.key(1), (2, 3)) / 2
    >>> params = {"proj": {"lora_a": a, "lora_b": b}, "head": jnp.zeros(3)}
    >>> def loss(p):
    ...   return (jnp.sum((p["proj"]["lora_a"] @ p["proj"]["lora_b"] - target) ** 2)
    ...           + jnp.sum((p["head"] - 1.0) ** 2))
    >>> tx = optax.chain(precondition_lora(), optax.adam(0.02))
    >>> state = tx.init(params)
    >>> for _ in range(200):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(f"{loss(params):.4f}")
    0.0004

  References:
    Zhang, Liu, Chen, `One-step full gradient suffices for low-rank fine-tuning, provably and
    efficiently <https://arxiv.org/abs/2502.01235>`_, ICML 2025 (code: YuanheZ/LoRA-One).

    Zhang, Pilanci, `Riemannian Preconditioned LoRA for Fine-Tuning Foundation Models
    <https://arxiv.org/abs/2402.02347>`_, ICML 2024.
  """
  _check_damping(damping)

  def init_fn(params: optax.Params) -> PreconditionLoraState:
    lora_pairs(params)
    return PreconditionLoraState()

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("precondition_lora: update needs params (the A and B of each module).")
    return _precondition(updates, params, damping), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _precondition(updates: Any, params: Any, damping: Any, a_for_b: dict | None = None) -> Any:
  """The simultaneous form; ``a_for_b`` (leaf index of A -> array) replaces the A used for
  ĝ_B (the released code's sequential form).

  Each module gives two r×r systems, ``(B Bᵀ + λI) ĝ_Aᵀ = g_Aᵀ`` and ``(AᵀA + λI) ĝ_B = g_B``;
  systems of equal shapes and dtype are stacked and solved together, one batched solve per
  group (one in all for a model whose adapted layers have equal widths)."""
  treedef = jax.tree.structure(params)
  p = jax.tree.leaves(params)
  g = list(treedef.flatten_up_to(updates))
  groups: dict[tuple, list[tuple[int, jax.Array, jax.Array, bool]]] = {}
  for ia, ib in lora_pairs(params):
    a = p[ia] if a_for_b is None else a_for_b[ia]
    systems = ((ia, _swap(p[ib]), _swap(g[ia]), True), (ib, a, g[ib], False))
    for i, f, rhs, swapped in systems:
      dtype = jnp.result_type(jnp.float32, f.dtype, rhs.dtype)
      groups.setdefault((f.shape, rhs.shape, dtype), []).append((i, f, rhs, swapped))
  for (_, _, dtype), systems in groups.items():
    x = _gram_solve(jnp.stack([f.astype(dtype) for _, f, _, _ in systems]),
                    jnp.stack([rhs.astype(dtype) for _, _, rhs, _ in systems]), damping)
    for k, (i, _, _, swapped) in enumerate(systems):
      g[i] = (_swap(x[k]) if swapped else x[k]).astype(g[i].dtype)
  return treedef.unflatten(g)


def _scale_by_adam_uncorrected(b1, b2, eps) -> optax.GradientTransformation:
  """``m / (√v + ε)`` without Adam's bias correction (the released LoRA-One code's Adam);
  its state is an :class:`optax.ScaleByAdamState`, so :func:`~mgpo_jax.optim.mgpo` finds
  the first moment in it."""

  def init_fn(params):
    zeros = lambda x: jnp.zeros_like(x)  # noqa: E731
    return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32),
                                  mu=jax.tree.map(zeros, params), nu=jax.tree.map(zeros, params))

  def update_fn(updates, state, params=None):
    del params
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), state.nu, updates)
    out = jax.tree.map(lambda m, v: (m / (jnp.sqrt(v) + eps)).astype(m.dtype), mu, nu)
    return out, optax.ScaleByAdamState(optax.safe_increment(state.count), mu, nu)

  return optax.GradientTransformation(init_fn, update_fn)


def lora_one_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: Any = None,
    damping: float | jax.Array = 1e-6,
    bias_correction: bool = True,
    sequential: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""LoRA-One's optimizer: :func:`precondition_lora`, then AdamW.

  The default is the paper's form, exactly
  ``optax.chain(precondition_lora(damping), optax.adamw(...))``. The authors' released code
  differs in two ways, both available:

  * ``bias_correction=False``: Adam without bias correction, :math:`m_t / (\sqrt{v_t} + ε)`;
  * ``sequential=True``: ``A`` is stepped first and ``ĝ_B`` uses the updated ``A``,
    :math:`\hat g_B = (A_{t+1}^\top A_{t+1} + λ I)^{-1} g_B`. Adam and weight decay act per
    element, so this is done exactly by running the AdamW update twice from the same state
    (the first run only to get :math:`A_{t+1}`): twice the optimizer arithmetic on the
    adapters, no extra gradient.

  The state has the layout of the chain, ``(PreconditionLoraState(), AdamW's state)``, in
  every form.

  Args:
    learning_rate: a scalar or an optax schedule.
    b1, b2, eps: Adam's.
    weight_decay: decoupled weight decay (default 0, the papers').
    mask: weight-decay mask, as in :func:`optax.adamw`.
    damping: λ of :func:`precondition_lora` (default 1e-6).
    bias_correction: Adam's bias correction (default ``True``, the paper's).
    sequential: precondition ``B`` with the updated ``A`` (default ``False``, the paper's
      simultaneous form).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose ``update`` requires ``params``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from mgpo_jax.optim import lora_one_adamw
    >>> tx = lora_one_adamw(1e-3, bias_correction=False, sequential=True)
    >>> params = {"q": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.zeros((2, 3))}}
    >>> updates, state = tx.update(params, tx.init(params), params)
    >>> updates["q"]["lora_b"].shape
    (2, 3)

  References:
    Zhang, Liu, Chen, `One-step full gradient suffices for low-rank fine-tuning, provably and
    efficiently <https://arxiv.org/abs/2502.01235>`_, ICML 2025 (code: YuanheZ/LoRA-One).
  """
  _check_damping(damping)
  if not isinstance(bias_correction, bool) or not isinstance(sequential, bool):
    raise ValueError(f"lora_one_adamw: bias_correction and sequential must be bools, got "
                     f"{bias_correction!r}, {sequential!r}")
  if bias_correction:
    adamw = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                        mask=mask)
  else:
    adamw = optax.chain(_scale_by_adam_uncorrected(b1, b2, eps),
                        optax.add_decayed_weights(weight_decay, mask),
                        optax.scale_by_learning_rate(learning_rate))
  pre = precondition_lora(damping)
  if not sequential:
    return optax.chain(pre, adamw)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("lora_one_adamw: update needs params (the A and B of each module).")
    pre_state, adam_state = state
    first, _ = adamw.update(_precondition(updates, params, damping), adam_state, params)
    p, u = jax.tree.leaves(params), jax.tree.structure(params).flatten_up_to(first)
    a_new = {ia: p[ia] + u[ia] for ia, _ in lora_pairs(params)}
    grads = _precondition(updates, params, damping, a_for_b=a_new)
    out, adam_state = adamw.update(grads, adam_state, params)
    return out, (pre_state, adam_state)

  chain = optax.chain(pre, adamw)
  return optax.GradientTransformationExtraArgs(chain.init, update_fn)
