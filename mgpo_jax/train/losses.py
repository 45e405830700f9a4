"""Loss functions in the :data:`~mgpo_jax.train.trainer.LossFn` convention
(``loss_fn(model, batch) -> (mean loss, summed metrics)``): sequence classification and
causal language modelling, both weighted cross-entropies with summed metrics."""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

__all__ = ["causal_lm_loss", "classification_loss", "perplexity"]


def _weighted_cross_entropy(logits: jax.Array, targets: jax.Array,
                            w: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """``(Σ w CE / Σ w, {"loss_sum", "correct", "count"})`` (the loss is 0 when ``Σ w = 0``)."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  count = jnp.sum(w)
  loss_sum = jnp.sum(w * ce)
  correct = jnp.sum(w * (jnp.argmax(logits, axis=-1) == targets))
  loss = loss_sum / jnp.where(count > 0, count, 1.0)
  return loss, {"loss_sum": loss_sum, "correct": correct, "count": count}


def classification_loss(model: nnx.Module, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Softmax cross-entropy of a sequence classifier, with accuracy.

  ``model(input_ids, attention_mask=..., token_type_ids=...)`` gives logits ``(B, C)``;
  ``attention_mask`` and ``token_type_ids`` are passed when the batch has them. An optional
  per-example ``batch["mask"]`` (weights, e.g. 0 on padding rows) weights every term.

    loss = Σ_i w_i CE(logits_i, y_i) / Σ_i w_i       (0 when Σ w = 0)

  Args:
    model: the classifier (train or eval mode is set by the caller).
    batch: ``input_ids``, ``labels`` (int, shape ``(B,)``, in ``[0, C)``), optional
      ``attention_mask``, ``token_type_ids``, ``mask``.

  Returns:
    ``(loss, {"loss_sum": Σ w CE, "correct": Σ w [argmax = y], "count": Σ w})``; the loss and
    its gradient are NaN when a label lies outside ``[0, C)`` (a value the trace cannot check).

  Raises:
    ValueError: at trace time, for a batch without ``input_ids`` or ``labels``, or with
      labels that are not integers of shape ``(B,)``.
  """
  missing = [k for k in ("input_ids", "labels") if k not in batch]
  if missing:
    raise ValueError(f"classification_loss: the batch has no {' or '.join(missing)} (it has "
                     f"{', '.join(sorted(batch)) or 'nothing'})")
  labels = batch["labels"]
  ids = batch["input_ids"]
  if not jnp.issubdtype(labels.dtype, jnp.integer) or labels.shape != ids.shape[:1]:
    raise ValueError(f"classification_loss: labels must be integer class ids of shape "
                     f"{tuple(ids.shape[:1])} (one per example); got {labels.dtype} of shape "
                     f"{tuple(labels.shape)}")
  kwargs = {k: batch[k] for k in ("attention_mask", "token_type_ids") if k in batch}
  logits = model(ids, **kwargs).astype(jnp.float32)
  w = batch["mask"].astype(jnp.float32) if "mask" in batch else jnp.ones(labels.shape)
  # A label outside [0, C) would silently index another class (-1: the last): its weight is
  # NaN instead, so the loss and the gradients are (and --nonfinite skip skips the step); valid
  # labels keep their weights exactly, so valid batches train bit for bit as without it.
  w = jnp.where((labels < 0) | (labels >= logits.shape[-1]), jnp.nan, w)
  return _weighted_cross_entropy(logits, labels, w)


def causal_lm_loss(
  model: nnx.Module, batch: Mapping[str, jax.Array]
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Next-token cross-entropy of a causal LM, on the tokens ``loss_mask`` selects.

  ``model(input_ids, attention_mask=...)`` gives logits ``(B, T, V)``. Token ``t`` is a target
  iff ``loss_mask[b, t] = 1``; it is predicted from the logits at ``t - 1``, so column 0 is
  never a target. Prompt and padding tokens have ``loss_mask = 0``
  (:mod:`mgpo_jax.lm_data` builds the mask). With weights ``w = loss_mask[:, 1:]`` (times an
  optional per-row ``batch["mask"]``, e.g. 0 on padding rows):

    loss = Σ w_bt CE(logits_b,t-1, ids_bt) / Σ w_bt        (0 when Σ w = 0)

  i.e. the mean over the batch's target TOKENS (with ``accum_steps > 1`` the Trainer averages
  the micro-batches' means).

  Args:
    model: a causal LM, e.g. :class:`~mgpo_jax.models.LlamaForCausalLM` with LoRA.
    batch: ``input_ids`` (B, T) int; optional ``attention_mask`` (B, T), ``loss_mask`` (B, T)
      (default: ``attention_mask``, else all ones), ``mask`` (B,).

  Returns:
    ``(loss, {"loss_sum": Σ w CE, "correct": Σ w [argmax = next token], "count": Σ w})``;
    eval reports ``loss_sum / count`` and :func:`perplexity`.
  """
  ids = batch["input_ids"]
  attention_mask = batch.get("attention_mask")
  logits = model(ids, attention_mask=attention_mask).astype(jnp.float32)[:, :-1]
  if "loss_mask" in batch:
    w = batch["loss_mask"]
  elif attention_mask is not None:
    w = attention_mask
  else:
    w = jnp.ones(ids.shape)
  w = w[:, 1:].astype(jnp.float32)
  if "mask" in batch:
    w = w * batch["mask"].astype(jnp.float32)[:, None]
  return _weighted_cross_entropy(logits, ids[:, 1:], w)


def perplexity(metrics: Mapping[str, float]) -> float:
  """``exp(loss_sum / count)`` of summed :func:`causal_lm_loss` metrics (``nan`` if count 0)."""
  count = float(metrics["count"])
  return math.exp(float(metrics["loss_sum"]) / count) if count > 0 else math.nan
