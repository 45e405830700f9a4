"""Optax transforms: one module per method.

``mgpo``      LoRA-MGPO, paper form (momentum-guided perturbation of the adapters)
``lora_one``  LoRA-One's r×r preconditioner of the adapter gradients (before Adam)
"""

from mgpo_jax.optim.lora_one import (PreconditionLoraState, lora_one_adamw, lora_pairs,
                                     precondition_lora)
from mgpo_jax.optim.mgpo import MGPOState, follow_schedule, mgpo, mgpo_adamw, mgpo_eval_params

__all__ = ["MGPOState", "follow_schedule", "mgpo", "mgpo_adamw", "mgpo_eval_params",
           "PreconditionLoraState", "lora_one_adamw", "lora_pairs", "precondition_lora"]
