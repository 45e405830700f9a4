"""Your own data and model: CSV / JSONL / Parquet classification files, sentence pairs, the
label map, `mgpo-jax predict`, and one-line errors that write nothing."""

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet
import pytest

from mgpo_jax import cli
from mgpo_jax.data import load_rotten_tomatoes, minilm_path
from mgpo_jax.data_files import load_classification_files
from mgpo_jax.finetune import fingerprint, predict

FAST = ["--steps", "4", "--eval-every", "4", "--save-every", "4", "--batch-size", "8",
        "--seq-len", "24", "--rank", "2", "--lr", "3e-3", "--no-progress"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Real snippets with string labels: train CSV, test JSONL, test Parquet."""
  root = tmp_path_factory.mktemp("files")
  split = load_rotten_tomatoes(seed=0)["train"]
  names = np.array(["neg", "pos"])[split.labels]
  rows = [{"review": t, "sentiment": str(n)} for t, n in zip(split.texts[:120], names[:120])]
  with open(root / "train.csv", "w") as f:
    f.write("review,sentiment\n")
    f.writelines(f'"{r["review"].replace(chr(34), chr(39))}",{r["sentiment"]}\n'
                 for r in rows[:80])
  with open(root / "test.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows[80:])
  pa.parquet.write_table(pa.Table.from_pylist(rows[80:]), root / "test.parquet")
  return root


def test_loader_builds_the_label_map_and_carves_validation(files):
  splits, labels = load_classification_files(
      str(files / "train.csv"), None, str(files / "test.parquet"), text_columns=["review"],
      label_column="sentiment", validation_fraction=0.25, seed=0)
  assert labels == ["neg", "pos"]
  assert len(splits["train"].texts) == 60 and len(splits["validation"].texts) == 20
  jsonl, _ = load_classification_files(
      str(files / "train.csv"), None, str(files / "test.jsonl"), text_columns=["review"],
      label_column="sentiment", validation_fraction=0.25, seed=0)
  assert jsonl["test"].texts == splits["test"].texts
  np.testing.assert_array_equal(jsonl["test"].labels, splits["test"].labels)
  again, _ = load_classification_files(
      str(files / "train.csv"), None, None, text_columns=["review"],
      label_column="sentiment", validation_fraction=0.25, seed=0)
  assert again["validation"].texts == splits["validation"].texts  # fixed seed


def test_integer_labels_and_sentence_pairs(tmp_path):
  (tmp_path / "pairs.jsonl").write_text("".join(
      json.dumps({"s1": f"a {i}", "s2": f"b {i}", "y": i % 3 * 10}) + "\n" for i in range(30)))
  splits, labels = load_classification_files(
      str(tmp_path / "pairs.jsonl"), None, None, text_columns=["s1", "s2"], label_column="y",
      validation_fraction=0.2)
  assert labels == [0, 10, 20]
  assert all(isinstance(t, tuple) and len(t) == 2 for t in splits["train"].texts)
  from transformers import AutoTokenizer

  from mgpo_jax.data import tokenize

  arrays = tokenize(splits["train"].texts[:4], AutoTokenizer.from_pretrained(minilm_path()), 16)
  assert (arrays["token_type_ids"] == 1).any(axis=1).all()  # the second sentence's segment


def test_finetune_on_files_then_predict(tmp_path, files, capsys):
  run = tmp_path / "run"
  code = cli.main(["finetune", "--train-file", str(files / "train.csv"), "--test-file",
                   str(files / "test.jsonl"), "--text-column", "review", "--label-column",
                   "sentiment", "--run-dir", str(run), *FAST])
  assert code == 0, capsys.readouterr().err
  capsys.readouterr()
  assert json.loads((run / "labels.json").read_text()) == ["neg", "pos"]
  summary = json.loads((run / "summary.json").read_text())

  out = tmp_path / "pred.jsonl"
  assert cli.main(["predict", "--run-dir", str(run), "--input-file",
                   str(files / "test.jsonl"), "--output", str(out)]) == 0
  preds = [json.loads(line) for line in out.read_text().splitlines()]
  lines = (files / "test.jsonl").read_text().splitlines()
  truth = [json.loads(line)["sentiment"] for line in lines]
  assert len(preds) == len(truth)
  for p in preds:
    assert p["label"] in ("neg", "pos") and abs(sum(p["probabilities"].values()) - 1) < 1e-5
  accuracy = np.mean([p["label"] == t for p, t in zip(preds, truth)])
  assert accuracy == pytest.approx(summary["test_accuracy"], abs=1e-6)  # the run's own model

  assert cli.main(["predict", "--run-dir", str(run), "--text", "a gorgeous film",
                   "--text", "dull"]) == 0
  printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [p["text"] for p in printed] == ["a gorgeous film", "dull"]
  assert printed == predict.predict(run, ["a gorgeous film", "dull"])
  with pytest.raises(ValueError, match=r"classifies single texts \(its text column 'review'\), "
                                       r"but 1 input\(s\) are pairs"):
    predict.predict(run, ["fine", ("a pair", "of texts")])  # not silently one text


def _finetune_a_model_copy(tmp_path, files, capsys):
  """``(model, run, args)``: a finished run on a copy of MiniLM's folder, and its flags."""
  model = tmp_path / "m"
  shutil.copytree(minilm_path(), model, ignore=shutil.ignore_patterns("1_Pooling", "*.md"))
  run = tmp_path / "run"
  args = ["--train-file", str(files / "train.csv"), "--text-column", "review",
          "--label-column", "sentiment", "--model", str(model), "--run-dir", str(run), *FAST]
  assert cli.main(["finetune", *args]) == 0, capsys.readouterr().err
  capsys.readouterr()
  return model, run, args


def test_resume_and_predict_refuse_a_changed_base_model(tmp_path, files, capsys):
  """The adapters belong to the weights they were trained on: once the --model folder's
  weights change, --resume and predict refuse it (one line, nothing written); the same bytes
  again (a restored or copied folder) are accepted."""
  import safetensors.numpy

  model, run, args = _finetune_a_model_copy(tmp_path, files, capsys)
  assert cli.main(["predict", "--run-dir", str(run), "--text", "fine"]) == 0
  before = capsys.readouterr().out

  original = (model / "model.safetensors").read_bytes()
  tensors = safetensors.numpy.load(original)
  name = next(k for k in tensors if k.endswith("attention.self.query.weight"))
  tensors[name] = tensors[name] + np.float32(1e-3)  # a fine-tuned base: same shapes
  safetensors.numpy.save_file(tensors, model / "model.safetensors")
  saved = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
  assert cli.main(["predict", "--run-dir", str(run), "--text", "fine"]) == 2
  _one_line(capsys, f"--run-dir {run}: its --model {model}: the base model differs from the "
                    "one the run trained on")
  assert cli.main(["finetune", *args, "--resume"]) == 2
  _one_line(capsys, f"--resume: --model {model}: the base model differs")
  assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == saved

  recorded = json.loads((run / "data.json").read_text())
  without_model = {k: v for k, v in recorded.items() if k != "model"}  # as runs saved before
  (run / "data.json").write_text(json.dumps(without_model))
  assert cli.main(["predict", "--run-dir", str(run), "--text", "fine"]) == 0  # not checked
  capsys.readouterr()
  (run / "data.json").write_text(json.dumps(recorded))

  (model / "model.safetensors").write_bytes(original)  # the same bytes, a new mtime
  assert cli.main(["predict", "--run-dir", str(run), "--text", "fine"]) == 0
  assert capsys.readouterr().out == before
  copy = shutil.copytree(model, tmp_path / "elsewhere")
  assert fingerprint.model_fingerprint(copy) == recorded["model"]


def test_predict_refuses_a_changed_tokenizer_and_damaged_run_files(tmp_path, files, capsys):
  """The tokens are part of what the adapters learned: a changed tokenizer file is refused by
  predict and --resume (one line, nothing written), the restored one accepted; a damaged
  data.json, labels.json or config.json is a one-line error that names the file."""
  model, run, args = _finetune_a_model_copy(tmp_path, files, capsys)
  predict_args = ["predict", "--run-dir", str(run), "--text", "Fine"]
  assert cli.main(predict_args) == 0
  before = capsys.readouterr().out

  original = (model / "tokenizer_config.json").read_text()
  changed = {**json.loads(original), "do_lower_case": False}  # "Fine" is now another token
  (model / "tokenizer_config.json").write_text(json.dumps(changed))
  saved = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
  assert cli.main(predict_args) == 2
  _one_line(capsys, f"--run-dir {run}: its --model {model}: the tokenizer differs from the one "
                    "the run trained on: its folder's tokenizer files changed")
  assert cli.main(["finetune", *args, "--resume"]) == 2
  _one_line(capsys, "--resume:")
  assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == saved
  (model / "tokenizer_config.json").write_text(original)
  assert cli.main(predict_args) == 0 and capsys.readouterr().out == before

  for name in ("data.json", "labels.json"):  # config.json: below, for every reader of it
    good = (run / name).read_text()
    (run / name).write_text(good[:len(good) // 2])  # cut short
    assert cli.main(predict_args) == 2
    _one_line(capsys, f"--run-dir {run}: {name} is not valid JSON (")
    (run / name).write_text(good)
  good = (run / "config.json").read_text()
  for damaged, error in ((good[:len(good) // 2], "is not valid JSON ("),
                         (json.dumps({**json.loads(good), "rnak": 8}),
                          "is not a valid run config (config: unknown field(s) rnak (did you "
                          "mean rank?)")):
    (run / "config.json").write_text(damaged)
    for command in (predict_args, ["finetune", *args, "--resume"],
                    ["predict", "--run-dir", str(run), "--input-file", str(files / "test.jsonl")]):
      assert cli.main(command) == 2
      _one_line(capsys, f"--run-dir {run}: config.json {error}")
  (run / "config.json").write_text(good)
  assert cli.main(predict_args) == 0 and capsys.readouterr().out == before


def test_model_fingerprint_of_a_sharded_checkpoint(tmp_path):
  """Every shard the index names is hashed (a changed one changes the fingerprint; a missing
  one is a one-line --model error), and a rewrite is seen even with the old size and mtime."""
  import safetensors.numpy

  from mgpo_jax.finetune.config import FinetuneConfig
  from mgpo_jax.finetune.job import model_path

  folder = tmp_path / "sharded"
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
  rng = np.random.default_rng(0)
  shards = {"model-1.safetensors": {"a": rng.normal(size=(3, 4)).astype(np.float32)},
            "model-2.safetensors": {"b": rng.normal(size=(5,)).astype(np.float32)}}
  for name, tensors in shards.items():
    safetensors.numpy.save_file(tensors, folder / name)
  (folder / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {k: name for name, tensors in shards.items() for k in tensors}}))
  first = fingerprint.model_fingerprint(folder)

  second = folder / "model-2.safetensors"
  stat = second.stat()
  safetensors.numpy.save_file({"b": shards["model-2.safetensors"]["b"] + 1}, second)
  assert second.stat().st_size == stat.st_size
  os.utime(second, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the old mtime, new bytes
  changed = fingerprint.model_fingerprint(folder)
  assert changed != first
  safetensors.numpy.save_file(shards["model-2.safetensors"], second)
  assert fingerprint.model_fingerprint(folder) == first

  second.unlink()
  with pytest.raises(ValueError, match=r"--model .*sharded: .*names shards that are not "
                                       r"there: model-2.safetensors"):
    model_path(FinetuneConfig(model=str(folder)))


def _one_line(capsys, *needles):
  err = capsys.readouterr().err.strip()
  assert err.startswith("mgpo-jax: error:") and len(err.splitlines()) == 1, err
  for needle in needles:
    assert needle in err, err


@pytest.mark.parametrize("case", ["missing column", "empty file", "unknown label",
                                  "no weights", "unsupported model", "not a folder"])
def test_bad_files_are_one_line_errors_that_write_nothing(tmp_path, files, capsys, case):
  args = ["--train-file", str(files / "train.csv"), "--text-column", "review",
          "--label-column", "sentiment"]
  if case == "missing column":
    args[3], needles = "body", ["--text-column 'body'", "train.csv", "review, sentiment"]
  elif case == "empty file":
    (tmp_path / "empty.csv").write_text("")
    args[1], needles = str(tmp_path / "empty.csv"), ["--train-file", "empty.csv", "empty"]
  elif case == "unknown label":
    (tmp_path / "test.jsonl").write_text(json.dumps({"review": "x", "sentiment": "meh"}) + "\n")
    args += ["--test-file", str(tmp_path / "test.jsonl")]
    needles = ["--test-file", "test.jsonl", "'meh'", "'neg', 'pos'"]
  elif case == "no weights":
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(open(f"{minilm_path()}/config.json").read())
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
      (tmp_path / "m" / name).write_bytes(open(f"{minilm_path()}/{name}", "rb").read())
    args += ["--model", str(tmp_path / "m")]
    needles = ["--model", str(tmp_path / "m"), "safetensors"]
  elif case == "unsupported model":
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    args += ["--model", str(tmp_path / "m")]
    needles = ["--model", "'gpt2'", "supported: bert"]
  else:
    args += ["--model", "bert-base-uncased"]
    needles = ["--model bert-base-uncased", "not a local", "hub"]
  assert cli.main(["finetune", "--run-dir", str(tmp_path / "run"), *args, *FAST]) == 2
  _one_line(capsys, *needles)
  assert not (tmp_path / "run").exists()
