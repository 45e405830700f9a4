"""Exact, atomic training checkpoints on top of ``orbax.checkpoint.CheckpointManager``.

A checkpoint is one step directory ``<directory>/<step>/`` with two items: ``state``, any pytree
of arrays (trainable adapters, the rest of the model state, the optax state, the step, the RNG
key, ...), and ``metadata``, a JSON dict (the data position, the resolved config, ...).

* **Exact.** Arrays are stored bit for bit and restored into the tree structure of an abstract
  target, so optax ``NamedTuple`` states (``ScaleByAdamState``, ``MultiStepsState``,
  ``MGPOState``, ...), ``flax.nnx.State`` / ``Variable`` nodes and typed PRNG keys
  (``jax.random.key``) come back as the same types, dtypes and shardings.
* **Atomic.** Orbax writes ``<step>.orbax-checkpoint-tmp-*`` and renames it to ``<step>`` only
  when every file is written; step listings ignore the temporary directories, so a process
  killed mid-save leaves the previous checkpoint as the latest one. Saves are synchronous:
  when :meth:`Checkpointer.save` returns, the checkpoint is on disk.
* **Clear failures.** A missing, truncated or unreadable checkpoint, or one whose tree does
  not match the target, raises :class:`CheckpointError` with a one-line message naming the
  directory and step. Nothing is deleted on failure; old checkpoints are only pruned
  (``keep``) after a newer save has been committed.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp

_STATE = "state"
_METADATA = "metadata"
_MAX_LISTED = 3
_STRAY_OUTPUT_GRACE_S = 0.5
_T = TypeVar("_T")


class CheckpointError(RuntimeError):
  """A checkpoint is missing, unreadable, corrupt, or does not match the restore target."""


class Checkpointer:
  """Saves every ``save_every`` steps into ``directory`` and keeps the last ``keep`` checkpoints.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, tempfile
    >>> params = {"w": jnp.ones(3)}
    >>> state = {"params": params, "opt": optax.adam(1e-3).init(params),
    ...          "key": jax.random.key(0)}
    >>> ckpt = Checkpointer(tempfile.mkdtemp(), save_every=10, keep=2)
    >>> ckpt.save(5, state), ckpt.save(10, state, metadata={"data_position": 320})
    (False, True)
    >>> restored, meta = ckpt.restore(jax.eval_shape(lambda: state))
    >>> type(restored["opt"][0]).__name__, meta
    ('ScaleByAdamState', {'data_position': 320})
    >>> ckpt.close()

  Args:
    directory: where the step directories live (created if missing). Other files in it (a
      ``config.json``, plots) are ignored. Opening it removes the drafts of interrupted saves
      and checkpoints beyond the newest ``keep``.
    save_every: :meth:`save` writes only at steps divisible by ``save_every`` unless
      ``force=True``.
    keep: how many of the most recent checkpoints to keep; ``None`` keeps all.
  """

  def __init__(self, directory: str | os.PathLike, *, save_every: int = 1,
               keep: int | None = None):
    _check_positive_int("save_every", save_every)
    if keep is not None:
      _check_positive_int("keep", keep)
    self.directory = os.path.abspath(os.fspath(directory))
    self.save_every = save_every
    self.keep = keep
    # Synchronous saves; the save decision is ours (orbax's default would also save the first
    # step it sees whatever ``save_every``), so ``save`` always passes ``force=True``.
    # Drafts of saves that a killed process left behind are removed when the directory opens.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False,
                                           cleanup_tmp_directories=True)
    try:
      self._manager = ocp.CheckpointManager(
          self.directory, options=options,
          item_handlers={_STATE: ocp.StandardCheckpointHandler(),
                         _METADATA: ocp.JsonCheckpointHandler()})
    except Exception as e:  # orbax raises many types for an unusable directory
      raise CheckpointError(
          f"cannot open checkpoint directory {self.directory}: {_reason(e)}") from e
    self._prune()

  def _prune(self) -> None:
    """Deletes checkpoints beyond the newest ``keep``: a process killed between a save and
    orbax's pruning leaves one too many, and the run may never save again."""
    if self.keep is not None:
      for step in self.all_steps()[:-self.keep]:
        _quietly(lambda step=step: self._manager.delete(step),
                 f"deleting old checkpoint step {step} in {self.directory} failed")

  def latest_step(self) -> int | None:
    """The newest committed step, or ``None`` if there is none (partial saves never count)."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """The committed steps, oldest first."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, *, metadata: Mapping[str, Any] | None = None,
           force: bool = False) -> bool:
    """Writes ``state`` and ``metadata`` as checkpoint ``step`` if due; returns whether it did.

    A step is due when it is divisible by ``save_every`` (or ``force`` is set) and newer than
    the latest saved step; an existing checkpoint is never overwritten. The write is
    synchronous and atomic; afterwards checkpoints beyond the last ``keep`` are deleted.

    Args:
      step: the training step (a non-negative integer) the state belongs to.
      state: a pytree of ``jax.Array`` / numpy arrays (typed PRNG keys included).
      metadata: a JSON-serialisable dict, e.g. ``{"data_position": 1234}``.
      force: save even if ``step`` is not divisible by ``save_every``.

    Raises:
      ValueError: ``step`` is not a non-negative integer, or ``metadata`` is not a JSON dict.
      CheckpointError: the write failed (the previous checkpoints are left as they were).
    """
    step = _check_step(step)
    metadata = _check_metadata(metadata)
    latest = self.latest_step()
    if latest is not None and step <= latest:
      return False
    if not force and step % self.save_every:
      return False
    args = ocp.args.Composite(**{
        _STATE: ocp.args.StandardSave(state), _METADATA: ocp.args.JsonSave(metadata)})

    def write() -> bool:
      saved = self._manager.save(step, args=args, force=True)
      self._manager.wait_until_finished()
      return bool(saved)

    return _quietly(write, f"saving checkpoint step {step} to {self.directory} failed")

  def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restores checkpoint ``step`` (default: the latest) into the structure of ``target``.

    ``target`` is the state's abstract shape, usually ``jax.eval_shape`` of the function that
    builds a fresh state, or a freshly built state itself (only shapes, dtypes and shardings
    are used). The result has ``target``'s tree structure (hence the right optax
    ``NamedTuple`` types) and dtypes; each array is placed with the target leaf's sharding
    when it has a concrete one, otherwise with the sharding it was saved with.

    Args:
      target: a pytree of ``jax.ShapeDtypeStruct`` or arrays with the saved structure.
      step: the step to restore; ``None`` for :meth:`latest_step`.

    Returns:
      ``(state, metadata)``.

    Raises:
      CheckpointError: no checkpoint, an unknown step, a tree, shape or dtype that differs
        from ``target``, or files that are missing, truncated or unreadable.
    """
    if step is None:
      step = self.latest_step()
      if step is None:
        raise CheckpointError(f"no checkpoint found in {self.directory}")
    step = _check_step(step)
    if step not in self._manager.all_steps():
      raise CheckpointError(
          f"no checkpoint step {step} in {self.directory}; available: {self.all_steps()}")
    where = f"checkpoint step {step} in {self.directory}"
    target = jax.tree.map(_restore_target, target)
    saved = _quietly(lambda: self._manager.item_metadata(step)[_STATE],
                     f"{where} is corrupt or unreadable")
    if saved is None:
      raise CheckpointError(f"{where} is corrupt or unreadable: its '{_STATE}' item is missing")
    mismatch = _mismatch(saved.tree, target)
    if mismatch:
      raise CheckpointError(f"{where} does not match the restore target: {mismatch}")
    restored = _quietly(lambda: self._manager.restore(step, args=ocp.args.Composite(**{
        _STATE: ocp.args.StandardRestore(target), _METADATA: ocp.args.JsonRestore()})),
                        f"{where} is corrupt or unreadable")
    state, metadata = restored[_STATE], restored[_METADATA]
    if not isinstance(metadata, dict):
      raise CheckpointError(f"{where} is corrupt: its metadata is not a JSON object")
    return state, metadata

  def close(self) -> None:
    """Waits for pending work and releases the manager's resources."""
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()

  def __repr__(self) -> str:
    return (f"Checkpointer({self.directory!r}, save_every={self.save_every}, "
            f"keep={self.keep})")


def _check_positive_int(name: str, value: Any) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ValueError(f"{name} must be a positive integer; got {value!r}")


def _check_step(step: Any) -> int:
  if isinstance(step, bool) or not np.issubdtype(np.asarray(step).dtype, np.integer) \
      or np.ndim(step) or int(step) < 0:
    raise ValueError(f"step must be a non-negative integer; got {step!r}")
  return int(step)


def _check_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
  metadata = {} if metadata is None else metadata
  try:
    if not isinstance(metadata, Mapping):
      raise TypeError(f"a {type(metadata).__name__}")
    return json.loads(json.dumps(dict(metadata)))
  except (TypeError, ValueError) as e:
    raise ValueError(f"metadata must be a JSON-serialisable dict; got {_reason(e)}") from e


def _restore_target(leaf: Any) -> Any:
  """A ``ShapeDtypeStruct`` for one target leaf: keeps typed-key dtypes and concrete shardings.

  (``ocp.utils.to_shape_dtype_struct`` would turn a typed PRNG key into its raw ``uint32`` data,
  and an ``AbstractMesh`` sharding, as ``jax.eval_shape`` returns for explicitly sharded inputs,
  cannot place arrays; such leaves are restored with the sharding they were saved with.)
  """
  if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
    return leaf
  sharding = getattr(leaf, "sharding", None)
  if isinstance(leaf, np.ndarray) or (
      isinstance(sharding, jax.sharding.NamedSharding)
      and isinstance(sharding.mesh, jax.sharding.AbstractMesh)):
    sharding = None
  return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


def _mismatch(saved: Any, target: Any) -> str:
  """One line describing how the saved tree differs from ``target``; empty if they agree."""
  saved = ocp.tree.to_flat_dict(saved)
  target = ocp.tree.to_flat_dict(target)
  problems = []
  missing = [k for k in target if k not in saved]
  extra = [k for k in saved if k not in target]
  if missing:
    problems.append(f"not in the checkpoint: {_paths(missing)}")
  if extra:
    problems.append(f"only in the checkpoint: {_paths(extra)}")
  for key in (k for k in target if k in saved):
    want = _stored_form(target[key])
    have = (tuple(saved[key].shape), np.dtype(saved[key].dtype))
    if want != have:
      problems.append(f"{'.'.join(key)} is {_show(have)} in the checkpoint, "
                      f"{_show(want)} in the target")
      if len(problems) >= _MAX_LISTED:
        break
  return "; ".join(problems)


def _stored_form(leaf: Any) -> tuple[tuple[int, ...], np.dtype]:
  """Shape and dtype as stored on disk (a typed PRNG key is stored as its ``uint32`` data)."""
  if not isinstance(leaf, jax.ShapeDtypeStruct):  # a Python or numpy scalar
    leaf = np.asarray(leaf)
  elif jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    leaf = jax.eval_shape(jax.random.key_data, leaf)
  return tuple(leaf.shape), np.dtype(leaf.dtype)


def _paths(keys: list[tuple[str, ...]]) -> str:
  shown = ", ".join(".".join(k) for k in keys[:_MAX_LISTED])
  return shown + (f" (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def _show(form: tuple[tuple[int, ...], np.dtype]) -> str:
  return f"{form[1].name}{list(form[0])}"


def _quietly(call: Callable[[], _T], failure: str) -> _T:
  """Runs an orbax call; any exception becomes ``CheckpointError(f"{failure}: {reason}")``.

  Orbax reads and writes files concurrently (tensorstore futures on a private asyncio loop).
  When one operation fails, the loop is closed while the others are still in flight, and
  their completions print "Event loop is closed" tracebacks on ``sys.stderr``. So stderr is
  buffered during the call: replayed on success, dropped (after a grace period for the
  stragglers) on failure, when the exception carries the cause.
  """
  real, buffer = sys.stderr, io.StringIO()
  sys.stderr = buffer
  try:
    result = call()
  except Exception as e:
    time.sleep(_STRAY_OUTPUT_GRACE_S)
    raise CheckpointError(f"{failure}: {_reason(e)}") from e
  finally:
    sys.stderr = real
  real.write(buffer.getvalue())
  return result


def _reason(error: BaseException) -> str:
  """The first line of the innermost cause, without tensorstore's spec dump."""
  for _ in range(16):  # chains are short; the bound only guards against a cycle
    inner = error.__cause__ or error.__context__
    if inner is None:
      break
    error = inner
  lines = str(error).strip().splitlines()
  text = lines[0] if lines else type(error).__name__
  text = text.split(" [tensorstore_spec=")[0].split(" See full TensorStore details")[0]
  return text if len(text) <= 300 else text[:297] + "..."
