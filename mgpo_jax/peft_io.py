"""Deprecated location: use :mod:`mgpo_jax.lora.peft_io` (or ``from mgpo_jax import ...``)."""

from mgpo_jax.lora.peft_io import CONFIG_NAME, WEIGHTS_NAME, load_adapters, save_adapters

__all__ = ["save_adapters", "load_adapters", "CONFIG_NAME", "WEIGHTS_NAME"]
