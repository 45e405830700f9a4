"""The fine-tune job and the ``mgpo-jax finetune`` command: outputs, exact resume, bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from mgpo_jax import cli
from mgpo_jax.finetune import job
from mgpo_jax.finetune.config import FinetuneConfig
from mgpo_jax.lora import lora_modules

TINY = dict(batch_size=4, seq_len=16, steps=6, eval_every=3, save_every=3, rank=2, alpha=4.0)


@pytest.fixture(scope="module")
def small_data():
  """A few real, tokenised Rotten Tomatoes examples per split (fast runs)."""
  data = job.load_data(FinetuneConfig(seq_len=TINY["seq_len"]))
  rng = np.random.default_rng(0)
  sizes = {"train": 48, "validation": 20, "test": 20}
  out = {}
  for name, n in sizes.items():
    idx = rng.choice(len(data[name]["labels"]), n, replace=False)
    out[name] = {k: v[idx] for k, v in data[name].items()}
  return {**out, "label_names": data["label_names"]}


def _run_cli(args, cwd):
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  return subprocess.run([sys.executable, "-m", "mgpo_jax.cli", "finetune", *args], cwd=cwd,
                        capture_output=True, text=True, env=env, timeout=600)


def _assert_one_line_error(result, *needles):
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("mgpo-jax: error:"), result.stderr
  assert "Traceback" not in result.stderr
  for needle in needles:
    assert needle in lines[0], lines[0]


def test_cli_end_to_end(tmp_path):
  run_dir = tmp_path / "run"
  result = _run_cli(["--steps", "4", "--eval-every", "2", "--save-every", "2", "--batch-size",
                     "4", "--seq-len", "16", "--rank", "2", "--run-dir", str(run_dir),
                     "--no-progress"], tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "test accuracy" in result.stdout
  config = json.loads((run_dir / "config.json").read_text())
  assert config["optimizer"] == "mgpo" and config["rank"] == 2 and config["steps"] == 4
  records = job.read_metrics(run_dir / "metrics.jsonl")
  assert [r["step"] for r in records if "loss" in r] == [2, 4]  # at checkpoints and the end
  assert [r["step"] for r in records if "val_accuracy" in r] == [2, 4]
  summary = json.loads((run_dir / "summary.json").read_text())
  assert 0.0 <= summary["test_accuracy"] <= 1.0
  assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["2", "4"]
  adapter_config = json.loads((run_dir / "adapters" / "adapter_config.json").read_text())
  assert adapter_config["r"] == 2 and adapter_config["peft_type"] == "LORA"
  tensors = load_file(run_dir / "adapters" / "adapter_model.safetensors")
  assert any(k.endswith("query.lora_A.weight") for k in tensors)
  assert all("lora_" in k or "classifier" in k for k in tensors)  # adapters and head only
  assert all(np.abs(v).max() > 0 for k, v in tensors.items() if "lora_B" in k)  # trained (B0 = 0)
  assert (run_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"


def _interrupt_after(monkeypatch, calls):
  real = job.Trainer.train_step
  count = {"n": 0}

  def step(self, state, batch):
    count["n"] += 1
    if count["n"] > calls:
      raise KeyboardInterrupt
    return real(self, state, batch)

  monkeypatch.setattr(job.Trainer, "train_step", step)


def test_resume_is_bit_identical(tmp_path, small_data, monkeypatch):
  config = FinetuneConfig(**TINY, run_dir=str(tmp_path / "full"))
  full = job.run(config, progress=False, data=small_data)

  interrupted = config.replace(run_dir=str(tmp_path / "resumed"))
  with monkeypatch.context() as m:
    _interrupt_after(m, 4)  # dies after step 4; the last checkpoint is step 3
    with pytest.raises(KeyboardInterrupt):
      job.run(interrupted, progress=False, data=small_data)
  with pytest.raises(job.UserError, match=r"--steps 999 \(saved: 6\)"):
    job.run(interrupted.replace(steps=999), resume=True, progress=False, data=small_data)
  resumed = job.run(interrupted, resume=True, progress=False, data=small_data)

  assert resumed == full
  assert (job.read_metrics(tmp_path / "full" / "metrics.jsonl")
          == job.read_metrics(tmp_path / "resumed" / "metrics.jsonl"))
  a = load_file(tmp_path / "full" / "adapters" / "adapter_model.safetensors")
  b = load_file(tmp_path / "resumed" / "adapters" / "adapter_model.safetensors")
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_compare_overlays_runs(tmp_path, small_data, monkeypatch, capsys):
  monkeypatch.setattr(job, "load_data", lambda config: small_data)
  config = FinetuneConfig(**{**TINY, "steps": 2, "eval_every": 2, "rho": 0.1},
                          run_dir=str(tmp_path))
  summaries = job.run_compare(config, ("adamw", "mgpo"), progress=False)
  assert set(summaries) == {"adamw", "mgpo"}
  rho = {m: json.loads((tmp_path / m / "config.json").read_text())["rho"] for m in summaries}
  assert rho == {"adamw": None, "mgpo": 0.1}  # each method keeps its own hyper-parameters
  assert (tmp_path / "compare.png").exists()
  assert json.loads((tmp_path / "summary.json").read_text()) == summaries
  table = capsys.readouterr().out
  assert "adamw" in table and "mgpo" in table and "test acc" in table


def test_resume_of_a_run_saved_with_an_unused_hyper_parameter(tmp_path, small_data,
                                                              monkeypatch, capsys):
  """A run saved before an unused --rho or --validation-fraction became an error (adamw,
  ``rho: 0.1`` and, without a train file, ``validation_fraction: 0.2`` in its config.json)
  still resumes: the values never had an effect on it."""
  monkeypatch.setattr(job, "load_data", lambda config: small_data)
  run_dir = tmp_path / "run"
  job.run(FinetuneConfig(**TINY, optimizer="adamw", run_dir=str(run_dir)), progress=False)
  saved = json.loads((run_dir / "config.json").read_text())
  (run_dir / "config.json").write_text(json.dumps({**saved, "rho": 0.1,
                                                   "validation_fraction": 0.2}))
  code = cli.main(["finetune", "--resume", "--run-dir", str(run_dir), "--no-progress"])
  assert code == 0, capsys.readouterr().err


def _tiny_job():
  """The benchmarks' tiny random BERT and random token data (fast runs)."""
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from benchmarks import _common

  return _common.tiny_base_model, _common.random_data({"train": 32, "validation": 8,
                                                       "test": 8}, TINY["seq_len"])


@pytest.mark.slow
def test_compare_adamw_lora_one(tmp_path, capsys):
  """``--compare adamw,lora-one``: lora-one starts from the spectral init (rsLoRA, B ≠ 0, the
  gradient taken on the first training batch) with the preconditioner in its optimizer, and
  exports plain PEFT adapters."""
  base_model, data = _tiny_job()
  args = cli._parser().parse_args(["finetune", "--compare", "adamw,lora-one", "--run-dir",
                                   str(tmp_path), "--steps", "2", "--eval-every", "2",
                                   "--save-every", "2", "--batch-size", "4", "--seq-len", "16",
                                   "--rank", "2"])
  config = cli._config(args)
  summaries = job.run_compare(config, config.parse_compare(args.compare), progress=False,
                              data=data, base_model=base_model)
  assert set(summaries) == {"adamw", "lora-one"}
  meta = json.loads((tmp_path / "lora-one" / "adapters" / "adapter_config.json").read_text())
  assert meta["use_rslora"] is True and meta["init_lora_weights"] is True
  assert json.loads((tmp_path / "adamw" / "adapters" / "adapter_config.json").read_text())[
      "use_rslora"] is False
  config = config.replace(optimizer="lora-one")
  model, lora = job.build_model(config, base_model(config), data=data)
  layer = next(iter(lora_modules(model).values()))
  assert lora.init == "lora-one" and lora.use_rslora and float(abs(layer.lora_b[...]).max()) > 0
  tx_state = job.build_optimizer(config).init({"q": {"lora_a": np.ones((3, 2)),
                                                     "lora_b": np.ones((2, 3))}})
  assert "PreconditionLoraState" in repr(tx_state)
  with pytest.raises(ValueError, match="needs the training data"):
    job.build_model(config, base_model(config))


def test_lora_one_flags_build_the_model_and_optimizer(tmp_path):
  """``--init lora-one --precondition`` with MGPO, and ``--optimizer lora-one``: the flags
  parse, the model starts from the spectral init, the preconditioner sits inside MGPO's
  base."""
  base_model, data = _tiny_job()
  args = cli._parser().parse_args([
      "finetune", "--optimizer", "mgpo", "--init", "lora-one", "--precondition",
      "--init-examples", "4", "--run-dir", str(tmp_path), "--batch-size", "4", "--seq-len",
      "16", "--rank", "2"])
  config = cli._config(args)
  assert (config.init_lora_weights, config.precondition, config.init_examples) == (
      "lora-one", True, 4)
  seen = []
  real = job.apply_lora_one
  with pytest.MonkeyPatch.context() as m:  # more than the 32 training examples: each once
    m.setattr(job, "apply_lora_one", lambda *a, num_examples, **k: seen.append(num_examples)
              or real(*a, num_examples=num_examples, **k))
    job.build_model(config.replace(init_examples=10**6), base_model(config), data=data)
  assert seen == [32]
  model, lora = job.build_model(config, base_model(config), data=data)
  assert lora.init == "lora-one" and not lora.use_rslora  # --use-rslora is the user's here
  assert all(float(abs(m.lora_b[...]).max()) > 0 for m in lora_modules(model).values())
  params = {"q": {"lora_a": np.ones((3, 2), np.float32), "lora_b": np.ones((2, 3), np.float32)}}
  state = repr(job.build_optimizer(config).init(params))
  assert "MGPOState" in state and "PreconditionLoraState" in state
  assert "PreconditionLoraState" not in repr(job.build_optimizer(
      config.replace(precondition=False)).init(params))
  config = config.replace(optimizer="lora-one", init_lora_weights="default")
  assert config.parse_compare("adamw,lora-one") == ("adamw", "lora-one")
  model, lora = job.build_model(config, base_model(config), data=data)
  assert lora.init == "lora-one" and lora.use_rslora
  assert "PreconditionLoraState" in repr(job.build_optimizer(config).init(params))
  with pytest.raises(ValueError, match="needs the training data"):
    job.build_model(config, base_model(config))


@pytest.mark.slow
def test_cli_compare_adamw_lora_one_minilm(tmp_path, small_data, monkeypatch, capsys):
  """The command itself, on MiniLM: ``mgpo-jax finetune --compare adamw,lora-one``."""
  monkeypatch.setattr(job, "load_data", lambda seq_len: small_data)
  code = cli.main(["finetune", "--compare", "adamw,lora-one", "--run-dir", str(tmp_path),
                   "--no-progress", "--batch-size", "4", "--seq-len", "16", "--steps", "2",
                   "--eval-every", "2", "--save-every", "2", "--rank", "2"])
  assert code == 0, capsys.readouterr().err
  assert (tmp_path / "lora-one" / "adapters" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("args, needles", [
    (["--optimizer", "lion"], ["--optimizer", "adamw, mgpo, sam", "lion"]),
    (["--seed", "100000000000000000000"], ["--seed", "4294967295"]),
    (["--seed", "-1"], ["--seed", "[0, 4294967295]"]),
    (["--seed", "x"], ["--seed", "invalid int"]),
    (["--pooling", "max"], ["--pooling", "cls, mean"]),
    (["--run-dir", ""], ["--run-dir"]),
    (["--target-modules", "re:("], ["--target-modules", "regex"]),
    (["--lr", "0"], ["--lr", "> 0"]),
    (["--lr=-1e-3"], ["--lr"]),
    (["--rank", "0"], ["--rank", "positive integer"]),
    (["--batch-size", "6", "--devices", "4"], ["--batch-size", "--devices"]),
    (["--sign", "2"], ["--sign", "+1, -1"]),
    (["--compare", "adamw,foo"], ["--compare", "foo"]),
    (["--optimizer", "lora-one", "--init", "pissa"], ["--optimizer lora-one", "pissa"]),
    (["--init", "svd"], ["--init-lora-weights", "lora-one"]),
    (["--init-examples", "0"], ["--init-examples", "positive integer"]),
    (["--precondition-damping", "0"], ["--precondition-damping", "> 0"]),
    (["--optimizer", "adamw", "--rho", "0.1"], ["--rho is not a hyper-parameter of adamw",
                                                "takes: none"]),
    (["--compare", "adamw,flat-lora", "--sign", "1"], ["--sign", "adamw, flat-lora",
                                                       "take: --sigma"]),
    (["--compare", "adamw,lora-one", "--init", "gaussian"], ["--compare's lora-one",
                                                             "gaussian"]),
    (["--validation-fraction", "0.2"], ["--validation-fraction", "--train-file"]),
    (["--task", "causal-lm", "--model", ".", "--train-file", "t.jsonl", "--eval-generate", "3"],
     ["--eval-generate", "--prompt-column"]),
])
def test_bad_flags_fail_fast(args, needles, tmp_path, capsys):
  assert cli.main(["finetune", "--run-dir", str(tmp_path / "r"), *args]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("mgpo-jax: error:") and len(err.splitlines()) == 1
  for needle in needles:
    assert needle in err
  assert not (tmp_path / "r").exists()  # nothing created


def test_unknown_target_module(tmp_path, capsys, small_data, monkeypatch):
  monkeypatch.setattr(job, "load_data", lambda config: small_data)
  code = cli.main(["finetune", "--target-modules", "qkv", "--run-dir", str(tmp_path / "r"),
                   "--no-progress"])
  err = capsys.readouterr().err.strip()
  assert code == 2 and len(err.splitlines()) == 1
  assert "qkv" in err and "attention.self.query" in err  # lists the linear module paths


def test_run_directory_is_protected(tmp_path, small_data):
  run_dir = tmp_path / "run"
  run_dir.mkdir()
  (run_dir / "notes.txt").write_text("mine")
  config = FinetuneConfig(**TINY, run_dir=str(run_dir))
  with pytest.raises(job.UserError, match="not empty"):
    job.run(config, progress=False, data=small_data)
  with pytest.raises(job.UserError, match=r"1 entry mgpo-jax did not write \(notes.txt\)"):
    job.run(config, overwrite=True, progress=False, data=small_data)
  with pytest.raises(job.UserError, match="not an mgpo-jax run directory"):
    job.run(config, resume=True, progress=False, data=small_data)
  assert (run_dir / "notes.txt").read_text() == "mine"
  assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt"]


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, small_data, capsys, monkeypatch):
  config = FinetuneConfig(**{**TINY, "steps": 3}, run_dir=str(tmp_path / "run"))
  job.run(config, progress=False, data=small_data)
  state_dir = tmp_path / "run" / "checkpoints" / "3" / "state"
  victims = [p for p in state_dir.rglob("*") if p.is_file() and p.stat().st_size > 0
             and "ocdbt" not in p.name]
  data_files = [p for p in victims if p.parent.name == "d"] or victims
  before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
  target = max(data_files, key=lambda p: p.stat().st_size)
  target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
  before[target] = target.read_bytes()

  monkeypatch.setattr(job, "load_data", lambda config: small_data)
  code = cli.main(["finetune", "--resume", "--run-dir", str(tmp_path / "run"), "--no-progress"])
  err = capsys.readouterr().err.strip()
  assert code == 2 and len(err.splitlines()) == 1, err
  assert "checkpoint step 3" in err
  after = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
  assert after == before  # nothing overwritten or lost


def test_job_adapters_load_in_peft_with_the_jobs_logits(tmp_path, small_data):
  """The exported adapters, loaded with PEFT onto the recorded base model as docs/training.md
  shows, give the job's own logits (the clean params of the final checkpoint) to 1e-4."""
  import jax.numpy as jnp
  import torch
  from flax import nnx
  from peft import PeftModel
  from transformers import AutoModelForSequenceClassification

  from mgpo_jax.train import Checkpointer, Trainer, clean_params

  config = FinetuneConfig(**{**TINY, "steps": 3, "lr": 1e-2}, run_dir=str(tmp_path / "run"))
  job.run(config, progress=False, data=small_data)
  model, _ = job.build_model(config)
  trainer = Trainer(model, job.build_optimizer(config))
  with Checkpointer(tmp_path / "run" / "checkpoints") as ckpt:
    state, _ = ckpt.restore(trainer.abstract_state())
  nnx.update(model, clean_params(state))
  model.eval()
  batch = {k: v[:8] for k, v in small_data["test"].items() if k != "labels"}
  ours = np.asarray(model(jnp.asarray(batch["input_ids"]),
                          attention_mask=jnp.asarray(batch["attention_mask"]),
                          token_type_ids=jnp.asarray(batch["token_type_ids"])))

  meta = json.loads((tmp_path / "run" / "adapters" / "adapter_config.json").read_text())
  base = AutoModelForSequenceClassification.from_pretrained(meta["base_model_name_or_path"],
                                                            num_labels=2)
  peft_model = PeftModel.from_pretrained(base, str(tmp_path / "run" / "adapters")).eval()
  with torch.no_grad():
    theirs = peft_model(**{k: torch.from_numpy(np.asarray(v, np.int64))
                           for k, v in batch.items()}).logits.numpy()
  assert np.abs(ours).max() > 0.01
  np.testing.assert_allclose(ours, theirs, atol=1e-4)
