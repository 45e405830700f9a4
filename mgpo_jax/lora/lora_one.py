"""LoRA-One's spectral initialisation: adapters on the top-r singular subspace of the gradient.

For each target kernel ``W ∈ R^{n×m}`` (Flax orientation, ``y = x W``) with full gradient
``G = ∇_W L`` averaged over a few training examples, and ``U S Vᵀ`` the SVD of ``−G``
(singular values descending)::

  A = U_r diag(√S_r) / √(S_0 γ),     B = diag(√S_r) V_rᵀ / √(S_0 γ),     W unchanged

so the initial update is ``s A B = s / γ · U_r diag(S_r / S_0) V_rᵀ``, with rsLoRA's
``s = α / √r`` one rank-r step ``α / (√r γ)`` along the negative gradient. Defaults (γ = 128,
8 examples, α = 16 with rsLoRA) are from the authors' release (γ from their README's command;
their config file's default is 16); the equations and sources are in ``docs/lora_one.md``.

Two phases, or one helper that runs both::

  grads = kernel_gradients(model, loss_fn, batches, config)        # phase 1: {path: G}
  init_lora_one(model, config, grads, rngs=nnx.Rngs(0))            # phase 2: LoRA from G
  apply_lora_one(model, config, loss_fn, batches, rngs=nnx.Rngs(0))  # both

Because ``W`` is unchanged, the adapters saved by
:func:`~mgpo_jax.lora.peft_io.save_adapters` are plain PEFT LoRA adapters.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mgpo_jax.lora import _graph
from mgpo_jax.lora.config import LoraConfig
from mgpo_jax.lora.layer import LoraLinear
from mgpo_jax.lora.surgery import _apply

__all__ = ["GAMMA", "NUM_EXAMPLES", "kernel_gradients", "lora_one_factors", "init_lora_one",
           "apply_lora_one"]

#: γ of the spectral init (the authors' README command for LLaMA-2-7B on MetaMath; their config
#: file's default, and their T5 script, use 16).
GAMMA = 128.0
#: Number of training examples whose mean gradient the init uses (the released default).
NUM_EXAMPLES = 8

Batch = Mapping[str, Any]
LossFn = Callable[[nnx.Module, Batch], Any]


def _targets(model: nnx.Module, config: LoraConfig | None) -> dict[str, tuple[Any, ...]]:
  """Dotted path -> graph path of the modules whose kernel gradient is wanted: the model's
  :class:`LoraLinear` modules if it has any, else the ``nnx.Linear`` modules ``config``
  targets."""
  adapted = {_graph.dotted(p): p for p, _ in _graph.nodes(model, LoraLinear)}
  if adapted:
    return adapted
  if config is None:
    raise ValueError("kernel_gradients: the model has no LoRA modules; pass config= (a "
                     "LoraConfig) to say which nnx.Linear kernels to differentiate")
  linears = [(p, m) for p, m in _graph.nodes(model, nnx.Linear) if p]
  chosen = {_graph.dotted(p): p for p, _ in linears if config.is_target(_graph.dotted(p))}
  if not chosen:
    raise ValueError(f"kernel_gradients: target_modules={config.target_modules!r} matches no "
                     f"linear module; the model's linear modules are: "
                     f"{[_graph.dotted(p) for p, _ in linears]}")
  return chosen


def _rows(batch: Batch) -> int:
  sizes = {np.shape(x)[0] for x in jax.tree.leaves(batch) if np.ndim(x)}
  if len(sizes) != 1:
    raise ValueError(f"kernel_gradients: every batch array needs the same leading (example) "
                     f"axis; got sizes {sorted(sizes)}")
  return sizes.pop()


def kernel_gradients(
  model: nnx.Module,
  loss_fn: LossFn,
  batches: Iterable[Batch],
  config: LoraConfig | None = None,
  *,
  num_examples: int | None = NUM_EXAMPLES,
  mesh: Mesh | None = None,
) -> dict[str, jax.Array]:
  """The mean gradient of the loss with respect to each target module's frozen kernel.

  Only the target kernels are differentiated (the model is split into them and the rest, and
  ``jax.grad`` takes the kernels alone); one float32 (float64 for float64 kernels) sum of the
  gradients is kept and updated in place by a jitted, buffer-donating step, so the memory is
  one set of kernel gradients plus one step's activations. With adapters already attached
  the gradient is that of the effective kernel ``W + s A B`` (equal to ``∇_W L``).

  Args:
    model: an NNX model, before adapters are attached (the targets are the ``nnx.Linear``
      modules ``config`` selects) or after (its :class:`LoraLinear` modules). Used in its
      current train/eval mode; it is not modified.
    loss_fn: ``loss_fn(model, batch)`` -> the mean loss over the batch, or a tuple whose first
      element is (the :class:`~mgpo_jax.train.Trainer`'s ``(loss, metrics)`` works).
    batches: an iterable of batches (mappings of arrays with a leading example axis); it is
      read only until ``num_examples`` examples are taken (the last batch is cut), so an
      endless training iterator is fine.
    config: which kernels, for a model without adapters (:meth:`LoraConfig.is_target`).
    num_examples: the number of examples to average over (the released default, 8), or
      ``None`` for every example of ``batches``. Batch means are weighted by their example
      counts.
    mesh: optional mesh: the kernels and the rest of the model are replicated on it, and each
      batch is sharded on its ``"data"`` axis (its first axis if it has none) when the batch
      divides evenly, else replicated.

  Returns:
    ``{dotted module path: G (in, out)}``, PEFT-style paths (``layers.0.query``).

  Raises:
    ValueError: no target module; ``num_examples`` not a positive int; no batches, or fewer
      examples than ``num_examples``; batch arrays of different lengths.
  """
  if num_examples is not None and (isinstance(num_examples, bool)
                                   or not isinstance(num_examples, (int, np.integer))
                                   or num_examples <= 0):
    raise ValueError(f"kernel_gradients: num_examples must be a positive int or None, got "
                     f"{num_examples!r}")
  targets = _targets(model, config)
  kernel_paths = {(*p, "kernel") for p in targets.values()}
  graphdef, kernels, rest = nnx.split(model, lambda path, _: tuple(path) in kernel_paths, ...)
  if mesh is not None:
    axis = "data" if "data" in mesh.axis_names else mesh.axis_names[0]
    kernels, rest = jax.device_put((kernels, rest), NamedSharding(mesh, P()))

  def loss(k, r, batch):
    out = loss_fn(nnx.merge(graphdef, k, r, copy=True), batch)
    return out[0] if isinstance(out, tuple) else out

  @functools.partial(jax.jit, donate_argnums=0)
  def accumulate(total, k, r, batch, weight):
    grads = jax.grad(loss)(k, r, batch)
    return jax.tree.map(lambda t, g: t + weight * g.astype(t.dtype), total, grads)

  total = jax.tree.map(
    lambda w: jnp.zeros(w.shape, jnp.promote_types(w.dtype, jnp.float32)), kernels)
  if mesh is not None:
    total = jax.device_put(total, NamedSharding(mesh, P()))
  taken, parts = 0, []
  for batch in batches:  # batch sizes first, so that the weights are known (n_b / N)
    rows = _rows(batch)
    if num_examples is not None:
      rows = min(rows, num_examples - taken)
      batch = jax.tree.map(lambda x, n=rows: x[:n], batch)
    parts.append((batch, rows))
    taken += rows
    if num_examples is not None and taken >= num_examples:
      break
  if not parts:
    raise ValueError("kernel_gradients: batches is empty; pass at least one batch")
  if num_examples is not None and taken < num_examples:
    raise ValueError(f"kernel_gradients: the batches hold {taken} examples, fewer than "
                     f"num_examples={num_examples}; pass more batches or a smaller "
                     "num_examples (None: all)")
  for batch, rows in parts:
    if mesh is not None:
      spec = P(axis) if rows % mesh.shape[axis] == 0 else P()
      batch = jax.device_put(batch, NamedSharding(mesh, spec))
    total = accumulate(total, kernels, rest, batch, jnp.float32(rows / taken))
  flat = dict(nnx.to_flat_state(total))
  return {dotted: flat[(*path, "kernel")][...] for dotted, path in targets.items()}


def lora_one_factors(grad: jax.Array, r: int, *, gamma: float = GAMMA,
                     name: str = "kernel") -> tuple[jax.Array, jax.Array]:
  """``(A (n, r), B (r, m))`` of LoRA-One's spectral init from a kernel gradient ``G (n, m)``.

  With ``U S Vᵀ`` the SVD of ``−G``: ``A = U_r diag(√S_r) / √(S_0 γ)``,
  ``B = diag(√S_r) V_rᵀ / √(S_0 γ)``, computed in float32 (float64 for a float64 ``G``).

  Raises:
    ValueError: ``r`` larger than ``min(n, m)``; ``gamma`` not > 0; a gradient that is all
      zeros (or not finite), naming ``name``.
  """
  if not (isinstance(gamma, (int, float, np.number)) and math.isfinite(gamma) and gamma > 0):
    raise ValueError(f"lora-one: gamma must be a finite number > 0, got {gamma!r}")
  n, m = grad.shape
  if r > min(n, m):
    raise ValueError(f"lora-one: r={r} is larger than the rank min(in, out) = {min(n, m)} of "
                     f"{name!r} (in={n}, out={m})")
  g = jnp.asarray(grad).astype(jnp.promote_types(grad.dtype, jnp.float32))
  u, sv, vt = jnp.linalg.svd(-g, full_matrices=False)
  top = float(sv[0])
  if not (math.isfinite(top) and top > 0):
    raise ValueError(f"lora-one: the gradient of {name!r} is {'all zeros' if top == 0 else top}"
                     "; the spectral init needs a non-zero gradient (does the loss depend on "
                     "this module? are the batches empty or masked out?)")
  if float(sv[r - 1]) <= top * jnp.finfo(g.dtype).eps * max(n, m):
    warnings.warn(f"lora-one: the gradient of {name!r} has rank below r={r}; the adapter "
                  "directions beyond its rank start at zero in both A and B and receive no "
                  "gradient", stacklevel=3)
  root = jnp.sqrt(sv[:r]) / jnp.sqrt(top * gamma)
  return u[:, :r] * root, root[:, None] * vt[:r]


def init_lora_one(model: nnx.Module, config: LoraConfig, gradients: Mapping[str, jax.Array],
                  *, gamma: float = GAMMA, rngs: nnx.Rngs | None = None) -> nnx.Module:
  """Phase 2: puts LoRA-One adapters on ``model`` from :func:`kernel_gradients`' result.

  Like :func:`~mgpo_jax.lora.apply_lora` (same targets, ``modules_to_save``, errors), with
  ``A, B`` from :func:`lora_one_factors` of each module's gradient (cast to the kernel's
  dtype) and the kernels unchanged. Every factor is computed before any module is replaced,
  so an error leaves ``model`` as it was. Works in place and returns ``model``.

  Args:
    model: an NNX model without adapters.
    config: a :class:`LoraConfig` with ``init="lora-one"``.
    gradients: ``{dotted module path: G}`` for exactly the modules ``config`` targets.
    gamma: γ (default 128, the authors' README command's; their config file's is 16).
    rngs: the dropout streams of the adapters (default ``nnx.Rngs(0)``).

  Raises:
    ValueError: ``config.init`` is not ``"lora-one"``; the gradients' paths or shapes do not
      match the targets; the errors of :func:`lora_one_factors` and ``apply_lora``.
  """
  if config.init != "lora-one":
    raise ValueError(f"init_lora_one needs LoraConfig(init='lora-one'), got init={config.init!r}")

  def factors(path: str, linear: nnx.Linear) -> tuple[jax.Array, jax.Array]:
    if path not in gradients:
      raise ValueError(f"init_lora_one: no gradient for target module {path!r}; gradients has "
                       f"{sorted(gradients)} (compute them with the same config)")
    grad, kernel = gradients[path], linear.kernel[...]
    if tuple(grad.shape) != tuple(kernel.shape):
      raise ValueError(f"init_lora_one: the gradient of {path!r} has shape {tuple(grad.shape)}, "
                       f"its kernel {tuple(kernel.shape)}")
    a, b = lora_one_factors(grad, config.r, gamma=gamma, name=path)
    return a.astype(kernel.dtype), b.astype(kernel.dtype)

  if not _graph.nodes(model, LoraLinear):  # (with adapters, _apply refuses the model)
    extra = sorted(set(gradients) - set(_targets(model, config)))
    if extra:
      raise ValueError(f"init_lora_one: gradients for modules that are not targets: {extra}")
  return _apply(model, config, rngs if rngs is not None else nnx.Rngs(0),
                strict_modules_to_save=True, factors=factors)


def apply_lora_one(model: nnx.Module, config: LoraConfig, loss_fn: LossFn,
                   batches: Iterable[Batch], *, num_examples: int | None = NUM_EXAMPLES,
                   gamma: float = GAMMA, mesh: Mesh | None = None,
                   rngs: nnx.Rngs | None = None) -> nnx.Module:
  """LoRA-One's spectral init in one call: :func:`kernel_gradients` then
  :func:`init_lora_one` (see both for the arguments). Works in place and returns ``model``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from mgpo_jax.lora import LoraConfig, apply_lora_one
    >>> class Net(nnx.Module):
    ...   def __init__(self):
    ...     self.proj = nnx.Linear(6, 4, rngs=nnx.Rngs(0))
    ...   def __call__(self, x):
    ...     return self.proj(x)
    >>> loss = lambda m, b: jnp.mean((m(b["x"]) - b["y"]) ** 2)
    >>> batch = {"x": jax.random.normal(jax.random.key(0), (8, 6)), "y": jnp.zeros((8, 4))}
    >>> config = LoraConfig(target_modules=["proj"], r=2, use_rslora=True, init="lora-one")
    >>> net = apply_lora_one(Net(), config, loss, [batch])
    >>> net.proj.lora_a.shape, net.proj.lora_b.shape
    ((6, 2), (2, 4))
  """
  if config.init != "lora-one":
    raise ValueError(f"apply_lora_one needs LoraConfig(init='lora-one'), got "
                     f"init={config.init!r}")
  grads = kernel_gradients(model, loss_fn, batches, config, num_examples=num_examples, mesh=mesh)
  return init_lora_one(model, config, grads, gamma=gamma, rngs=rngs)
