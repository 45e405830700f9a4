"""Jitted, data-parallel train and eval steps for LoRA fine-tuning of Flax NNX models.

The model is split ONCE (``nnx.split(model, wrt, ...)``) into a graph definition, the
trainable leaves and the rest (frozen weights, RNG streams); the steps are plain ``jax.jit``
functions that ``nnx.merge`` the model inside the trace. Any optax transform works: AdamW,
:func:`mgpo_jax.mgpo_adamw` (one forward/backward per step) and ``optax.contrib.sam`` in
opaque mode (its second gradient comes through ``grad_fn``). A
:class:`~mgpo_jax.perturbation.WeightPerturbation` (Flat-LoRA, LoRA-GGPO, released-code MGPO)
perturbs the LoRA modules' effective kernels for each step's forward and backward pass.
Usage is in ``docs/training.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mgpo_jax.lora import lora_modules, set_perturbations
from mgpo_jax.optim import MGPOState, mgpo_eval_params
from mgpo_jax.perturbation import WeightPerturbation, adapter_pairs, lora_weights
from mgpo_jax.train import sharding as _sh
from mgpo_jax.train.losses import classification_loss

DATA_AXIS = "data"
_PERTURBATION_SALT = 2**31 - 1  # the step's perturbation key: fold_in(step key, this)

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]
LossFn = Callable[[nnx.Module, Batch], tuple[jax.Array, Metrics]]
"""``loss_fn(model, batch) -> (loss, metrics)``: ``loss`` is the mean over the batch (it is
differentiated); ``metrics`` are SUMS over the batch (additive over micro-batches, devices and
eval batches), e.g. ``{"loss_sum", "correct", "count"}``."""


class TrainState(NamedTuple):
  """Everything that changes during training: a pytree of arrays, checkpointable as is.

  Attributes:
    step: optimizer steps taken so far (int32 scalar).
    params: the trainable leaves as a nested ``dict`` (``nnx.to_pure_dict`` layout),
      in their own dtype (float32). With MGPO these are the shifted iterate ``θ + ε``; use
      :func:`clean_params` for evaluation and export.
    opt_state: the optimizer state (optax ``NamedTuple`` types).
    rng: base PRNG key data (``uint32[2]`` for threefry keys, JAX's default; ``uint32[4]``
      under ``jax.default_prng_impl("rbg")``); step ``t`` draws dropout from
      ``fold_in(rng, t)``, so a resumed run repeats the uninterrupted run's masks.
    perturbation_state: the weight perturbation's state (``optax.EmptyState()`` without
      one), so checkpoints carry it.
  """

  step: jax.Array
  params: dict[str, Any]
  opt_state: optax.OptState
  rng: jax.Array
  perturbation_state: Any = optax.EmptyState()


def make_mesh(devices: int | Sequence[jax.Device] | None = None, *,
              axes: str | Mapping[str, int] | None = None) -> Mesh:
  """A device mesh: 1-D ``"data"`` for data parallelism, or named axes for sharded models.

  Args:
    devices: ``None`` for all devices (multi-host: every process's devices), a count ``n``
      for the first ``n`` of ``jax.devices()``, or explicit devices.
    axes: e.g. ``"data=2,fsdp=4"`` or ``{"data": 2, "fsdp": 2, "tensor": 2}`` (axes
      ``data``, ``fsdp``, ``tensor``; see :func:`mgpo_jax.train.sharding.parse_mesh`): a mesh
      over the first ``prod(sizes)`` of ``devices``. ``None``: 1-D over all of ``devices``.

  Returns:
    ``jax.make_mesh`` with automatically sharded (``AxisType.Auto``) axes.
  """
  if axes is not None:
    if isinstance(devices, int):
      raise ValueError(f"pass devices as None or a device list together with axes; got "
                       f"devices={devices}")
    return _sh.build_mesh(axes, devices)
  if devices is None:
    devices = jax.devices()
  elif isinstance(devices, int):
    if not 1 <= devices <= jax.device_count():
      raise ValueError(f"devices must be between 1 and {jax.device_count()} (the number of "
                       f"available devices); got {devices}")
    devices = jax.devices()[:devices]
  return jax.make_mesh((len(devices),), (DATA_AXIS,), (AxisType.Auto,), devices=list(devices))


def clean_params(state: TrainState) -> dict[str, Any]:
  """The params to evaluate and export: ``mgpo_eval_params`` (θ = p − ε) when the optimizer
  state holds an :class:`~mgpo_jax.optim.mgpo.MGPOState`, else ``state.params``."""
  is_mgpo = lambda x: isinstance(x, MGPOState)  # noqa: E731
  if any(map(is_mgpo, jax.tree.leaves(state.opt_state, is_leaf=is_mgpo))):
    return mgpo_eval_params(state.opt_state, state.params)
  return state.params


def _cast_floats(tree: Any, dtype: Any) -> Any:
  """Casts the floating-point leaves of ``tree`` to ``dtype`` (``None``: unchanged)."""
  if dtype is None:
    return tree
  cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
  return jax.tree.map(cast, tree)


def _rng_streams(state: nnx.State) -> tuple[str, ...]:
  """Names (tags) of the RNG streams held in ``state``."""
  is_key = lambda x: isinstance(x, nnx.RngKey)  # noqa: E731
  return tuple(sorted({k.tag for k in jax.tree.leaves(state, is_leaf=is_key) if is_key(k)}))


def _check_batch(batch: Batch, num_devices: int, accum_steps: int) -> None:
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(batch)}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(f"every batch array needs the same leading (batch) axis; got sizes {sizes}")
  (batch_size,) = sizes
  if batch_size % num_devices:
    raise ValueError(f"batch_size {batch_size} is not divisible by the device count "
                     f"{num_devices}")
  if batch_size % (num_devices * accum_steps):
    raise ValueError(f"batch_size {batch_size} is not divisible by accum_steps * device count "
                     f"= {accum_steps} * {num_devices}")


class Trainer:
  """Train and eval steps for an NNX model; holds only constants, the state is a
  :class:`TrainState`.

  Args:
    model: the NNX model (e.g. after :func:`mgpo_jax.lora.apply_lora`). It is split once;
      the frozen part is kept (cast to ``compute_dtype``), the model object is not modified.
    tx: any optax transform; ``optax.contrib.sam(..., opaque_mode=True)`` gets ``grad_fn``.
    loss_fn: ``loss_fn(model, batch) -> (mean loss, summed metrics)`` (see :data:`LossFn`).
    wrt: NNX filter of the trainable leaves (default ``nnx.LoRAParam``).
    accum_steps: micro-batches per optimizer step; micro-batch ``j`` is ``batch[j::k]``,
      gradients and loss are averaged, ONE ``tx.update`` per step.
    compute_dtype: e.g. ``jnp.bfloat16``: frozen weights are stored in it, and the forward
      pass runs in it (trainable params are cast, and every module's ``dtype`` attribute is
      set to it); trainable params, gradients and optimizer state stay float32.
    mesh: a mesh with a ``"data"`` axis and optionally ``"fsdp"`` / ``"tensor"`` axes
      (:func:`make_mesh`): batches are split over ``data`` × ``fsdp``; frozen weights,
      trainable params and optimizer state are placed by ``rules``. ``None``: one device.
    rules: a :class:`~mgpo_jax.train.sharding.ShardingRules` (default
      :data:`~mgpo_jax.train.sharding.DEFAULT_RULES`, the BERT and Llama tables); only used
      with a mesh. On a 1-D ``data`` mesh everything is replicated.
    remat: rematerialise each transformer block in the backward pass (``True``: policy
      ``"nothing_saveable"``, or the name of a ``jax.checkpoint_policies`` policy); needs a
      model with remat-capable blocks (the BERT and Llama ports). The model passed in is not
      modified.
    perturbation: a :class:`~mgpo_jax.perturbation.WeightPerturbation` (e.g.
      :func:`~mgpo_jax.perturbation.flat_lora`): each step's forward and backward pass see
      every LoRA module's kernel perturbed (the same ε for all micro-batches, from the key
      ``fold_in(step key, 2**31 - 1)``); evaluation and export never do.
  """

  def __init__(self, model: nnx.Module, tx: optax.GradientTransformation,
               loss_fn: LossFn = classification_loss, *, wrt: Any = nnx.LoRAParam,
               accum_steps: int = 1, compute_dtype: Any = None, mesh: Mesh | None = None,
               rules: _sh.ShardingRules | None = None, remat: bool | str = False,
               perturbation: WeightPerturbation | None = None):
    if not (hasattr(tx, "init") and hasattr(tx, "update")):
      raise ValueError(f"tx must be an optax GradientTransformation (e.g. optax.adamw(1e-3) or "
                       f"mgpo_jax.mgpo_adamw(1e-3)); got {tx!r}")
    if not isinstance(accum_steps, int) or accum_steps < 1:
      raise ValueError(f"accum_steps must be an integer >= 1; got {accum_steps!r}")
    if mesh is not None and DATA_AXIS not in mesh.axis_names:
      raise ValueError(f"mesh must have an axis named {DATA_AXIS!r}; got {mesh.axis_names}")
    if rules is not None and not isinstance(rules, _sh.ShardingRules):
      raise ValueError(f"rules must be a ShardingRules (e.g. sharding.DEFAULT_RULES) or None; "
                       f"got {rules!r}")
    if remat:
      from mgpo_jax.models.remat import set_remat  # models import nothing from train
      model = set_remat(nnx.clone(model), remat)
    self.graphdef, params, rest = nnx.split(model, wrt, ...)
    self._init_params = nnx.to_pure_dict(params)
    if not jax.tree.leaves(self._init_params):
      raise ValueError(f"wrt={wrt!r} selects no parameters of the model; apply LoRA first or "
                       "pass the filter of the leaves to train")
    self.tx, self.loss_fn, self.mesh = optax.with_extra_args_support(tx), loss_fn, mesh
    self.accum_steps, self.compute_dtype = accum_steps, compute_dtype
    self.num_devices = _sh.batch_size_divisor(mesh) if mesh is not None else 1
    if perturbation is not None and not isinstance(perturbation, WeightPerturbation):
      raise ValueError("perturbation must be a WeightPerturbation (mgpo_jax.perturbation) or "
                       f"None; got {perturbation!r}")
    if perturbation is not None and not lora_modules(model):
      raise ValueError("perturbation needs LoRA modules (mgpo_jax.lora.apply_lora); the model "
                       "has none")
    self.perturbation = perturbation
    self._streams = _rng_streams(rest)
    rest = _cast_floats(rest, compute_dtype)
    self._state_sh = None  # init() leaves the state unplaced until this is set
    if mesh is None:
      self.rest, shardings, eval_shardings = rest, {}, {}
    else:
      self.rules = _sh.DEFAULT_RULES if rules is None else rules
      rest_sh, self._params_sh = _sh.param_shardings(rest, self._init_params, mesh, self.rules)
      # Leaf by leaf, each device receives only its shards (for checkpoints too big for one
      # device, load them straight into these shardings: docs/training.md).
      self.rest = jax.device_put(rest, rest_sh)
      self._state_sh = _sh.state_shardings(jax.eval_shape(lambda: self.init(0)),
                                           self._init_params, self._params_sh, mesh)
      replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, _sh.batch_spec(mesh))
      shardings = {"in_shardings": (self._state_sh, rest_sh, data),
                   "out_shardings": (self._state_sh, replicated)}
      eval_shardings = {"in_shardings": (self._state_sh, rest_sh, data),
                        "out_shardings": replicated}
    self._train = jax.jit(self._train_step, **shardings)
    self._eval = jax.jit(self._eval_step, **eval_shardings)

  # -- the step ------------------------------------------------------------------------------

  def _model(self, params, rest) -> nnx.Module:
    """The model at ``params``, computing in ``compute_dtype`` (modules' ``dtype`` attribute)."""
    model = nnx.merge(self.graphdef, _cast_floats(params, self.compute_dtype), rest, copy=True)
    if self.compute_dtype is not None:
      model.set_attributes(dtype=self.compute_dtype, raise_if_not_found=False)
    return model

  def _loss(self, params, rest, batch, key, eps):
    """Loss of the train-mode model at ``params``, its LoRA kernels perturbed by ``eps``;
    every RNG stream reseeded from ``key``."""
    model = self._model(params, rest)
    if eps:
      set_perturbations(model, eps)
    model.train()
    nnx.reseed(model, **{name: jax.random.fold_in(key, i) for i, name in enumerate(self._streams)})
    return self.loss_fn(model, batch)

  def _grads(self, params, rest, batch, key, eps):
    """``((mean loss, summed metrics), mean gradient)`` over ``accum_steps`` micro-batches,
    every one of them under the same perturbation ``eps``."""
    value_and_grad = jax.value_and_grad(self._loss, has_aux=True)
    k = self.accum_steps
    if k == 1:
      return value_and_grad(params, rest, batch, key, eps)
    micro = jax.tree.map(lambda x: x.reshape(-1, k, *x.shape[1:]).swapaxes(0, 1), batch)

    def add(total, i_mb):
      i, mb = i_mb
      out = value_and_grad(params, rest, mb, jax.random.fold_in(key, i), eps)
      return jax.tree.map(jnp.add, total, out), None

    shapes = jax.eval_shape(value_and_grad, params, rest, jax.tree.map(lambda x: x[0], micro),
                            key, eps)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    ((loss, metrics), grads), _ = jax.lax.scan(add, zeros, (jnp.arange(k), micro))
    return (loss / k, metrics), jax.tree.map(lambda g: g / k, grads)

  def _train_step(self, state: TrainState, rest, batch) -> tuple[TrainState, Metrics]:
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    wp, modules, eps = self.perturbation, {}, {}
    if wp is not None:  # one ε per LoRA module for this step's forward/backward pass
      modules = lora_weights(nnx.merge(self.graphdef, state.params, rest, copy=True))
      eps = wp.perturbations(state.perturbation_state, modules, state.opt_state,
                             jax.random.fold_in(key, _PERTURBATION_SALT), state.step)
    (loss, metrics), grads = self._grads(state.params, rest, batch, key, eps)
    sam_grad_fn = lambda p, _: self._grads(p, rest, batch, key, eps)[1]  # noqa: E731 (SAM)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params, grad_fn=sam_grad_fn)
    params = optax.apply_updates(state.params, updates)
    wp_state = state.perturbation_state
    if wp is not None:  # fold in what the step learned (e.g. gradient norms)
      wp_state = wp.update(wp_state, modules, adapter_pairs(grads, list(modules)))
    new = TrainState(state.step + 1, params, opt_state, state.rng, wp_state)
    return new, {"loss": loss, **metrics}

  def _eval_step(self, state: TrainState, rest, batch) -> Metrics:
    model = self._model(clean_params(state), rest)
    model.eval()
    return self.loss_fn(model, batch)[1]

  # -- public API ----------------------------------------------------------------------------

  def init(self, seed: int | jax.Array) -> TrainState:
    """The step-0 state: the model's trainable params, ``tx.init``, a base key from ``seed``
    (an int or a PRNG key); placed on the mesh by the sharding rules (adapters follow their
    base kernels, optimizer state follows the params, the rest replicated)."""
    key = jax.random.key(int(seed)) if isinstance(seed, (int, np.integer)) else seed
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
      key = jax.random.key_data(key)
    params = self._init_params
    wp_state = optax.EmptyState()
    if self.perturbation is not None:
      wp_state = self.perturbation.init(lora_weights(nnx.merge(self.graphdef, params, self.rest,
                                                               copy=True)))
    state = TrainState(jnp.zeros((), jnp.int32), params, self.tx.init(params), key, wp_state)
    return state if self._state_sh is None else jax.device_put(state, self._state_sh)

  def abstract_state(self) -> TrainState:
    """``jax.ShapeDtypeStruct`` tree of :meth:`init`'s result, with shardings (a restore
    target for orbax)."""
    abstract = jax.eval_shape(lambda: self.init(0))
    if self.mesh is None:
      single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      shardings = jax.tree.map(lambda _: single, abstract)
    else:
      shardings = self._state_sh
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        abstract, shardings)

  def shard_batch(self, batch: Batch) -> Batch:
    """Puts this process's rows of a batch on the mesh (global arrays split over ``data`` ×
    ``fsdp``; with several hosts, each passes its own rows). Without a mesh: ``jnp.asarray``."""
    if self.mesh is None:
      return jax.tree.map(jnp.asarray, batch)
    _check_batch(batch, max(1, self.num_devices // jax.process_count()), 1)
    sharding = NamedSharding(self.mesh, _sh.batch_spec(self.mesh))
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)

  def lower(self, state: TrainState, batch: Batch) -> jax.stages.Lowered:
    """The lowered train step, for inspection: ``.compile().memory_analysis()``,
    ``.as_text()``. The frozen weights are an argument, not constants baked into it."""
    return self._train.lower(state, self.rest, batch)

  def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    """One optimizer step: ``(new state, {"loss": mean loss, **summed metrics})``."""
    _check_batch(batch, self.num_devices, self.accum_steps)
    return self._train(state, self.rest, batch)

  def eval_step(self, state: TrainState, batch: Batch) -> Metrics:
    """Summed metrics of the eval-mode model (no dropout) at :func:`clean_params`."""
    _check_batch(batch, self.num_devices, 1)
    return self._eval(state, self.rest, batch)
