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
import math
import operator
import os
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mgpo_jax.data import (DataUnavailableError, batch_iterator, eval_batch_iterator,
                           load_rotten_tomatoes, minilm_path, tokenize)
from mgpo_jax.data_files import load_classification_files, load_text_files
from mgpo_jax.finetune import fingerprint
from mgpo_jax.finetune import run_dir as run_dir_lib
from mgpo_jax.finetune.config import FinetuneConfig
from mgpo_jax.lora import LoraConfig, apply_lora, apply_lora_one, save_adapters
from mgpo_jax.methods import METHODS
from mgpo_jax.answers import exact_match_rate
from mgpo_jax.generate import greedy_generate
from mgpo_jax.lm_data import (decode_generated, encode_prompt_response, encode_prompts,
                              encode_texts, pad_token_id)
from mgpo_jax.models import SUPPORTED, load_model, model_type, weight_files
from mgpo_jax.optim import precondition_lora
from mgpo_jax.train import (Trainer, TrainState, causal_lm_loss, classification_loss,
                            clean_params, make_mesh)
from mgpo_jax.train.checkpoint import CheckpointError, Checkpointer
from mgpo_jax.train.sharding import load_shardings

LOG_EVERY = 10
_HEADS = ("classifier", "score")  # a classifier's new head, trained in full (BERT, Llama)
EVAL_BATCH_SIZE = 128
_SPLIT_SEED = 0  # the data split is fixed, whatever the training seed
_NEVER_GIVE_UP = 2**31 - 1  # apply_if_finite's max_consecutive_errors: always skip


class UserError(Exception):
  """A problem with the user's input or files, reported as one line without a traceback."""


def build_optimizer(config: FinetuneConfig) -> optax.GradientTransformation:
  """The method ``config.optimizer`` from the registry (:mod:`mgpo_jax.methods`), around
  AdamW with linear warm-up and cosine decay; unset hyper-parameters take the method's
  defaults. With ``--precondition`` (or a method that asks for it) the AdamW every method
  wraps is ``chain(precondition_lora(), adamw)``: inside MGPO, the preconditioner sees the
  clean θ."""
  warmup = round(config.warmup_fraction * config.steps)
  if config.warmup_fraction > 0:  # at least one warm-up step; none for 0 (step 0 at full lr)
    warmup = max(1, warmup)
  schedule = optax.warmup_cosine_decay_schedule(  # --steps 1: no warm-up step, not an error
      0.0, config.lr, warmup_steps=min(warmup, config.steps - 1), decay_steps=config.steps)
  adamw = optax.adamw(schedule, weight_decay=config.weight_decay)
  method = METHODS[config.optimizer]
  if config.precondition or method.precondition:  # before Adam, inside every method's base
    adamw = optax.chain(precondition_lora(config.precondition_damping), adamw)
  hyper = method.resolve({k: getattr(config, k) for k in method.hyper})
  tx = method.optimizer(adamw, schedule=schedule, lr=config.lr, **hyper)
  if config.nonfinite == "skip":  # a step whose update is not finite leaves params and state
    tx = optax.apply_if_finite(tx, max_consecutive_errors=_NEVER_GIVE_UP)
  return tx


def build_perturbation(config: FinetuneConfig) -> Any:
  """The weight perturbation of ``config.optimizer`` (a
  :class:`~mgpo_jax.perturbation.WeightPerturbation`), or ``None`` for a method without one."""
  method = METHODS[config.optimizer]
  if method.perturbation is None:
    return None
  hyper = method.resolve({k: getattr(config, k) for k in method.hyper})
  return method.perturbation(steps=config.steps, **hyper)


def model_path(config: FinetuneConfig) -> str:
  """The local checkpoint folder of the base model: ``--model``, else the embedded MiniLM.
  Checked without loading it: a local folder (never a hub name) with a ``config.json`` of a
  supported model type and weight files."""
  if config.model is None:
    return minilm_path()
  folder = pathlib.Path(config.model)
  if not (folder / "config.json").is_file():
    raise ValueError(f"--model {config.model} is not a local Hugging Face checkpoint folder "
                     "(no config.json there); nothing is fetched from a hub")
  try:
    kind = model_type(folder)
  except ValueError as err:
    raise ValueError(f"--model {config.model}: {err}") from err
  if config.task not in SUPPORTED.get(kind, {}):
    supported = "; ".join(f"{t} ({', '.join(tasks)})" for t, tasks in SUPPORTED.items())
    raise ValueError(f"--model {config.model}: model_type {kind!r} is not supported for "
                     f"--task {config.task}; supported: {supported}")
  try:
    weight_files(folder)
  except (FileNotFoundError, ValueError) as err:
    raise ValueError(f"--model {config.model}: {err}") from err
  return str(folder)


def _loss_fn(config: FinetuneConfig):
  return causal_lm_loss if config.task == "causal-lm" else classification_loss


def load_base(config: FinetuneConfig, num_labels: int = 2, mesh: Any = None) -> nnx.Module:
  """The :func:`model_path` checkpoint as the model of ``config.task``, a classifier with a
  fresh ``num_labels``-way head (BERT pooling ``config.pooling``) or a causal LM; on ``mesh``,
  each weight is read straight into the sharding the Trainer gives it."""
  path = model_path(config)
  bert = model_type(path) == "bert"
  if config.pooling != "cls" and not bert:
    raise ValueError(f"--pooling {config.pooling} applies to BERT classifiers; --model {path} "
                     f"is a {model_type(path)} model")
  try:
    return load_model(path, task=config.task,
                      num_labels=num_labels if config.task == "classification" else None,
                      rngs=nnx.Rngs(params=config.seed, dropout=config.seed + 1),
                      shardings=None if mesh is None else load_shardings(mesh),
                      **({"pooling": config.pooling} if bert else {}))
  except (FileNotFoundError, ValueError, NotImplementedError) as err:  # e.g. Llama 3's RoPE
    raise ValueError(f"--model {path}: {err}") from err


def build_model(config: FinetuneConfig, base: nnx.Module | None = None, num_labels: int = 2,
                *, data: dict | None = None, mesh: Any = None) -> tuple[nnx.Module, LoraConfig]:
  """LoRA on ``config.target_modules`` of ``base`` (default: :func:`load_base`, with a fresh
  ``num_labels``-way head for classification); a classifier's head is trained in full (PEFT's
  ``modules_to_save``).

  The init is the method's (:attr:`Method.lora_init`) or ``config.init_lora_weights``; for
  ``"lora-one"`` the full gradients of the target kernels are first computed on the first
  ``config.init_examples`` examples of the training batches (``data["train"]``, in the order
  training sees them), on ``mesh`` if given. A method with ``use_rslora`` turns rsLoRA on."""
  model = base or load_base(config, num_labels, mesh)
  positions = _max_positions(model)
  if positions is not None and config.seq_len > positions:
    raise ValueError(f"--seq-len {config.seq_len} is longer than the model's "
                     f"max_position_embeddings ({positions})")
  targets = config.target_modules  # names, "all-linear", or "re:REGEX" (LoraConfig's regex)
  if isinstance(targets, str) and targets.startswith("re:"):
    targets = targets[3:]
  method = METHODS[config.optimizer]
  lora = LoraConfig(target_modules=targets,
                    r=config.rank, alpha=config.alpha, dropout=config.lora_dropout,
                    use_rslora=config.use_rslora or method.use_rslora,
                    init=method.lora_init or config.init_lora_weights,
                    modules_to_save=tuple(h for h in _HEADS if hasattr(model, h)))
  rngs = nnx.Rngs(params=config.seed + 2, dropout=config.seed + 3)
  if lora.init != "lora-one":
    apply_lora(model, lora, rngs=rngs)
    return model, lora
  if data is None:
    raise ValueError("the lora-one init needs the training data: build_model(config, "
                     "data=...) (finetune.run passes it)")
  train = data["train"]
  batches = batch_iterator({k: v for k, v in train.items() if k != "labels"}, train["labels"],
                           config.batch_size, seed=config.seed)
  apply_lora_one(model, lora, _loss_fn(config), batches,  # each example at most once
                 num_examples=min(config.init_examples, len(train["labels"])), mesh=mesh,
                 rngs=rngs)
  return model, lora


def _max_positions(model: nnx.Module) -> int | None:
  """The number of position embeddings of a model with learned positions (BERT), if any."""
  for path, node in nnx.iter_graph(model):
    if path and path[-1] == "position_embeddings" and isinstance(node, nnx.Embed):
      return node.num_embeddings
  return None


def load_data(config: FinetuneConfig) -> dict[str, Any]:
  """Tokenised splits ``{split: {input_ids, ..., labels}}`` (train, validation, and test when
  there is one) and ``"label_names"`` (``label_names[i]`` is the label of id ``i``).

  The user's files when ``config.train_file`` is set, else the embedded Rotten Tomatoes;
  tokenised with the base model's tokenizer to ``config.seq_len``.
  """
  from transformers import AutoTokenizer

  tokenizer = AutoTokenizer.from_pretrained(model_path(config), local_files_only=True)
  if config.task == "causal-lm":
    return _load_lm_data(config, tokenizer)
  if tokenizer.pad_token is None:  # Llama: pad with EOS (the classifier reads the last real token)
    tokenizer.pad_token = tokenizer.eos_token
  if config.train_file:
    splits, label_names = load_classification_files(
        config.train_file, config.validation_file, config.test_file,
        text_columns=[c.strip() for c in config.text_column.split(",")],
        label_column=config.label_column, validation_fraction=config.validation_fraction,
        seed=_SPLIT_SEED)
  else:
    splits, label_names = load_rotten_tomatoes(seed=_SPLIT_SEED), ["negative", "positive"]
  return {**{name: {**tokenize(s.texts, tokenizer, config.seq_len), "labels": s.labels}
             for name, s in splits.items()}, "label_names": label_names}


def _load_lm_data(config: FinetuneConfig, tokenizer: Any) -> dict[str, Any]:
  """Causal-LM splits: ``input_ids``, ``attention_mask``, ``loss_mask`` (prompt and padding
  tokens carry no loss), dummy ``labels``; and the validation prompts/responses as text, for
  ``--eval-generate``."""
  columns = ([config.prompt_column, config.response_column] if config.prompt_column
             else [config.text_column])
  texts = load_text_files(config.train_file, config.validation_file, config.test_file,
                          columns=columns, validation_fraction=config.validation_fraction,
                          seed=_SPLIT_SEED)
  data = {}
  for name, split in texts.items():
    encoded = (encode_prompt_response(tokenizer, *(split[c] for c in columns), config.seq_len)
               if config.prompt_column else encode_texts(tokenizer, split[columns[0]],
                                                         config.seq_len))
    data[name] = {**encoded.arrays(), "labels": np.zeros(len(encoded.input_ids), np.int32)}
  if config.prompt_column:
    data["generation"] = {"prompts": texts["validation"][config.prompt_column],
                          "responses": texts["validation"][config.response_column]}
  return data


def label_names(data: dict[str, Any]) -> list[Any]:
  """The label of each class id: ``data["label_names"]``, else ``0 .. max label``."""
  if "label_names" in data:
    return list(data["label_names"])
  return list(range(int(max(np.max(data[s]["labels"]) for s in ("train", "validation"))) + 1))


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
  loss = float(totals["loss_sum"] / totals["count"])
  out = {"loss": loss, "accuracy": float(totals["correct"] / totals["count"])}
  if "loss_mask" in split:  # causal LM: per-token loss and next-token accuracy
    out["perplexity"] = math.exp(min(loss, 700.0))
  return out


def run(config: FinetuneConfig, *, resume: bool = False, overwrite: bool = False,
        progress: bool = True, data: dict | None = None,
        base_model: Callable[[FinetuneConfig], nnx.Module] | None = None) -> dict[str, Any]:
  """Trains ``config`` into ``config.run_dir``; returns the summary (also ``summary.json``).

  The steps, each a function of this module: check the run directory (writing nothing),
  :func:`load_data`, :func:`build_model`, :func:`build_optimizer`, :func:`build_perturbation`,
  then — only once the inputs have proved good — start the run directory, :func:`train`, and
  :func:`export` the adapters, plot and summary.

  Args:
    config: the run's configuration (validated here).
    resume: continue the run saved in ``run_dir`` from its latest checkpoint; ``config`` must
      equal the saved one (differences are refused, naming the flags). The result is
      bit-identical to an uninterrupted run.
    overwrite: replace a previous mgpo-jax run in ``run_dir`` (only the files it wrote).
    progress: show a progress bar.
    data: pre-tokenised splits in :func:`load_data`'s layout (default: Rotten Tomatoes).
    base_model: ``base_model(config)`` builds the model to put adapters on (default: MiniLM
      with a fresh 2-way head).

  Raises:
    UserError: bad configuration, a run directory that holds something else, a corrupt
      checkpoint, missing data or model packages, a non-finite training loss.
  """
  try:
    config.validate()
    run_dir = pathlib.Path(config.run_dir)
    with run_dir_lib.Lock(run_dir) as lock:  # held to the end: no other job shares it
      if run_dir.is_dir():
        lock.acquire()  # before the checks, so that what they read stays as they read it
      if resume and run_dir_lib.is_unstarted(run_dir, "run"):
        # Killed before its config was saved: nothing to continue; replace the partial start.
        if not run_dir.exists():  # killed before the folder was made, or a mistyped --run-dir
          print(f"mgpo-jax: --resume: {run_dir} does not exist; starting the run there",
                file=sys.stderr)
        resume, overwrite = False, True
      _check_run_dir(run_dir, config, resume=resume, overwrite=overwrite)
      folder = model_path(config) if base_model is None else None  # a bad --model fails first
      data = data or load_data(config)
      if config.batch_size > len(data["train"]["labels"]):
        raise ValueError(f"--batch-size {config.batch_size} is larger than the training split "
                         f"({len(data['train']['labels'])} examples)")
      labels = label_names(data)
      inputs = fingerprint.fingerprint(data, labels, folder)
      if resume:
        fingerprint.check_resume(run_dir, inputs, folder)
      mesh = (make_mesh(axes=config.mesh) if config.mesh else
              make_mesh(config.devices) if config.devices > 1 else None)
      model, lora = build_model(config, base_model(config) if base_model else None, len(labels),
                                data=data, mesh=mesh)
      trainer = Trainer(model, build_optimizer(config), _loss_fn(config), mesh=mesh,
                        remat=config.remat, accum_steps=config.accum_steps,
                        compute_dtype=None if config.compute_dtype == "float32" else
                        jnp.dtype(config.compute_dtype),
                        perturbation=build_perturbation(config))
      state = trainer.init(config.seed)
      if lock.acquire():  # a new folder, made and locked only now: checked again (another
        _check_run_dir(run_dir, config, resume=resume, overwrite=overwrite)  # job may be there)
      if resume:
        run_dir_lib.remove_drafts(run_dir)
      else:  # only now, when the inputs have proved good, is anything written or removed
        if not run_dir_lib.is_empty(run_dir):
          run_dir_lib.clear(run_dir, "run")
        run_dir_lib.create(run_dir, "run", run_dir_lib.RUN_ENTRIES)
        run_dir_lib.write_atomic(run_dir / fingerprint.FILE, json.dumps(inputs))
        run_dir_lib.write_atomic(run_dir / "labels.json", json.dumps(labels))
        run_dir_lib.write_atomic(run_dir / "config.json", config.to_json())  # marks it started
      state, val = train(config, trainer, state, data, run_dir, progress=progress)
      return export(config, trainer, state, model, lora, data, run_dir, val,
                    base_model_name_or_path=folder)
  except (ValueError, CheckpointError, DataUnavailableError, FileNotFoundError) as err:
    raise UserError(" ".join(str(err).split())) from err


def run_compare(config: FinetuneConfig, optimizers: Sequence[str], *, resume: bool = False,
                overwrite: bool = False, progress: bool = True, data: dict | None = None,
                base_model: Callable[[FinetuneConfig], nnx.Module] | None = None,
                ) -> dict[str, dict[str, Any]]:
  """Runs each optimizer with the same seed and data into ``run_dir/<optimizer>``; writes
  ``compare.png`` and ``summary.json`` in ``run_dir`` and prints a summary table. ``resume``
  continues every sub-run (starting those that never started)."""
  root = pathlib.Path(config.run_dir)
  with run_dir_lib.Lock(root) as lock:  # held to the end, as in run()
    try:
      config.validate(tuple(optimizers))
      if root.is_dir():
        lock.acquire()  # before the checks, as in run()
      _check_compare_dir(root, config, optimizers, resume=resume, overwrite=overwrite)
      data = data or load_data(config)
      if lock.acquire():  # made and locked only now: checked again, as in run()
        _check_compare_dir(root, config, optimizers, resume=resume, overwrite=overwrite)
      if not resume:
        if not run_dir_lib.is_empty(root):
          run_dir_lib.clear(root, "compare")
        run_dir_lib.create(root, "compare", {**run_dir_lib.COMPARE_FILES,
                                             **{n: run_dir_lib.SUB_RUN for n in optimizers}})
      if not (root / "config.json").exists():  # also a comparison killed before writing it
        run_dir_lib.write_atomic(root / "config.json", config.to_json())
    except (ValueError, DataUnavailableError, FileNotFoundError) as err:
      raise UserError(" ".join(str(err).split())) from err
    summaries = {}
    for name in optimizers:  # each method keeps the hyper-parameters that are its own
      sub = config.replace(optimizer=name, run_dir=str(root / name)).drop_unused()
      summaries[name] = run(sub, resume=resume and (root / name).exists(),
                            progress=progress, data=data, base_model=base_model)
    metrics = {name: read_metrics(root / name / "metrics.jsonl") for name in optimizers}
    plot_curves(metrics, root / "compare.png",
                title=f"LoRA r={config.rank}: " + ", ".join(optimizers))
    run_dir_lib.write_atomic(root / "summary.json", json.dumps(summaries, indent=2))
    print(summary_table(summaries))
    return summaries


def _check_compare_dir(root: pathlib.Path, config: FinetuneConfig, optimizers: Sequence[str],
                       *, resume: bool, overwrite: bool) -> None:
  """:func:`_check_run_dir` for the root of a comparison: on resume, the same methods and
  flags as saved (every sub-run's, before any continues)."""
  run_dir_lib.check_usable(root)
  if resume:
    manifest = run_dir_lib.read_manifest(root, "compare")
    saved = sorted(k for k, v in manifest["entries"].items() if v == run_dir_lib.SUB_RUN)
    if saved != sorted(optimizers):
      raise ValueError(f"--resume: --compare {','.join(optimizers)} differs from the saved "
                       f"comparison ({','.join(saved)})")
    if (root / "config.json").exists():
      saved_config = FinetuneConfig.saved_in(root)
      changed = config.differences(saved_config.drop_unused(tuple(optimizers)))
      if changed:
        raise ValueError(f"--resume: these flags differ from the saved comparison's config: "
                         f"{'; '.join(changed)}. Drop them to continue it as it was started")
  else:
    run_dir_lib.check_startable(root, "compare", overwrite=overwrite)


def _check_run_dir(run_dir: pathlib.Path, config: FinetuneConfig, *, resume: bool,
                   overwrite: bool) -> None:
  """Checks, writing nothing, that ``run_dir`` may be used: on resume, that it is an mgpo-jax
  run saved with ``config``; otherwise that it is empty, or (with ``overwrite``) holds only
  what a previous run wrote."""
  run_dir_lib.check_usable(run_dir)
  if resume:
    run_dir_lib.read_manifest(run_dir, "run")
    if not (run_dir / "config.json").exists():
      raise ValueError(f"--resume: --run-dir {run_dir} holds no run (no config.json)")
    saved = FinetuneConfig.saved_in(run_dir)
    changed = config.differences(saved.drop_unused())
    if changed:
      raise ValueError(f"--resume: these flags differ from the saved run's config: "
                       f"{'; '.join(changed)}. Drop them to continue the run as it was "
                       "started, or start a new run")
  else:
    run_dir_lib.check_startable(run_dir, "run", overwrite=overwrite)


def train(config: FinetuneConfig, trainer: Trainer, state: TrainState, data: dict,
          run_dir: pathlib.Path, *, progress: bool = True) -> tuple[TrainState, dict | None]:
  """The training loop, from the latest checkpoint in ``run_dir`` (if any) to ``config.steps``:
  logs to ``metrics.jsonl``, validates every ``eval_every`` steps, checkpoints every
  ``save_every``. Returns the final state and the last validation metrics.

  ``metrics.jsonl`` is first cut back to the restored step (0 without a checkpoint), so it
  always matches the state. A non-finite training loss stops the run before the state is
  saved (``nonfinite="stop"``).
  """
  from tqdm.auto import tqdm

  metrics_file = run_dir / "metrics.jsonl"
  with Checkpointer(run_dir / "checkpoints", save_every=config.save_every,
                    keep=config.keep) as ckpt:
    if ckpt.latest_step() is not None:
      state, _ = ckpt.restore(trainer.abstract_state())
    start = int(state.step)
    _truncate_metrics(metrics_file, start)
    train_split = data["train"]
    batches = batch_iterator({k: v for k, v in train_split.items() if k != "labels"},
                             train_split["labels"], config.batch_size, seed=config.seed,
                             start=start)
    bar = tqdm(total=config.steps, initial=start, disable=not progress, unit="step",
               desc=f"{config.optimizer} r={config.rank}", dynamic_ncols=True)
    window, t0, val = [], time.perf_counter(), None
    with open(metrics_file, "a") as log:
      for step in range(start + 1, config.steps + 1):
        state, m = trainer.train_step(state, trainer.shard_batch(next(batches)))
        window.append(m)
        # Log windows also end at checkpoint steps, so a resumed run logs the same records,
        # and a non-finite loss is seen before the state is saved.
        if step % LOG_EVERY == 0 or step % config.save_every == 0 or step == config.steps:
          logged = _log_train(log, step, window)
          if config.nonfinite == "stop" and not math.isfinite(logged["loss"]):
            raise ValueError(
                f"the training loss became non-finite by step {step}; the run stopped and its "
                f"last checkpoint (step {ckpt.latest_step() or 'none'}) is intact. Lower --lr, "
                "or pass --nonfinite skip to skip such steps")
          rate = len(window) * config.batch_size / (time.perf_counter() - t0)
          bar.set_postfix(loss=f"{logged['loss']:.4f}", ex_per_s=f"{rate:.1f}")
          window, t0 = [], time.perf_counter()
        if step % config.eval_every == 0 or step == config.steps:
          val = evaluate(trainer, state, data["validation"])
          _write(log, {"step": step, **{f"val_{k}": v for k, v in val.items()}})
          bar.write(f"step {step}: validation accuracy {val['accuracy']:.4f}")
        saving = step % config.save_every == 0 or step == config.steps
        if saving:
          os.fsync(log.fileno())  # the log up to this step is on disk before its checkpoint
          if config.nonfinite == "stop" and not _all_finite(state.params):
            raise ValueError(
                f"the trained parameters became non-finite by step {step}; the run stopped "
                f"before saving them and its last checkpoint (step "
                f"{ckpt.latest_step() or 'none'}) is intact. Lower --lr, or pass --nonfinite "
                "skip to skip such steps")
        ckpt.save(step, state, metadata={"step": step, "data_position": step},
                  force=step == config.steps)
        bar.update(1)
      bar.close()
  return state, val


def export(config: FinetuneConfig, trainer: Trainer, state: TrainState, model: nnx.Module,
           lora: LoraConfig, data: dict, run_dir: pathlib.Path, val: dict | None = None, *,
           base_model_name_or_path: str | None = None) -> dict[str, Any]:
  """Test metrics (when there is a test split), PEFT adapters of the clean params (recording
  the base model's local path), the curves and ``summary.json``."""
  val = val or evaluate(trainer, state, data["validation"])
  summary = {"optimizer": config.optimizer, "steps": config.steps, "seed": config.seed,
             **{f"val_{k}": v for k, v in val.items()}}
  if "test" in data:
    test = evaluate(trainer, state, data["test"])
    summary.update({f"test_{k}": v for k, v in test.items()})
    if config.task == "classification":
      labels = data["test"]["labels"]
      summary["majority_class"] = float(np.max(np.bincount(labels)) / len(labels))
    with open(run_dir / "metrics.jsonl", "a") as log:
      _write(log, {"step": config.steps, **{f"test_{k}": v for k, v in test.items()}})
  nnx.update(model, clean_params(state))  # the clean θ into the (unchanged) model object
  if config.eval_generate and "generation" in data:
    summary["val_exact_match"] = _generation_exact_match(config, model, data["generation"])
  save_adapters(run_dir / "adapters", model, lora,
                task_type="CAUSAL_LM" if config.task == "causal-lm" else "SEQ_CLS",
                base_model_name_or_path=base_model_name_or_path)
  plot_curves({config.optimizer: read_metrics(run_dir / "metrics.jsonl")},
              run_dir / "curves.png", title=f"{config.optimizer}, LoRA r={config.rank}")
  run_dir_lib.write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
  if config.task == "causal-lm":
    result = f"validation perplexity {val['perplexity']:.4g}" + (
        f", exact match {summary['val_exact_match']:.4f} on {config.eval_generate} generated "
        "answers" if "val_exact_match" in summary else "")
  elif "test" in data:
    result = (f"test accuracy {summary['test_accuracy']:.4f} (majority class "
              f"{summary['majority_class']:.4f})")
  else:
    result = f"validation accuracy {val['accuracy']:.4f} (no test split)"
  print(f"{config.optimizer}: {result}; run directory {run_dir}")
  return summary


def generate(config: FinetuneConfig, model: nnx.Module, prompts: Sequence[str]) -> list[str]:
  """Greedy answers (``config.max_new_tokens`` tokens, KV cache) of a causal-LM ``model``."""
  from transformers import AutoTokenizer

  tokenizer = AutoTokenizer.from_pretrained(model_path(config), local_files_only=True)
  ids, mask = encode_prompts(tokenizer, list(prompts), config.seq_len)
  model.eval()
  tokens = greedy_generate(model, jnp.asarray(ids), jnp.asarray(mask),
                           max_new_tokens=config.max_new_tokens,
                           eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=pad_token_id(tokenizer))
  return decode_generated(tokenizer, np.asarray(tokens), tokenizer.eos_token_id)


def _generation_exact_match(config: FinetuneConfig, model: nnx.Module,
                            generation: dict[str, list[str]]) -> float:
  n = config.eval_generate
  answers = generate(config, model, generation["prompts"][:n])
  return exact_match_rate(answers, generation["responses"][:n])


def _log_train(log, step: int, window: list) -> dict[str, float]:
  """Writes the mean train loss / accuracy of the steps since the last log (one host sync)."""
  window = jax.device_get(window)
  record = {"step": step,
            "loss": float(np.mean([m["loss"] for m in window])),
            "accuracy": float(sum(m["correct"] for m in window) / sum(m["count"] for m in window))}
  _write(log, record)
  return record


def _all_finite(tree: Any) -> bool:
  """One host sync for the whole tree (called at checkpoint steps only)."""
  return bool(jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)])))


def _write(log, record: dict[str, Any]) -> None:
  log.write(_json_line(record))
  log.flush()


def _json_line(record: dict[str, Any]) -> str:
  """Strict JSON (a non-finite number becomes ``null``) and a newline."""
  clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v
           for k, v in record.items()}
  return json.dumps(clean, allow_nan=False) + "\n"


def _truncate_metrics(path: pathlib.Path, step: int) -> None:
  """Keeps the records up to ``step`` (the restored state's), dropping what an interrupted
  run wrote after its last checkpoint, test records, and a line cut short by a kill."""
  if path.exists():
    kept = [r for r in read_metrics(path, partial_ok=True)
            if r["step"] <= step and "test_accuracy" not in r]
    run_dir_lib.write_atomic(path, "".join(_json_line(r) for r in kept))


def read_metrics(path: str | os.PathLike, *, partial_ok: bool = False) -> list[dict[str, Any]]:
  """The records of a ``metrics.jsonl`` file (``partial_ok``: skip a last line that a killed
  process left unfinished)."""
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  if partial_ok and lines and not lines[-1].endswith("\n"):
    lines = lines[:-1]
  return [json.loads(line) for line in lines]


def _series(records: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
  pairs = [(r["step"], r[key]) for r in records if key in r]
  return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs], dtype=float)


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
  tmp = pathlib.Path(path).with_name(pathlib.Path(path).name + ".tmp")
  fig.savefig(tmp, dpi=110, format="png")
  plt.close(fig)
  os.replace(tmp, path)


def summary_table(summaries: dict[str, dict[str, Any]]) -> str:
  """A plain-text table of the runs' final accuracies."""
  lines = [f"{'optimizer':<10} {'val acc':>8} {'test acc':>9} {'test loss':>10}"]
  nan = float("nan")
  lines += [f"{name:<10} {s['val_accuracy']:>8.4f} {s.get('test_accuracy', nan):>9.4f} "
            f"{s.get('test_loss', nan):>10.4f}" for name, s in summaries.items()]
  return "\n".join(lines)
