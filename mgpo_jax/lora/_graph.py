"""Small helpers to walk and edit an NNX module graph by path (private to ``mgpo_jax.lora``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flax import nnx


def dotted(path: Sequence[Any]) -> str:
  """A graph path as PyTorch-style dotted name: ``("layers", 0, "query")`` → ``layers.0.query``."""
  return ".".join(str(p) for p in path)


def nodes(model: nnx.Module, kind: type) -> list[tuple[tuple[Any, ...], Any]]:
  """``(path, node)`` for every node of ``model`` that is an instance of ``kind``."""
  return [(p, n) for p, n in nnx.iter_graph(model) if isinstance(n, kind)]


def module_paths(model: nnx.Module) -> list[str]:
  """Dotted paths of every submodule of ``model`` (the root excluded)."""
  return [dotted(p) for p, _ in nodes(model, nnx.Module) if p]


def get(root: Any, dotted_path: str) -> Any:
  """The node at a dotted path (integer parts index ``nnx.List``)."""
  node = root
  for part in dotted_path.split("."):
    node = node[int(part)] if part.isdigit() else getattr(node, part)
  return node


def set_child(root: Any, path: Sequence[Any], value: Any) -> None:
  """Replaces the node at ``path`` (a graph path) by ``value``."""
  parent = root
  for part in path[:-1]:
    parent = parent[part] if isinstance(part, int) else getattr(parent, part)
  if isinstance(path[-1], int):
    parent[path[-1]] = value
  else:
    setattr(parent, path[-1], value)


def retype(module: nnx.Module, old: type, new: type) -> None:
  """Replaces every variable of exact type ``old`` under ``module`` by a ``new`` variable."""
  for p, var in nodes(module, nnx.Variable):
    if type(var) is old:
      set_child(module, p, new.from_metadata(var.get_value(), var.get_metadata()))
