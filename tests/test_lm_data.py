"""Causal-LM pieces without a model download: tokenisation masks (lm_data), the loss against a
float64 numpy reference (train.losses), and GSM8K-style answer scoring (answers)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mgpo_jax.answers import exact_match, exact_match_rate, normalize_answer
from mgpo_jax.lm_data import (decode_generated, encode_prompt_response, encode_prompts,
                              encode_texts, pad_token_id)
from mgpo_jax.train import causal_lm_loss, perplexity
from tiny_llama import BOS_ID, EOS_ID, PAD_ID, build_tokenizer


@pytest.fixture(scope="module")
def tok():
  return build_tokenizer()


def test_prompt_response_masks_the_prompt(tok):
  batch = encode_prompt_response(tok, ["what is 3 + 4 ?", "hello"], ["#### 7", "world"], 10)
  p = tok("what is 3 + 4 ?")["input_ids"]  # with BOS
  r = tok("#### 7", add_special_tokens=False)["input_ids"]
  assert p[0] == BOS_ID and len(p) == 7 and len(r) == 2
  np.testing.assert_array_equal(batch.input_ids[0], p + r + [EOS_ID])
  np.testing.assert_array_equal(batch.loss_mask[0], [0] * 7 + [1, 1, 1])
  np.testing.assert_array_equal(batch.attention_mask[0], [1] * 10)
  # right padding: pad id, no attention, no loss
  np.testing.assert_array_equal(batch.input_ids[1, 4:], [PAD_ID] * 6)
  np.testing.assert_array_equal(batch.loss_mask[1], [0, 0, 1, 1] + [0] * 6)
  np.testing.assert_array_equal(batch.attention_mask[1], [1] * 4 + [0] * 6)
  assert batch.truncated == 0 and batch.input_ids.dtype == np.int32
  assert set(batch.arrays()) == {"input_ids", "attention_mask", "loss_mask"}


def test_truncation_keeps_the_first_tokens(tok):
  batch = encode_prompt_response(tok, ["what is 3 + 4 ?", "what is 3 + 4 ?"], ["#### 7", "7"], 8)
  np.testing.assert_array_equal(batch.loss_mask[0], [0] * 7 + [1])  # response tail cut
  np.testing.assert_array_equal(batch.loss_mask[1], [0] * 7 + [1])
  assert batch.truncated == 2
  short = encode_prompt_response(tok, ["what is 3 + 4 ?"], ["#### 7"], 5)
  assert short.loss_mask.sum() == 0 and short.truncated == 1  # response cut away entirely


def test_texts_and_prompts(tok):
  batch = encode_texts(tok, ["hello world", "tiny"], 6)
  np.testing.assert_array_equal(batch.input_ids[0], [BOS_ID, *tok("hello world",
                                add_special_tokens=False)["input_ids"], EOS_ID, PAD_ID, PAD_ID])
  np.testing.assert_array_equal(batch.loss_mask[0], [0, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(batch.loss_mask[1], [0, 1, 1, 0, 0, 0])
  ids, mask = encode_prompts(tok, ["what is 3 + 4 ?", "hello"], 5)
  np.testing.assert_array_equal(mask, [[1] * 5, [0, 0, 0, 1, 1]])  # left padding
  np.testing.assert_array_equal(ids[0], tok("what is 3 + 4 ?")["input_ids"][-5:])  # tail kept
  np.testing.assert_array_equal(ids[1], [PAD_ID] * 3 + tok("hello")["input_ids"])
  generated = np.array([tok.convert_tokens_to_ids(["####", "17", "</s>", "5"])])
  assert decode_generated(tok, generated) == ["#### 17"]
  assert pad_token_id(tok) == PAD_ID


def test_errors(tok):
  with pytest.raises(ValueError, match="seq_len"):
    encode_texts(tok, ["a"], 1)
  with pytest.raises(ValueError, match="differ in length"):
    encode_prompt_response(tok, ["a"], [], 8)


class _Bigram(nnx.Module):
  """A toy causal LM: logits of position t depend on token t only."""

  def __init__(self, v):
    self.table = nnx.Param(jnp.asarray(np.random.default_rng(0).normal(size=(v, v)),
                                       jnp.float32))

  def __call__(self, ids, attention_mask=None):
    return self.table[...][ids]


def test_causal_lm_loss_matches_float64_reference(tok):
  batch = encode_prompt_response(tok, ["what is 3 + 4 ?", "hello", "a"],
                                 ["#### 7", "world tiny llama", "b c"], 10)
  model = _Bigram(len(tok))
  loss, metrics = causal_lm_loss(model, {k: jnp.asarray(v) for k, v in batch.arrays().items()})

  table = np.asarray(model.table[...], np.float64)
  ids, lm = batch.input_ids, batch.loss_mask
  terms, hits = [], []
  for b in range(len(ids)):
    for t in range(1, ids.shape[1]):
      if lm[b, t]:
        logits = table[ids[b, t - 1]]
        logp = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
        terms.append(-logp[ids[b, t]])
        hits.append(logits.argmax() == ids[b, t])
  assert len(terms) == 3 + 4 + 3  # response tokens + EOS only: no prompt token
  np.testing.assert_allclose(float(metrics["loss_sum"]), np.sum(terms), rtol=1e-5)
  np.testing.assert_allclose(float(loss), np.mean(terms), rtol=1e-5)
  assert float(metrics["count"]) == len(terms) and float(metrics["correct"]) == sum(hits)
  np.testing.assert_allclose(perplexity(metrics), np.exp(np.mean(terms)), rtol=1e-5)

  # a prompt token's value does not change the loss (it is input only) unless it is a target's
  # predecessor; changing a masked-out PROMPT target changes nothing
  ids2 = ids.copy()
  ids2[0, 2] = 5  # inside the prompt, neither a target nor a target's predecessor
  loss2, _ = causal_lm_loss(model, {**batch.arrays(), "input_ids": jnp.asarray(ids2)})
  assert float(loss2) == float(loss)
  # row weights
  _, m = causal_lm_loss(model, {**batch.arrays(), "mask": jnp.asarray([1, 0, 0])})
  assert float(m["count"]) == 3


def test_answer_normalisation():
  assert normalize_answer("Natalia sold 48/2 = 24 clips.\n#### 72") == "72"
  assert normalize_answer("#### $1,200.00") == "1200"
  assert normalize_answer("#### 3 #### 5") == "5"  # the last marker
  assert normalize_answer("first 3, then 4.50 apples") == "4.5"
  assert normalize_answer("12 - 5 = 7.") == "7"
  assert normalize_answer("no digits here") is None
  assert normalize_answer("#### five. ") == "five"
  assert normalize_answer("-0.0") == "0" and normalize_answer("#### +007") == "7"
  assert exact_match("The answer is 1,000", "#### 1000.0")
  assert not exact_match("no answer", "no answer")  # no answer never matches
  assert exact_match_rate(["#### 7", "#### 8"], ["7", "9"]) == 0.5
  with pytest.raises(ValueError, match="equal length"):
    exact_match_rate(["1"], [])
