"""Configuration of the fine-tune job, validated without importing JAX.

Kept apart from :mod:`mgpo_jax.finetune` so that the command line can check its flags (and ask
XLA for fake CPU devices) before JAX is first imported.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

OPTIMIZERS = ("adamw", "mgpo", "sam")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """Everything that defines one fine-tune run; saved as ``config.json`` in the run directory.

  Defaults: MiniLM (all-MiniLM-L6-v2) + Rotten Tomatoes, LoRA r=8, alpha=16 on query and
  value, the classifier head trained in full (PEFT's ``modules_to_save``), AdamW-based
  optimizers with 3% linear warmup and cosine decay (the papers' schedule).
  """

  optimizer: str = "mgpo"
  rank: int = 8
  alpha: float = 16.0
  target_modules: tuple[str, ...] | str = ("query", "value")
  lr: float = 1e-3
  weight_decay: float = 0.0
  warmup_fraction: float = 0.03
  rho: float | None = None  # None: the method's default (mgpo 0.05, sam 0.003)
  sign: float = 1.0
  batch_size: int = 16
  seq_len: int = 48  # covers 95% of the snippets' MiniLM token counts
  steps: int = 300
  eval_every: int = 100
  save_every: int = 200
  keep: int = 2
  seed: int = 0
  devices: int = 1
  pooling: str = "mean"
  run_dir: str = "runs/finetune"

  def validate(self) -> None:
    """Raises ``ValueError`` naming the first bad field and the values it accepts."""
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}")
    _positive_int("--rank", self.rank)
    _positive("--alpha", self.alpha)
    _positive("--lr", self.lr)
    if self.rho is not None and not (math.isfinite(self.rho) and self.rho >= 0):
      raise ValueError(f"--rho must be a finite number >= 0; got {self.rho}")
    if self.sign not in (-1.0, 1.0):
      raise ValueError(f"--sign must be +1 or -1; got {self.sign}")
    for name in ("batch_size", "seq_len", "steps", "eval_every", "save_every", "keep",
                 "devices"):
      _positive_int("--" + name.replace("_", "-"), getattr(self, name))
    if self.seq_len < 8:
      raise ValueError(f"--seq-len must be >= 8; got {self.seq_len}")
    if self.batch_size % self.devices:
      raise ValueError(
          f"--batch-size ({self.batch_size}) must be divisible by --devices ({self.devices})")
    if not 0 <= self.warmup_fraction < 1:
      raise ValueError(f"warmup_fraction must be in [0, 1); got {self.warmup_fraction}")
    if self.pooling not in ("mean", "cls"):
      raise ValueError(f"pooling must be 'mean' or 'cls'; got {self.pooling!r}")
    if not self.target_modules:
      raise ValueError("--target-modules must name at least one module, a regex, or all-linear")

  def parse_compare(self, text: str | None) -> tuple[str, ...]:
    """Parses ``--compare adamw,mgpo,...`` into optimizer names (empty: no comparison)."""
    if not text:
      return ()
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in OPTIMIZERS]
    if bad or len(set(names)) != len(names) or len(names) < 2:
      raise ValueError(
          f"--compare takes two or more distinct names from {', '.join(OPTIMIZERS)}; "
          f"got {text!r}")
    return names

  def replace(self, **changes: Any) -> "FinetuneConfig":
    return dataclasses.replace(self, **changes)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> "FinetuneConfig":
    values = json.loads(text)
    if isinstance(values.get("target_modules"), list):
      values["target_modules"] = tuple(values["target_modules"])
    return cls(**values)


def _positive_int(name: str, value: Any) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ValueError(f"{name} must be a positive integer; got {value!r}")


def _positive(name: str, value: Any) -> None:
  if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
    raise ValueError(f"{name} must be a number > 0; got {value!r}")
