"""Weight-space perturbations of the LoRA modules' effective kernels: one mechanism, one module
per method. The math, defaults and sources are in ``docs/weight_perturbation.md``.

=============  ===============================================================================
``base``       :class:`WeightPerturbation` (``init`` / ``perturbations`` / ``update``),
               :class:`LoraWeights`, :func:`lora_weights`, :func:`adapter_pairs`,
               :func:`cosine_ramp`, Gram-product norms
``flat_lora``  :func:`flat_lora` (Flat-LoRA, filter-wise Gaussian noise)
``ggpo``       :func:`ggpo` (LoRA-GGPO, a reconstruction: noise from weight and gradient norms)
``mgpo_code``  :func:`mgpo_code` (LoRA-MGPO as released: low-rank, along the momentum image)
=============  ===============================================================================
"""

from mgpo_jax.perturbation.base import (LoraWeights, WeightPerturbation, adapter_pairs,
                                        cosine_ramp, image_column_sq_norms, image_sq_norm,
                                        lora_weights)
from mgpo_jax.perturbation.flat_lora import FlatLoraState, flat_lora
from mgpo_jax.perturbation.ggpo import GGPOState, ggpo
from mgpo_jax.perturbation.mgpo_code import MGPOCodeState, mgpo_code

__all__ = ["FlatLoraState", "GGPOState", "LoraWeights", "MGPOCodeState", "WeightPerturbation",
           "adapter_pairs", "cosine_ramp", "flat_lora", "ggpo", "image_column_sq_norms",
           "image_sq_norm", "lora_weights", "mgpo_code"]
