"""The registry of methods: the one place where a method's name maps to how it is built.

Each :class:`Method` names its optax transform builder, optionally a weight-perturbation builder
(:mod:`mgpo_jax.perturbation`), and its own hyper-parameters, each with its default and the
source of that default. The command line's ``--optimizer`` and
``--compare`` choices, their help text, the benchmarks and the method table in ``docs/``
read this registry. Adding a method is one module (e.g. ``mgpo_jax/optim/<method>.py``) and
one entry here.

Importing this module does not import JAX: the builders import what they need when called.

Examples:
  >>> sorted(METHODS)
  ['adamw', 'flat-lora', 'ggpo', 'lora-one', 'mgpo', 'mgpo-code', 'sam']
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
    perturbation: ``None``, or ``perturbation(steps=, **hyper) -> WeightPerturbation``
      (``steps``: the run's number of optimizer steps), passed to ``Trainer(...,
      perturbation=...)``.
  """

  name: str
  summary: str
  reference: str
  hyper: Mapping[str, Hyper]
  optimizer: Callable[..., Any]
  lora_init: str | None = None
  precondition: bool = False
  use_rslora: bool = False
  perturbation: Callable[..., Any] | None = None

  def resolve(self, given: Mapping[str, Any]) -> dict[str, Any]:
    """The method's hyper-parameter values: ``given`` where not ``None``, else defaults."""
    return {k: given[k] if given.get(k) is not None else h.default for k, h in self.hyper.items()}


def _adamw(base, *, schedule, lr, **hyper):
  del schedule, lr, hyper  # the hyper-parameters of a weight perturbation, if any
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


def _flat_lora(*, steps, sigma):
  from mgpo_jax.perturbation import flat_lora

  return flat_lora(sigma, total_steps=steps)


def _ggpo(*, steps, sigma, beta):
  from mgpo_jax.perturbation import ggpo

  del steps  # the reconstruction's sigma is constant
  return ggpo(sigma, beta)


def _mgpo_code(*, steps, rho):
  from mgpo_jax.perturbation import mgpo_code

  del steps
  return mgpo_code(rho)


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
    Method("mgpo-code", "LoRA-MGPO as the authors released it: each LoRA kernel moved against "
                        "its momentum image s(m_A B + A m_B), sized per module by an EMA of "
                        "gradient norms (low rank, one gradient per step)",
           "Chang et al., LoRA-MGPO, EMNLP 2025 Findings (arXiv 2502.14538), released code",
           {"rho": Hyper(0.05, "MGPO paper, NLU setting (T5-base on GLUE)",
                         "perturbation radius")},
           _adamw, perturbation=_mgpo_code),
    Method("flat-lora", "Flat-LoRA: filter-wise Gaussian noise on each LoRA kernel, scaled by "
                        "its column norms, ramped in along a cosine (one gradient per step)",
           "Li et al., Flat-LoRA, ICML 2025 (arXiv 2409.14396)",
           {"sigma": Hyper(0.05, "Flat-LoRA paper (T5-base on GLUE, LLaMA-2-7B)",
                           "weight-noise level")},
           _adamw, perturbation=_flat_lora),
    Method("ggpo", "LoRA-GGPO (reconstructed): Flat-LoRA's noise widened by the previous "
                   "gradient's column norms (one gradient per step)",
           "Chang et al., LoRA-GGPO (arXiv 2502.14538 v1); reconstruction, see "
           "docs/weight_perturbation.md",
           {"sigma": Hyper(0.03, "the GGPO reconstruction (docs/weight_perturbation.md)",
                           "weight-noise level"),
            "beta": Hyper(0.01, "the GGPO reconstruction (docs/weight_perturbation.md)",
                          "weight of the gradient-norm term in the noise variance")},
           _adamw, perturbation=_ggpo),
)}


def method_table() -> str:
  """The methods and their defaults as a Markdown table (as in ``docs/methods.md``)."""
  rows = ["| method | what it does | hyper-parameters (default: source) | reference |",
          "|---|---|---|---|"]
  for m in METHODS.values():
    hyper = "; ".join(f"`{k}` = {h.default!r}: {h.source}" for k, h in m.hyper.items()) or "—"
    rows.append(f"| `{m.name}` | {m.summary} | {hyper} | {m.reference} |")
  return "\n".join(rows)
