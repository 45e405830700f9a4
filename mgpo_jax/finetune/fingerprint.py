"""What a run reads, fingerprinted: ``data.json`` in the run directory.

A run records, before its ``config.json``, the SHA-256 of each tokenised split, of the
``--eval-generate`` prompts and answers, the label names, and of its base model (the folder's
``config.json`` and weight files). ``--resume`` refuses other data or another base model, and
``predict`` another base model: the adapters belong to the weights they were trained on.
Runs saved before mgpo-jax wrote a field are not checked for it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import pathlib
from typing import Any

import numpy as np

from mgpo_jax.models import weight_files

FILE = "data.json"
_DATA_KEYS = ("train", "validation", "test", "generation", "label_names")


def fingerprint(data: dict[str, Any], labels: list[Any], model_dir: str | None) -> dict[str, Any]:
  """The fingerprints of ``data`` (the splits: every array's name, dtype, shape and bytes; the
  generation set, as text), of ``labels`` and of the base model in ``model_dir`` (``None``: a
  model built in code, not fingerprinted)."""
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
    out["model"] = model_fingerprint(model_dir)
  return json.loads(json.dumps(out))  # as it reads back from the file


def model_fingerprint(model_dir: str | pathlib.Path) -> str:
  """SHA-256 of a checkpoint folder's ``config.json`` and weight files (their names and bytes,
  not their folder: a copied checkpoint has the same fingerprint). Hashed once per process
  while each file stays the same file (device, inode) with the same size and times."""
  files = [pathlib.Path(model_dir) / "config.json", *weight_files(model_dir)]
  return _hash_files(tuple(_identity(f) for f in files))


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
  if "model" in saved and "model" in now and saved["model"] != now["model"]:
    raise _model_changed(f"--resume: --model {model_dir}")


def check_model(run_dir: pathlib.Path, model_dir: str) -> None:
  """Raises unless the base model in ``model_dir`` is the one the run in ``run_dir`` trained
  its adapters on (for ``predict``; hashed only when the run recorded its model)."""
  saved = _saved(run_dir)
  if saved and "model" in saved and saved["model"] != model_fingerprint(model_dir):
    raise _model_changed(f"--run-dir {run_dir}: its --model {model_dir}")


def _saved(run_dir: pathlib.Path) -> dict[str, Any] | None:
  file = run_dir / FILE
  return json.loads(file.read_text()) if file.exists() else None


def _model_changed(what: str) -> ValueError:
  return ValueError(
      f"{what}: the base model differs from the one the run trained on: its folder's "
      "config.json or weights changed since. Use the model the run started with (the "
      "adapters belong to its weights), or start a new run")
