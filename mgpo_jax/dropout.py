"""Dropout with masks drawn from 16-bit uniforms: ``nnx.Dropout`` at half the random bits.

``nnx.Dropout`` draws one 32-bit threefry word per element (``jax.random.bernoulli``). Dropout
needs far less resolution, so :class:`Dropout` splits each 32-bit word into two 16-bit
uniforms ``u``, keeps an element when ``u >= t`` with ``t = round(rate · 2^16)``, and scales the
kept ones by ``1 / (1 - t / 2^16)``, so that ``E[dropout(x)] = x`` (exactly, up to rounding that
scale to the input's dtype, as ``nnx.Dropout`` does). The drop probability is the rate rounded
to a multiple of ``2^-16`` (0.1 becomes 0.1000061). On CPU the random words are most of a
mask's cost: when this landed, a MiniLM LoRA train step was 8-12% faster than with
``nnx.Dropout`` at batch x sequence 16 x 64 to 32 x 128 on one core
(``benchmarks/vs_pytorch.py --also nnx-dropout``; ``docs/benchmarks.md``, section 4).

Everything else is ``nnx.Dropout``'s: ``deterministic`` (``model.train()`` / ``model.eval()``,
``nnx.view``), the ``rngs`` stream (forked at construction, or given per call),
``broadcast_dims`` and explicit sharding (the mask takes the input's sharding). The masks
differ from ``nnx.Dropout``'s for the same key. Element ``j`` of the last axis shares its word
with element ``j + ceil(n / 2)``, so leading axes keep their sharding, while a sharded last
axis costs a collective to build the mask.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mgpo_jax._checks import check_scalar

_LEVELS = 1 << 16  # 16-bit uniforms


def keep_mask(key: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
  """A boolean mask of ``shape``, each element ``True`` with probability ``1 - t / 2^16``,
  ``t = round(rate · 2^16)``, from half as many 32-bit random words as elements (the words
  are drawn along the last axis, so leading axes keep their sharding)."""
  *lead, n = shape or (1,)
  words = jax.random.bits(key, (*lead, -(-n // 2)), jnp.uint32)
  # (..., 2, m): the low halves, then the high halves; shifting a broadcast (not concatenating)
  # keeps the whole mask in one fused loop with its consumer.
  halves = (words[..., None, :] >> jnp.array([[0], [16]], jnp.uint32)) & 0xFFFF
  uniforms = halves.reshape(*lead, 2 * words.shape[-1])[..., :n]
  return (uniforms >= jnp.uint32(round(rate * _LEVELS))).reshape(shape)


class Dropout(nnx.Dropout):
  """``nnx.Dropout`` whose masks come from :func:`keep_mask` (16-bit uniforms).

  .. math::
     y = \\frac{m \\odot x}{1 - t / 2^{16}}, \\quad
     m_i = [u_i \\ge t], \\quad t = \\mathrm{round}(\\text{rate} \\cdot 2^{16}),
     \\quad u_i \\sim U\\{0, \\dots, 2^{16} - 1\\}

  Args: as ``nnx.Dropout`` (``rate``, ``broadcast_dims``, ``deterministic``,
  ``rng_collection``, ``rngs``).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from mgpo_jax import Dropout
    >>> layer = Dropout(0.5, rngs=nnx.Rngs(0))
    >>> y = layer(jnp.ones((2, 1000)))
    >>> bool(jnp.all((y == 0) | (y == 2))), abs(float((y == 0).mean()) - 0.5) < 0.05
    (True, True)
  """

  def __init__(self, rate: float, **kwargs: Any):
    check_scalar("Dropout", "rate", rate, lambda v: 0 <= v <= 1, "a number in [0, 1]")  # 1: all
    super().__init__(float(rate), **kwargs)

  def __call__(self, inputs: jax.Array, *, deterministic: bool | None = None,
               rngs: nnx.Rngs | nnx.RngStream | jax.Array | None = None) -> jax.Array:
    deterministic = self.deterministic if deterministic is None else deterministic
    if deterministic is None:
      raise ValueError("Dropout: deterministic is None; give deterministic=True/False at "
                       "construction or in the call, or use model.train() / model.eval()")
    threshold = round(self.rate * _LEVELS)
    if deterministic or threshold == 0:
      return inputs
    if threshold >= _LEVELS:
      return jnp.zeros_like(inputs)
    stream = self.rngs if rngs is None else rngs
    if stream is None:
      raise ValueError("Dropout: deterministic is False but no rngs were given, neither at "
                       "construction nor in the call")
    if isinstance(stream, nnx.Rngs):
      stream = stream[self.rng_collection]
    key = stream() if isinstance(stream, nnx.RngStream) else stream
    if any(not -inputs.ndim <= d < inputs.ndim for d in self.broadcast_dims):
      raise ValueError(f"Dropout: broadcast_dims={self.broadcast_dims} out of range for an "
                       f"input of {inputs.ndim} dimensions")
    shared = {d % inputs.ndim for d in self.broadcast_dims}
    shape = tuple(1 if d in shared else s for d, s in enumerate(inputs.shape))
    keep = jnp.broadcast_to(keep_mask(key, shape, self.rate), inputs.shape)
    spec = getattr(jax.typeof(inputs).sharding, "spec", ())
    if any(axis is not None for axis in spec):  # explicit sharding: the mask follows the input
      keep = jax.sharding.reshard(keep, spec)
    scale = jnp.asarray(_LEVELS / (_LEVELS - threshold), inputs.dtype)
    return jnp.where(keep, inputs * scale, jnp.zeros_like(inputs))
