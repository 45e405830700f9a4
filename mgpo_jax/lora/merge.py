"""Folding LoRA adapters back into plain ``nnx.Linear`` layers: ``W ← W + s A B``."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from mgpo_jax.lora import _graph
from mgpo_jax.lora.layer import LoraLinear

__all__ = ["merge_lora"]


def merge_lora(model: nnx.Module) -> nnx.Module:
  """A copy of ``model`` with every :class:`LoraLinear` folded into a plain ``nnx.Linear``
  with kernel ``W + s A B``, and ``modules_to_save`` parameters back to ``nnx.Param``.

  ``model`` is left untouched. Any perturbation set on ``model`` is ignored.
  """
  merged = nnx.clone(model)
  for p, layer in _graph.nodes(merged, LoraLinear):
    w = layer.kernel[...]
    kernel = (w.astype(jnp.float32) + layer.delta_kernel().astype(jnp.float32)).astype(w.dtype)
    linear = nnx.eval_shape(
      lambda layer=layer: nnx.Linear(
        layer.in_features, layer.out_features, use_bias=layer.use_bias,
        dtype=layer.dtype, param_dtype=layer.param_dtype, precision=layer.precision,
        dot_general=layer.dot_general, promote_dtype=layer.promote_dtype,
        preferred_element_type=layer.preferred_element_type, rngs=nnx.Rngs(0),
      )
    )
    linear.kernel = nnx.Param.from_metadata(kernel, layer.kernel.get_metadata())
    if layer.use_bias:
      linear.bias = layer.bias
    _graph.set_child(merged, p, linear)
  _graph.retype(merged, nnx.LoRAParam, nnx.Param)
  return merged
