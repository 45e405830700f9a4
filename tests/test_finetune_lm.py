"""`mgpo-jax finetune --task causal-lm` end to end on a tiny sharded Llama checkpoint, then
`mgpo-jax predict`; the adapters load in PyTorch with PEFT and give the same logits."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from mgpo_jax import cli
from mgpo_jax.finetune import FinetuneConfig, job, predict
import tiny_llama


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("lm")
  model_dir = tiny_llama.save_tiny_llama(root / "llama", seed=0, scale=0.2)
  assert (model_dir / "model.safetensors.index.json").exists()  # sharded
  pairs = tiny_llama.toy_pairs(24, seed=1)
  (root / "toy.jsonl").write_text("".join(
      json.dumps({"question": q, "answer": a}) + "\n" for q, a in pairs))
  args = ["finetune", "--task", "causal-lm", "--model", str(model_dir), "--train-file",
          str(root / "toy.jsonl"), "--prompt-column", "question", "--response-column",
          "answer", "--target-modules", "all-linear", "--optimizer", "adamw", "--lr", "2e-2",
          "--steps", "40", "--batch-size", "8", "--seq-len", "16", "--eval-every", "20",
          "--save-every", "40", "--validation-fraction", "0.25", "--eval-generate", "6",
          "--max-new-tokens", "4", "--rank", "8", "--run-dir", str(root / "run"),
          "--no-progress"]
  assert cli.main(args) == 0
  return root, model_dir, pairs


def test_loss_decreases_and_generation_is_scored(llama_run):
  root, _, _ = llama_run
  records = job.read_metrics(root / "run" / "metrics.jsonl")
  losses = [r["loss"] for r in records if "loss" in r]
  assert losses[-1] < 0.5 * losses[0], losses
  summary = json.loads((root / "run" / "summary.json").read_text())
  assert summary["val_perplexity"] == pytest.approx(np.exp(summary["val_loss"]), rel=1e-6)
  assert 0.0 <= summary["val_exact_match"] <= 1.0
  meta = json.loads((root / "run" / "adapters" / "adapter_config.json").read_text())
  assert meta["task_type"] == "CAUSAL_LM"


def test_prompt_tokens_carry_no_loss(llama_run):
  root, model_dir, _ = llama_run
  config = FinetuneConfig.from_json((root / "run" / "config.json").read_text())
  data = job.load_data(config)
  tokenizer = tiny_llama.build_tokenizer()
  prompts = data["generation"]["prompts"]
  for row, prompt in enumerate(prompts):
    n_prompt = len(tokenizer(prompt)["input_ids"])
    mask = data["validation"]["loss_mask"][row]
    assert not mask[:n_prompt].any() and mask[n_prompt:].sum() > 0


def test_adapters_give_the_same_logits_in_peft(llama_run):
  import torch
  from peft import PeftModel
  from transformers import AutoModelForCausalLM

  root, model_dir, pairs = llama_run
  _, _, ours = predict.load_run(root / "run")
  ids = np.asarray([tiny_llama.build_tokenizer()(pairs[0][0] + " " + pairs[0][1])["input_ids"]])
  mine = np.asarray(ours(jnp.asarray(ids), jnp.ones_like(jnp.asarray(ids))))
  base = AutoModelForCausalLM.from_pretrained(str(model_dir))
  peft_model = PeftModel.from_pretrained(base, str(root / "run" / "adapters")).eval()
  with torch.no_grad():
    theirs = peft_model(input_ids=torch.from_numpy(ids.astype(np.int64))).logits.numpy()
  np.testing.assert_allclose(mine, theirs, atol=1e-4)


def test_predict_generates(llama_run, capsys):
  root, _, pairs = llama_run
  capsys.readouterr()
  assert cli.main(["predict", "--run-dir", str(root / "run"), "--text", pairs[0][0]]) == 0
  (out,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert out["prompt"] == pairs[0][0] and isinstance(out["generated"], str)


def test_llama_sequence_classification_through_the_job(tmp_path, capsys, monkeypatch):
  """The classification path works for Llama too: `score` head trained in full, then predict,
  from another folder (the run saves the relative --model as an absolute path)."""
  tiny_llama.save_tiny_llama(tmp_path / "llama", seed=0, scale=0.2)
  monkeypatch.chdir(tmp_path)
  model_dir = "llama"
  rows = [{"text": q, "label": "big" if int(r.split()[-1]) > 40 else "small"}
          for q, r in tiny_llama.toy_pairs(40, seed=2)]
  (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert cli.main(["finetune", "--model", str(model_dir), "--train-file",  # BERT's flag
                   str(tmp_path / "train.jsonl"), "--pooling", "mean", "--run-dir",
                   str(tmp_path / "bad"), "--no-progress"]) == 2
  assert "--pooling mean applies to BERT classifiers" in capsys.readouterr().err
  assert cli.main(["finetune", "--model", str(model_dir), "--train-file",
                   str(tmp_path / "train.jsonl"), "--target-modules", "q_proj,v_proj",
                   "--optimizer", "adamw", "--steps", "6", "--batch-size", "8", "--seq-len",
                   "16", "--eval-every", "6", "--save-every", "6", "--run-dir",
                   str(tmp_path / "run"), "--no-progress"]) == 0
  meta = json.loads((tmp_path / "run" / "adapters" / "adapter_config.json").read_text())
  assert meta["task_type"] == "SEQ_CLS" and "score" in meta["modules_to_save"]
  assert meta["base_model_name_or_path"] == str(tmp_path / "llama")
  (tmp_path / "elsewhere").mkdir()
  monkeypatch.chdir(tmp_path / "elsewhere")
  capsys.readouterr()
  assert cli.main(["predict", "--run-dir", str(tmp_path / "run"), "--text", rows[0]["text"]]) == 0
  (out,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert out["label"] in ("big", "small")
  assert sum(out["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


def test_an_unsupported_rope_type_is_one_line(tmp_path, capsys):
  """A Llama 3.1-style checkpoint (rope_type llama3) is refused naming --model, not with a
  traceback, and nothing is written."""
  model_dir = tiny_llama.save_tiny_llama(tmp_path / "llama", seed=0, scale=0.2)
  config = json.loads((model_dir / "config.json").read_text())
  config["rope_parameters"] = config["rope_scaling"] = {
      "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
  (model_dir / "config.json").write_text(json.dumps(config))
  (tmp_path / "t.jsonl").write_text("".join(
      json.dumps({"question": q, "answer": a}) + "\n" for q, a in tiny_llama.toy_pairs(8, seed=1)))
  capsys.readouterr()  # the saver's progress bar
  assert cli.main(["finetune", "--task", "causal-lm", "--model", str(model_dir), "--train-file",
                   str(tmp_path / "t.jsonl"), "--prompt-column", "question",
                   "--response-column", "answer", "--target-modules", "all-linear",
                   "--seq-len", "16", "--batch-size", "4", "--run-dir", str(tmp_path / "run"),
                   "--no-progress"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"mgpo-jax: error: --model {model_dir}:") and "rope_type" in err, err
  assert len(err.splitlines()) == 1 and not (tmp_path / "run").exists()
