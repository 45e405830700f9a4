"""``LoraConfig`` and PEFT's rule for which modules it targets.

Matching mirrors PEFT (``peft.tuners.tuners_utils.check_target_module_exists``), so a config
selects the same modules in mgpo-jax as on the PyTorch model:

* a **sequence of names** matches a module whose dotted path equals a name or ends with
  ``"." + name``; names are literal and may contain dots (``"attention.self.query"``);
* a **single string** is a regular expression that must ``re.fullmatch`` the whole path;
* the string ``"all-linear"`` (any case) is every linear module except a root-level output
  head (``lm_head``, ``classifier``, ``score``);
* a module equal to, or inside, a ``modules_to_save`` module is never a target (it is
  trained in full instead), whatever the pattern.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from mgpo_jax.lora.init import INITS

__all__ = ["LoraConfig", "ALL_LINEAR", "matches_name"]

ALL_LINEAR = "all-linear"
# Root-level output heads that "all-linear" leaves out, as PEFT does (the output embedding of
# a causal LM, and PEFT's SEQ_CLS_HEAD_NAMES for classifiers).
_HEAD_NAMES = ("lm_head", "classifier", "score")


def matches_name(path: str, name: str) -> bool:
  """PEFT's name rule: the dotted ``path`` equals ``name`` or ends with ``"." + name``.

  >>> matches_name("bert.encoder.layer.0.attention.self.query", "attention.self.query")
  True
  >>> matches_name("bert.encoder.layer.0.attention.self.query", "self.q")
  False
  """
  return path == name or path.endswith("." + name)


def _inside(path: str, name: str) -> bool:
  """``path`` is, or lies under, a module that :func:`matches_name` ``name``."""
  parts = path.split(".")
  return any(matches_name(".".join(parts[:i]), name) for i in range(1, len(parts) + 1))


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
  """LoRA hyper-parameters, with PEFT's names and meaning.

  Args:
   target_modules: which linear modules get adapters (see :meth:`is_target`). A sequence
    of names: a module matches if its dotted path (e.g.
    ``bert.encoder.layer.0.attention.self.query``) equals a name or ends with
    ``"." + name`` (``"query"``, ``"attention.self.query"``). A single string: a regular
    expression that must ``re.fullmatch`` the path (PEFT's rule; pass ``["name"]``, not
    ``"name"``, to match by name). ``"all-linear"``: every linear module except a
    root-level output head (``lm_head``, ``classifier``, ``score``), as in PEFT.
   r: adapter rank (> 0, and at most ``min(in, out)`` of every matched module).
   alpha: scaling numerator; ``s = alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA).
   dropout: dropout rate on the adapter input, in ``[0, 1)``. The dropout layers start in
    eval mode (as the shipped models' do): call ``model.train()`` to turn them on.
   use_rslora: use ``s = alpha / sqrt(r)`` (Kalajdzievski 2023) instead of ``alpha / r``.
   init: how ``A, B`` start, one of :data:`~mgpo_jax.lora.init.INITS` (see
    :func:`~mgpo_jax.lora.init.init_factors`): ``"default"`` (PEFT's Kaiming-uniform
    ``A``, ``B = 0``), ``"gaussian"`` (``A ~ N(0, 1/r²)``, ``B = 0``), ``"pissa"``
    (top-r SVD of ``W``, which is replaced by the residual) or ``"lora-one"`` (top-r SVD of
    the negative full gradient of ``W``; made by :func:`~mgpo_jax.lora.apply_lora_one`,
    which computes that gradient, and trained best with ``use_rslora=True``).
   modules_to_save: names (matched like ``target_modules`` names) of modules trained in
    full, e.g. ``("classifier",)``: their parameters become ``nnx.LoRAParam``, and no
    module in or under them gets an adapter.

  >>> config = LoraConfig(target_modules=["attention.self.query", "value"], r=4, alpha=8)
  >>> config.scaling
  2.0
  >>> config.is_target("bert.encoder.layer.0.attention.self.query")
  True
  >>> LoraConfig(target_modules="attention.self.query").is_target(
  ...   "bert.encoder.layer.0.attention.self.query")  # one string: a regex, fullmatched
  False
  >>> LoraConfig(target_modules=".*", modules_to_save=["classifier"]).is_target("classifier")
  False
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

  def is_target(self, path: str) -> bool:
    """Whether the linear module at dotted ``path`` gets an adapter (PEFT's rule)."""
    if any(_inside(path, name) for name in self.modules_to_save):
      return False
    targets = self.target_modules
    if targets == ALL_LINEAR:
      return path not in _HEAD_NAMES
    if isinstance(targets, str):
      return re.fullmatch(targets, path) is not None
    return any(matches_name(path, name) for name in targets)

  def is_saved(self, path: str) -> bool:
    """Whether the module at dotted ``path`` is one of ``modules_to_save``."""
    return any(matches_name(path, name) for name in self.modules_to_save)


def _check_names(param: str, names: Any, allow_empty: bool) -> tuple[str, ...]:
  if isinstance(names, str) or not isinstance(names, Sequence):
    raise ValueError(f"{param} must be a sequence of module names, got {names!r}")
  names = tuple(names)
  if (not names and not allow_empty) or not all(isinstance(n, str) and n for n in names):
    raise ValueError(f"{param} must be a non-empty sequence of non-empty strings, got {names!r}")
  return names


def _check_targets(targets: Any) -> str | tuple[str, ...]:
  if isinstance(targets, str):
    if targets.lower() == ALL_LINEAR:
      return ALL_LINEAR
    try:
      re.compile(targets)
    except re.error as e:
      raise ValueError(
        f"target_modules: {targets!r} is neither {ALL_LINEAR!r} nor a valid regular "
        f"expression ({e}); pass a list of names to match by name"
      ) from None
    return targets
  return _check_names("target_modules (a regex str, 'all-linear' or names)", targets, False)
