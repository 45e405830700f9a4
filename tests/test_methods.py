"""The registry of methods is the one source for the CLI, the benchmarks and the docs."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import optax
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # the repo root

from benchmarks import overhead, quality, study  # noqa: E402
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
  for variants in (quality.METHODS, study.variants()[0]):
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


def test_lora_one_is_the_init_and_the_preconditioner():
  method = METHODS["lora-one"]
  assert method.lora_init == "lora-one" and method.precondition and method.use_rslora
  assert FinetuneConfig().parse_compare("adamw,lora-one") == ("adamw", "lora-one")


@pytest.mark.parametrize("fraction, steps, first_lr", [
    (0.0, 10, 1e-2),  # no warm-up: the first step at the full rate
    (0.03, 10, 0.0),  # 0.3 warm-up steps round up to one, whose rate is 0
    (0.5, 10, 0.0), (0.5, 1, 1e-2)])  # --steps 1: no room for a warm-up step
def test_the_warm_up_starts_where_the_fraction_says(fraction, steps, first_lr):
  tx = job.build_optimizer(FinetuneConfig(optimizer="adamw", steps=steps, lr=1e-2,
                                          warmup_fraction=fraction, weight_decay=0.0))
  params = {"w": jnp.ones(3)}
  updates, _ = tx.update({"w": jnp.full(3, 0.5)}, tx.init(params), params)
  assert jnp.allclose(updates["w"], -first_lr, rtol=1e-4, atol=0)  # Adam's first step: -lr


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_builds_and_takes_a_finite_step(name):
  config = FinetuneConfig(optimizer=name, steps=10, lr=1e-2)
  tx = job.build_optimizer(config)
  key_w, key_a, key_b = jax.random.split(jax.random.key(0), 3)
  params = {"w": jax.random.normal(key_w, (4,)),  # a head, and one LoRA module
            "q": {"lora_a": jax.random.normal(key_a, (4, 2)),
                  "lora_b": jax.random.normal(key_b, (2, 3))}}
  target = jnp.arange(12.0).reshape(4, 3) / 10
  loss = lambda p: (jnp.sum((p["w"] - 1.0) ** 2)  # noqa: E731
                    + jnp.sum((p["q"]["lora_a"] @ p["q"]["lora_b"] - target) ** 2))
  state, new = tx.init(params), params
  for _ in range(3):  # the warm-up's first learning rate is 0
    updates, state = tx.update(jax.grad(loss)(new), state, new,
                               grad_fn=lambda p, _: jax.grad(loss)(p))
    new = optax.apply_updates(new, updates)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(new))
  assert loss(new) < loss(params)
