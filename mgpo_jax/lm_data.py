"""Tokenisation for causal-LM fine-tuning and generation, with a caller-loaded HF tokenizer.

Three encoders, all returning ``int32`` numpy arrays of shape ``(N, seq_len)``:

=============================  ==========  ==============================================
function                       padding     loss on
=============================  ==========  ==============================================
:func:`encode_prompt_response` right       response tokens (+ EOS) only; prompt masked
:func:`encode_texts`           right       every real token (+ EOS)
:func:`encode_prompts`         LEFT        none: prompts for ``greedy_generate``
=============================  ==========  ==============================================

Sequences are padded, not packed: each example is one row, padding carries
``attention_mask = 0`` and ``loss_mask = 0``. ``loss_mask[b, t] = 1`` marks token ``t`` as a
target, predicted from position ``t - 1`` (:func:`mgpo_jax.train.causal_lm_loss`).

Truncation: training rows keep their FIRST ``seq_len`` tokens, so an overlong example loses
the end of its response first, then the end of its prompt (a row whose response is cut away
entirely has no target and adds nothing to the loss; :func:`encode_prompt_response` reports
how many rows were cut). Generation prompts keep their LAST ``seq_len`` tokens (the end of
the prompt is what the answer continues), losing the beginning (BOS included).

The prompt is tokenised with the tokenizer's special tokens (BOS for Llama tokenizers), the
response without, followed by ``eos_token_id``; prompt and response are tokenised separately
and concatenated, so the prompt's tokens at training and at generation time are the same.
The pad id is ``tokenizer.pad_token_id``, else ``eos_token_id`` (Llama tokenizers have none).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

__all__ = ["LMBatch", "pad_token_id", "encode_prompt_response", "encode_texts",
           "encode_prompts", "decode_generated"]


class LMBatch(NamedTuple):
  """Encoded rows: ``input_ids``, ``attention_mask``, ``loss_mask`` (N, seq_len) int32, and
  ``truncated``: how many rows lost tokens to ``seq_len``."""

  input_ids: np.ndarray
  attention_mask: np.ndarray
  loss_mask: np.ndarray
  truncated: int

  def arrays(self) -> dict[str, np.ndarray]:
    """The batch dict :func:`~mgpo_jax.train.causal_lm_loss` reads."""
    return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
            "loss_mask": self.loss_mask}


def pad_token_id(tokenizer: Any) -> int:
  """``tokenizer.pad_token_id``, else its ``eos_token_id``; ``ValueError`` if it has neither."""
  for name in ("pad_token_id", "eos_token_id"):
    value = getattr(tokenizer, name, None)
    if value is not None:
      return int(value)
  raise ValueError("the tokenizer has neither pad_token_id nor eos_token_id; set one "
                   "(tokenizer.pad_token = ...)")


def _check_seq_len(seq_len: int) -> None:
  if not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
    raise ValueError(f"seq_len must be an integer >= 2; got {seq_len!r}")


def _ids(tokenizer: Any, texts: Sequence[str], special: bool) -> list[list[int]]:
  if isinstance(texts, str):
    raise TypeError("pass a sequence of strings, not one string")
  if not texts:
    return []
  return tokenizer(list(texts), add_special_tokens=special)["input_ids"]


def _eos(tokenizer: Any, add_eos: bool) -> list[int]:
  if not add_eos:
    return []
  if tokenizer.eos_token_id is None:
    raise ValueError("add_eos=True but the tokenizer has no eos_token_id; pass add_eos=False")
  return [int(tokenizer.eos_token_id)]


def _rows(pieces: list[tuple[list[int], list[int]]], seq_len: int, pad: int) -> LMBatch:
  """Rows ``context + targets`` cut to their first ``seq_len`` tokens, right-padded."""
  n = len(pieces)
  ids = np.full((n, seq_len), pad, np.int32)
  attention = np.zeros((n, seq_len), np.int32)
  loss = np.zeros((n, seq_len), np.int32)
  truncated = 0
  for i, (context, targets) in enumerate(pieces):
    row = (context + targets)[:seq_len]
    truncated += len(context) + len(targets) > seq_len
    ids[i, : len(row)] = row
    attention[i, : len(row)] = 1
    loss[i, len(context): len(row)] = 1
  return LMBatch(ids, attention, loss, int(truncated))


def encode_prompt_response(
  tokenizer: Any,
  prompts: Sequence[str],
  responses: Sequence[str],
  seq_len: int,
  *,
  add_eos: bool = True,
) -> LMBatch:
  """Rows ``prompt + response + EOS``, loss on the response and EOS only (module docstring:
  right padding; overlong rows keep their first ``seq_len`` tokens)."""
  _check_seq_len(seq_len)
  if len(prompts) != len(responses):
    raise ValueError(f"prompts and responses differ in length: {len(prompts)} != "
                     f"{len(responses)}")
  eos = _eos(tokenizer, add_eos)
  prompt_ids = _ids(tokenizer, prompts, True)
  response_ids = _ids(tokenizer, responses, False)
  pieces = [(list(p), list(r) + eos) for p, r in zip(prompt_ids, response_ids)]
  return _rows(pieces, seq_len, pad_token_id(tokenizer))


def encode_texts(
  tokenizer: Any, texts: Sequence[str], seq_len: int, *, add_eos: bool = True
) -> LMBatch:
  """Rows ``text + EOS`` (with the tokenizer's special tokens, e.g. BOS), loss on every real
  token after the first (right padding; overlong rows keep their first ``seq_len`` tokens)."""
  _check_seq_len(seq_len)
  eos = _eos(tokenizer, add_eos)
  pieces = []
  for ids in _ids(tokenizer, texts, True):
    ids = list(ids) + eos
    pieces.append((ids[:1], ids[1:]))  # the first token has no predecessor to predict it
  return _rows(pieces, seq_len, pad_token_id(tokenizer))


def encode_prompts(
  tokenizer: Any, prompts: Sequence[str], seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
  """``(input_ids, attention_mask)`` (N, seq_len) int32 of LEFT-padded prompts for
  :func:`~mgpo_jax.generate.greedy_generate`; an overlong prompt keeps its LAST ``seq_len``
  tokens. Tokenised as :func:`encode_prompt_response` tokenises prompts."""
  _check_seq_len(seq_len)
  pad = pad_token_id(tokenizer)
  prompt_ids = _ids(tokenizer, prompts, True)
  ids = np.full((len(prompt_ids), seq_len), pad, np.int32)
  mask = np.zeros((len(prompt_ids), seq_len), np.int32)
  for i, row in enumerate(prompt_ids):
    row = list(row)[-seq_len:]
    if not row:
      raise ValueError(f"prompt {i} encodes to no tokens; generation needs at least one")
    ids[i, seq_len - len(row):] = row
    mask[i, seq_len - len(row):] = 1
  return ids, mask


def decode_generated(
  tokenizer: Any, tokens: np.ndarray, eos_token_id: int | Sequence[int] | None = None
) -> list[str]:
  """Texts of generated ids (N, L): each row cut before its first EOS (default the
  tokenizer's), decoded without special tokens and stripped."""
  if eos_token_id is None:
    eos_token_id = tokenizer.eos_token_id
  eos = set() if eos_token_id is None else (
    {int(eos_token_id)} if isinstance(eos_token_id, (int, np.integer)) else set(eos_token_id))
  texts = []
  for row in np.asarray(tokens).tolist():
    cut = next((i for i, t in enumerate(row) if t in eos), len(row))
    texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
  return texts
