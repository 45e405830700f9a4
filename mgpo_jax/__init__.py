"""mgpo-jax: flat-minima LoRA fine-tuning in JAX.

LoRA-MGPO (momentum-guided perturbation) as an Optax transform, weight-space perturbations
(Flat-LoRA, LoRA-GGPO, the released-code LoRA-MGPO), LoRA adapters for Flax NNX models, and a
jitted data-parallel train step. The math is in ``docs/``.

The public names below are imported on first use, so ``import mgpo_jax`` is cheap and pulls
in neither transformers, torch, orbax, matplotlib nor tqdm.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "mgpo_jax.optim.mgpo": ("MGPOState", "follow_schedule", "mgpo", "mgpo_adamw",
                           "mgpo_eval_params"),
    "mgpo_jax.optim.lora_one": ("PreconditionLoraState", "lora_one_adamw", "lora_pairs",
                               "precondition_lora"),
    "mgpo_jax.perturbation": ("FlatLoraState", "GGPOState", "LoraWeights", "MGPOCodeState",
                              "WeightPerturbation", "adapter_pairs", "cosine_ramp", "flat_lora",
                              "ggpo", "lora_weights", "mgpo_code"),
    "mgpo_jax.analysis": ("top_hessian_eigenvalue",),
    "mgpo_jax.dropout": ("Dropout", "keep_mask"),
    "mgpo_jax.data": ("DataUnavailableError", "Split", "batch_iterator", "eval_batch_iterator",
                      "load_rotten_tomatoes", "minilm_path", "tokenize"),
    "mgpo_jax.train.checkpoint": ("CheckpointError", "Checkpointer"),
    "mgpo_jax.train": ("TrainState", "Trainer", "causal_lm_loss", "classification_loss",
                       "clean_params", "make_mesh", "parse_mesh", "perplexity", "ShardingRules"),
    "mgpo_jax.lora": ("ALL_LINEAR", "INITS", "DenseNoise", "LoraConfig", "LoraLinear",
                      "LowRank", "Perturbation", "apply_lora",
                      "clear_perturbations", "frozen", "init_lora_params", "lora_labels",
                      "lora_modules", "merge_lora", "merge_lora_params", "perturbed",
                      "load_adapters", "save_adapters", "set_perturbations", "split_lora",
                      "trainable", "kernel_gradients", "init_lora_one", "apply_lora_one"),
    "mgpo_jax.models": ("BertForSequenceClassification", "BertModel", "LlamaForCausalLM",
                        "LlamaForSequenceClassification", "load_model"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
  if name not in _WHERE:
    raise AttributeError(f"module 'mgpo_jax' has no attribute {name!r}")
  value = getattr(importlib.import_module(_WHERE[name]), name)
  globals()[name] = value  # later lookups skip this function
  return value


def __dir__() -> list[str]:
  return sorted({*globals(), *__all__})
