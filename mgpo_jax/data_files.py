"""Classification data from the user's own files: CSV, JSONL or Parquet, read with pyarrow.

:func:`load_classification_files` reads a train file and optional validation and test files,
checks the columns, builds the label <-> id map once from the training labels (sorted; strings
or integers), and carves a validation split from train (fixed seed) when no validation file is
given. Every problem is a ``ValueError`` naming the flag and the file.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from mgpo_jax.data import Split

_READERS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json",
            ".parquet": "parquet", ".pq": "parquet"}


def read_table(path: str, flag: str) -> dict[str, list[Any]]:
  """The columns of a CSV/TSV, JSONL (one object per line) or Parquet file."""
  import pyarrow as pa
  import pyarrow.csv
  import pyarrow.json
  import pyarrow.parquet

  file = pathlib.Path(path)
  kind = _READERS.get(file.suffix.lower())
  if kind is None:
    raise ValueError(f"{flag} {path}: unknown file type {file.suffix!r}; accepted: "
                     f"{', '.join(sorted(_READERS))}")
  if not file.is_file():
    raise ValueError(f"{flag} {path}: no such file")
  try:
    if kind == "csv":
      options = pa.csv.ParseOptions(delimiter="\t" if file.suffix.lower() == ".tsv" else ",")
      table = pa.csv.read_csv(file, parse_options=options)
    elif kind == "json":
      table = pa.json.read_json(file)
    else:
      table = pa.parquet.read_table(file)
  except (pa.ArrowInvalid, OSError) as err:
    if file.stat().st_size == 0 or "Empty CSV file" in str(err):
      raise ValueError(f"{flag} {path} is empty") from err
    raise ValueError(f"{flag} {path} cannot be read as {kind} ({err})") from err
  if table.num_rows == 0:
    raise ValueError(f"{flag} {path} has no rows")
  return table.to_pydict()


def _examples(columns: dict[str, list[Any]], text_columns: Sequence[str], label_column: str,
              flag: str, path: str) -> tuple[list[Any], list[Any]]:
  for name, what in [*((c, "--text-column") for c in text_columns),
                     (label_column, "--label-column")]:
    if name not in columns:
      raise ValueError(f"{what} {name!r} is not a column of {flag} {path} "
                       f"(columns: {', '.join(columns)})")
  texts = [columns[c] for c in text_columns]
  for c, values in zip(text_columns, texts):
    bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
    if bad is not None:
      raise ValueError(f"{flag} {path}: row {bad + 1} of --text-column {c!r} is not text "
                       f"({values[bad]!r})")
  labels = columns[label_column]
  if any(v is None for v in labels):
    raise ValueError(f"{flag} {path}: --label-column {label_column!r} has empty values")
  return list(zip(*texts)) if len(texts) == 2 else list(texts[0]), labels


def load_classification_files(
    train_file: str, validation_file: str | None, test_file: str | None, *,
    text_columns: Sequence[str], label_column: str, validation_fraction: float, seed: int = 0,
) -> tuple[dict[str, Split], list[Any]]:
  """``({"train", "validation"[, "test"]}: Split, label_names)`` from the user's files.

  ``Split.texts`` holds strings, or ``(first, second)`` pairs when two text columns are
  given. ``label_names[i]`` is the label of id ``i``.
  """
  if len(text_columns) not in (1, 2):
    raise ValueError(f"--text-column takes one column, or two comma-separated for sentence "
                     f"pairs; got {','.join(text_columns)!r}")
  files = {"train": ("--train-file", train_file), "validation": ("--validation-file",
           validation_file), "test": ("--test-file", test_file)}
  raw = {name: _examples(read_table(path, flag), text_columns, label_column, flag, path)
         for name, (flag, path) in files.items() if path}
  label_names = sorted(set(raw["train"][1]), key=lambda v: (isinstance(v, str), v))
  if len(label_names) < 2:
    raise ValueError(f"--train-file {train_file}: --label-column {label_column!r} has fewer "
                     f"than two distinct labels ({label_names})")
  ids = {v: i for i, v in enumerate(label_names)}
  splits = {}
  for name, (texts, labels) in raw.items():
    unknown = sorted({v for v in labels if v not in ids}, key=str)
    if unknown:
      flag, path = files[name]
      raise ValueError(f"{flag} {path} has label(s) {', '.join(map(repr, unknown[:3]))} not in "
                       f"--train-file (labels: {', '.join(map(repr, label_names))})")
    splits[name] = Split(texts, np.asarray([ids[v] for v in labels], np.int32))
  if "validation" not in splits:
    train = splits["train"]
    pick = lambda idx: Split([train.texts[i] for i in idx], train.labels[idx])  # noqa: E731
    val, rest = _carve(len(train.labels), validation_fraction, seed)
    splits["validation"], splits["train"] = pick(val), pick(rest)
  return splits, label_names


def _carve(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """``(validation, train)`` indices: a fixed-seed ``fraction`` of ``n`` training rows."""
  order = np.random.default_rng(seed).permutation(n)
  n_val = int(round(fraction * n))
  if not 0 < n_val < n:
    raise ValueError(f"--validation-fraction {fraction} of {n} training examples leaves an "
                     "empty split; give --validation-file")
  return order[:n_val], order[n_val:]


def load_text_files(
    train_file: str, validation_file: str | None, test_file: str | None, *,
    columns: Sequence[str], validation_fraction: float, seed: int = 0,
) -> dict[str, dict[str, list[str]]]:
  """``{split: {column: texts}}`` for language modelling: the named text ``columns`` (e.g.
  prompt and response) of each file; validation carved from train (fixed seed) when absent."""
  files = {"train": ("--train-file", train_file), "validation": ("--validation-file",
           validation_file), "test": ("--test-file", test_file)}
  splits = {}
  for name, (flag, path) in files.items():
    if not path:
      continue
    table = read_table(path, flag)
    split = {}
    for column in columns:
      if column not in table:
        raise ValueError(f"column {column!r} is not in {flag} {path} "
                         f"(columns: {', '.join(table)})")
      split[column] = list(table[column])
      bad = next((i for i, v in enumerate(split[column]) if not isinstance(v, str)), None)
      if bad is not None:
        raise ValueError(f"{flag} {path}: row {bad + 1} of column {column!r} is not text")
    splits[name] = split
  if "validation" not in splits:
    train = splits["train"]
    val, rest = _carve(len(train[columns[0]]), validation_fraction, seed)
    splits["validation"] = {c: [v[i] for i in val] for c, v in train.items()}
    splits["train"] = {c: [v[i] for i in rest] for c, v in train.items()}
  return splits
