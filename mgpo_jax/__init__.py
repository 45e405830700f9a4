"""mgpo-jax: flat-minima LoRA fine-tuning in JAX.

LoRA-MGPO (momentum-guided perturbation) as an Optax transform, LoRA adapters for Flax NNX
models, and a jitted data-parallel train step. The math is in ``docs/`` and
``ALGORITHMS.md``.
"""

__version__ = "0.1.0"
