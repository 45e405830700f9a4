"""Hugging Face (PyTorch) names of NNX parameters: the one place that maps them.

The models of this package name their submodules exactly like Hugging Face's PyTorch modules,
so a module's NNX path joined with ``"."`` is its PyTorch module name. A parameter's HF name
is that path plus the PyTorch parameter name below, and PyTorch stores a linear weight as
``(out, in)`` where Flax stores the kernel as ``(in, out)``:

=================  =====================  ===============================================
NNX module         NNX parameter          PyTorch parameter
=================  =====================  ===============================================
``nnx.Linear``     ``kernel`` (in, out)   ``weight`` (out, in), transposed
``nnx.Linear``     ``bias``               ``bias``
``nnx.Embed``      ``embedding``          ``weight``
``nnx.LayerNorm``  ``scale``, ``bias``    ``weight``, ``bias``
``nnx.RMSNorm``    ``scale``              ``weight``
``LoraLinear``     ``kernel``, ``bias``   ``base_layer.weight`` (transposed), ``base_layer.bias``
``LoraLinear``     ``lora_a`` (in, r)     ``lora_A.weight`` (r, in), transposed
``LoraLinear``     ``lora_b`` (r, out)    ``lora_B.weight`` (out, r), transposed
=================  =====================  ===============================================

``LoraLinear``'s names are PEFT's (``peft.tuners.lora.Linear``, without the adapter name, as
in a saved adapter file). A parameter of any other module keeps its NNX name, untransposed.
Model loading (:mod:`mgpo_jax.models`) and PEFT adapter files (:mod:`mgpo_jax.lora.peft_io`)
both use :func:`hf_parameters`.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from mgpo_jax.lora.layer import LoraLinear

__all__ = ["TORCH_NAMES", "torch_name", "hf_parameters"]

#: NNX module type -> {NNX parameter name: (PyTorch parameter name, transposed)}.
TORCH_NAMES: dict[type[nnx.Module], dict[str, tuple[str, bool]]] = {
  nnx.Linear: {"kernel": ("weight", True), "bias": ("bias", False)},
  nnx.Embed: {"embedding": ("weight", False)},
  nnx.LayerNorm: {"scale": ("weight", False), "bias": ("bias", False)},
  nnx.RMSNorm: {"scale": ("weight", False)},
  LoraLinear: {
    "kernel": ("base_layer.weight", True),
    "bias": ("base_layer.bias", False),
    "lora_a": ("lora_A.weight", True),
    "lora_b": ("lora_B.weight", True),
  },
}


def torch_name(module: nnx.Module, attr: str) -> tuple[str, bool]:
  """``(PyTorch name, transposed)`` of ``module``'s parameter ``attr``.

  >>> torch_name(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), "kernel")
  ('weight', True)
  """
  for kind, names in TORCH_NAMES.items():
    if isinstance(module, kind):
      return names.get(attr, (attr, False))
  return attr, False


def hf_parameters(
  model: nnx.Module, kind: type[nnx.Variable] = nnx.Param
) -> dict[str, tuple[nnx.Variable, bool]]:
  """HF parameter name -> (the model's variable, whether the HF tensor is its transpose),
  for every variable of type ``kind`` (default: all parameters) in ``model``."""
  params = {}
  for path, _ in nnx.to_flat_state(nnx.state(model, kind)):
    parent: Any = model
    for part in path[:-1]:
      parent = parent[part] if isinstance(part, int) else getattr(parent, part)
    attr = path[-1]
    variable = parent[attr] if isinstance(attr, int) else getattr(parent, attr)
    name, transposed = torch_name(parent, attr)
    params[".".join(map(str, (*path[:-1], name)))] = (variable, transposed)
  return params
