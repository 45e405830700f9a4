"""The registry of methods is the one source for the CLI, the benchmarks and the docs."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import optax
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # the repo root

from benchmarks import double_descent, overhead, quality  # noqa: E402
from mgpo_jax import cli  # noqa: E402
from mgpo_jax.finetune import job  # noqa: E402
from mgpo_jax.finetune.config import OPTIMIZERS, FinetuneConfig  # noqa: E402
from mgpo_jax.methods import METHODS, method_table  # noqa: E402

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs" / "methods.md"


def test_docs_table_is_the_registrys():
  assert method_table() in DOCS.read_text()


def test_cli_and_benchmarks_read_the_registry(capsys):
  assert OPTIMIZERS == tuple(METHODS)
  assert overhead.OPTIMIZERS == tuple(METHODS)
  for variants in (quality.METHODS, double_descent.METHODS):
    assert all(v["optimizer"] in METHODS for v in variants.values())
  assert cli.main(["finetune", "--help"]) == 0
  help_text = " ".join(capsys.readouterr().out.split())
  for name, method in METHODS.items():
    assert name in help_text
    for hyper in method.hyper.values():
      assert hyper.help in help_text


def test_unset_hyper_parameters_take_each_methods_default():
  config = FinetuneConfig()
  assert config.rho is None
  assert METHODS["mgpo"].resolve({"rho": None, "sign": 1.0}) == {
      "rho": 0.05, "sign": 1.0, "rho_schedule": "constant"}
  assert METHODS["sam"].resolve({"rho": None}) == {"rho": 0.003}


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_builds_and_takes_a_finite_step(name):
  config = FinetuneConfig(optimizer=name, steps=10, lr=1e-2)
  tx = job.build_optimizer(config)
  params = {"w": jax.random.normal(jax.random.key(0), (4,))}
  loss = lambda p: jnp.sum((p["w"] - 1.0) ** 2)  # noqa: E731
  state, new = tx.init(params), params
  for _ in range(3):  # the warm-up's first learning rate is 0
    updates, state = tx.update(jax.grad(loss)(new), state, new,
                               grad_fn=lambda p, _: jax.grad(loss)(p))
    new = optax.apply_updates(new, updates)
  assert jnp.all(jnp.isfinite(new["w"])) and loss(new) < loss(params)
