"""LoRA for Flax NNX models (and plain parameter pytrees), with PEFT's names and meaning.

A LoRA module wraps a frozen kernel ``W ∈ R^{n×m}`` (Flax orientation, ``y = x W``) with
adapters ``A ∈ R^{n×r}``, ``B ∈ R^{r×m}``; its effective kernel is
``W' = W + s · A B`` with ``s = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``). The math is in
``docs/lora.md``. One module per idea:

=====================  ==========================================================================
``config``             :class:`LoraConfig` and PEFT's target-matching rule
``init``               how ``A, B`` start (``"default"``, ``"gaussian"``, ``"pissa"``)
``layer``              :class:`LoraLinear`, the perturbation types :class:`LowRank`, :class:`DenseNoise`
``surgery``            :func:`apply_lora`, :func:`lora_modules`, the :data:`trainable` / :data:`frozen`
                       filters, :func:`split_lora`, :func:`lora_labels`
``merge``              :func:`merge_lora`: adapters folded into plain ``nnx.Linear`` layers
``perturb``            :func:`set_perturbations`, :func:`clear_perturbations`, :func:`perturbed`
``pytree``             the linen / plain-pytree path: :func:`init_lora_params`, :func:`merge_lora_params`
``peft_io``            :func:`save_adapters`, :func:`load_adapters` in Hugging Face PEFT's layout
``lora_one``           LoRA-One's spectral init: :func:`kernel_gradients`, :func:`init_lora_one`,
                       :func:`apply_lora_one` (both phases)
=====================  ==========================================================================
"""

from mgpo_jax.lora.config import ALL_LINEAR, LoraConfig
from mgpo_jax.lora.init import INITS
from mgpo_jax.lora.layer import DenseNoise, LoraLinear, LowRank, Perturbation
from mgpo_jax.lora.lora_one import apply_lora_one, init_lora_one, kernel_gradients
from mgpo_jax.lora.merge import merge_lora
from mgpo_jax.lora.peft_io import load_adapters, save_adapters
from mgpo_jax.lora.perturb import clear_perturbations, perturbed, set_perturbations
from mgpo_jax.lora.pytree import init_lora_params, merge_lora_params
from mgpo_jax.lora.surgery import (apply_lora, frozen, lora_labels, lora_modules, split_lora,
                                   trainable)

__all__ = [
  "ALL_LINEAR",
  "INITS",
  "LoraConfig",
  "LoraLinear",
  "LowRank",
  "DenseNoise",
  "Perturbation",
  "trainable",
  "frozen",
  "apply_lora",
  "lora_modules",
  "merge_lora",
  "split_lora",
  "lora_labels",
  "set_perturbations",
  "clear_perturbations",
  "perturbed",
  "init_lora_params",
  "merge_lora_params",
  "save_adapters",
  "load_adapters",
  "kernel_gradients",
  "init_lora_one",
  "apply_lora_one",
]
