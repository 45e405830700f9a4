"""Llama from a SHARDED checkpoint folder: load_model dispatch and errors, param_dtype,
LlamaForSequenceClassification parity and PEFT SEQ_CLS adapters, and LoRA fine-tuning with
causal_lm_loss whose CAUSAL_LM adapters give the same logits in PyTorch + PEFT."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mgpo_jax.answers import exact_match_rate
from mgpo_jax.generate import greedy_generate
from mgpo_jax.lm_data import decode_generated, encode_prompt_response, encode_prompts
from mgpo_jax.lora import LoraConfig, apply_lora, lora_modules, save_adapters
from mgpo_jax.models import LlamaForCausalLM, LlamaForSequenceClassification, load_model
from mgpo_jax.train import Trainer, causal_lm_loss, classification_loss, clean_params
from tiny_llama import PAD_ID, build_tokenizer, save_tiny_llama, toy_pairs

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), scale=0.2)


def _padded_ids():
  ids = np.random.default_rng(1).integers(3, 200, size=(3, 8))
  mask = np.ones_like(ids)
  mask[1, :3] = 0  # left padding
  mask[2, 5:] = 0  # right padding
  return np.where(mask == 1, ids, PAD_ID), mask


def test_sharded_checkpoint_loads_exactly(llama_dir):
  index = json.loads((llama_dir / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  model = load_model(llama_dir, task="causal-lm")
  assert isinstance(model, LlamaForCausalLM)
  hf = transformers.LlamaForCausalLM.from_pretrained(str(llama_dir)).eval()
  ids, mask = _padded_ids()
  with torch.no_grad():
    want = hf(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
  got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  keep = mask.astype(bool)
  assert np.abs(want).max() > 0.5
  np.testing.assert_allclose(got[keep], want[keep], rtol=0, atol=1e-4)

  half = load_model(llama_dir, task="causal-lm", param_dtype=jnp.bfloat16)
  full, low = nnx.state(model, nnx.Param), nnx.state(half, nnx.Param)
  assert {x.dtype for x in jax.tree.leaves(low)} == {jnp.dtype(jnp.bfloat16)}
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(low)):
    np.testing.assert_array_equal(np.asarray(a.astype(jnp.bfloat16)), np.asarray(b))


def test_load_model_errors(llama_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="not an existing local directory"):
    load_model("meta-llama/Llama-3.2-1B", task="causal-lm")
  with pytest.raises(ValueError, match=r"task='seq2seq'; accepted values"):
    load_model(llama_dir, task="seq2seq")
  with pytest.raises(ValueError, match="num_labels=3 applies to task='classification'"):
    load_model(llama_dir, task="causal-lm", num_labels=3)
  for kind in ("qwen2", "mistral", "gpt2"):
    (tmp_path / kind).mkdir()
    (tmp_path / kind / "config.json").write_text(json.dumps({"model_type": kind}))
    with pytest.raises(ValueError, match=rf"model_type='{kind}' \(config.json in .*{kind}'\) is "
                       r"not supported .*supported model_types: bert \(classification\); "
                       r"llama \(classification, causal-lm\)"):
      load_model(tmp_path / kind)
  transformers.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=8).save_pretrained(str(tmp_path / "bert"))
  with pytest.raises(ValueError, match="model_type='bert'.*task='causal-lm'"):
    load_model(tmp_path / "bert", task="causal-lm")
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    load_model(tmp_path / "bert")  # a folder without weights


def test_llama_sequence_classification_matches_hf_and_peft(llama_dir, tmp_path):
  # a causal LM's checkpoint: lm_head skipped, a fresh score head
  fresh = load_model(llama_dir, num_labels=3)
  assert isinstance(fresh, LlamaForSequenceClassification) and fresh.score.kernel.shape == (32, 3)

  base = save_tiny_llama(tmp_path / "cls", task="classification", scale=0.2, num_labels=3,
                         max_shard_size="30KB")
  hf = transformers.LlamaForSequenceClassification.from_pretrained(str(base)).eval()
  pristine = load_model(base)
  assert isinstance(pristine, LlamaForSequenceClassification) and pristine.num_labels == 3
  ids, mask = _padded_ids()
  with torch.no_grad():
    want = hf(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
  np.testing.assert_allclose(np.asarray(pristine(jnp.asarray(ids), jnp.asarray(mask))), want,
                             rtol=0, atol=1e-4)
  labels = jnp.asarray([0, 2, 1])
  loss, metrics = classification_loss(pristine, {  # BERT-style batches work (types ignored)
    "input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask),
    "token_type_ids": jnp.zeros_like(jnp.asarray(ids)), "labels": labels})
  want_loss = torch.nn.functional.cross_entropy(torch.as_tensor(want), torch.as_tensor([0, 2, 1]))
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-4)
  assert float(metrics["count"]) == 3

  config = LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], r=2, alpha=4.0,
                      modules_to_save=["score"])
  model = apply_lora(nnx.clone(pristine), config, rngs=nnx.Rngs(1))
  rng = np.random.default_rng(2)
  for layer in lora_modules(model).values():
    layer.lora_b[...] = jnp.asarray(rng.normal(size=layer.lora_b.shape) * 0.2, jnp.float32)
  model.score.kernel[...] = model.score.kernel[...] * 2 + 0.05
  expected = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  assert np.abs(expected - want).max() > 1e-2
  save_adapters(tmp_path / "adapter", model, config, base_model_name_or_path=str(base),
                task_type="SEQ_CLS")
  pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
  with torch.no_grad():
    got = pm(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits
  np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-4)


def test_lora_finetune_causal_lm_then_peft_logits(llama_dir, tmp_path):
  tok = build_tokenizer()
  pairs = toy_pairs(8)
  batch = encode_prompt_response(tok, *zip(*pairs), seq_len=12).arrays()
  assert batch["loss_mask"][batch["input_ids"] == tok.bos_token_id].sum() == 0

  config = LoraConfig(target_modules="all-linear", r=4, alpha=8.0)
  model = apply_lora(LlamaForCausalLM.from_pretrained(llama_dir), config, rngs=nnx.Rngs(1))
  trainer = Trainer(model, optax.adamw(2e-2), causal_lm_loss)
  state = trainer.init(0)
  batch = trainer.shard_batch(batch)
  first = float(trainer.eval_step(state, batch)["loss_sum"])
  losses = []
  for _ in range(25):
    state, metrics = trainer.train_step(state, batch)
    losses.append(float(metrics["loss"]))
  last = trainer.eval_step(state, batch)
  assert float(last["count"]) == sum(len(r.split()) + 1 for _, r in pairs)  # response + EOS
  assert float(last["loss_sum"]) < 0.2 * first, (first, losses)

  nnx.update(model, clean_params(state))
  save_adapters(tmp_path / "adapter", model, config, base_model_name_or_path=str(llama_dir),
                task_type="CAUSAL_LM")
  meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  assert meta["task_type"] == "CAUSAL_LM"
  hf = transformers.LlamaForCausalLM.from_pretrained(str(llama_dir)).eval()
  pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
  ids, mask = _padded_ids()
  with torch.no_grad():
    want = pm(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits
  got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  keep = mask.astype(bool)
  np.testing.assert_allclose(got[keep], want.numpy()[keep], rtol=0, atol=1e-4)

  # the memorised answers come back from greedy generation
  prompt_ids, prompt_mask = encode_prompts(tok, [p for p, _ in pairs], 8)
  tokens = greedy_generate(model, prompt_ids, prompt_mask, max_new_tokens=3,
                           eos_token_id=tok.eos_token_id, pad_token_id=PAD_ID)
  texts = decode_generated(tok, tokens)
  assert exact_match_rate(texts, [r for _, r in pairs]) >= 0.75, texts
