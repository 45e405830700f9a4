"""``mgpo-jax predict``: apply a finished fine-tune run to new texts.

The run's saved ``config.json`` and ``labels.json`` rebuild the base model (refused when its
folder no longer holds the weights the run trained on, by ``data.json``); its exported
PEFT adapters (the clean parameters) are loaded onto it, and each text gets its label and the
probability of every label.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mgpo_jax.data import eval_batch_iterator, tokenize
from mgpo_jax.data_files import read_table
from mgpo_jax.finetune import fingerprint
from mgpo_jax.finetune import run_dir as run_dir_lib
from mgpo_jax.finetune.config import FinetuneConfig
from mgpo_jax.finetune.job import generate, load_base, model_path
from mgpo_jax.lora import load_adapters


def load_run(run_dir: str | pathlib.Path) -> tuple[FinetuneConfig, list[Any], nnx.Module]:
  """``(config, label_names, model)``: the run's base model with its exported adapters."""
  run_dir = pathlib.Path(run_dir)
  needed = [run_dir / n for n in ("config.json", "labels.json", "adapters/adapter_config.json")]
  missing = [str(p.relative_to(run_dir)) for p in needed if not p.is_file()]
  if missing:
    raise ValueError(f"--run-dir {run_dir} holds no finished run (missing "
                     f"{', '.join(missing)})")
  config = FinetuneConfig.saved_in(run_dir)
  labels = run_dir_lib.read_json(run_dir, "labels.json")
  fingerprint.check_model(run_dir, model_path(config))
  model = load_base(config, len(labels))
  load_adapters(run_dir / "adapters", model)
  model.eval()
  return config, labels, model


def predict(run_dir: str | pathlib.Path, texts: Sequence[Any], *,
            batch_size: int = 64) -> list[dict[str, Any]]:
  """One ``{"text", "label", "probabilities": {label: p}}`` per text (a string, or a
  ``(first, second)`` pair for a sentence-pair run); for a causal-LM run, one
  ``{"prompt", "generated"}`` per prompt (greedy, the run's ``max_new_tokens``)."""
  from transformers import AutoTokenizer

  config, labels, model = load_run(run_dir)
  pairs = config.task == "classification" and "," in config.text_column
  wrong = [t for t in texts if isinstance(t, (tuple, list)) != pairs]
  if wrong:
    raise ValueError(
        f"the run classifies {'sentence pairs' if pairs else 'single texts'} (its text column "
        f"{config.text_column!r}), but {len(wrong)} input(s) are "
        + ("single texts: give each as a (first, second) pair (an --input-file with both "
           "columns)" if pairs else
           f"pairs: give one text each (the first: {list(wrong[0])!r})"))
  if config.task == "causal-lm":
    return [{"prompt": p, "generated": g}
            for p, g in zip(texts, generate(config, model, list(texts)))]
  tokenizer = AutoTokenizer.from_pretrained(model_path(config), local_files_only=True)
  if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token
  arrays = tokenize(list(texts), tokenizer, config.seq_len)
  graphdef, state = nnx.split(model)

  @jax.jit
  def probabilities(state, batch):
    logits = nnx.merge(graphdef, state)(batch["input_ids"], attention_mask=batch["attention_mask"],
                                        token_type_ids=batch["token_type_ids"])
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

  out = []
  for batch in eval_batch_iterator(arrays, np.zeros(len(texts), np.int32), batch_size):
    probs = np.asarray(probabilities(state, {k: jnp.asarray(v) for k, v in batch.items()}))
    out += [row for row, real in zip(probs, batch["mask"]) if real > 0]
  return [{"text": list(t) if isinstance(t, tuple) else t, "label": labels[int(np.argmax(p))],
           "probabilities": {str(label): float(q) for label, q in zip(labels, p)}}
          for t, p in zip(texts, out)]


def read_texts(path: str, text_column: str) -> list[Any]:
  """The texts of ``--input-file``: the run's text column(s) of a CSV/JSONL/Parquet file, or
  one text per line of a ``.txt`` file."""
  if path.endswith(".txt"):
    try:
      lines = pathlib.Path(path).read_text().splitlines()
    except OSError as err:
      raise ValueError(f"--input-file {path}: {err.strerror}") from err
    return [line for line in lines if line.strip()]
  columns = read_table(path, "--input-file")
  names = [c.strip() for c in text_column.split(",")]
  missing = [c for c in names if c not in columns]
  if missing:
    raise ValueError(f"--input-file {path} has no column {missing[0]!r} (the run's "
                     f"--text-column; columns: {', '.join(columns)})")
  return list(zip(*(columns[c] for c in names))) if len(names) == 2 else list(columns[names[0]])
