"""Optax transforms: one module per method.

``mgpo``  LoRA-MGPO, paper form (momentum-guided perturbation of the adapters)
"""

from mgpo_jax.optim.mgpo import MGPOState, follow_schedule, mgpo, mgpo_adamw, mgpo_eval_params

__all__ = ["MGPOState", "follow_schedule", "mgpo", "mgpo_adamw", "mgpo_eval_params"]
