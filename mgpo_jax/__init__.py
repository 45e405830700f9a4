"""mgpo-jax: flat-minima LoRA fine-tuning in JAX.

LoRA-MGPO (momentum-guided perturbation) as an Optax transform, LoRA adapters for Flax NNX
models, and a jitted data-parallel train step. The math is in ``docs/`` and
``ALGORITHMS.md``.
"""

__version__ = "0.1.0"
from mgpo_jax.transform import MGPOState, mgpo, mgpo_adamw, mgpo_eval_params
from mgpo_jax.analysis import top_hessian_eigenvalue
from mgpo_jax.data import (DataUnavailableError, Split, batch_iterator, eval_batch_iterator,
                           load_rotten_tomatoes, minilm_path, tokenize)
from mgpo_jax.checkpoint import CheckpointError, Checkpointer
from mgpo_jax.train import (TrainState, Trainer, classification_loss, clean_params,
                            make_mesh)
from mgpo_jax.lora import (DenseNoise, LoraConfig, LoraLinear, LowRank, apply_lora,
                           clear_perturbations, frozen, init_lora_params, lora_labels,
                           lora_modules, merge_lora, merge_lora_params, perturbed,
                           set_perturbations, split_lora, trainable)
from mgpo_jax.lora import load_adapters, save_adapters
from mgpo_jax.models import BertForSequenceClassification, BertModel, LlamaForCausalLM
