"""A tiny random Llama checkpoint folder and tokenizer, built offline (for tests and demos).

``save_tiny_llama(directory)`` writes what ``mgpo-jax finetune --model`` reads: ``config.json``,
SHARDED safetensors (``model.safetensors.index.json`` + shards, via transformers'
``save_pretrained(max_shard_size=...)``) and tokenizer files (a ``tokenizers`` WordLevel model
wrapped in ``PreTrainedTokenizerFast``: BOS prepended, ``<pad>`` = 0, ``<s>`` = 1, ``</s>`` = 2).
``toy_pairs`` gives a memorisable GSM8K-style prompt/response set (answers after ``####``).
"""

from __future__ import annotations

import random
from pathlib import Path

SPECIAL = ("<pad>", "<s>", "</s>", "<unk>")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
WORDS = ("what", "is", "the", "sum", "of", "and", "answer", "question", "+", "=", "?", ".",
         "####", "a", "b", "c", "hello", "world", "tiny", "llama", "says")


def build_tokenizer():
  """A ``PreTrainedTokenizerFast``: whitespace/punctuation words, the numbers 0..199 and
  :data:`WORDS`; ``<s>`` is prepended to every encoded text (``add_special_tokens=True``)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast

  vocab = {t: i for i, t in enumerate((*SPECIAL, *map(str, range(200)), *WORDS))}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(
    single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS_ID)]
  )
  tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
  return PreTrainedTokenizerFast(
    tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
    unk_token="<unk>",
  )


def tiny_llama_config(vocab_size: int, **overrides):
  from transformers import LlamaConfig

  kw = dict(
    vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, tie_word_embeddings=False,
  )
  return LlamaConfig(**(kw | overrides))


def torch_tiny_llama(tokenizer=None, *, seed: int = 0, scale: float | None = None,
                     task: str = "causal-lm", **overrides):
  """A random ``transformers`` Llama (eval mode) for ``tokenizer``'s vocabulary.

  ``scale``: if set, every weight is redrawn as ``N(0, scale²)`` (+1 on the norms), giving
  O(1) logits for parity tests; ``None`` keeps transformers' init (small, near-uniform
  logits: a fair start for training). ``task``: ``"causal-lm"`` or ``"classification"``
  (``LlamaForSequenceClassification``, ``num_labels`` from ``overrides``, default 2)."""
  import torch
  import transformers

  tokenizer = tokenizer or build_tokenizer()
  torch.manual_seed(seed)
  config = tiny_llama_config(len(tokenizer), **overrides)
  cls = (transformers.LlamaForCausalLM if task == "causal-lm"
         else transformers.LlamaForSequenceClassification)
  model = cls(config).eval()
  if scale is not None:
    with torch.no_grad():
      for name, p in model.named_parameters():
        p.copy_(torch.randn_like(p) * scale + (1.0 if "norm" in name else 0.0))
  return model


def save_tiny_llama(directory, *, seed: int = 0, scale: float | None = None,
                    max_shard_size: str = "40KB", task: str = "causal-lm", **overrides) -> Path:
  """Writes a tiny random Llama checkpoint folder (sharded safetensors + tokenizer) to
  ``directory`` and returns it."""
  directory = Path(directory)
  tokenizer = build_tokenizer()
  model = torch_tiny_llama(tokenizer, seed=seed, scale=scale, task=task, **overrides)
  model.save_pretrained(str(directory), max_shard_size=max_shard_size)
  tokenizer.save_pretrained(str(directory))
  return directory


def toy_pairs(n: int = 8, seed: int = 0) -> list[tuple[str, str]]:
  """``n`` (prompt, response) pairs ``("what is 3 + 4 ?", "#### 7")`` with small numbers."""
  rng = random.Random(seed)
  pairs = []
  for _ in range(n):
    a, b = rng.randrange(50), rng.randrange(50)
    pairs.append((f"what is {a} + {b} ?", f"#### {a + b}"))
  return pairs
