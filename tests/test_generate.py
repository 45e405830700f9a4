"""Greedy decoding with the KV cache: equal to recomputing the full forward every step, and to
transformers' ``generate``, on a tiny random Llama with left-padded prompts. (Generation with
LoRA after training: tests/test_causal_lm.py.)"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mgpo_jax.generate import greedy_generate, prompt_positions
from mgpo_jax.models import LlamaForCausalLM
from tiny_llama import PAD_ID, torch_tiny_llama

N_NEW = 6


def _prompts():
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 200, size=(3, 7))
  mask = np.ones_like(ids)
  mask[1, :3] = 0  # left padding
  mask[2, :5] = 0
  return np.where(mask == 1, ids, PAD_ID), mask


@nnx.jit
def _forward(model, ids, mask):
  return model(ids, mask, positions=prompt_positions(mask))


def _no_cache(model, ids, mask, n, eos=None, pad=PAD_ID):
  """Greedy decoding that recomputes the whole forward pass (no cache) for every new token.
  One buffer of the final length keeps one compiled shape: the causal mask hides the not yet
  generated columns from the column read at each step."""
  t = ids.shape[1]
  ids = np.concatenate([ids, np.full((len(ids), n), pad)], 1)
  mask = np.concatenate([mask, np.ones((len(ids), n), mask.dtype)], 1)
  done = np.zeros(len(ids), bool)
  for i in range(n):
    logits = np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(mask)))
    token = np.where(done, pad, logits[:, t + i - 1].argmax(-1))
    done |= token == eos
    ids[:, t + i] = token
  return ids[:, t:]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  path = tmp_path_factory.mktemp("llama")
  hf = torch_tiny_llama(scale=0.3)
  hf.save_pretrained(str(path))
  return hf, LlamaForCausalLM.from_pretrained(path)


def test_cache_equals_full_recompute(tiny):
  _, model = tiny
  ids, mask = _prompts()
  got = np.asarray(greedy_generate(model, ids, mask, max_new_tokens=N_NEW))
  assert got.shape == (3, N_NEW)
  np.testing.assert_array_equal(got, _no_cache(model, ids, mask, N_NEW))
  # a padded row decodes as it would alone
  alone = greedy_generate(model, ids[2:, 5:], mask[2:, 5:], max_new_tokens=N_NEW)
  np.testing.assert_array_equal(got[2], np.asarray(alone)[0])


def test_stops_filling_after_eos(tiny):
  _, model = tiny
  ids, mask = _prompts()
  free = np.asarray(greedy_generate(model, ids, mask, max_new_tokens=N_NEW))
  eos = int(free[0, 2])  # a token row 0 emits at step 2 plays EOS
  got = np.asarray(greedy_generate(model, ids, mask, max_new_tokens=N_NEW, eos_token_id=[eos],
                                   pad_token_id=PAD_ID))
  np.testing.assert_array_equal(got, _no_cache(model, ids, mask, N_NEW, eos=eos))
  first = int(np.argmax(free[0] == eos))
  np.testing.assert_array_equal(got[0, : first + 1], free[0, : first + 1])
  assert (got[0, first + 1:] == PAD_ID).all()


def test_matches_transformers_generate(tiny):
  torch = pytest.importorskip("torch")
  hf, model = tiny
  ids, mask = _prompts()
  with torch.no_grad():
    want = hf.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                       max_new_tokens=N_NEW, do_sample=False, eos_token_id=None,
                       pad_token_id=PAD_ID).numpy()[:, ids.shape[1]:]
  np.testing.assert_array_equal(np.asarray(greedy_generate(model, ids, mask,
                                                           max_new_tokens=N_NEW)), want)


def test_errors(tiny):
  _, model = tiny
  ids, mask = _prompts()
  with pytest.raises(ValueError, match="LEFT-padded"):
    greedy_generate(model, ids[:, ::-1], mask[:, ::-1], max_new_tokens=2)
  with pytest.raises(ValueError, match="max_new_tokens"):
    greedy_generate(model, ids, mask, max_new_tokens=0)
  with pytest.raises(ValueError, match=r"\(B, T\)"):
    greedy_generate(model, ids[0], mask[0], max_new_tokens=2)
