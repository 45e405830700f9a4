"""What a run reads, fingerprinted: ``data.json`` in the run directory.

A run records, before its ``config.json``, the SHA-256 of each tokenised split, of the
``--eval-generate`` prompts and answers, the label names, of its base model (the folder's
``config.json`` and weight files) and of its tokenizer (the folder's tokenizer files).
``--resume`` refuses other data or another base model or tokenizer, and ``predict`` another
base model or tokenizer: the adapters belong to the weights and tokens they were trained on.
Runs saved before mgpo-jax wrote a field are not checked for it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import pathlib
from typing import Any

import numpy as np

from mgpo_jax.finetune import run_dir as run_dir_lib
from mgpo_jax.models import weight_files

FILE = "data.json"
_DATA_KEYS = ("train", "validation", "test", "generation", "label_names")


def fingerprint(data: dict[str, Any], labels: list[Any], model_dir: str | None) -> dict[str, Any]:
  """The fingerprints of ``data`` (the splits: every array's name, dtype, shape and bytes; the
  generation set, as text), of ``labels`` and of the base model and tokenizer in ``model_dir``
  (``None``: a model built in code, not fingerprinted)."""
  out: dict[str, Any] = {"label_names": list(labels)}
  for split in ("train", "validation", "test"):
    if split in data:
      digest = hashlib.sha256()
      for key in sorted(data[split]):
        array = np.ascontiguousarray(data[split][key])
        digest.update(f"{key}:{array.dtype.str}:{array.shape};".encode())
        digest.update(array.tobytes())
      out[split] = digest.hexdigest()
  if "generation" in data:  # the prompts and answers that --eval-generate scores, as text
    text = json.dumps(data["generation"], sort_keys=True, default=list)
    out["generation"] = hashlib.sha256(text.encode()).hexdigest()
  if model_dir is not None:
    out.update({key: fingerprint_of(model_dir) for key, (fingerprint_of, *_) in _FOLDER.items()})
  return json.loads(json.dumps(out))  # as it reads back from the file


def model_fingerprint(model_dir: str | pathlib.Path) -> str:
  """SHA-256 of a checkpoint folder's ``config.json`` and weight files (their names and bytes,
  not their folder: a copied checkpoint has the same fingerprint). Hashed once per process
  while each file stays the same file (device, inode) with the same size and times."""
  files = [pathlib.Path(model_dir) / "config.json", *weight_files(model_dir)]
  return _hash_files(tuple(_identity(f) for f in files))


# The files a Hugging Face tokenizer is read from (those in the folder are hashed).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
                    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


def tokenizer_fingerprint(model_dir: str | pathlib.Path) -> str:
  """SHA-256 of the tokenizer files in a checkpoint folder (their names and bytes), cached as
  :func:`model_fingerprint` is."""
  files = [pathlib.Path(model_dir) / name for name in _TOKENIZER_FILES]
  return _hash_files(tuple(_identity(f) for f in files if f.is_file()))


# A checkpoint folder's fingerprints: key in data.json -> (function, what it is, its files).
_FOLDER = {"model": (model_fingerprint, "base model", "config.json or weights"),
           "tokenizer": (tokenizer_fingerprint, "tokenizer", "tokenizer files")}


def _identity(file: pathlib.Path) -> tuple[str, int, int, int, int, int]:
  """What :func:`_hash_files` is cached on: the path and what a write to the file changes
  (``st_ctime_ns`` too, which cannot be set back by hand)."""
  st = file.stat()
  return (str(file.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@functools.lru_cache(maxsize=16)
def _hash_files(files: tuple[tuple[str, int, int, int, int, int], ...]) -> str:
  digest = hashlib.sha256()
  for path, _, _, size, _, _ in files:
    with open(path, "rb") as f:
      digest.update(f"{pathlib.Path(path).name}:{size};".encode())
      digest.update(hashlib.file_digest(f, "sha256").digest())
  return digest.hexdigest()


def check_resume(run_dir: pathlib.Path, now: dict[str, Any], model_dir: str | None) -> None:
  """Raises unless ``now`` (:func:`fingerprint` of the data and of the model in ``model_dir``)
  is what the run in ``run_dir`` started with."""
  saved = _saved(run_dir)
  if saved is None:  # saved before mgpo-jax wrote data.json
    return
  changed = [k for k in _DATA_KEYS if saved.get(k) != now.get(k)]
  if changed:
    raise ValueError(
        f"--resume: the data differ from the saved run's ({', '.join(changed)}): a changed "
        "data file, tokenizer or label set. Resume with the data the run started with, or "
        "start a new run")
  _check_folder(saved, now, f"--resume: --model {model_dir}")


def check_model(run_dir: pathlib.Path, model_dir: str) -> None:
  """Raises unless the base model and tokenizer in ``model_dir`` are the ones the run in
  ``run_dir`` trained its adapters with (for ``predict``; each hashed only when the run
  recorded it)."""
  saved = _saved(run_dir) or {}
  now = {key: fingerprint_of(model_dir) for key, (fingerprint_of, *_) in _FOLDER.items()
         if key in saved}
  _check_folder(saved, now, f"--run-dir {run_dir}: its --model {model_dir}")


def _check_folder(saved: dict[str, Any], now: dict[str, Any], what: str) -> None:
  for key, (_, name, parts) in _FOLDER.items():
    if key in saved and key in now and saved[key] != now[key]:
      raise ValueError(
          f"{what}: the {name} differs from the one the run trained on: its folder's {parts} "
          "changed since. Use the model the run started with (the adapters belong to its "
          "weights and tokens), or start a new run")


def _saved(run_dir: pathlib.Path) -> dict[str, Any] | None:
  return run_dir_lib.read_json(run_dir, FILE) if (run_dir / FILE).exists() else None
