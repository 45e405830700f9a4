"""Greedy decoding with a KV cache for :class:`~mgpo_jax.models.LlamaForCausalLM`, jitted.

Prompts are LEFT-padded (:func:`mgpo_jax.lm_data.encode_prompts`): every row's last prompt
token sits in the same column, so each step writes one cache slot for the whole batch. RoPE
positions count real tokens only (``cumsum(attention_mask) - 1``, as HF's ``generate``), so a
padded row decodes exactly as it would alone. One compiled program per (model graph, batch
shape, ``max_new_tokens``): a prefill over the prompt, then a ``lax.scan`` of
``max_new_tokens - 1`` one-token steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["greedy_generate", "prompt_positions"]


def prompt_positions(attention_mask: jax.Array) -> jax.Array:
  """RoPE positions (B, T) of left-padded prompts: 0 at each row's first real token."""
  return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)


def _eos_ids(eos_token_id: int | Sequence[int] | None) -> tuple[int, ...]:
  if eos_token_id is None:
    return ()
  if isinstance(eos_token_id, int):
    return (eos_token_id,)
  return tuple(int(i) for i in eos_token_id)


def greedy_generate(
  model: nnx.Module,
  input_ids: jax.Array,
  attention_mask: jax.Array,
  *,
  max_new_tokens: int,
  eos_token_id: int | Sequence[int] | None = None,
  pad_token_id: int = 0,
  cache_dtype: Any = None,
) -> jax.Array:
  """Greedy continuation of a batch of LEFT-padded prompts.

  Args:
    model: a :class:`~mgpo_jax.models.LlamaForCausalLM` (LoRA applied or not), used in its
      current mode (call ``model.eval()`` first if it has dropout). Anything with its
      ``model`` (a ``LlamaModel``), ``head`` and ``init_cache`` works.
    input_ids: (B, T) int prompts, left-padded.
    attention_mask: (B, T), 1 = token, 0 = padding; a right-padded batch raises ``ValueError``
      when the mask is concrete.
    max_new_tokens: tokens generated per row (fixed: the output shape).
    eos_token_id: one id or several (Llama 3 has two). After a row emits one, the rest of
      its row is ``pad_token_id`` (the EOS itself is kept).
    pad_token_id: the filler after EOS.
    cache_dtype: dtype of the KV cache (default: the embedding's parameter dtype).

  Returns:
    (B, max_new_tokens) int32 generated ids (the prompt not included).
  """
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be an integer >= 1; got {max_new_tokens!r}")
  input_ids, attention_mask = jnp.asarray(input_ids), jnp.asarray(attention_mask)
  if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
    raise ValueError(f"input_ids and attention_mask must both be (B, T); got "
                     f"{input_ids.shape} and {attention_mask.shape}")
  if not isinstance(attention_mask, jax.core.Tracer) and not bool(attention_mask[:, -1].all()):
    raise ValueError("greedy_generate needs LEFT-padded prompts (attention_mask[:, -1] all 1); "
                     "encode them with mgpo_jax.lm_data.encode_prompts")
  if cache_dtype is None:
    cache_dtype = model.model.embed_tokens.embedding.get_value().dtype
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, input_ids, attention_mask, max_new_tokens,
                   _eos_ids(eos_token_id), int(pad_token_id), jnp.dtype(cache_dtype))


@partial(jax.jit, static_argnums=(0, 4, 5, 6, 7))
def _generate(graphdef, state, input_ids, attention_mask, max_new_tokens, eos_ids, pad_id,
              cache_dtype):
  model = nnx.merge(graphdef, state)
  b, t = input_ids.shape
  slots = t + max_new_tokens
  mask = jnp.concatenate([attention_mask, jnp.ones((b, max_new_tokens), attention_mask.dtype)], 1)
  cache = model.init_cache(b, slots, cache_dtype)
  hidden, cache = model.model(input_ids, mask, prompt_positions(attention_mask), cache)
  logits = model.head(hidden[:, -1:])  # the prefill needs the last column's logits only
  lengths = jnp.sum(attention_mask, axis=-1)  # position of the first generated token
  eos = jnp.asarray(eos_ids or (-1,), jnp.int32)

  def pick(logits, done):
    token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    token = jnp.where(done, pad_id, token)
    return token, done | jnp.isin(token, eos)

  first, done = pick(logits, jnp.zeros((b,), bool))

  def step(carry, i):
    token, done, cache = carry
    positions = (lengths + i)[:, None]
    logits, cache = model(token[:, None], mask, positions=positions, cache=cache)
    new, done = pick(logits, done)
    return (new, done, cache), new

  _, rest = jax.lax.scan(step, (first, done, cache), jnp.arange(max_new_tokens - 1))
  return jnp.concatenate([first[:, None], rest.T], axis=1)
