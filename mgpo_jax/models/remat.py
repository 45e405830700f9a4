"""Rematerialisation of transformer blocks: recompute a block's activations in the backward pass.

The BERT and Llama ports run each block through :func:`block` (``BertEncoder`` and
``LlamaModel`` loops), which wraps the block's ``__call__`` in ``nnx.remat`` (``jax.checkpoint``)
when the container's ``remat_policy`` is set. Policy names are those of
``jax.checkpoint_policies``; the default, ``"nothing_saveable"``, keeps only each block's input
for the backward pass (activation memory O(layers × B × T × H) instead of every intermediate,
for about one extra forward pass of compute). ``"dots_with_no_batch_dims_saveable"`` keeps the
weight matmuls' outputs and recomputes the rest (cheaper, less saving).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

__all__ = ["DEFAULT_POLICY", "block", "resolve_policy", "set_remat"]

DEFAULT_POLICY = "nothing_saveable"


def resolve_policy(remat: bool | str | None) -> str | None:
  """``False``/``None`` -> ``None``; ``True`` -> :data:`DEFAULT_POLICY`; a policy name -> itself.

  Raises ``ValueError`` naming ``remat`` for anything else."""
  if remat is None or remat is False:
    return None
  if remat is True:
    return DEFAULT_POLICY
  if isinstance(remat, str) and callable(getattr(jax.checkpoint_policies, remat, None)):
    return remat
  names = sorted(n for n in dir(jax.checkpoint_policies) if not n.startswith("_"))
  raise ValueError(f"remat must be a bool or a jax.checkpoint_policies name ({', '.join(names)}); "
                   f"got {remat!r}")


def set_remat(model: nnx.Module, remat: bool | str = True) -> nnx.Module:
  """Sets the remat policy of every block container of ``model`` in place and returns it.

  Raises ``ValueError`` if ``model`` has no remat-capable container (its modules need a
  ``remat_policy`` attribute, as the shipped BERT and Llama ports have)."""
  policy = resolve_policy(remat)
  found = [m for _, m in nnx.iter_graph(model)
           if isinstance(m, nnx.Module) and hasattr(m, "remat_policy")]
  if not found:
    raise ValueError(f"remat={remat!r}: {type(model).__name__} has no remat-capable blocks "
                     "(modules with a remat_policy attribute: the BERT and Llama ports)")
  for m in found:
    m.remat_policy = policy
  return model


def block(layer: nnx.Module, policy: str | None) -> Callable[..., Any]:
  """``layer`` itself, or its ``__call__`` under ``nnx.remat`` with the named policy."""
  if policy is None:
    return layer
  remat_call = nnx.remat(type(layer).__call__, policy=getattr(jax.checkpoint_policies, policy))
  return functools.partial(remat_call, layer)
