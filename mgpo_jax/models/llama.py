"""Llama-family decoder-only causal LM (Flax NNX) with Hugging Face's module names and math.

RMSNorm, rotary position embeddings (RoPE, ``rope_type="default"``), SwiGLU MLP and
grouped-query attention, as ``transformers.LlamaForCausalLM``. Module paths mirror the PyTorch
model (``model.layers.0.self_attn.q_proj`` and so on), so PEFT adapter names are
``"base_model.model." + path`` and HF checkpoints load by name.

Dropout (only if ``config.attention_dropout > 0``; 0 in released Llama configs) starts in eval
mode; ``model.train()`` / ``model.eval()`` switch it, as in :mod:`mgpo_jax.models.bert`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx
from mgpo_jax.models import _hf

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


def _rotate_half(x: jax.Array) -> jax.Array:
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def _rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates ``x`` (B, T, heads, D) by angles given as ``cos``/``sin`` (T, D)."""
  cos, sin = cos[:, None, :].astype(x.dtype), sin[:, None, :].astype(x.dtype)
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
    self.dropout = nnx.Dropout(config.attention_dropout, deterministic=True, rngs=rngs)

  def __call__(
    self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array
  ) -> jax.Array:
    """``x`` (B, T, H); ``cos``, ``sin`` (T, head_dim); ``mask`` (B, 1, T, T) True = attend."""
    b, t, _ = x.shape
    q = _rope(self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim), cos, sin)
    k = _rope(self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim), cos, sin)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    groups = self.num_heads // self.num_kv_heads
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)  # HF's repeat_kv
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * self.head_dim**-0.5
    scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    probs = self.dropout(jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype))
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, -1)
    return self.o_proj(out)


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
    self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array
  ) -> jax.Array:
    x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
    return x + self.mlp(self.post_attention_layernorm(x))


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

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    t = input_ids.shape[1]
    exponents = jnp.arange(0, self.head_dim, 2, dtype=jnp.float32) / self.head_dim
    inv_freq = 1.0 / self.rope_theta**exponents
    angles = jnp.arange(t, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    mask = causal[None, None] & attention_mask.astype(bool)[:, None, None, :]
    x = self.embed_tokens(input_ids)
    for layer in self.layers:
      x = layer(x, cos, sin, mask)
    return self.norm(x)


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

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """``input_ids`` (B, T) int; ``attention_mask`` (B, T), 1 = token, 0 = padding (default all
    ones), combined with the causal mask. Positions are 0..T-1 as in HF without
    ``position_ids``. Returns logits (B, T, vocab_size)."""
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    hidden = self.model(input_ids, attention_mask)
    if self.lm_head is None:
      return self.model.embed_tokens.attend(hidden)
    return self.lm_head(hidden)

  @classmethod
  def from_pretrained(
    cls,
    path: str | Path,
    *,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs | None = None,
  ) -> LlamaForCausalLM:
    """Loads a local HF Llama checkpoint: ``config.json`` + ``model.safetensors`` (or sharded
    ``model.safetensors.index.json``). With ``tie_word_embeddings`` a saved ``lm_head.weight``
    is skipped. ``rngs`` (default ``nnx.Rngs(0)``) seeds the dropout stream. Raises
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

    return _hf.build_from_checkpoint(build, rngs or nnx.Rngs(0), checkpoint, rename)
