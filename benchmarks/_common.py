"""Shared pieces of the benchmark scripts: machine description, a tiny BERT for ``--quick``
runs, the final state of a run, its predictions and Hessian sharpness, and small statistics
helpers (mean ± std, macro-F1, the paired t-interval)."""

from __future__ import annotations

import contextlib
import os
import pathlib
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from typing import Any

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
DOCS = REPO / "docs"
_PACKAGES = ("mgpo-jax", "jax", "jaxlib", "flax", "optax", "numpy", "transformers", "torch", "peft")


def enable_compilation_cache(path: str | os.PathLike = "/tmp/mgpo_jax_xla_cache") -> None:
  """Re-uses compiled train steps across the runs of one benchmark (same HLO, same program)."""
  import jax

  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def machine_info(script: str, argv: list[str] | None) -> dict[str, Any]:
  """CPU model, core count, the CPUs this process may run on (``taskset``), ``XLA_FLAGS``,
  JAX backend and devices, the default matmul precision (on GPUs JAX's "default" is TF32),
  library versions, the git commit of this checkout (``+dirty``
  with uncommitted changes outside benchmarks/results and docs; ``None`` outside git) and the
  command that runs ``benchmarks/<script>`` with ``argv`` (default ``sys.argv[1:]``)."""
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
  return {"cpu": cpu, "cores": os.cpu_count(), "cpu_affinity": sorted(os.sched_getaffinity(0)),
          "xla_flags": os.environ.get("XLA_FLAGS", ""), "backend": jax.default_backend(),
          "devices": [str(d) for d in jax.devices()],
          "matmul_precision": jax.config.jax_default_matmul_precision or "default",
          "python": platform.python_version(),
          "versions": versions, "commit": _git_commit(), "command": command}


def _git_commit() -> str | None:
  def git(*args):
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                          check=True, timeout=30).stdout.strip()
  try:
    dirty = git("status", "--porcelain", "-uno", "--", ".", ":!benchmarks/results", ":!docs")
    return git("rev-parse", "HEAD") + ("+dirty" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    return None


def cpu_seconds() -> float:
  """User + system CPU time of this process, all its threads (divided by a wall time: the
  number of cores it kept busy)."""
  import resource

  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def print_machine(info: dict[str, Any]) -> None:
  print(f"machine: {info['cpu']}, {info['cores']} cores, JAX backend {info['backend']} "
        f"({len(info['devices'])} device(s))")
  print("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
  print(f"devices: {', '.join(info['devices'])}; matmul precision "
        f"{info.get('matmul_precision', 'default')}; commit {info.get('commit')}")
  if "cpu_affinity" in info:
    print(f"CPUs usable: {info['cpu_affinity']}; XLA_FLAGS {info['xla_flags'] or '(unset)'}")
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


def save_curve_plot(fig, ax_loss, ax_acc, title: str, path: pathlib.Path, *,
                    acc_title: str = "validation accuracy", loss_title: str = "training loss",
                    legend_size: int = 8,
                    dpi: int = 80) -> None:
  """Labels the training-loss / validation-accuracy panels of a benchmark's curve figure and
  writes it to ``path``."""
  import matplotlib.pyplot as plt

  ax_loss.set(xlabel="step", ylabel="training loss (mean of 10 steps)", title=loss_title)
  ax_acc.set(xlabel="step", ylabel="accuracy", title=acc_title)
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=dpi)
  plt.close(fig)


def parse_settings(parser, values: list[str]) -> list[tuple[int, int]]:
  """``["16x64", ...]`` -> ``[(16, 64), ...]`` (batch x sequence length), or ``parser.error``."""
  try:
    settings = [tuple(int(v) for v in s.lower().split("x")) for s in values]
  except ValueError:
    parser.error(f"--settings takes BATCHxSEQ values such as 16x64; got {values}")
  if any(len(s) != 2 or min(s) < 1 for s in settings):
    parser.error(f"--settings takes BATCHxSEQ with positive sizes; got {values}")
  return settings


def write_text(path: pathlib.Path, text: str) -> None:
  """Writes ``text`` to ``path`` (creating the folder) through a draft named for this process,
  so an interrupted write never leaves a truncated file where a finished one is expected, and
  two processes writing the same file (two study processes started at once) never share one."""
  import os

  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(f".{os.getpid()}.tmp")
  tmp.write_text(text, encoding="utf-8")
  os.replace(tmp, path)


def write_json(path: pathlib.Path, results: Any) -> None:
  """Writes a benchmark's results as JSON, as :func:`write_text` does."""
  import json

  write_text(path, json.dumps(results, indent=1))


def check_same_config(path: pathlib.Path, stored: dict[str, Any], config: dict[str, Any]
                      ) -> None:
  """Exits with an error when the result in ``path``, about to be reused instead of run, was
  made with another config than ``config`` asks for. Compared: the fields both record, except
  where the run and its data files lived (``run_dir``, ``*_file``)."""
  differ = sorted(k for k in stored.keys() & config.keys()
                  if k != "run_dir" and not k.endswith("_file") and stored[k] != config[k])
  if differ:
    said = ", ".join(f"{k}={stored[k]!r} (now {config[k]!r})" for k in differ)
    raise SystemExit(f"mgpo-jax: error: {path} was made with {said}; pass the flags it was made "
                     "with, or another --results folder")


def tree_nbytes(tree: Any) -> int:
  import jax

  return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))


def trailing_mean(values, window: int) -> np.ndarray:
  """``out[k] = mean(values[max(0, k - window + 1) : k + 1])``: a moving average that uses
  only the past (the first points average what there is)."""
  x = np.asarray(values, dtype=np.float64)
  c = np.concatenate([[0.0], np.cumsum(x)])
  k = np.arange(1, x.size + 1)
  start = np.maximum(0, k - window)
  return (c[k] - c[start]) / (k - start)


def mean_std(values: list[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof = 1; 0 for a single value)."""
  a = np.asarray(values, dtype=np.float64)
  return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


# -- the final state of a fine-tune run: predictions and sharpness -----------------------------

HESSIAN_BATCH = 16  # validation examples of the Hessian's loss
HESSIAN_TOL = 1e-3  # relative change of the power-iteration estimate that counts as converged


def restore_final(config, base_model=None, num_labels: int = 2, data=None):
  """``(trainer, state)``: the Trainer of ``config``'s model and the state of the latest
  checkpoint in ``config.run_dir`` (a run of :func:`mgpo_jax.finetune.run`); ``data`` for a
  method whose init reads the training data (lora-one; the init is then overwritten)."""
  from mgpo_jax import finetune
  from mgpo_jax.train import Trainer
  from mgpo_jax.train.checkpoint import Checkpointer

  model, _ = finetune.build_model(config, base_model(config) if base_model else None,
                                  num_labels, data=data)
  trainer = Trainer(model, finetune.build_optimizer(config),
                    perturbation=finetune.build_perturbation(config))  # the saved layout
  with Checkpointer(pathlib.Path(config.run_dir) / "checkpoints") as ckpt:
    state, _ = ckpt.restore(trainer.abstract_state())
  return trainer, state


_JITTED: dict[Any, Any] = {}  # compiled once per process and model structure (graphdef)


def _predict_fn():
  if "predict" not in _JITTED:
    import jax
    from flax import nnx

    def predict(graphdef, params, rest, batch):
      model = nnx.merge(graphdef, params, rest, copy=True)
      model.eval()
      logits = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                     token_type_ids=batch["token_type_ids"])
      return jax.numpy.argmax(logits, axis=-1)

    _JITTED["predict"] = jax.jit(predict, static_argnums=0)
  return _JITTED["predict"]


def _eval_loss_fn(graphdef):
  """The eval-mode loss of the model ``graphdef``: one function object per structure, so
  :func:`mgpo_jax.analysis.top_hessian_eigenvalue` (jitted on it) compiles once per process."""
  key = ("loss", graphdef)
  if key not in _JITTED:
    from flax import nnx

    from mgpo_jax.train import classification_loss

    def loss_fn(params, rest, b):
      model = nnx.merge(graphdef, params, rest, copy=True)
      model.eval()
      return classification_loss(model, b)[0]

    _JITTED[key] = loss_fn
  return _JITTED[key]


def predictions(trainer, state, split: dict[str, np.ndarray], batch_size: int = 128) -> np.ndarray:
  """The argmax class of every example of ``split`` (eval mode, clean params), in order."""
  import jax

  from mgpo_jax.data import eval_batch_iterator
  from mgpo_jax.train import clean_params

  predict = _predict_fn()
  params = clean_params(state)
  arrays = {k: v for k, v in split.items() if k != "labels"}
  n = len(split["labels"])
  out = [predict(trainer.graphdef, params, trainer.rest, {k: b[k] for k in arrays})
         for b in eval_batch_iterator(arrays, split["labels"], min(batch_size, n))]
  return np.concatenate(jax.device_get(out))[:n]


def sharpness(trainer, state, split: dict[str, np.ndarray], *, iters: int = 20,
              batch: int = HESSIAN_BATCH, tol: float = HESSIAN_TOL) -> dict[str, Any]:
  """The largest Hessian eigenvalue of the eval-mode loss on the first ``batch`` examples of
  ``split``, w.r.t. the trainable params, at the clean params of ``state``.

  :func:`mgpo_jax.analysis.top_hessian_eigenvalue` (power iteration that stops once the estimate
  changes by at most ``tol``, relative, or after ``iters`` Hessian-vector products; ``iters``
  Lanczos steps when a negative eigenvalue dominates) is run with ``iters`` and again with
  ``2 * iters``: ``converged`` when the two agree within ``tol`` (relative). The power loop is
  deterministic: when it stopped on the tolerance within ``iters`` products, the two are
  equal."""
  import jax

  from mgpo_jax.analysis import top_hessian_eigenvalue
  from mgpo_jax.train import clean_params

  loss_fn = _eval_loss_fn(trainer.graphdef)
  b = {k: jax.numpy.asarray(v[:batch]) for k, v in split.items()}
  params = clean_params(state)
  values = [float(top_hessian_eigenvalue(loss_fn, params, trainer.rest, b, key=jax.random.key(0),
                                         num_iters=n, tol=tol)) for n in (iters, 2 * iters)]
  converged = abs(values[0] - values[1]) <= tol * abs(values[1])
  return {"value": values[0], "converged": converged, "max_iters": iters,
          "value_2x_iters": values[1], "tol": tol, "batch": len(b["labels"]), "key": 0}


# -- statistics ----------------------------------------------------------------------------------

def macro_f1(labels: np.ndarray, predicted: np.ndarray, num_classes: int | None = None) -> float:
  """The unweighted mean over classes of F1 = 2 TP / (2 TP + FP + FN): over the classes that
  occur in ``labels`` or ``predicted`` (scikit-learn's ``f1_score(average="macro")``), or over
  ``0 .. num_classes - 1`` when given (a class with no example and no prediction scores 0)."""
  labels, predicted = np.asarray(labels), np.asarray(predicted)
  classes = np.union1d(labels, predicted) if num_classes is None else np.arange(num_classes)
  scores = []
  for c in classes:
    tp = np.sum((predicted == c) & (labels == c))
    fp = np.sum((predicted == c) & (labels != c))
    fn = np.sum((predicted != c) & (labels == c))
    scores.append(2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else 0.0)
  return float(np.mean(scores))


# Two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom.
_T975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004,
         2.262157, 2.228139, 2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905,
         2.109816, 2.100922, 2.093024, 2.085963, 2.079614, 2.073873, 2.068658, 2.063899,
         2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272)


def t_quantile_975(df: int) -> float:
  """Student's t 0.975 quantile (a table up to 30 degrees of freedom, then the Cornish-Fisher
  expansion, within 1e-5 of the exact value there)."""
  if df < 1:
    raise ValueError(f"degrees of freedom must be >= 1; got {df}")
  if df <= len(_T975):
    return _T975[df - 1]
  z = 1.959963985
  return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
          + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def paired_t_interval(a: list[float], b: list[float]) -> dict[str, Any]:
  """The mean of the paired differences ``a_i - b_i`` and its 95% t-interval,
  ``mean ± t_{0.975, n-1} · sd / sqrt(n)`` (sd with ddof = 1); ``established`` when the
  interval excludes 0; ``positive`` / ``negative``: how many differences are above / below 0.
  With one pair the interval is undefined (``None``)."""
  d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
  if d.ndim != 1 or d.size == 0:
    raise ValueError("paired_t_interval needs two equally long, non-empty lists")
  mean, signs = float(d.mean()), {"positive": int((d > 0).sum()), "negative": int((d < 0).sum())}
  if d.size < 2:
    return {"n": 1, "mean": mean, "sd": None, "low": None, "high": None, "established": False,
            **signs}
  sd = float(d.std(ddof=1))
  half = t_quantile_975(d.size - 1) * sd / np.sqrt(d.size)
  low, high = mean - half, mean + half
  return {"n": int(d.size), "mean": mean, "sd": sd, "low": float(low), "high": float(high),
          "established": bool(low > 0 or high < 0), **signs}
