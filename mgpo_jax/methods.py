"""The registry of methods: the one place where a method's name maps to how it is built.

Each :class:`Method` names its optax transform builder and its own hyper-parameters, each with
its default and the source of that default. The command line's ``--optimizer`` and
``--compare`` choices, their help text, the benchmarks and the method table in ``docs/``
read this registry. Adding a method is one module (e.g. ``mgpo_jax/optim/<method>.py``) and
one entry here.

Importing this module does not import JAX: the builders import what they need when called.

Examples:
  >>> sorted(METHODS)
  ['adamw', 'lora-one', 'mgpo', 'sam']
  >>> METHODS["mgpo"].hyper["rho"].default
  0.05
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class Hyper:
  """A method's hyper-parameter: its default, where the default comes from, what it does."""

  default: Any
  source: str
  help: str
  choices: tuple[Any, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Method:
  """How a method is built.

  Attributes:
    name: the name users type (``--optimizer NAME``).
    summary: one line for help texts and tables.
    reference: the method's paper.
    hyper: the method's own hyper-parameters (config fields of the same names).
    optimizer: ``optimizer(base, schedule=, lr=, **hyper) -> optax transform``, where
      ``base`` is the AdamW (with the learning-rate ``schedule`` peaking at ``lr``) that every
      method wraps.
    lora_init: the adapter init the method needs (a ``LoraConfig.init`` name), or ``None``
      for the user's ``--init``. The job runs the init's gradient-estimation phase on the
      first training batches when the init needs one (``"lora-one"``).
    precondition: the method puts LoRA-One's r×r preconditioner before Adam
      (``optax.chain(precondition_lora(), base)``), as ``--precondition`` does for any method.
    use_rslora: the method trains with rsLoRA's scaling ``alpha / sqrt(r)``.
  """

  name: str
  summary: str
  reference: str
  hyper: Mapping[str, Hyper]
  optimizer: Callable[..., Any]
  lora_init: str | None = None
  precondition: bool = False
  use_rslora: bool = False

  def resolve(self, given: Mapping[str, Any]) -> dict[str, Any]:
    """The method's hyper-parameter values: ``given`` where not ``None``, else defaults."""
    return {k: given[k] if given.get(k) is not None else h.default for k, h in self.hyper.items()}


def _adamw(base, *, schedule, lr):
  del schedule, lr
  return base


def _mgpo(base, *, schedule, lr, rho, sign, rho_schedule):
  from mgpo_jax.optim import follow_schedule, mgpo

  if rho_schedule == "follow-lr":
    rho = follow_schedule(schedule, rho, lr)
  return mgpo(base, rho=rho, sign=sign)


def _sam(base, *, schedule, lr, rho):
  del schedule, lr
  import optax

  adversary = optax.chain(optax.contrib.normalize(), optax.sgd(rho))
  return optax.contrib.sam(base, adversary, sync_period=2, opaque_mode=True)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("adamw", "plain LoRA: AdamW on the adapters",
           "Hu et al., LoRA, ICLR 2022 (arXiv 2106.09685)", {}, _adamw),
    Method("mgpo", "LoRA-MGPO: gradient at a point moved along Adam's momentum, sized by an "
                   "EMA of gradient norms (one gradient per step)",
           "Chang et al., LoRA-MGPO, EMNLP 2025 Findings (arXiv 2502.14538)",
           {"rho": Hyper(0.05, "MGPO paper, NLU setting (T5-base on GLUE)",
                         "perturbation radius"),
            "sign": Hyper(-1.0, "the authors' released code (as Momentum-SAM); the paper "
                                "writes +1, which stops short of the minimum at convergence "
                                "(docs/mgpo.md)", "direction along the momentum",
                          choices=(1.0, -1.0)),
            "rho_schedule": Hyper("constant", "MGPO paper (constant rho)",
                                  "constant, or follow-lr: rho scaled like the learning rate",
                                  choices=("constant", "follow-lr"))},
           _mgpo),
    Method("sam", "SAM: a second gradient at the normalised-gradient ascent point "
                  "(optax.contrib.sam, two gradients per step)",
           "Foret et al., SAM, ICLR 2021 (arXiv 2010.01412)",
           {"rho": Hyper(0.003, "Flat-LoRA's best SAM radius on the adapters (arXiv 2409.14396)",
                         "perturbation radius")},
           _sam),
    Method("lora-one", "LoRA-One: adapters start on the top-r singular subspace of the full "
                       "gradient of the first 8 training examples (rsLoRA scaling), then AdamW "
                       "on r×r preconditioned gradients (docs/lora_one.md)",
           "Zhang et al., LoRA-One, ICML 2025 (arXiv 2502.01235)", {}, _adamw,
           lora_init="lora-one", precondition=True, use_rslora=True),
)}


def method_table() -> str:
  """The methods and their defaults as a Markdown table (as in ``docs/methods.md``)."""
  rows = ["| method | what it does | hyper-parameters (default: source) | reference |",
          "|---|---|---|---|"]
  for m in METHODS.values():
    hyper = "; ".join(f"`{k}` = {h.default!r}: {h.source}" for k, h in m.hyper.items()) or "—"
    rows.append(f"| `{m.name}` | {m.summary} | {hyper} | {m.reference} |")
  return "\n".join(rows)
