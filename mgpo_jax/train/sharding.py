"""Sharding rules: where every parameter, adapter, optimizer-state leaf and batch lives on a mesh.

The mesh has a data axis and model axes (JAX SPMD: ``NamedSharding`` + XLA's partitioner, no
home-made engine):

* ``"data"``: the batch is split over it; parameters are replicated over it.
* ``"fsdp"``: the batch is split over it too, and every frozen kernel (``ndim >= 2``) is split
  along its largest axis that the tensor rules left free (and that the axis size divides); XLA
  all-gathers a kernel where a matmul needs it and frees it afterwards.
* ``"tensor"`` (optional): Megatron-style tensor parallelism from a table of path rules:
  column-parallel kernels (Q/K/V, gate/up, BERT's intermediate) split their OUTPUT axis,
  row-parallel kernels (O, down, BERT's output denses) their INPUT axis.

LoRA adapters follow their base kernel (as qwix does): for ``W`` (in, out) with spec
``P(s_in, s_out)``, ``A`` (in, r) gets ``P(s_in, None)`` and ``B`` (r, out) ``P(None, s_out)``,
so ``x A`` and ``(x A) B`` need no other layout than ``x W``. Optimizer-state leaves follow the
parameter they mirror (matched by key-path suffix and shape); scalars and counters are
replicated. The rules as a table: ``print(DEFAULT_RULES.table())``; ``docs/training.md``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

__all__ = ["AXES", "BERT_RULES", "DATA_AXIS", "DEFAULT_RULES", "FSDP_AXIS", "LLAMA_RULES",
           "ShardingRules", "TENSOR_AXIS", "batch_size_divisor", "batch_spec", "build_mesh",
           "load_shardings", "param_shardings", "parse_mesh", "path_str", "per_device_bytes",
           "state_shardings"]

DATA_AXIS, FSDP_AXIS, TENSOR_AXIS = "data", "fsdp", "tensor"
AXES = (DATA_AXIS, FSDP_AXIS, TENSOR_AXIS)
"""The mesh axes we know, in mesh order (data outermost: its all-reduce is the rarest)."""

_COLUMN, _ROW = P(None, TENSOR_AXIS), P(TENSOR_AXIS, None)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
  """Path rules for tensor parallelism, plus automatic FSDP of the largest free axis.

  Args:
    rules: ``(regex, PartitionSpec)`` rows, first match wins; the regex is searched in the
      leaf's ``/``-joined path (``model/layers/0/self_attn/q_proj/kernel``). A spec names mesh
      axes per array axis; axes absent from the mesh, or whose size does not divide that array
      axis, are dropped (that axis stays whole). Leaves no row matches are replicated apart
      from FSDP.
    fsdp: whether ``ndim >= 2`` leaves are also split over ``"fsdp"`` along their largest axis
      that the matched spec leaves free (ties: the first), when the fsdp size divides it.
  """

  rules: tuple[tuple[str, P], ...] = ()
  fsdp: bool = True

  def __post_init__(self):
    for row in self.rules:
      if (not isinstance(row, tuple) or len(row) != 2 or not isinstance(row[0], str)
          or not isinstance(row[1], P)):
        raise ValueError(f"rules must be (regex str, PartitionSpec) pairs; got {row!r}")
      re.compile(row[0])

  def spec(self, path: str, shape: Sequence[int], mesh: Mesh) -> P:
    """The ``PartitionSpec`` of a parameter at ``path`` with ``shape`` on ``mesh``."""
    shape = tuple(shape)
    entries: list[Any] = [None] * len(shape)
    for pattern, spec in self.rules:
      if re.search(pattern, path):
        if len(spec) <= len(shape):
          entries = [_fit(e, d, mesh) for e, d in zip((*spec, *[None] * len(shape)), shape)]
        break
    fsdp = mesh.shape.get(FSDP_AXIS, 1) if FSDP_AXIS in mesh.axis_names else 1
    used = {a for e in entries for a in _axes(e)}
    if self.fsdp and fsdp > 1 and len(shape) >= 2 and FSDP_AXIS not in used:
      free = [i for i, e in enumerate(entries) if e is None and shape[i] % fsdp == 0]
      if free:
        entries[max(free, key=lambda i: (shape[i], -i))] = FSDP_AXIS
    while entries and entries[-1] is None:
      entries.pop()
    return P(*entries)

  def table(self) -> str:
    """The rules as a markdown table (FSDP's automatic rule in the last row)."""
    rows = ["| parameter path (regex) | PartitionSpec (in, out) |", "|---|---|"]
    rows += [f"| `{pattern}` | `{spec}` |" for pattern, spec in self.rules]
    if self.fsdp:
      rows.append("| any other axis of an `ndim >= 2` leaf | `fsdp` on the largest free axis |")
    return "\n".join(rows)

  def __add__(self, other: ShardingRules) -> ShardingRules:
    return ShardingRules(self.rules + other.rules, self.fsdp and other.fsdp)


LLAMA_RULES = ShardingRules((
  (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel$", _COLUMN),
  (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/bias$", P(TENSOR_AXIS)),
  (r"(o_proj|down_proj)/kernel$", _ROW),
))
"""Llama: column-parallel Q/K/V (heads split) and gate/up; row-parallel O and down."""

BERT_RULES = ShardingRules((
  (r"attention/self/(query|key|value)/kernel$", _COLUMN),
  (r"attention/self/(query|key|value)/bias$", P(TENSOR_AXIS)),
  (r"intermediate/dense/kernel$", _COLUMN),
  (r"intermediate/dense/bias$", P(TENSOR_AXIS)),
  (r"output/dense/kernel$", _ROW),
))
"""BERT: column-parallel query/key/value and intermediate; row-parallel attention/output and
output denses (``attention/output/dense``, ``layer/N/output/dense``)."""

DEFAULT_RULES = LLAMA_RULES + BERT_RULES
"""Both ports' rules (their module names do not collide)."""


def _axes(entry: Any) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _fit(entry: Any, dim: int, mesh: Mesh) -> Any:
  """``entry`` without the axes absent from ``mesh`` or not dividing ``dim``."""
  kept = []
  for axis in _axes(entry):
    if axis in mesh.axis_names and dim % (math.prod(mesh.shape[a] for a in kept)
                                          * mesh.shape[axis]) == 0:
      kept.append(axis)
  return None if not kept else kept[0] if len(kept) == 1 else tuple(kept)


# -- meshes -----------------------------------------------------------------------------------


def parse_mesh(spec: str | Mapping[str, int]) -> dict[str, int]:
  """``"data=2,fsdp=4"`` (or a mapping) -> ``{"data": 2, "fsdp": 4}`` in mesh order.

  Axes are ``data``, ``fsdp`` and ``tensor``; each size a positive integer; ``data`` defaults
  to 1 when not given. Raises ``ValueError`` naming the offending part otherwise.
  """
  if isinstance(spec, str):
    sizes: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
      name, sep, value = part.partition("=")
      if not sep or not value.strip().isdigit():
        raise ValueError(f"mesh must look like 'data=2,fsdp=4' (axes {', '.join(AXES)}); "
                         f"got {spec!r}")
      if name.strip() in sizes:
        raise ValueError(f"mesh names axis {name.strip()!r} twice in {spec!r}")
      sizes[name.strip()] = int(value)
  elif isinstance(spec, Mapping):
    sizes = dict(spec)
  else:
    raise ValueError(f"mesh must be a string like 'data=2,fsdp=4' or a mapping; got {spec!r}")
  unknown = sorted(set(sizes) - set(AXES))
  if unknown:
    raise ValueError(f"mesh axes must be among {AXES}; got {unknown}")
  for name, size in sizes.items():
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
      raise ValueError(f"mesh axis {name!r} needs a positive integer size; got {size!r}")
  sizes.setdefault(DATA_AXIS, 1)
  return {a: int(sizes[a]) for a in AXES if a in sizes}


def build_mesh(axes: str | Mapping[str, int],
               devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with the named axes (:func:`parse_mesh`), over the first ``prod(sizes)`` devices
  of ``devices`` (default ``jax.devices()``, every host's). Raises ``ValueError`` when there
  are too few devices."""
  sizes = parse_mesh(axes)
  devices = list(jax.devices() if devices is None else devices)
  n = math.prod(sizes.values())
  if n > len(devices):
    raise ValueError(f"mesh {sizes} needs {n} devices; only {len(devices)} are available")
  return jax.make_mesh(tuple(sizes.values()), tuple(sizes), (AxisType.Auto,) * len(sizes),
                       devices=devices[:n])


def batch_spec(mesh: Mesh) -> P:
  """Batch rows split over ``data`` and ``fsdp`` (those in the mesh); replicated over
  ``tensor``."""
  axes = tuple(a for a in (DATA_AXIS, FSDP_AXIS) if a in mesh.axis_names)
  return P(axes if len(axes) > 1 else axes[0]) if axes else P()


def batch_size_divisor(mesh: Mesh) -> int:
  """How many ways the batch is split: ``data × fsdp``."""
  return math.prod(mesh.shape[a] for a in (DATA_AXIS, FSDP_AXIS) if a in mesh.axis_names)


# -- parameters and state ---------------------------------------------------------------------


def _name(key: Any) -> str | None:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return None


def path_str(path: Sequence[Any]) -> str:
  """``/``-joined names of a key path, without the ``.value`` of NNX variables."""
  names = [n for n in map(_name, path) if n is not None]
  while names and names[-1] in ("value", "raw_value"):
    names.pop()
  return "/".join(names)


def param_shardings(rest: Any, params: Any, mesh: Mesh,
                    rules: ShardingRules = DEFAULT_RULES) -> tuple[Any, Any]:
  """``NamedSharding`` trees for the frozen part ``rest`` and the trainable ``params``.

  Frozen leaves get ``rules.spec(path, shape)``. A trainable ``.../lora_a`` (in, r) gets
  ``P(s_in, None)`` and ``.../lora_b`` (r, out) ``P(None, s_out)`` where ``P(s_in, s_out)`` is
  the spec of the sibling frozen ``.../kernel``; other trainable leaves (e.g. a trained head)
  get the rules like frozen ones. Leaves without a shape (typed PRNG keys included) are
  replicated when they have no rank.
  """
  spec_of: dict[str, P] = {}

  def frozen(path, leaf):
    shape = np.shape(leaf) if not hasattr(leaf, "shape") else leaf.shape
    spec = rules.spec(path_str(path), shape, mesh)
    spec_of[path_str(path)] = spec
    return NamedSharding(mesh, spec)

  rest_sh = jax.tree_util.tree_map_with_path(frozen, rest)

  def trainable(path, leaf):
    name = path_str(path)
    module, _, last = name.rpartition("/")
    if last in ("lora_a", "lora_b"):
      w = tuple(spec_of.get(f"{module}/kernel", P())) + (None, None)
      return NamedSharding(mesh, P(w[0], None) if last == "lora_a" else P(None, w[1]))
    return NamedSharding(mesh, rules.spec(name, leaf.shape, mesh))

  return rest_sh, jax.tree_util.tree_map_with_path(trainable, params)


def state_shardings(abstract_state: Any, params: Any, param_sh: Any, mesh: Mesh) -> Any:
  """Shardings for a whole train state (a pytree of ``ShapeDtypeStruct``/arrays).

  Every leaf whose key path ends with a trainable param's path (``params``' own key paths)
  and has that param's shape gets the param's sharding (``param_sh``): the params themselves
  and the param-shaped leaves of the optimizer state (Adam's ``mu``/``nu``, MGPO's ``eps``,
  SAM's state, ...). Everything else (step, counters, RNG key, scalars) is replicated.
  """
  by_suffix: dict[tuple[str, ...], tuple[tuple[int, ...], NamedSharding]] = {}
  flat_sh = jax.tree.leaves(param_sh)
  for (path, leaf), sh in zip(jax.tree_util.tree_flatten_with_path(params)[0], flat_sh):
    by_suffix[tuple(n for n in map(_name, path) if n is not None)] = (tuple(np.shape(leaf)), sh)
  lengths = sorted({len(k) for k in by_suffix}, reverse=True)
  replicated = NamedSharding(mesh, P())

  def pick(path, leaf):
    names = tuple(n for n in map(_name, path) if n is not None)
    for n in lengths:
      hit = by_suffix.get(names[-n:]) if len(names) >= n else None
      if hit is not None and hit[0] == tuple(np.shape(leaf)):
        return hit[1]
    return replicated

  return jax.tree_util.tree_map_with_path(pick, abstract_state)


def load_shardings(mesh: Mesh, rules: ShardingRules = DEFAULT_RULES
                   ) -> Callable[[str, tuple[int, ...]], NamedSharding]:
  """The ``shardings`` argument of :func:`mgpo_jax.models.load_model`: each frozen parameter
  is loaded straight into the ``NamedSharding`` that :class:`~mgpo_jax.train.Trainer` gives it
  on ``mesh`` with ``rules`` (so the Trainer moves nothing). Pass the Trainer the same
  ``rules``: with others it moves every leaf to its own shardings."""
  return lambda path, shape: NamedSharding(mesh, rules.spec(path, shape, mesh))


def per_device_bytes(tree: Any) -> dict[Any, int]:
  """Bytes each device holds of the arrays in ``tree`` (its addressable shards)."""
  out: dict[Any, int] = {}
  for leaf in jax.tree.leaves(tree):
    for shard in getattr(leaf, "addressable_shards", ()):
      out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
  return out
