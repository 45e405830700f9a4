"""LoRA for Flax NNX models (and plain parameter pytrees), with PEFT's names and meaning.

A LoRA module wraps a frozen kernel ``W ∈ R^{n×m}`` (Flax orientation, ``y = x W``) with
adapters ``A ∈ R^{n×r}``, ``B ∈ R^{r×m}``; its effective kernel is (ALGORITHMS.md, notation)::

  W' = W + s · A B,      s = alpha / r        (rsLoRA: s = alpha / sqrt(r))

and it computes ``y = x W + s · ((dropout(x) A) B) + b`` without ever forming ``W'``.

Everything trainable after :func:`apply_lora` is an ``nnx.LoRAParam`` (the adapters, plus the
full parameters of ``modules_to_save``), so the one filter :data:`trainable` selects it for
``nnx.Optimizer(model, tx, wrt=trainable)``, ``nnx.split`` (:func:`split_lora`) and
``optax.partition`` (:func:`lora_labels`).

Per step, a caller may perturb each LoRA module's effective kernel without touching ``W``
(ALGORITHMS.md 2.4) with :func:`set_perturbations` / :func:`perturbed`: low-rank factors
(:class:`LowRank`, adds ``x U V``) or dense noise drawn inside the layer from a key and
per-output-column scales (:class:`DenseNoise`, adds ``x ε`` with ``ε_ij = σ_j z_ij``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
  "LoraConfig",
  "LoraLinear",
  "LowRank",
  "DenseNoise",
  "Perturbation",
  "trainable",
  "frozen",
  "apply_lora",
  "lora_modules",
  "merge_lora",
  "split_lora",
  "lora_labels",
  "set_perturbations",
  "clear_perturbations",
  "perturbed",
  "init_lora_params",
  "merge_lora_params",
]

INITS = ("default", "gaussian", "pissa")
ALL_LINEAR = "all-linear"
# Root-level output heads that "all-linear" leaves out, as PEFT does (the output embedding of
# a causal LM, and PEFT's SEQ_CLS_HEAD_NAMES for classifiers).
_HEAD_NAMES = ("lm_head", "classifier", "score")

#: Filter for everything :func:`apply_lora` makes trainable (adapters and ``modules_to_save``).
trainable = nnx.LoRAParam
#: Filter for the frozen parameters (every ``nnx.Param`` that is not trainable).
frozen = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
  """LoRA hyper-parameters, with PEFT's names and meaning.

  Args:
   target_modules: which linear modules get adapters. A sequence of names: a module
    matches if its dotted path (e.g. ``bert.encoder.layer.0.attention.self.query``)
    equals a name or ends with ``"." + name``. A single string: a regular expression
    that must ``re.fullmatch`` the path. ``"all-linear"``: every linear module except a
    root-level output head (``lm_head``, ``classifier``, ``score``), as in PEFT.
   r: adapter rank (> 0, and at most ``min(in, out)`` of every matched module).
   alpha: scaling numerator; ``s = alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA).
   dropout: dropout rate on the adapter input, in ``[0, 1)``. The dropout layers start in
    eval mode (as the shipped models' do): call ``model.train()`` to turn them on.
   use_rslora: use ``s = alpha / sqrt(r)`` (Kalajdzievski 2023) instead of ``alpha / r``.
   init: ``"default"``: ``A ~ U(-1/sqrt(in), 1/sqrt(in))`` (PEFT's Kaiming-uniform with
    ``a = sqrt(5)``), ``B = 0``; ``"gaussian"``: ``A ~ N(0, std = 1/r)`` (PEFT's
    ``init_lora_weights="gaussian"``), ``B = 0``; ``"pissa"``: ``A, B`` from the top-r SVD
    of ``W`` and ``W`` replaced by the residual ``W - s A B`` (Meng et al. 2024).
   modules_to_save: names (matched like ``target_modules`` names) of modules trained in
    full, e.g. ``("classifier",)``: their parameters become ``nnx.LoRAParam``.
  """

  target_modules: str | tuple[str, ...]
  r: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  use_rslora: bool = False
  init: str = "default"
  modules_to_save: tuple[str, ...] = ()

  def __post_init__(self):
    if isinstance(self.r, bool) or not isinstance(self.r, (int, np.integer)) or self.r <= 0:
      raise ValueError(f"r must be a positive int, got {self.r!r}")
    if not isinstance(self.alpha, (int, float, np.number)) or not (
      math.isfinite(self.alpha) and self.alpha > 0
    ):
      raise ValueError(f"alpha must be a positive finite number, got {self.alpha!r}")
    if not isinstance(self.dropout, (int, float, np.number)) or not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"dropout must be a float in [0, 1), got {self.dropout!r}")
    if not isinstance(self.use_rslora, bool):
      raise ValueError(f"use_rslora must be a bool, got {self.use_rslora!r}")
    if self.init not in INITS:
      raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
    object.__setattr__(self, "r", int(self.r))
    object.__setattr__(self, "alpha", float(self.alpha))
    object.__setattr__(self, "dropout", float(self.dropout))
    object.__setattr__(self, "target_modules", _check_targets(self.target_modules))
    object.__setattr__(
      self, "modules_to_save", _check_names("modules_to_save", self.modules_to_save, True)
    )

  @property
  def scaling(self) -> float:
    """``s = alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``."""
    return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def _check_names(param: str, names: Any, allow_empty: bool) -> tuple[str, ...]:
  if isinstance(names, str) or not isinstance(names, Sequence):
    raise ValueError(f"{param} must be a sequence of module names, got {names!r}")
  names = tuple(names)
  if (not names and not allow_empty) or not all(isinstance(n, str) and n for n in names):
    raise ValueError(f"{param} must be a non-empty sequence of non-empty strings, got {names!r}")
  return names


def _check_targets(targets: Any) -> str | tuple[str, ...]:
  if isinstance(targets, str):
    if targets != ALL_LINEAR:
      try:
        re.compile(targets)
      except re.error as e:
        raise ValueError(
          f"target_modules: {targets!r} is neither {ALL_LINEAR!r} nor a valid regular "
          f"expression ({e}); pass a list of names to match by name"
        ) from None
    return targets
  return _check_names("target_modules (a regex str, 'all-linear' or names)", targets, False)


def _name_match(path: str, name: str) -> bool:
  return path == name or path.endswith("." + name)


def _is_target(path: str, targets: str | tuple[str, ...]) -> bool:
  if targets == ALL_LINEAR:
    return path not in _HEAD_NAMES
  if isinstance(targets, str):
    return re.fullmatch(targets, path) is not None
  return any(_name_match(path, t) for t in targets)


# --------------------------------------------------------------------------------------------
# Adapter initialisation (shared by the NNX and pytree paths)
# --------------------------------------------------------------------------------------------


def _init_factors(
  key: jax.Array, w: jax.Array, config: LoraConfig
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """Returns ``(A, B, W_residual or None)`` for a kernel ``w`` of shape (in, out)."""
  n, m = w.shape
  r, dtype = config.r, w.dtype
  if config.init == "pissa":
    # W = U S Vᵀ;  A = U_r sqrt(S_r/s),  B = sqrt(S_r/s) V_rᵀ,  W_res = W - s A B.
    u, sv, vt = jnp.linalg.svd(w.astype(jnp.float32), full_matrices=False)
    root = jnp.sqrt(sv[:r] / config.scaling)
    a, b = u[:, :r] * root, root[:, None] * vt[:r]
    residual = w.astype(jnp.float32) - config.scaling * (a @ b)
    return a.astype(dtype), b.astype(dtype), residual.astype(dtype)
  if config.init == "gaussian":
    a = jax.random.normal(key, (n, r), dtype) / r
  else:
    bound = 1.0 / math.sqrt(n)
    a = jax.random.uniform(key, (n, r), dtype, -bound, bound)
  return a, jnp.zeros((r, m), dtype), None


# --------------------------------------------------------------------------------------------
# Perturbations (ALGORITHMS.md 2.4)
# --------------------------------------------------------------------------------------------


class LowRank(NamedTuple):
  """Low-rank perturbation ``ε = U V`` of a LoRA module's effective kernel.

  ``u``: (in, k), ``v``: (k, out). The layer adds ``(x U) V``; cost O(k (in + out)).
  """

  u: jax.Array
  v: jax.Array


class DenseNoise(NamedTuple):
  """Dense Gaussian perturbation ``ε_ij = σ_j z_ij`` drawn inside the layer.

  ``z = jax.random.normal(key, (in, out), kernel dtype)``; ``col_scale`` is ``σ`` (out,),
  one scale per output column (per output unit). The layer adds ``(x z) * σ``; ``z`` exists
  only inside the forward pass and is regenerated from ``key`` (e.g. in the backward pass).
  """

  key: jax.Array
  col_scale: jax.Array


class Perturbation(nnx.Variable):
  """Holds a LoRA module's perturbation for one step: ``None``, :class:`LowRank` or
  :class:`DenseNoise`. Not a ``Param``: neither trainable nor frozen weights."""


# --------------------------------------------------------------------------------------------
# The LoRA layer
# --------------------------------------------------------------------------------------------


class LoraLinear(nnx.Module):
  """``nnx.Linear`` with a LoRA adapter: ``y = x W + s ((dropout(x) A) B) [+ x ε] + b``.

  Built from an existing ``nnx.Linear`` by :func:`apply_lora`; the frozen ``kernel`` and
  ``bias`` are the base module's own ``nnx.Param`` variables (same state paths), the adapters
  ``lora_a`` (in, r) and ``lora_b`` (r, out) are ``nnx.LoRAParam``. ``perturbation`` (a
  :class:`Perturbation`) optionally adds a constant perturbation ``ε`` of the effective
  kernel for one step; no gradient flows through ``ε``.
  """

  def __init__(self, base: nnx.Linear, config: LoraConfig, *, rngs: nnx.Rngs):
    self.in_features, self.out_features = base.in_features, base.out_features
    self.use_bias = base.use_bias
    self.dtype, self.param_dtype = base.dtype, base.param_dtype
    self.precision = base.precision
    self.dot_general = base.dot_general
    self.promote_dtype = base.promote_dtype
    self.preferred_element_type = base.preferred_element_type
    self.r = config.r
    self.scaling = config.scaling

    a, b, residual = _init_factors(rngs.params(), base.kernel[...], config)
    self.kernel = base.kernel
    if residual is not None:
      self.kernel.set_value(residual)
    self.bias = base.bias
    self.lora_a = nnx.LoRAParam(a)
    self.lora_b = nnx.LoRAParam(b)
    # Built in eval mode, like the shipped models' dropouts: ``model.train()`` turns it on.
    self.dropout = nnx.Dropout(
      config.dropout, deterministic=True, rngs=rngs if config.dropout > 0 else None
    )
    self.perturbation = Perturbation(None)

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    kernel = self.kernel[...]
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias, a, b = self.promote_dtype(
      (inputs, kernel, bias, self.lora_a[...], self.lora_b[...]), dtype=self.dtype
    )
    kwargs = {"out_sharding": out_sharding}
    if self.preferred_element_type is not None:
      kwargs["preferred_element_type"] = self.preferred_element_type
    y = self.dot_general(
      inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())), precision=self.precision,
      **kwargs,
    )
    mm = lambda p, q: jnp.matmul(p, q, precision=self.precision)  # noqa: E731
    y = y + self.scaling * mm(mm(self.dropout(inputs), a), b)
    y = y + self._perturbation_term(inputs, kernel.dtype)
    if bias is not None:
      y = y + bias
    return y

  def _perturbation_term(self, x: jax.Array, dtype) -> jax.Array | float:
    p = self.perturbation.get_value()
    if p is None:
      return 0.0
    mm = lambda p, q: jnp.matmul(p, q, precision=self.precision)  # noqa: E731
    if isinstance(p, LowRank):
      u, v = jax.lax.stop_gradient((p.u, p.v))
      return mm(mm(x, u.astype(x.dtype)), v.astype(x.dtype))
    z = jax.random.normal(p.key, (self.in_features, self.out_features), dtype)
    scale = jax.lax.stop_gradient(p.col_scale).astype(x.dtype)
    return mm(x, jax.lax.stop_gradient(z).astype(x.dtype)) * scale

  def delta_kernel(self) -> jax.Array:
    """``s A B`` (in, out), materialised: for merging and tests, not for the forward pass."""
    return self.scaling * (self.lora_a[...] @ self.lora_b[...])

  def column_norms(self) -> jax.Array:
    """``‖W'_{:,j}‖`` for every output column j of ``W' = W + s A B``, without forming W'.

    ``‖W'_{:,j}‖² = ‖W_{:,j}‖² + 2 s (Wᵀ A)_{j,:} B_{:,j} + s² B_{:,j}ᵀ (AᵀA) B_{:,j}``
    (Flat-LoRA's filter-wise noise scale, ALGORITHMS.md 2.1).
    """
    w, a, b, s = self.kernel[...], self.lora_a[...], self.lora_b[...], self.scaling
    sq = (
      jnp.sum(w * w, axis=0)
      + 2 * s * jnp.sum((w.T @ a) * b.T, axis=1)
      + s * s * jnp.sum(b * ((a.T @ a) @ b), axis=0)
    )
    return jnp.sqrt(jnp.maximum(sq, 0.0))


# --------------------------------------------------------------------------------------------
# Graph surgery
# --------------------------------------------------------------------------------------------


def _dotted(path: Sequence[Any]) -> str:
  return ".".join(str(p) for p in path)


def _set_child(root: Any, path: Sequence[Any], value: Any) -> None:
  parent = root
  for part in path[:-1]:
    parent = parent[part] if isinstance(part, int) else getattr(parent, part)
  if isinstance(path[-1], int):
    parent[path[-1]] = value
  else:
    setattr(parent, path[-1], value)


def _nodes(model: nnx.Module, kind: type) -> list[tuple[tuple[Any, ...], Any]]:
  return [(p, n) for p, n in nnx.iter_graph(model) if isinstance(n, kind)]


def lora_modules(model: nnx.Module) -> dict[str, LoraLinear]:
  """All :class:`LoraLinear` modules of ``model``, by dotted path."""
  return {_dotted(p): m for p, m in _nodes(model, LoraLinear)}


def apply_lora(model: nnx.Module, config: LoraConfig, *, rngs: nnx.Rngs) -> nnx.Module:
  """Puts LoRA adapters on every ``nnx.Linear`` of ``model`` that ``config`` targets.

  Works in place (and returns ``model``): each matched ``nnx.Linear`` (also inside
  ``nnx.List``) is replaced by a :class:`LoraLinear` that keeps its ``kernel`` and ``bias``
  variables, and the parameters of ``config.modules_to_save`` become ``nnx.LoRAParam``.
  Afterwards :data:`trainable` selects exactly what should be trained. Keys for ``A`` come
  from ``rngs.params()`` (one per module), dropout draws from ``rngs.dropout``.

  Raises:
   ValueError: the model already has LoRA modules; ``target_modules`` matches no linear
    module (the message lists the model's linear module paths); ``r > min(in, out)`` for
    a matched module; a ``modules_to_save`` name matches nothing or overlaps a target.
  """
  if lora_modules(model):
    raise ValueError("apply_lora: the model already has LoRA modules")
  linears = [(p, m) for p, m in _nodes(model, nnx.Linear) if p]
  paths = [_dotted(p) for p, _ in linears]
  targets = [(p, m) for (p, m), s in zip(linears, paths) if _is_target(s, config.target_modules)]
  if not targets:
    raise ValueError(
      f"target_modules={config.target_modules!r} matches no linear module; the model's "
      f"linear modules are: {paths}"
    )
  for p, m in targets:
    if config.r > min(m.in_features, m.out_features):
      raise ValueError(
        f"r={config.r} exceeds min(in, out) = {min(m.in_features, m.out_features)} of "
        f"{_dotted(p)!r} (in={m.in_features}, out={m.out_features})"
      )
  saved = _match_modules_to_save(model, config.modules_to_save)
  for s in saved:
    clash = [_dotted(p) for p, _ in targets if (_dotted(p) + ".").startswith(s + ".")]
    if clash:
      raise ValueError(f"modules_to_save {s!r} overlaps LoRA target modules {clash}")
  for p, m in targets:
    _set_child(model, p, LoraLinear(m, config, rngs=rngs))
  for s in saved:
    _retype_params(_get(model, s), nnx.Param, nnx.LoRAParam)
  return model


def _get(root: Any, dotted: str) -> Any:
  node = root
  for part in dotted.split("."):
    node = node[int(part)] if part.isdigit() else getattr(node, part)
  return node


def _match_modules_to_save(model: nnx.Module, names: tuple[str, ...]) -> list[str]:
  modules = [_dotted(p) for p, _ in _nodes(model, nnx.Module) if p]
  found = []
  for name in names:
    hits = [s for s in modules if _name_match(s, name)]
    if not hits:
      raise ValueError(
        f"modules_to_save name {name!r} matches no module; the model's modules are: "
        f"{modules}"
      )
    found += hits
  return sorted(set(found))


def _retype_params(module: nnx.Module, old: type, new: type) -> None:
  """Replaces every variable of exact type ``old`` under ``module`` by a ``new`` variable."""
  for p, var in _nodes(module, nnx.Variable):
    if type(var) is old:
      _set_child(module, p, new.from_metadata(var.get_value(), var.get_metadata()))


def merge_lora(model: nnx.Module) -> nnx.Module:
  """A copy of ``model`` with every :class:`LoraLinear` folded into a plain ``nnx.Linear``
  with kernel ``W + s A B``, and ``modules_to_save`` parameters back to ``nnx.Param``.

  ``model`` is left untouched. Any perturbation set on ``model`` is ignored.
  """
  merged = nnx.clone(model)
  for p, layer in _nodes(merged, LoraLinear):
    w = layer.kernel[...]
    kernel = (w.astype(jnp.float32) + layer.delta_kernel().astype(jnp.float32)).astype(w.dtype)
    linear = nnx.eval_shape(
      lambda layer=layer: nnx.Linear(
        layer.in_features, layer.out_features, use_bias=layer.use_bias,
        dtype=layer.dtype, param_dtype=layer.param_dtype, precision=layer.precision,
        dot_general=layer.dot_general, promote_dtype=layer.promote_dtype,
        preferred_element_type=layer.preferred_element_type, rngs=nnx.Rngs(0),
      )
    )
    linear.kernel = nnx.Param.from_metadata(kernel, layer.kernel.get_metadata())
    if layer.use_bias:
      linear.bias = layer.bias
    _set_child(merged, p, linear)
  _retype_params(merged, nnx.LoRAParam, nnx.Param)
  return merged


# --------------------------------------------------------------------------------------------
# Partitioning
# --------------------------------------------------------------------------------------------


def split_lora(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """``nnx.split(model, trainable, ...)``: ``(graphdef, trainable_state, rest)``.

  For a plain ``jax.jit`` train step: split once, then inside the loss function
  ``model = nnx.merge(graphdef, trainable_state, rest, copy=True)`` (``copy=True`` gives
  fresh variables, so :func:`set_perturbations` and dropout's RNG counter can update them
  inside ``jax.grad``). ``rest`` holds the frozen params, the perturbation slots and, with
  ``dropout > 0``, the dropout RNG counters (return ``nnx.state(model, nnx.RngState)`` as
  an aux output of the loss, or the same mask repeats every step).
  """
  return nnx.split(model, trainable, ...)


def lora_labels(params: Any) -> Any:
  """Label tree (``"trainable"`` / ``"frozen"``) for ``optax.partition`` over a state tree
  whose leaves are NNX variables, e.g. ``nnx.state(model, nnx.Param)``."""
  is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
  if not any(is_var(x) for x in jax.tree.leaves(params, is_leaf=is_var)):
    raise ValueError(
      "lora_labels needs a tree of NNX variables such as nnx.state(model, nnx.Param); "
      "got a tree without any nnx.Variable"
    )
  return jax.tree.map(
    lambda v: "trainable" if isinstance(v, trainable) else "frozen", params, is_leaf=is_var
  )


# --------------------------------------------------------------------------------------------
# Perturbation API
# --------------------------------------------------------------------------------------------


def set_perturbations(
  model: nnx.Module, perturbations: Mapping[str, LowRank | DenseNoise]
) -> None:
  """Sets, for the next forward/backward pass(es), a perturbation ``ε`` of the effective
  kernel of each named LoRA module (dotted path → :class:`LowRank` or :class:`DenseNoise`).

  Modules not named keep their current perturbation. Usable inside ``jax.jit`` (on a model
  from ``nnx.merge``) as well as outside. Shapes are checked here.
  """
  layers = lora_modules(model)
  for path, p in perturbations.items():
    if path not in layers:
      raise ValueError(f"no LoRA module at {path!r}; LoRA modules are: {list(layers)}")
    layer = layers[path]
    n, m = layer.in_features, layer.out_features
    if isinstance(p, LowRank):
      ok = p.u.ndim == 2 and p.v.ndim == 2 and p.u.shape[0] == n and p.v.shape[1] == m
      ok = ok and p.u.shape[1] == p.v.shape[0]
      if not ok:
        raise ValueError(
          f"LowRank for {path!r} needs u (in={n}, k) and v (k, out={m}); got "
          f"{p.u.shape} and {p.v.shape}"
        )
    elif isinstance(p, DenseNoise):
      if jnp.shape(p.col_scale) != (m,):
        raise ValueError(
          f"DenseNoise.col_scale for {path!r} must have shape ({m},), got "
          f"{jnp.shape(p.col_scale)}"
        )
    else:
      raise ValueError(f"perturbation for {path!r} must be LowRank or DenseNoise, got {p!r}")
    layer.perturbation.set_value(p)


def clear_perturbations(model: nnx.Module) -> None:
  """Removes the perturbation of every LoRA module."""
  for layer in lora_modules(model).values():
    layer.perturbation.set_value(None)


@contextlib.contextmanager
def perturbed(
  model: nnx.Module, perturbations: Mapping[str, LowRank | DenseNoise]
) -> Iterator[nnx.Module]:
  """``with perturbed(model, {...}): loss = loss_fn(model)`` — sets the perturbations and
  clears every perturbation on exit."""
  set_perturbations(model, perturbations)
  try:
    yield model
  finally:
    clear_perturbations(model)


# --------------------------------------------------------------------------------------------
# Pure-pytree path (linen parameter dicts)
# --------------------------------------------------------------------------------------------


def _kernels(params: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, Any]]:
  for k, v in params.items():
    if isinstance(v, Mapping):
      yield from _kernels(v, (*prefix, str(k)))
    elif k == "kernel" and prefix and jnp.ndim(v) == 2:
      yield ".".join(prefix), v


def _check_pytree_config(config: LoraConfig) -> None:
  unsupported = {
    "init='pissa'": config.init == "pissa",
    "dropout > 0": config.dropout > 0,
    "modules_to_save": bool(config.modules_to_save),
  }
  bad = [k for k, v in unsupported.items() if v]
  if bad:
    raise ValueError(
      f"the pytree path merges adapters into the kernels and does not support {bad}; "
      "use the NNX path (apply_lora) for these"
    )


def init_lora_params(
  params: Mapping[str, Any], config: LoraConfig, key: jax.Array
) -> dict[str, dict[str, jax.Array]]:
  """Adapters ``{path: {"lora_a": (in, r), "lora_b": (r, out)}}`` for the 2-D ``kernel``
  leaves of a parameter dict (e.g. linen's ``variables["params"]``) whose module path
  (dict keys joined by ".", e.g. ``"Dense_0"``) ``config`` targets.

  Supports ``init`` "default" and "gaussian" (not "pissa"), no dropout, no
  ``modules_to_save``. Train the returned adapters; :func:`merge_lora_params` gives the
  params to apply the model with.
  """
  _check_pytree_config(config)
  kernels = dict(_kernels(params))
  chosen = {p: w for p, w in kernels.items() if _is_target(p, config.target_modules)}
  if not chosen:
    raise ValueError(
      f"target_modules={config.target_modules!r} matches no 2-D kernel; the kernels are "
      f"at: {list(kernels)}"
    )
  adapters = {}
  for i, (path, w) in enumerate(sorted(chosen.items())):
    if config.r > min(w.shape):
      raise ValueError(f"r={config.r} exceeds min(in, out) = {min(w.shape)} of {path!r}")
    a, b, _ = _init_factors(jax.random.fold_in(key, i), jnp.asarray(w), config)
    adapters[path] = {"lora_a": a, "lora_b": b}
  return adapters


def merge_lora_params(
  params: Mapping[str, Any], adapters: Mapping[str, Mapping[str, jax.Array]], config: LoraConfig
) -> dict[str, Any]:
  """``params`` with each adapted kernel replaced by ``W + s A B`` (differentiable in the
  adapters), for ``model.apply({"params": merge_lora_params(...)}, x)``."""
  _check_pytree_config(config)
  missing = set(adapters) - {p for p, _ in _kernels(params)}
  if missing:
    raise ValueError(f"adapters for paths with no 2-D kernel in params: {sorted(missing)}")

  def merge(tree: Mapping[str, Any], prefix: tuple[str, ...]) -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
      if isinstance(v, Mapping):
        out[k] = merge(v, (*prefix, str(k)))
      elif k == "kernel" and ".".join(prefix) in adapters:
        ad = adapters[".".join(prefix)]
        out[k] = v + (config.scaling * (ad["lora_a"] @ ad["lora_b"])).astype(v.dtype)
      else:
        out[k] = v
    return out

  return merge(params, ())
