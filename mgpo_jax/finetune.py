"""The fine-tune job behind ``mgpo-jax finetune``: MiniLM + LoRA on Rotten Tomatoes.

:func:`run` trains one configuration into a run directory::

    run_dir/
      config.json              the resolved FinetuneConfig
      metrics.jsonl            one JSON object per log / eval event
      checkpoints/<step>/      orbax checkpoints (the last ``keep``)
      adapters/                PEFT layout: adapter_config.json + adapter_model.safetensors
      curves.png               training loss and validation accuracy
      summary.json             final validation and test accuracy

:func:`run_compare` runs several optimizers with the same seed and data into
``run_dir/<optimizer>/`` and overlays their curves in ``run_dir/compare.png``. The benchmarks
call the same functions.
"""

from __future__ import annotations

import json
import operator
import os
import pathlib
import shutil
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from mgpo_jax.checkpoint import CheckpointError, Checkpointer
from mgpo_jax.data import (DataUnavailableError, batch_iterator, eval_batch_iterator,
                           load_rotten_tomatoes, minilm_path, tokenize)
from mgpo_jax.finetune_config import FinetuneConfig
from mgpo_jax.lora import LoraConfig, apply_lora
from mgpo_jax.models import BertForSequenceClassification
from mgpo_jax.peft_io import save_adapters
from mgpo_jax.train import Trainer, TrainState, clean_params, make_mesh
from mgpo_jax.transform import mgpo

DEFAULT_RHO = {"mgpo": 0.05, "sam": 0.003}  # MGPO paper (NLU); Flat-LoRA's best SAM rho on A, B
LOG_EVERY = 10
EVAL_BATCH_SIZE = 128
_SPLIT_SEED = 0  # the data split is fixed, whatever the training seed


class UserError(Exception):
  """A problem with the user's input or files, reported as one line without a traceback."""


def build_optimizer(config: FinetuneConfig) -> optax.GradientTransformation:
  """AdamW with 3% linear warm-up and cosine decay, wrapped by MGPO or SAM as configured."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.lr, warmup_steps=max(1, round(config.warmup_fraction * config.steps)),
      decay_steps=config.steps)
  adamw = optax.adamw(schedule, weight_decay=config.weight_decay)
  rho = DEFAULT_RHO.get(config.optimizer) if config.rho is None else config.rho
  if config.optimizer == "mgpo":
    return mgpo(adamw, rho=rho, sign=config.sign)
  if config.optimizer == "sam":
    adversary = optax.chain(optax.contrib.normalize(), optax.sgd(rho))
    return optax.contrib.sam(adamw, adversary, sync_period=2, opaque_mode=True)
  return adamw


def build_model(config: FinetuneConfig,
                base: nnx.Module | None = None) -> tuple[nnx.Module, LoraConfig]:
  """LoRA on ``config.target_modules`` of ``base`` (default: MiniLM with a fresh 2-way head,
  pooling ``config.pooling``); the head is trained in full (PEFT's ``modules_to_save``)."""
  model = base or BertForSequenceClassification.from_pretrained(
      minilm_path(), num_labels=2, pooling=config.pooling,
      rngs=nnx.Rngs(params=config.seed, dropout=config.seed + 1))
  lora = LoraConfig(target_modules=config.target_modules, r=config.rank, alpha=config.alpha,
                    modules_to_save=("classifier",))
  apply_lora(model, lora, rngs=nnx.Rngs(params=config.seed + 2, dropout=config.seed + 3))
  return model, lora


def load_data(seq_len: int) -> dict[str, dict[str, np.ndarray]]:
  """Tokenised train / validation / test splits: ``{split: {input_ids, ..., labels}}``."""
  from transformers import AutoTokenizer

  tokenizer = AutoTokenizer.from_pretrained(minilm_path())
  splits = load_rotten_tomatoes(seed=_SPLIT_SEED)
  return {name: {**tokenize(s.texts, tokenizer, seq_len), "labels": s.labels}
          for name, s in splits.items()}


def evaluate(trainer: Trainer, state: TrainState, split: dict[str, np.ndarray],
             batch_size: int | None = None) -> dict[str, float]:
  """Exact mean loss and accuracy over every example of ``split`` (clean params, no dropout).

  ``batch_size`` defaults to about 128, rounded up to a multiple of the device count.
  """
  n = trainer.num_devices
  batch_size = batch_size or -(-EVAL_BATCH_SIZE // n) * n
  arrays = {k: v for k, v in split.items() if k != "labels"}
  totals = None
  for batch in eval_batch_iterator(arrays, split["labels"], batch_size):
    m = trainer.eval_step(state, trainer.shard_batch(batch))
    totals = m if totals is None else jax.tree.map(operator.add, totals, m)  # stays async
  totals = jax.device_get(totals)
  return {"loss": float(totals["loss_sum"] / totals["count"]),
          "accuracy": float(totals["correct"] / totals["count"])}


def run(config: FinetuneConfig, *, resume: bool = False, overwrite: bool = False,
        progress: bool = True, data: dict | None = None) -> dict[str, Any]:
  """Trains ``config`` into ``config.run_dir``; returns the summary (also ``summary.json``).

  Args:
    config: the run's configuration (validated here).
    resume: continue the run saved in ``run_dir`` from its latest checkpoint (the saved
      configuration is used; the result is bit-identical to an uninterrupted run).
    overwrite: replace a previous run in ``run_dir``.
    progress: show a progress bar.
    data: pre-tokenised splits from :func:`load_data` (to share them between runs).

  Raises:
    UserError: bad configuration, a run directory that holds something else, a corrupt
      checkpoint, missing data or model packages.
  """
  try:
    config.validate()
    run_dir = pathlib.Path(config.run_dir)
    config = _checked_config(run_dir, config, resume=resume, overwrite=overwrite)
    return _train(config, run_dir, fresh=not resume, progress=progress, data=data)
  except (ValueError, CheckpointError, DataUnavailableError, FileNotFoundError) as err:
    raise UserError(" ".join(str(err).split())) from err


def run_compare(config: FinetuneConfig, optimizers: Sequence[str], *, resume: bool = False,
                overwrite: bool = False, progress: bool = True) -> dict[str, dict[str, Any]]:
  """Runs each optimizer with the same seed and data into ``run_dir/<optimizer>``; writes
  ``compare.png`` and ``summary.json`` in ``run_dir`` and prints a summary table."""
  root = pathlib.Path(config.run_dir)
  try:
    _prepare_parent(root, overwrite=overwrite, resume=resume)
    data = load_data(config.seq_len)
  except (ValueError, DataUnavailableError, FileNotFoundError) as err:
    raise UserError(" ".join(str(err).split())) from err
  summaries = {}
  for name in optimizers:
    sub = config.replace(optimizer=name, run_dir=str(root / name))
    summaries[name] = run(sub, resume=resume and (root / name / "config.json").exists(),
                          progress=progress, data=data)
  metrics = {name: read_metrics(root / name / "metrics.jsonl") for name in optimizers}
  plot_curves(metrics, root / "compare.png", title=f"LoRA r={config.rank}: " + ", ".join(optimizers))
  (root / "summary.json").write_text(json.dumps(summaries, indent=2))
  print(summary_table(summaries))
  return summaries


def _prepare_parent(root: pathlib.Path, *, overwrite: bool, resume: bool) -> None:
  if not resume and _check_replaceable(root, overwrite):
    shutil.rmtree(root)
  root.mkdir(parents=True, exist_ok=True)


def _check_replaceable(run_dir: pathlib.Path, overwrite: bool) -> bool:
  """Whether ``run_dir`` holds a previous run to replace; raises if it holds anything that
  may not be replaced."""
  if not (run_dir.exists() and any(run_dir.iterdir())):
    return False
  if not overwrite:
    raise ValueError(f"run directory {run_dir} is not empty; pass --resume to continue it or "
                     "--overwrite to replace it")
  if not _looks_like_run(run_dir):
    raise ValueError(f"--overwrite: {run_dir} does not look like an mgpo-jax run directory; "
                     "not deleting it")
  return True


def _checked_config(run_dir: pathlib.Path, config: FinetuneConfig, *, resume: bool,
                    overwrite: bool) -> FinetuneConfig:
  """Checks (writing nothing) that ``run_dir`` may be used; returns the config to run (the
  saved one on resume)."""
  config_file = run_dir / "config.json"
  if resume:
    if not config_file.exists():
      raise ValueError(f"--resume: {run_dir} holds no run (no config.json)")
    try:
      saved = FinetuneConfig.from_json(config_file.read_text())
    except (ValueError, TypeError) as err:
      raise ValueError(f"--resume: {config_file} is not a valid run config ({err})") from err
    return saved.replace(run_dir=str(run_dir))
  _check_replaceable(run_dir, overwrite)
  return config


def _start_run_dir(run_dir: pathlib.Path, config: FinetuneConfig) -> None:
  """Replaces a previous run (checked by :func:`_checked_config`) and writes the config."""
  if run_dir.exists() and any(run_dir.iterdir()):
    shutil.rmtree(run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  _write_atomic(run_dir / "config.json", config.to_json())


def _looks_like_run(path: pathlib.Path) -> bool:
  """Whether ``path`` was written by :func:`run` or :func:`run_compare`."""
  markers = ("config.json", "summary.json", "metrics.jsonl")
  return any((path / m).exists() for m in markers) or any(
      (sub / "config.json").exists() for sub in path.iterdir() if sub.is_dir())


def _write_atomic(path: pathlib.Path, text: str) -> None:
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def _train(config: FinetuneConfig, run_dir: pathlib.Path, *, fresh: bool, progress: bool,
           data: dict | None) -> dict[str, Any]:
  from tqdm.auto import tqdm

  data = data or load_data(config.seq_len)
  model, lora = build_model(config)
  mesh = make_mesh(config.devices) if config.devices > 1 else None
  trainer = Trainer(model, build_optimizer(config), mesh=mesh)
  state = trainer.init(config.seed)
  if fresh:  # only now, when the inputs have proved good, is anything written
    _start_run_dir(run_dir, config)
  metrics_file = run_dir / "metrics.jsonl"
  with Checkpointer(run_dir / "checkpoints", save_every=config.save_every,
                    keep=config.keep) as ckpt:
    if ckpt.latest_step() is not None:
      state, meta = ckpt.restore(trainer.abstract_state())
      _truncate_metrics(metrics_file, int(meta["step"]))
    start = int(state.step)
    train = data["train"]
    batches = batch_iterator({k: v for k, v in train.items() if k != "labels"}, train["labels"],
                             config.batch_size, seed=config.seed, start=start)
    bar = tqdm(total=config.steps, initial=start, disable=not progress, unit="step",
               desc=f"{config.optimizer} r={config.rank}", dynamic_ncols=True)
    window, t0, val = [], time.perf_counter(), None
    with open(metrics_file, "a") as log:
      for step in range(start + 1, config.steps + 1):
        state, m = trainer.train_step(state, trainer.shard_batch(next(batches)))
        window.append(m)
        # Log windows also end at checkpoint steps, so a resumed run logs the same records.
        if step % LOG_EVERY == 0 or step % config.save_every == 0 or step == config.steps:
          logged = _log_train(log, step, window)
          rate = len(window) * config.batch_size / (time.perf_counter() - t0)
          bar.set_postfix(loss=f"{logged['loss']:.4f}", ex_per_s=f"{rate:.1f}")
          window, t0 = [], time.perf_counter()
        if step % config.eval_every == 0 or step == config.steps:
          val = evaluate(trainer, state, data["validation"])
          _write(log, {"step": step, "val_loss": val["loss"], "val_accuracy": val["accuracy"]})
          bar.write(f"step {step}: validation accuracy {val['accuracy']:.4f}")
        ckpt.save(step, state, metadata={"step": step, "data_position": step},
                  force=step == config.steps)
        bar.update(1)
      bar.close()
      test = evaluate(trainer, state, data["test"])
      val = val or evaluate(trainer, state, data["validation"])
      _write(log, {"step": config.steps, "test_loss": test["loss"],
                   "test_accuracy": test["accuracy"]})
  nnx.update(model, clean_params(state))  # the clean θ into the (unchanged) model object
  save_adapters(run_dir / "adapters", model, lora, task_type="SEQ_CLS")
  plot_curves({config.optimizer: read_metrics(metrics_file)}, run_dir / "curves.png",
              title=f"{config.optimizer}, LoRA r={config.rank}")
  majority = float(max(np.mean(data["test"]["labels"]), 1 - np.mean(data["test"]["labels"])))
  summary = {"optimizer": config.optimizer, "steps": config.steps, "seed": config.seed,
             "val_accuracy": val["accuracy"], "test_accuracy": test["accuracy"],
             "test_loss": test["loss"], "majority_class": majority}
  _write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
  print(f"{config.optimizer}: test accuracy {test['accuracy']:.4f} "
        f"(majority class {majority:.4f}); run directory {run_dir}")
  return summary


def _log_train(log, step: int, window: list) -> dict[str, float]:
  """Writes the mean train loss / accuracy of the steps since the last log (one host sync)."""
  window = jax.device_get(window)
  record = {"step": step,
            "loss": float(np.mean([m["loss"] for m in window])),
            "accuracy": float(sum(m["correct"] for m in window) / sum(m["count"] for m in window))}
  _write(log, record)
  return record


def _write(log, record: dict[str, Any]) -> None:
  log.write(json.dumps(record) + "\n")
  log.flush()


def _truncate_metrics(path: pathlib.Path, step: int) -> None:
  """Drops records after ``step`` (written by an interrupted run after its last checkpoint)."""
  if path.exists():
    kept = [r for r in read_metrics(path) if r["step"] <= step and "test_accuracy" not in r]
    _write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of a ``metrics.jsonl`` file."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _series(records: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
  pairs = [(r["step"], r[key]) for r in records if key in r]
  return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def plot_curves(runs: dict[str, list[dict[str, Any]]], path: str | os.PathLike, *,
                title: str = "") -> None:
  """One PNG: training loss (left) and validation accuracy (right), one line per run."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
  for name, records in runs.items():
    ax_loss.plot(*_series(records, "loss"), label=name)
    ax_acc.plot(*_series(records, "val_accuracy"), marker="o", label=name)
  ax_loss.set(xlabel="step", ylabel="training loss (mean over 10 steps)", title="training loss")
  ax_acc.set(xlabel="step", ylabel="accuracy", title="validation accuracy")
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def summary_table(summaries: dict[str, dict[str, Any]]) -> str:
  """A plain-text table of the runs' final accuracies."""
  lines = [f"{'optimizer':<10} {'val acc':>8} {'test acc':>9} {'test loss':>10}"]
  lines += [f"{name:<10} {s['val_accuracy']:>8.4f} {s['test_accuracy']:>9.4f} "
            f"{s['test_loss']:>10.4f}" for name, s in summaries.items()]
  return "\n".join(lines)
