"""Llama-family decoder-only causal LM (Flax NNX) with Hugging Face's module names and math.

RMSNorm, rotary position embeddings (RoPE, ``rope_type="default"``), SwiGLU MLP and
grouped-query attention, as ``transformers.LlamaForCausalLM``. Module paths mirror the PyTorch
model (``model.layers.0.self_attn.q_proj`` and so on), so PEFT adapter names are
``"base_model.model." + path`` and HF checkpoints load by name.

Dropout (only if ``config.attention_dropout > 0``; 0 in released Llama configs) starts in eval
mode; ``model.train()`` / ``model.eval()`` switch it, as in :mod:`mgpo_jax.models.bert`.

Decoding with a KV cache (:class:`KVCache`, used by :func:`mgpo_jax.generate.greedy_generate`):
``model(ids, mask, positions=..., cache=cache)`` writes the keys/values of ``ids`` into the cache
at slots ``cache.index ...`` and attends to every cache slot ``j <= `` its own slot whose
``mask`` entry is 1; ``mask`` then covers all ``cache`` slots. Without ``cache`` the call is the
plain full-sequence forward.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from mgpo_jax.dropout import Dropout
from mgpo_jax.models import _hf
from mgpo_jax.models import remat as _remat

if TYPE_CHECKING:
  from transformers import LlamaConfig

_SKIPPED = ("model.rotary_emb.inv_freq",)  # a buffer some older checkpoints saved


def _rope_theta(config: LlamaConfig) -> float:
  """``rope_theta`` of a default-RoPE config; other RoPE types are not implemented."""
  params = getattr(config, "rope_parameters", None) or {}
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type != "default":
    raise NotImplementedError(
      f"rope_type={rope_type!r} (config.rope_parameters) is not supported; supported: 'default'"
    )
  return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


class KVCache(NamedTuple):
  """Keys and values of the tokens seen so far, one ``(B, S, kv_heads, head_dim)`` array per
  layer (``S`` slots), and ``index``: the number of slots filled (int32 scalar, the same for
  every row: prompts are LEFT-padded so that all rows end at the same slot)."""

  keys: tuple[jax.Array, ...]
  values: tuple[jax.Array, ...]
  index: jax.Array


def _rotate_half(x: jax.Array) -> jax.Array:
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def _rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates ``x`` (B, T, heads, D) by angles given as ``cos``/``sin`` (B or 1, T, D)."""
  cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
  return x * cos + _rotate_half(x) * sin


class LlamaAttention(nnx.Module):
  """Causal grouped-query attention: ``num_key_value_heads`` K/V heads shared by groups of the
  ``num_attention_heads`` query heads, RoPE on queries and keys."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
    if config.num_attention_heads % config.num_key_value_heads:
      raise ValueError(
        f"num_attention_heads={config.num_attention_heads} is not a multiple of "
        f"num_key_value_heads={config.num_key_value_heads}"
      )
    self.num_heads = config.num_attention_heads
    self.num_kv_heads = config.num_key_value_heads
    self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
    kw = dict(use_bias=config.attention_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    self.q_proj = nnx.Linear(config.hidden_size, q_dim, **kw)
    self.k_proj = nnx.Linear(config.hidden_size, kv_dim, **kw)
    self.v_proj = nnx.Linear(config.hidden_size, kv_dim, **kw)
    self.o_proj = nnx.Linear(q_dim, config.hidden_size, **kw)
    self.dropout = Dropout(config.attention_dropout, deterministic=True, rngs=rngs)

  def __call__(
    self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
    cache: tuple[jax.Array, jax.Array, jax.Array] | None = None,
  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """``x`` (B, T, H); ``cos``, ``sin`` (B or 1, T, head_dim); ``mask`` (B, 1, T, S) True =
    attend. ``cache``: ``(keys, values, index)`` of this layer; the new keys/values are written
    at slots ``index ... index + T - 1`` and attention runs over all ``S`` slots. Returns the
    output and the updated ``(keys, values)`` (``None`` without a cache)."""
    b, t, _ = x.shape
    q = _rope(self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim), cos, sin)
    k = _rope(self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim), cos, sin)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    new_cache = None
    if cache is not None:
      keys, values, index = cache
      start = (0, index, 0, 0)
      keys = jax.lax.dynamic_update_slice(keys, k.astype(keys.dtype), start)
      values = jax.lax.dynamic_update_slice(values, v.astype(values.dtype), start)
      new_cache = (keys, values)
      k, v = keys.astype(q.dtype), values.astype(q.dtype)
    groups = self.num_heads // self.num_kv_heads
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)  # HF's repeat_kv
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * self.head_dim**-0.5
    scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    probs = self.dropout(jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype))
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, -1)
    return self.o_proj(out), new_cache


class LlamaMLP(nnx.Module):
  """SwiGLU: ``down_proj(act(gate_proj(x)) * up_proj(x))`` with ``act`` = ``hidden_act``."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
    kw = dict(use_bias=config.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = nnx.Linear(config.hidden_size, config.intermediate_size, **kw)
    self.up_proj = nnx.Linear(config.hidden_size, config.intermediate_size, **kw)
    self.down_proj = nnx.Linear(config.intermediate_size, config.hidden_size, **kw)
    self.act = _hf.activation(config.hidden_act)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
  """Pre-norm block: ``x + attn(rms(x))`` then ``x + mlp(rms(x))``."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.self_attn = LlamaAttention(config, **kw)
    self.mlp = LlamaMLP(config, **kw)
    self.input_layernorm = nnx.RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, **kw)
    self.post_attention_layernorm = nnx.RMSNorm(
      config.hidden_size, epsilon=config.rms_norm_eps, **kw
    )

  def __call__(
    self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, cache=None
  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    attn, new_cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
    x = x + attn
    return x + self.mlp(self.post_attention_layernorm(x)), new_cache


class LlamaModel(nnx.Module):
  """Token embedding, decoder layers and the final RMSNorm; returns hidden states."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    self.rope_theta = _rope_theta(config)
    self.head_dim = head_dim
    self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, **kw)
    self.layers = nnx.List(
      [LlamaDecoderLayer(config, **kw) for _ in range(config.num_hidden_layers)]
    )
    self.norm = nnx.RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, **kw)
    self.num_kv_heads = config.num_key_value_heads
    self.remat_policy: str | None = None  # mgpo_jax.models.remat.set_remat

  def init_cache(self, batch_size: int, max_len: int, dtype: Any = jnp.float32) -> KVCache:
    """An empty :class:`KVCache` with ``max_len`` slots per row."""
    shape = (batch_size, max_len, self.num_kv_heads, self.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in self.layers)
    return KVCache(zeros, zeros, jnp.zeros((), jnp.int32))

  def __call__(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    positions: jax.Array | None = None,
    cache: KVCache | None = None,
  ) -> tuple[jax.Array, KVCache | None]:
    """Hidden states (B, T, H) and the updated cache (``None`` without one).

    ``positions`` (B, T) RoPE positions (default ``0..T-1``). Without ``cache``,
    ``attention_mask`` is (B, T); with it, (B, S) over the cache's slots, and the query at
    slot ``cache.index + i`` sees the slots ``j <= cache.index + i`` whose mask is 1."""
    t = input_ids.shape[1]
    if positions is None:
      positions = jnp.arange(t)[None, :]
    exponents = jnp.arange(0, self.head_dim, 2, dtype=jnp.float32) / self.head_dim
    inv_freq = 1.0 / self.rope_theta**exponents
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    start = 0 if cache is None else cache.index
    slots = attention_mask.shape[1]
    causal = jnp.arange(slots)[None, :] <= start + jnp.arange(t)[:, None]  # (T, S)
    mask = causal[None, None] & attention_mask.astype(bool)[:, None, None, :]
    x = self.embed_tokens(input_ids)
    keys, values = [], []
    for i, layer in enumerate(self.layers):
      layer_cache = None if cache is None else (cache.keys[i], cache.values[i], cache.index)
      call = layer if cache is not None else _remat.block(layer, self.remat_policy)
      x, kv = call(x, cos, sin, mask, layer_cache)
      if kv is not None:
        keys.append(kv[0])
        values.append(kv[1])
    new_cache = None if cache is None else KVCache(tuple(keys), tuple(values), cache.index + t)
    return self.norm(x), new_cache


class LlamaForCausalLM(nnx.Module):
  """Llama causal LM, numerically equal to ``transformers.LlamaForCausalLM`` (eval mode).

  Args:
    config: a ``transformers.LlamaConfig``. Uses ``hidden_act``, ``rms_norm_eps``,
      ``num_key_value_heads``, ``head_dim``, ``attention_bias``, ``mlp_bias``,
      ``attention_dropout``, ``rope_parameters`` (only ``rope_type="default"``; others raise
      ``NotImplementedError``) and ``tie_word_embeddings``.
    rngs: parameter initialisation and the dropout stream.
    dtype: computation dtype (``None``: inferred from inputs and parameters).
    param_dtype: parameter storage dtype.

  Submodules: ``model`` (embedding, layers, norm) and, unless ``tie_word_embeddings``,
  ``lm_head`` (``nnx.Linear`` without bias). With tied embeddings there is no ``lm_head``
  module: the logits are ``hidden @ model.embed_tokens.embedding.T``.

  Examples:
    >>> from transformers import LlamaConfig
    >>> config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    >>> model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    >>> model(jnp.array([[1, 5, 7]])).shape
    (1, 3, 100)
  """

  def __init__(
    self,
    config: LlamaConfig,
    *,
    rngs: nnx.Rngs,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
  ):
    self.model = LlamaModel(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.tie_word_embeddings = bool(config.tie_word_embeddings)
    self.lm_head = (
      None
      if self.tie_word_embeddings
      else nnx.Linear(
        config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype,
        param_dtype=param_dtype, rngs=rngs,
      )
    )

  def __call__(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    positions: jax.Array | None = None,
    cache: KVCache | None = None,
  ) -> jax.Array | tuple[jax.Array, KVCache]:
    """``input_ids`` (B, T) int; ``attention_mask`` (B, T), 1 = token, 0 = padding (default all
    ones), combined with the causal mask. Positions are 0..T-1 as in HF without
    ``position_ids``, unless ``positions`` (B, T) is given (HF's ``position_ids``). Returns
    logits (B, T, vocab_size); with a ``cache`` (:meth:`init_cache`), ``(logits, new cache)``
    and ``attention_mask`` covers the cache's slots (see :meth:`LlamaModel.__call__`)."""
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    hidden, new_cache = self.model(input_ids, attention_mask, positions, cache)
    logits = self.head(hidden)
    return logits if cache is None else (logits, new_cache)

  def head(self, hidden: jax.Array) -> jax.Array:
    """Logits of hidden states: ``lm_head``, or the tied embedding's transpose."""
    if self.lm_head is None:
      return self.model.embed_tokens.attend(hidden)
    return self.lm_head(hidden)

  def init_cache(self, batch_size: int, max_len: int, dtype: Any = jnp.float32) -> KVCache:
    """An empty :class:`KVCache` for ``batch_size`` rows of up to ``max_len`` tokens."""
    return self.model.init_cache(batch_size, max_len, dtype)

  @classmethod
  def from_pretrained(
    cls,
    path: str | Path,
    *,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs | None = None,
    shardings: _hf.ShardingsFn | None = None,
  ) -> LlamaForCausalLM:
    """Loads a local HF Llama checkpoint: ``config.json`` + ``model.safetensors`` (or sharded
    ``model.safetensors.index.json``). With ``tie_word_embeddings`` a saved ``lm_head.weight``
    is skipped. ``rngs`` (default ``nnx.Rngs(0)``) seeds the dropout stream; ``shardings``
    puts each parameter straight into its sharding (:func:`mgpo_jax.models.load_model`). Raises
    ``FileNotFoundError`` if ``path`` is not a local directory and
    :class:`~mgpo_jax.models._hf.CheckpointMismatchError` on missing/unexpected/misshapen
    tensors."""
    config = _hf.load_config(path, {"llama"})
    checkpoint = _hf.SafetensorsCheckpoint(path)
    build = lambda r: cls(config, rngs=r, dtype=dtype, param_dtype=param_dtype)

    def rename(key: str) -> str | None:
      if key in _SKIPPED or (config.tie_word_embeddings and key == "lm_head.weight"):
        return None
      return key

    return _hf.build_from_checkpoint(build, rngs or nnx.Rngs(0), checkpoint, rename,
                                     shardings=shardings)


def last_token_index(
  input_ids: jax.Array, attention_mask: jax.Array | None, pad_token_id: int | None
) -> jax.Array:
  """Index (B,) of the token a sequence classifier reads, as HF's
  ``LlamaForSequenceClassification``: with ``pad_token_id``, the rightmost token that is not
  ``pad_token_id`` (0 if all are; works for left and right padding); without one, the rightmost
  position whose ``attention_mask`` is 1 (HF refuses batches > 1 there), else the last."""
  t = input_ids.shape[1]
  if pad_token_id is not None:
    keep = input_ids != pad_token_id
  elif attention_mask is not None:
    keep = attention_mask.astype(bool)
  else:
    return jnp.full(input_ids.shape[:1], t - 1)
  return jnp.argmax(jnp.arange(t) * keep, axis=-1)


class LlamaForSequenceClassification(nnx.Module):
  """Llama decoder + ``score`` head (linear, no bias) read at the last non-padding token,
  numerically equal to ``transformers.LlamaForSequenceClassification`` (eval mode).

  Args:
    config: a ``transformers.LlamaConfig`` (see :class:`LlamaForCausalLM`); its
      ``pad_token_id`` picks the token that is classified (:func:`last_token_index`).
    num_labels: number of classes (default ``config.num_labels``).
    rngs, dtype, param_dtype: as in :class:`LlamaForCausalLM`.

  Submodules: ``model`` (:class:`LlamaModel`) and ``score`` (``nnx.Linear`` hidden ->
  num_labels, no bias), HF's names, so PEFT ``SEQ_CLS`` adapters (``modules_to_save``
  ``["score"]``) move both ways.
  """

  def __init__(
    self,
    config: LlamaConfig,
    num_labels: int | None = None,
    *,
    rngs: nnx.Rngs,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
  ):
    num_labels = config.num_labels if num_labels is None else num_labels
    if num_labels < 1:
      raise ValueError(f"num_labels={num_labels}; must be a positive integer")
    self.num_labels = num_labels
    self.pad_token_id = config.pad_token_id
    self.model = LlamaModel(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.score = nnx.Linear(
      config.hidden_size, num_labels, use_bias=False, dtype=dtype, param_dtype=param_dtype,
      rngs=rngs,
    )

  def __call__(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    token_type_ids: jax.Array | None = None,
  ) -> jax.Array:
    """``input_ids`` (B, T), ``attention_mask`` (B, T) (default all ones); logits (B, C).
    ``token_type_ids`` is accepted and ignored (Llama has no segment embeddings), so batches
    built for BERT and :func:`~mgpo_jax.train.classification_loss` work unchanged."""
    del token_type_ids
    mask = jnp.ones_like(input_ids) if attention_mask is None else attention_mask
    hidden, _ = self.model(input_ids, mask)
    last = last_token_index(input_ids, attention_mask, self.pad_token_id)
    return self.score(hidden[jnp.arange(hidden.shape[0]), last])

  @classmethod
  def from_pretrained(
    cls,
    path: str | Path,
    *,
    num_labels: int | None = None,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs | None = None,
    shardings: _hf.ShardingsFn | None = None,
  ) -> LlamaForSequenceClassification:
    """Loads a local HF Llama checkpoint (a causal LM's or a sequence classifier's); ``score``
    is read if saved, else freshly initialised from ``rngs`` (default ``nnx.Rngs(0)``); a
    saved ``lm_head`` is skipped. Raises as :meth:`LlamaForCausalLM.from_pretrained`, and
    :class:`~mgpo_jax.models._hf.CheckpointMismatchError` for a saved ``score`` of another
    ``num_labels``."""
    config = _hf.load_config(path, {"llama"})
    checkpoint = _hf.SafetensorsCheckpoint(path)
    build = lambda r: cls(config, num_labels, rngs=r, dtype=dtype, param_dtype=param_dtype)

    def rename(key: str) -> str | None:
      return None if key in _SKIPPED or key.startswith("lm_head.") else key

    return _hf.build_from_checkpoint(
      build, rngs or nnx.Rngs(0), checkpoint, rename, allow_missing=("score.weight",),
      shardings=shardings,
    )
