"""Putting LoRA on an NNX model, and selecting what to train.

:func:`apply_lora` replaces the targeted ``nnx.Linear`` modules by :class:`LoraLinear` and
makes the parameters of ``modules_to_save`` trainable. Everything trainable afterwards is an
``nnx.LoRAParam``, so the one filter :data:`trainable` selects it for
``nnx.Optimizer(model, tx, wrt=trainable)``, ``nnx.split`` (:func:`split_lora`) and
``optax.partition`` (:func:`lora_labels`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from mgpo_jax.lora import _graph
from mgpo_jax.lora.config import LoraConfig, matches_name
from mgpo_jax.lora.layer import LoraLinear

__all__ = ["trainable", "frozen", "apply_lora", "lora_modules", "split_lora", "lora_labels"]

#: Filter for everything :func:`apply_lora` makes trainable (adapters and ``modules_to_save``).
trainable = nnx.LoRAParam
#: Filter for the frozen parameters (every ``nnx.Param`` that is not trainable).
frozen = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


def lora_modules(model: nnx.Module) -> dict[str, LoraLinear]:
  """All :class:`LoraLinear` modules of ``model``, by dotted path."""
  return {_graph.dotted(p): m for p, m in _graph.nodes(model, LoraLinear)}


def apply_lora(model: nnx.Module, config: LoraConfig, *, rngs: nnx.Rngs) -> nnx.Module:
  """Puts LoRA adapters on every ``nnx.Linear`` of ``model`` that ``config`` targets.

  Works in place (and returns ``model``): each ``nnx.Linear`` (also inside ``nnx.List``) for
  which :meth:`LoraConfig.is_target` holds is replaced by a :class:`LoraLinear` that keeps
  its ``kernel`` and ``bias`` variables, and the parameters of ``config.modules_to_save``
  become ``nnx.LoRAParam``. Modules in or under ``modules_to_save`` never get adapters (as in
  PEFT). Afterwards :data:`trainable` selects exactly what should be trained. Keys for ``A``
  come from ``rngs.params()`` (one per module), dropout draws from ``rngs.dropout``.

  Raises:
   ValueError: the model already has LoRA modules; ``target_modules`` matches no linear
    module (the message lists the model's linear module paths); ``r > min(in, out)`` for
    a matched module; a ``modules_to_save`` name matches no module; ``init="lora-one"``
    (it needs gradients: use :func:`~mgpo_jax.lora.apply_lora_one`).
  """
  if config.init == "lora-one":
    raise ValueError(
      "apply_lora: init='lora-one' needs the full gradient of each target kernel; use "
      "mgpo_jax.lora.apply_lora_one(model, config, loss_fn, batches), or "
      "kernel_gradients(...) then init_lora_one(model, config, gradients)"
    )
  return _apply(model, config, rngs, strict_modules_to_save=True)


def _apply(
  model: nnx.Module, config: LoraConfig, rngs: nnx.Rngs, *, strict_modules_to_save: bool,
  factors: Callable[[str, nnx.Linear], tuple[jax.Array, jax.Array]] | None = None,
) -> nnx.Module:
  """:func:`apply_lora`; with ``strict_modules_to_save=False`` a ``modules_to_save`` name
  that matches no module is ignored, as PEFT does when it loads an adapter. ``factors(path,
  linear)``, if given, makes each module's ``(A, B)`` (LoRA-One's spectral init); it is
  called for every target before any module is replaced, so an error leaves ``model`` as
  it was."""
  if lora_modules(model):
    raise ValueError("apply_lora: the model already has LoRA modules")
  modules = _graph.module_paths(model)
  unmatched = [n for n in config.modules_to_save if not any(matches_name(s, n) for s in modules)]
  if unmatched and strict_modules_to_save:
    raise ValueError(
      f"modules_to_save name {unmatched[0]!r} matches no module; the model's modules are: "
      f"{modules}"
    )
  linears = [(p, m) for p, m in _graph.nodes(model, nnx.Linear) if p]
  targets = [(p, m) for p, m in linears if config.is_target(_graph.dotted(p))]
  if not targets:
    raise ValueError(_no_match_message(config, [_graph.dotted(p) for p, _ in linears]))
  for p, m in targets:
    if config.r > min(m.in_features, m.out_features):
      raise ValueError(
        f"r={config.r} exceeds min(in, out) = {min(m.in_features, m.out_features)} of "
        f"{_graph.dotted(p)!r} (in={m.in_features}, out={m.out_features})"
      )
  made = {p: factors(_graph.dotted(p), m) for p, m in targets} if factors else {}
  for p, m in targets:
    _graph.set_child(model, p, LoraLinear(m, config, rngs=rngs, factors=made.get(p)))
  for s in modules:
    if config.is_saved(s):
      _graph.retype(_graph.get(model, s), nnx.Param, nnx.LoRAParam)
  return model


def _no_match_message(config: LoraConfig, paths: list[str]) -> str:
  message = (
    f"target_modules={config.target_modules!r} matches no linear module"
    + (" outside modules_to_save" if config.modules_to_save else "")
    + f"; the model's linear modules are: {paths}"
  )
  targets = config.target_modules
  if isinstance(targets, str) and any(matches_name(p, targets) for p in paths):
    message += (
      f". A single string is a regular expression that must match the whole path (PEFT's "
      f"rule); to match {targets!r} by name, pass a list: [{targets!r}]"
    )
  return message


def split_lora(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """``nnx.split(model, trainable, ...)``: ``(graphdef, trainable_state, rest)``.

  For a plain ``jax.jit`` train step: split once, then inside the loss function
  ``model = nnx.merge(graphdef, trainable_state, rest, copy=True)`` (``copy=True`` gives
  fresh variables, so :func:`~mgpo_jax.lora.perturb.set_perturbations` and dropout's RNG
  counter can update them inside ``jax.grad``). ``rest`` holds the frozen params, the
  perturbation slots and, with ``dropout > 0``, the dropout RNG counters (return
  ``nnx.state(model, nnx.RngState)`` as an aux output of the loss, or the same mask repeats
  every step).
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
