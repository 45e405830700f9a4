"""Flax NNX implementations of the supported Hugging Face model families.

Module paths mirror the PyTorch modules' names, so LoRA targets and PEFT adapter keys use HF's
names; ``from_pretrained`` reads a local HF checkpoint directory (never a hub).
"""

from mgpo_jax.models._hf import CheckpointMismatchError, weight_files
from mgpo_jax.models.auto import SUPPORTED, TASKS, load_model, model_type
from mgpo_jax.models.bert import BertForSequenceClassification, BertModel
from mgpo_jax.models.llama import KVCache, LlamaForCausalLM, LlamaForSequenceClassification
from mgpo_jax.models.remat import set_remat

__all__ = [
  "BertForSequenceClassification",
  "BertModel",
  "CheckpointMismatchError",
  "KVCache",
  "LlamaForCausalLM",
  "LlamaForSequenceClassification",
  "SUPPORTED",
  "TASKS",
  "load_model",
  "model_type",
  "set_remat",
  "weight_files",
]
