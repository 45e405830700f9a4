"""Loading Hugging Face checkpoint files from a local directory into the NNX models.

Checkpoint keys are matched to the model's parameters by their HF names, which
:mod:`mgpo_jax.hf_names` owns (NNX path + PyTorch parameter name, linear weights transposed).
Loading is strict: a checkpoint tensor with no home in the model, a model parameter absent
from the checkpoint, or a shape mismatch raises :class:`CheckpointMismatchError`.
Nothing here touches the network: the directory must exist locally.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from mgpo_jax.hf_names import hf_parameters

if TYPE_CHECKING:  # transformers imports torch where installed: only load it when reading files
  from transformers import PretrainedConfig

M = TypeVar("M", bound=nnx.Module)
ShardingsFn = Callable[[str, tuple[int, ...]], "jax.sharding.Sharding | None"]
"""``(NNX parameter path such as "model/layers/0/mlp/up_proj/kernel", shape) -> sharding`` (or
``None``: the default device): where a loader puts each parameter, e.g.
:func:`mgpo_jax.train.sharding.load_shardings`."""

_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"
_MAX_LISTED = 12

# Hugging Face ``hidden_act`` names -> JAX functions (ACT2FN in transformers/activations.py).
_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  "relu": jax.nn.relu,
  "silu": jax.nn.silu,
  "swish": jax.nn.silu,
}


class CheckpointMismatchError(ValueError):
  """A checkpoint's tensors do not match the model's parameters (names or shapes)."""


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """The JAX function for a Hugging Face ``hidden_act`` name (``"gelu"`` is the exact erf form)."""
  if name not in _ACTIVATIONS:
    raise NotImplementedError(
      f"hidden_act={name!r} is not supported; supported: {sorted(_ACTIVATIONS)}"
    )
  return _ACTIVATIONS[name]


def local_dir(path: str | Path) -> Path:
  """``path`` as an existing local directory; never resolved against a model hub."""
  directory = Path(path)
  if not directory.is_dir():
    raise FileNotFoundError(
      f"{str(path)!r} is not an existing local directory. from_pretrained reads a local folder "
      "holding config.json and model.safetensors; it never downloads from a hub."
    )
  return directory


def load_config(path: str | Path, model_types: Collection[str]) -> PretrainedConfig:
  """Reads ``config.json`` of a local checkpoint and checks its ``model_type``."""
  directory = local_dir(path)
  if not (directory / "config.json").is_file():
    raise FileNotFoundError(f"no config.json in {str(directory)!r}")
  from transformers import AutoConfig

  config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
  if config.model_type not in model_types:
    raise ValueError(
      f"config.json in {str(directory)!r} has model_type={config.model_type!r}; "
      f"expected one of {sorted(model_types)}"
    )
  return config


def weight_files(path: str | Path) -> list[Path]:
  """The files a checkpoint's weights are read from: ``model.safetensors``, or the index
  ``model.safetensors.index.json`` and the shards it names (each checked to exist).

  Raises:
    FileNotFoundError: no weights, or a shard the index names is missing.
    ValueError: an index that is not JSON with a ``weight_map`` of file names.
  """
  directory = local_dir(path)
  if (directory / _SINGLE_FILE).is_file():
    return [directory / _SINGLE_FILE]
  index = directory / _INDEX_FILE
  if not index.is_file():
    raise FileNotFoundError(f"neither {_SINGLE_FILE} nor {_INDEX_FILE} in {str(directory)!r}")
  try:
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
  except (ValueError, KeyError, TypeError, AttributeError) as err:
    raise ValueError(f"{str(index)!r} is not a safetensors index (JSON with a weight_map of "
                     f"tensor name -> file): {err!r}") from err
  missing = [name for name in shards if not (directory / name).is_file()]
  if missing:
    raise FileNotFoundError(f"{_INDEX_FILE} in {str(directory)!r} names shards that are not "
                            f"there: {', '.join(missing[:3])}")
  return [index, *(directory / name for name in shards)]


class SafetensorsCheckpoint:
  """Lazy, read-only view of a local checkpoint's safetensors file(s), single or sharded.

  Tensors are read one at a time into host memory as numpy arrays (any dtype safetensors
  stores, bfloat16 included): no device sees a tensor until the loader places it.
  """

  def __init__(self, path: str | Path):
    files = [f for f in weight_files(path) if f.name != _INDEX_FILE]
    self._file_of: dict[str, Path] = {}
    self._shape_of: dict[str, tuple[int, ...]] = {}
    for file in files:
      with safe_open(str(file), framework="numpy") as f:
        for key in f.keys():
          self._file_of[key] = file
          self._shape_of[key] = tuple(f.get_slice(key).get_shape())

  def keys(self) -> list[str]:
    return list(self._file_of)

  def shape(self, key: str) -> tuple[int, ...]:
    return self._shape_of[key]

  def tensors(self, keys: Iterable[str]) -> Iterator[tuple[str, np.ndarray]]:
    """``(key, tensor)`` for ``keys``, shard by shard: each file is opened once and its
    tensors read one at a time (the caller converts and drops each before the next)."""
    by_file: dict[Path, list[str]] = {}
    for key in keys:
      by_file.setdefault(self._file_of[key], []).append(key)
    for file in sorted(by_file):
      with safe_open(str(file), framework="numpy") as f:
        for key in by_file[file]:
          yield key, f.get_tensor(key)


def _listing(names: Iterable[str]) -> str:
  names = sorted(names)
  more = f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else ""
  return ", ".join(names[:_MAX_LISTED]) + more


def load_hf_weights(
  model: nnx.Module,
  checkpoint: SafetensorsCheckpoint,
  rename: Callable[[str], str | None],
  *,
  allow_missing: Collection[str] = (),
  shardings: ShardingsFn | None = None,
) -> None:
  """Copies checkpoint tensors into ``model``'s parameters in place (abstract ones included).

  Args:
    model: an NNX model whose module paths are HF module names.
    checkpoint: the tensors to load.
    rename: checkpoint key -> HF parameter name in ``model``, or ``None`` to skip the tensor
      (e.g. non-persistent buffers or heads the model does not have).
    allow_missing: HF parameter names that may be absent from the checkpoint (they are left
      as they are, e.g. a new classification head).
    shardings: where each parameter goes (see :data:`ShardingsFn`); a sharded parameter is
      built with ``jax.make_array_from_callback``, so each device receives only its slice of
      the tensor and no device ever holds the whole of it. Default: the default device.

  Raises:
    CheckpointMismatchError: unexpected tensors, missing parameters or shape mismatches, all
      listed in the message. Nothing is modified in that case.
  """
  params = hf_parameters(model)
  source = {}
  for key in checkpoint.keys():
    name = rename(key)
    if name is not None:
      source[name] = key
  unexpected = set(source) - set(params)
  missing = set(params) - set(source) - set(allow_missing)
  mismatched = []
  for name in set(source) & set(params):
    variable, transposed = params[name]
    shape = variable.get_value().shape
    expected = shape[::-1] if transposed else shape
    found = checkpoint.shape(source[name])
    if tuple(expected) != found:
      mismatched.append(f"{name}: checkpoint {found}, model {tuple(expected)}")
  problems = []
  if unexpected:
    problems.append(f"unexpected tensors (no such parameter): {_listing(unexpected)}")
  if missing:
    problems.append(f"missing from the checkpoint: {_listing(missing)}")
  if mismatched:
    problems.append(f"shape mismatches: {_listing(mismatched)}")
  if problems:
    raise CheckpointMismatchError(
      f"checkpoint does not fit {type(model).__name__}: " + "; ".join(problems)
    )
  path_of = ({id(node): "/".join(map(str, path)) for path, node in nnx.iter_graph(model)}
             if shardings is not None else {})
  name_of = {key: name for name, key in source.items()}
  for key, tensor in checkpoint.tensors(name_of):  # shard by shard, one tensor at a time
    variable, transposed = params[name_of[key]]
    tensor = tensor.T if transposed else tensor
    dtype = variable.get_value().dtype
    where = shardings(path_of[id(variable)], tuple(tensor.shape)) if shardings else None
    if where is None:
      variable.set_value(jnp.asarray(tensor, dtype=dtype))
    else:  # each device gets its slice only
      variable.set_value(jax.make_array_from_callback(
        tensor.shape, where, lambda index, t=tensor: np.asarray(t[index], dtype)))
    del tensor  # only the parameter (in its param_dtype) stays


def build_from_checkpoint(
  build: Callable[[nnx.Rngs], M],
  rngs: nnx.Rngs,
  checkpoint: SafetensorsCheckpoint,
  rename: Callable[[str], str | None],
  *,
  allow_missing: Collection[str] = (),
  shardings: ShardingsFn | None = None,
) -> M:
  """``build(rngs)`` with its parameters read from ``checkpoint``, without initialising them.

  The model is first built abstractly (shapes only); the checkpoint fills its parameters (each
  straight into its place from ``shardings``, see :func:`load_hf_weights`), and only what is
  left (parameters in ``allow_missing`` absent from the checkpoint, and the dropout RNG
  streams) is computed, by one jitted ``build(rngs)`` from which XLA drops the unused
  initialisers. The result equals ``build(rngs)`` followed by loading the checkpoint.
  """
  model = nnx.eval_shape(lambda: build(nnx.Rngs(0)))
  load_hf_weights(model, checkpoint, rename, allow_missing=allow_missing, shardings=shardings)
  abstract = nnx.state(model, lambda _, x: isinstance(x.get_value(), jax.ShapeDtypeStruct))
  todo = {path for path, _ in nnx.to_flat_state(abstract)}
  if todo:
    fresh = nnx.jit(lambda r: nnx.state(build(r), lambda path, _: path in todo))(rngs)
    nnx.update(model, fresh)
  return model
