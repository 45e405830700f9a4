"""`import mgpo_jax` is cheap and the command line answers --help without JAX."""

import subprocess
import sys
import time

HEAVY = ("jax", "flax", "optax", "transformers", "torch", "orbax", "matplotlib", "tqdm")


def _imported(code: str) -> list[str]:
  probe = f"import sys; {code}; print(sorted({{m.split('.')[0] for m in sys.modules}}))"
  out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
  return [m for m in HEAVY if f"'{m}'" in out.stdout]


def test_import_mgpo_jax_imports_nothing_heavy():
  assert _imported("import mgpo_jax") == []
  assert _imported("import mgpo_jax.cli, mgpo_jax.methods, mgpo_jax.finetune") == []
  assert "jax" in _imported("import mgpo_jax; mgpo_jax.mgpo")  # names load on first use
  assert "orbax" not in _imported("import mgpo_jax; mgpo_jax.Trainer")


def test_public_names_resolve():
  import mgpo_jax

  for name in mgpo_jax.__all__:
    assert getattr(mgpo_jax, name) is not None, name
  import mgpo_jax.lora

  # docs/lora.md: every public name of mgpo_jax.lora is importable from mgpo_jax too
  assert set(mgpo_jax.lora.__all__) <= set(mgpo_jax.__all__)


def test_cli_help_is_fast():
  """Best of three: under a second, with no JAX import."""
  best = float("inf")
  for _ in range(3):
    t0 = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "mgpo_jax.cli", "finetune", "--help"],
                            capture_output=True, text=True)
    best = min(best, time.perf_counter() - t0)
    assert result.returncode == 0 and "--optimizer" in result.stdout
  assert best < 1.0, best
  assert _imported("from mgpo_jax import cli; cli._parser()") == []
