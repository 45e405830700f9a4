"""A tiny NNX model shared by the LoRA and PEFT tests: an embedding, two blocks in an
``nnx.List`` (query/value/dense/up linears, one without bias) and a classifier head."""

import functools

import jax
import jax.numpy as jnp
from flax import nnx


class Block(nnx.Module):
  def __init__(self, d: int, h: int, rngs: nnx.Rngs):
    self.query, self.value = nnx.Linear(d, d, rngs=rngs), nnx.Linear(d, d, rngs=rngs)
    self.dense = nnx.Linear(d, h, use_bias=False, rngs=rngs)
    self.up = nnx.Linear(h, d, rngs=rngs)

  def __call__(self, x):
    h = jnp.tanh(self.query(x)) * self.value(x)
    return x + self.up(jax.nn.gelu(self.dense(h), approximate=False))  # torch's default GELU


class Tiny(nnx.Module):
  """Embedding (vocab ``v``, width ``d``) + two blocks + mean-pooled classifier (``c``)."""

  def __init__(self, rngs: nnx.Rngs, *, d: int, h: int, v: int, c: int):
    self.emb = nnx.Embed(v, d, rngs=rngs)
    self.layers = nnx.List([Block(d, h, rngs), Block(d, h, rngs)])
    self.classifier = nnx.Linear(d, c, rngs=rngs)

  def __call__(self, ids):
    h = self.emb(ids)
    for layer in self.layers:
      h = layer(h)
    return self.classifier(h.mean(axis=1))


def tiny(d: int, h: int, v: int, c: int):
  """``Tiny`` with fixed sizes: ``tiny(...)(rngs)`` builds one."""
  return functools.partial(Tiny, d=d, h=h, v=v, c=c)
