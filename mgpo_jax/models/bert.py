"""BERT-family encoder (Flax NNX) with Hugging Face's module names and math.

Module paths mirror ``transformers``' PyTorch ``BertModel`` exactly (``encoder.layer.0.attention
.self.query`` and so on), so PEFT adapter names are ``"base_model.model." + path`` and HF
checkpoints load by name (see :mod:`mgpo_jax.models._hf`).

Dropout (:class:`mgpo_jax.dropout.Dropout`: ``nnx.Dropout`` with masks from 16-bit uniforms):
every dropout layer is built in eval mode (deterministic). ``model.train()`` turns them
on, ``model.eval()`` off again (the NNX idiom); ``nnx.view(model, deterministic=False)`` gives a
training view without changing ``model``. Each dropout layer draws from its own ``"dropout"``
stream forked from the constructor's ``rngs`` (``nnx.Rngs(0)`` works: ``"dropout"`` falls back
to ``"default"``); the stream's counter is model state, so a jitted train step must carry the
model's RNG state along with its parameters to get fresh masks each step.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx
from mgpo_jax.dropout import Dropout
from mgpo_jax.models import _hf
from mgpo_jax.models import remat as _remat

if TYPE_CHECKING:
  from transformers import BertConfig

POOLINGS = ("cls", "mean")

_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")  # non-persistent in HF


def _dropout(rate: float, rngs: nnx.Rngs) -> Dropout:
  return Dropout(rate, deterministic=True, rngs=rngs)


class BertEmbeddings(nnx.Module):
  """Word + position (0..T-1) + token-type embeddings, then LayerNorm and dropout."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
    position_type = getattr(config, "position_embedding_type", "absolute")
    if position_type != "absolute":
      raise NotImplementedError(
        f"position_embedding_type={position_type!r} is not supported; supported: 'absolute'"
      )
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.word_embeddings = nnx.Embed(config.vocab_size, config.hidden_size, **kw)
    self.position_embeddings = nnx.Embed(config.max_position_embeddings, config.hidden_size, **kw)
    self.token_type_embeddings = nnx.Embed(config.type_vocab_size, config.hidden_size, **kw)
    self.LayerNorm = nnx.LayerNorm(
      config.hidden_size, epsilon=config.layer_norm_eps, use_fast_variance=False, **kw
    )
    self.dropout = _dropout(config.hidden_dropout_prob, rngs)

  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
    if input_ids.shape[1] > self.position_embeddings.num_embeddings:  # NaN rows, not an error
      raise ValueError(f"BERT: {input_ids.shape[1]} tokens per sequence, more than the model's "
                       f"max_position_embeddings ({self.position_embeddings.num_embeddings})")
    positions = jnp.arange(input_ids.shape[1])[None, :]
    x = (
      self.word_embeddings(input_ids)
      + self.token_type_embeddings(token_type_ids)
      + self.position_embeddings(positions)
    )
    return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nnx.Module):
  """Multi-head scaled dot-product attention; dropout on the attention probabilities."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
    if config.hidden_size % config.num_attention_heads:
      raise ValueError(
        f"hidden_size={config.hidden_size} is not a multiple of "
        f"num_attention_heads={config.num_attention_heads}"
      )
    self.num_heads = config.num_attention_heads
    self.head_dim = config.hidden_size // config.num_attention_heads
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.query = nnx.Linear(config.hidden_size, config.hidden_size, **kw)
    self.key = nnx.Linear(config.hidden_size, config.hidden_size, **kw)
    self.value = nnx.Linear(config.hidden_size, config.hidden_size, **kw)
    self.dropout = _dropout(config.attention_probs_dropout_prob, rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """``x`` (B, T, H), ``mask`` (B, 1, 1, T) boolean (True = attend) -> (B, T, H)."""
    heads = lambda y: y.reshape(*y.shape[:-1], self.num_heads, self.head_dim)
    q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * self.head_dim**-0.5
    scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    probs = self.dropout(jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype))
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return out.reshape(*x.shape[:-1], -1)


class BertAttention(nnx.Module):
  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.self = BertSelfAttention(config, **kw)  # HF's attribute name, kept for the paths
    self.output = BertOutput(config, config.hidden_size, **kw)  # HF's BertSelfOutput

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    return self.output(self.self(x, mask), x)


class BertIntermediate(nnx.Module):
  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
    self.dense = nnx.Linear(
      config.hidden_size, config.intermediate_size, dtype=dtype, param_dtype=param_dtype,
      rngs=rngs,
    )
    self.act = _hf.activation(config.hidden_act)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.act(self.dense(x))


class BertOutput(nnx.Module):
  """Dense to hidden size, dropout, residual, LayerNorm: after the attention (HF's
  ``BertSelfOutput``, ``in_features`` = hidden size) and after the MLP (``BertOutput``,
  ``in_features`` = intermediate size)."""

  def __init__(self, config: BertConfig, in_features: int, *, rngs: nnx.Rngs, dtype: Any,
               param_dtype: Any):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dense = nnx.Linear(in_features, config.hidden_size, **kw)
    self.LayerNorm = nnx.LayerNorm(
      config.hidden_size, epsilon=config.layer_norm_eps, use_fast_variance=False, **kw
    )
    self.dropout = _dropout(config.hidden_dropout_prob, rngs)

  def __call__(self, x: jax.Array, residual: jax.Array) -> jax.Array:
    return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertLayer(nnx.Module):
  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.attention = BertAttention(config, **kw)
    self.intermediate = BertIntermediate(config, **kw)
    self.output = BertOutput(config, config.intermediate_size, **kw)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    x = self.attention(x, mask)
    return self.output(self.intermediate(x), x)


class BertEncoder(nnx.Module):
  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
    self.layer = nnx.List(
      [
        BertLayer(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        for _ in range(config.num_hidden_layers)
      ]
    )
    self.remat_policy: str | None = None  # mgpo_jax.models.remat.set_remat

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    for layer in self.layer:
      x = _remat.block(layer, self.remat_policy)(x, mask)
    return x


class BertPooler(nnx.Module):
  """tanh(dense(hidden state of the first token, [CLS]))."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
    self.dense = nnx.Linear(
      config.hidden_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )

  def __call__(self, hidden: jax.Array) -> jax.Array:
    return jnp.tanh(self.dense(hidden[:, 0]))


def _rename_for_base(has_pooler: bool):
  """Checkpoint key -> BertModel parameter name (``None``: skip)."""

  def rename(key: str) -> str | None:
    if key in _BUFFERS or (not has_pooler and key.startswith("pooler.")):
      return None
    return key

  return rename


class BertModel(nnx.Module):
  """BERT encoder, numerically equal to ``transformers.BertModel`` (eval mode).

  Args:
    config: a ``transformers.BertConfig`` (``AutoConfig`` of a BERT checkpoint). Uses
      ``hidden_act`` (``"gelu"`` = exact erf GELU), ``layer_norm_eps``, the dropout rates
      ``hidden_dropout_prob`` / ``attention_probs_dropout_prob`` and absolute positions.
    add_pooling_layer: build ``pooler`` (tanh dense on [CLS]) like HF; ``__call__`` returns
      hidden states either way, the pooler is used by :class:`BertForSequenceClassification`.
    rngs: parameter initialisation and the dropout streams.
    dtype: computation dtype (``None``: inferred from inputs and parameters).
    param_dtype: parameter storage dtype.

  Dropout layers start in eval mode; see the module docstring for ``train()`` / ``eval()``.

  Examples:
    >>> from transformers import BertConfig
    >>> config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    ...                     intermediate_size=64, vocab_size=100)
    >>> model = BertModel(config, rngs=nnx.Rngs(0))
    >>> model(jnp.array([[2, 5, 7, 0]]), attention_mask=jnp.array([[1, 1, 1, 0]])).shape
    (1, 4, 32)
  """

  def __init__(
    self,
    config: BertConfig,
    *,
    add_pooling_layer: bool = True,
    rngs: nnx.Rngs,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
  ):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.embeddings = BertEmbeddings(config, **kw)
    self.encoder = BertEncoder(config, **kw)
    self.pooler = BertPooler(config, **kw) if add_pooling_layer else None

  def __call__(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    token_type_ids: jax.Array | None = None,
  ) -> jax.Array:
    """``input_ids`` (B, T) int; ``attention_mask`` (B, T), 1 = token, 0 = padding (default all
    ones); ``token_type_ids`` (B, T) (default zeros). Returns the last hidden states (B, T, H)."""
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    mask = attention_mask.astype(bool)[:, None, None, :]
    return self.encoder(self.embeddings(input_ids, token_type_ids), mask)

  @classmethod
  def from_pretrained(
    cls,
    path: str | Path,
    *,
    add_pooling_layer: bool = True,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs | None = None,
    shardings: _hf.ShardingsFn | None = None,
  ) -> BertModel:
    """Loads a local HF BERT checkpoint (``config.json`` + ``model.safetensors``).

    Accepts bare ``BertModel`` keys (``embeddings.…``, as in all-MiniLM-L6-v2) and task-model
    keys prefixed ``bert.`` (whose heads are skipped). ``rngs`` (default ``nnx.Rngs(0)``) seeds
    the dropout streams. Raises ``FileNotFoundError`` if ``path`` is not a local directory and
    :class:`~mgpo_jax.models._hf.CheckpointMismatchError` on missing/unexpected/misshapen tensors.
    """
    config = _hf.load_config(path, {"bert"})
    checkpoint = _hf.SafetensorsCheckpoint(path)
    build = lambda r: cls(
      config, add_pooling_layer=add_pooling_layer, rngs=r, dtype=dtype, param_dtype=param_dtype
    )
    prefixed = any(key.startswith("bert.") for key in checkpoint.keys())
    base = _rename_for_base(add_pooling_layer)

    def rename(key: str) -> str | None:
      if prefixed:
        return base(key.removeprefix("bert.")) if key.startswith("bert.") else None
      return base(key)

    return _hf.build_from_checkpoint(build, rngs or nnx.Rngs(0), checkpoint, rename,
                                     shardings=shardings)


class BertForSequenceClassification(nnx.Module):
  """BERT encoder + pooling + dropout + linear classifier; returns logits (B, num_labels).

  Args:
    config: a ``transformers.BertConfig``.
    num_labels: number of classes (default ``config.num_labels``, 2 unless the config says so).
    pooling: ``"cls"``: HF's pooler (tanh dense on [CLS]), as
      ``transformers.BertForSequenceClassification``; ``"mean"``: mean of the last hidden states
      over non-padding tokens (sentence-transformers, how all-MiniLM-L6-v2 was trained). With
      ``"mean"`` the encoder has no ``pooler``.
    rngs, dtype, param_dtype: as :class:`BertModel`.

  The dropout before the classifier uses ``config.classifier_dropout`` if set, else
  ``hidden_dropout_prob`` (as HF). Submodules: ``bert`` (a :class:`BertModel`), ``dropout``,
  ``classifier`` (``nnx.Linear`` hidden -> num_labels).
  """

  def __init__(
    self,
    config: BertConfig,
    num_labels: int | None = None,
    pooling: Literal["cls", "mean"] = "cls",
    *,
    rngs: nnx.Rngs,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
  ):
    if pooling not in POOLINGS:
      raise ValueError(f"pooling={pooling!r}; accepted values: {POOLINGS}")
    num_labels = config.num_labels if num_labels is None else num_labels
    if num_labels < 1:
      raise ValueError(f"num_labels={num_labels}; must be a positive integer")
    self.pooling = pooling
    self.num_labels = num_labels
    self.bert = BertModel(
      config, add_pooling_layer=pooling == "cls", rngs=rngs, dtype=dtype,
      param_dtype=param_dtype,
    )
    rate = config.classifier_dropout
    self.dropout = _dropout(config.hidden_dropout_prob if rate is None else rate, rngs)
    self.classifier = nnx.Linear(
      config.hidden_size, num_labels, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )

  def pool(self, hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Sentence embedding (B, H) from hidden states (B, T, H) per ``self.pooling``."""
    if self.pooling == "cls":
      return self.bert.pooler(hidden)
    weights = attention_mask.astype(hidden.dtype)[..., None]
    return (hidden * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1e-9)

  def __call__(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    token_type_ids: jax.Array | None = None,
  ) -> jax.Array:
    """Same inputs as :meth:`BertModel.__call__`; returns logits (B, num_labels)."""
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    hidden = self.bert(input_ids, attention_mask, token_type_ids)
    return self.classifier(self.dropout(self.pool(hidden, attention_mask)))

  @classmethod
  def from_pretrained(
    cls,
    path: str | Path,
    *,
    num_labels: int | None = None,
    pooling: Literal["cls", "mean"] = "cls",
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs | None = None,
    shardings: _hf.ShardingsFn | None = None,
  ) -> BertForSequenceClassification:
    """Loads a local HF BERT checkpoint; the classifier is freshly initialised if absent.

    Reads ``config.json`` + ``model.safetensors`` of either a ``BertModel`` (bare keys, e.g.
    all-MiniLM-L6-v2) or a ``BertFor…`` model (keys prefixed ``bert.``). A checkpoint without
    ``classifier.*`` gets a new head initialised from ``rngs`` (default ``nnx.Rngs(0)``);
    pretraining heads (``cls.*``) and, with ``pooling="mean"``, the pooler are skipped.
    Raises ``FileNotFoundError`` if ``path`` is not a local directory,
    :class:`~mgpo_jax.models._hf.CheckpointMismatchError` on missing/unexpected/misshapen
    tensors (e.g. a saved classifier for another ``num_labels``), ``ValueError`` on a bad
    ``pooling``.
    """
    if pooling not in POOLINGS:
      raise ValueError(f"pooling={pooling!r}; accepted values: {POOLINGS}")
    config = _hf.load_config(path, {"bert"})
    checkpoint = _hf.SafetensorsCheckpoint(path)
    build = lambda r: cls(
      config, num_labels, pooling, rngs=r, dtype=dtype, param_dtype=param_dtype
    )
    prefixed = any(key.startswith("bert.") for key in checkpoint.keys())
    base = _rename_for_base(pooling == "cls")

    def rename(key: str) -> str | None:
      if key.startswith("classifier."):
        return key
      if key.startswith("cls."):
        return None
      if prefixed:
        key = key.removeprefix("bert.")
      name = base(key)
      return None if name is None else "bert." + name

    return _hf.build_from_checkpoint(
      build, rngs or nnx.Rngs(0), checkpoint, rename,
      allow_missing=("classifier.weight", "classifier.bias"), shardings=shardings,
    )
