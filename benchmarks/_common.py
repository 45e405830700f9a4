"""Shared pieces of the benchmark scripts: machine description, a tiny BERT for ``--quick``
runs, the Hessian sharpness of a trained state, and small statistics helpers."""

from __future__ import annotations

import contextlib
import os
import pathlib
import platform
import shlex
import sys
from importlib import metadata
from typing import Any

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
DOCS = REPO / "docs"
_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "transformers")


def enable_compilation_cache(path: str | os.PathLike = "/tmp/mgpo_jax_xla_cache") -> None:
  """Re-uses compiled train steps across the runs of one benchmark (same HLO, same program)."""
  import jax

  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def machine_info(script: str, argv: list[str] | None) -> dict[str, Any]:
  """CPU model, core count, JAX backend and devices, library versions and the command that
  runs ``benchmarks/<script>`` with ``argv`` (default ``sys.argv[1:]``)."""
  import jax

  cpu = platform.processor() or "unknown"
  with contextlib.suppress(OSError):
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  versions = {}
  for name in _PACKAGES:
    with contextlib.suppress(metadata.PackageNotFoundError):
      versions[name] = metadata.version(name)
  argv = sys.argv[1:] if argv is None else argv
  command = " ".join([".venv/bin/python", f"benchmarks/{script}", *map(shlex.quote, argv)])
  return {"cpu": cpu, "cores": os.cpu_count(), "backend": jax.default_backend(),
          "devices": [str(d) for d in jax.devices()], "python": platform.python_version(),
          "versions": versions, "command": command}


def print_machine(info: dict[str, Any]) -> None:
  print(f"machine: {info['cpu']}, {info['cores']} cores, JAX backend {info['backend']} "
        f"({len(info['devices'])} device(s))")
  print("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
  print(f"command: {info['command']}")


def tiny_bert_config():
  """A 2-layer, 32-wide random BERT (vocab 128): the model of the ``--quick`` runs."""
  from transformers import BertConfig

  return BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, vocab_size=128, max_position_embeddings=64)


def tiny_base_model(config):
  """A random BERT of :func:`tiny_bert_config` with a 2-way head: the ``base_model`` of the
  ``--quick`` runs (``finetune.run(..., base_model=tiny_base_model)``)."""
  from flax import nnx

  from mgpo_jax.models import BertForSequenceClassification

  return BertForSequenceClassification(
      tiny_bert_config(), num_labels=2, pooling=config.pooling,
      rngs=nnx.Rngs(params=config.seed, dropout=config.seed + 1))


def build_tiny_model(config):
  """:func:`mgpo_jax.finetune.build_model` on :func:`tiny_base_model`."""
  from mgpo_jax import finetune

  return finetune.build_model(config, tiny_base_model(config))


def random_data(num: dict[str, int], seq_len: int, vocab: int = 128,
                seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
  """Random token splits in the layout of :func:`mgpo_jax.finetune.load_data`; the label is a
  learnable function of the tokens (whether token 1 occurs more often than token 2)."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, n in num.items():
    ids = rng.integers(1, 4, size=(n, seq_len)).astype(np.int32)
    ids[:, 0] = 101 % vocab
    out[name] = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                 "token_type_ids": np.zeros_like(ids),
                 "labels": ((ids == 1).sum(1) > (ids == 2).sum(1)).astype(np.int32)}
  return out


def tree_nbytes(tree: Any) -> int:
  import jax

  return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))


def mean_std(values: list[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof = 1; 0 for a single value)."""
  a = np.asarray(values, dtype=np.float64)
  return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0
