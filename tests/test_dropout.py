"""mgpo_jax.dropout: 16-bit masks, against their exact distribution and nnx.Dropout's interface."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mgpo_jax.dropout import Dropout, keep_mask


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(64, 12, 33, 33), (200_001,)])  # odd last axes
def test_keep_fraction_is_binomial(rate, shape):
  """The kept fraction is within 5 binomial standard deviations of 1 - t / 2^16."""
  mask = np.asarray(keep_mask(jax.random.key(1), shape, rate))
  assert mask.shape == shape and mask.dtype == bool
  p = 1 - round(rate * 2**16) / 2**16
  n = mask.size
  assert abs(mask.mean() - p) < 5 * np.sqrt(p * (1 - p) / n)


def test_the_two_halves_of_a_word_are_independent():
  """Element j and element j + ceil(n/2) of a row come from one 32-bit word (low and high
  halves): their masks must agree only as often as two independent draws do."""
  rate, n = 0.5, 1001
  mask = np.asarray(keep_mask(jax.random.key(2), (500, n), rate))
  m = -(-n // 2)
  lo, hi = mask[:, : n - m], mask[:, m:]
  agree = (lo == hi).mean()
  assert abs(agree - 0.5) < 5 * np.sqrt(0.25 / lo.size)
  # And neighbours along the row, the other pairing one could get wrong.
  assert abs((mask[:, 1:] == mask[:, :-1]).mean() - 0.5) < 5 * np.sqrt(0.25 / mask[:, 1:].size)


@pytest.mark.parametrize("shape", [(3, 7, 9), (10,), ()])
@pytest.mark.parametrize("rate", [0.1, 0.37])
def test_mask_is_the_reference_bit_for_bit(shape, rate):
  """An independent rebuild from the documented layout: row ``words`` of ``jax.random.bits``,
  the low halves for elements 0 .. m-1 and the high halves for m .. 2m-1, kept when
  ``u >= round(rate * 2^16)``; and the layer computes ``where(keep, x * 2^16 / (2^16 - t), 0)``
  with that mask for a key given in the call."""
  key = jax.random.key(11)
  lead, n = (shape[:-1], shape[-1]) if shape else ((), 1)
  m = -(-n // 2)
  words = np.asarray(jax.random.bits(key, (*lead, m), jnp.uint32)).astype(np.int64)
  uniforms = np.concatenate([words % 2**16, words // 2**16], axis=-1)[..., :n]
  t = int(np.floor(rate * 2**16 + 0.5))
  want = (uniforms >= t).reshape(shape)
  np.testing.assert_array_equal(np.asarray(keep_mask(key, shape, rate)), want)
  x = np.asarray(jax.random.normal(jax.random.key(12), shape), np.float32)
  y = Dropout(rate, rngs=nnx.Rngs(0))(jnp.asarray(x), rngs=key)
  scale = np.float32(2**16 / (2**16 - t))
  np.testing.assert_array_equal(np.asarray(y), np.where(want, x * scale, 0).astype(np.float32))


def test_dropout_is_unbiased_and_scaled():
  x = jax.random.normal(jax.random.key(3), (8, 4096))
  y = Dropout(0.1, rngs=nnx.Rngs(0))(x)
  kept = np.asarray(y != 0)
  scale = 2**16 / (2**16 - round(0.1 * 2**16))
  np.testing.assert_allclose(np.asarray(y)[kept], np.asarray(x)[kept] * scale, rtol=1e-6)
  # E[y] = x: the mean of y / x over many masks of one input.
  layer = Dropout(0.3, rngs=nnx.Rngs(5))
  ones = jnp.ones((4096,))
  mean = np.mean([np.asarray(layer(ones)) for _ in range(50)])
  assert abs(mean - 1.0) < 5 * np.sqrt(0.3 / 0.7 / (50 * 4096))


def test_interface_matches_nnx_dropout():
  x = jnp.arange(1.0, 41.0).reshape(4, 10)
  layer = Dropout(0.5, deterministic=True, rngs=nnx.Rngs(0))
  assert isinstance(layer, nnx.Dropout)
  np.testing.assert_array_equal(layer(x), x)  # deterministic: the identity
  a = layer(x, deterministic=False)
  b = layer(x, deterministic=False)
  assert not np.array_equal(a, b)  # the stream advances
  np.testing.assert_array_equal(layer(x, deterministic=False, rngs=jax.random.key(7)),
                                layer(x, deterministic=False, rngs=jax.random.key(7)))
  np.testing.assert_array_equal(Dropout(0.0, rngs=nnx.Rngs(0))(x), x)
  np.testing.assert_array_equal(Dropout(1.0, rngs=nnx.Rngs(0))(x), jnp.zeros_like(x))
  shared = np.asarray(Dropout(0.5, broadcast_dims=(-1,), rngs=nnx.Rngs(1))(x) == 0)
  assert (shared.all(axis=1) | (~shared).all(axis=1)).all()  # one mask value per row
  with pytest.raises(ValueError, match="no rngs"):
    Dropout(0.5)(x)
  with pytest.raises(ValueError, match="deterministic is None"):
    Dropout(0.5, deterministic=None, rngs=nnx.Rngs(0))(x)
  with pytest.raises(ValueError, match="broadcast_dims"):
    Dropout(0.5, broadcast_dims=(2,), rngs=nnx.Rngs(0))(x)
  for rate in (1.5, -0.5, float("nan"), "0.1"):  # 1.5 would drop everything, silently
    with pytest.raises(ValueError, match=r"Dropout: rate must be a number in \[0, 1\]"):
      Dropout(rate, rngs=nnx.Rngs(0))
  rows = np.asarray(Dropout(0.5, broadcast_dims=(0,), rngs=nnx.Rngs(2))(x) == 0)
  assert (rows == rows[0]).all() and 0 < rows[0].sum() < 10  # one mask value per column
  # Per-call Rngs and RngStream draw from what is given, like nnx.Dropout.
  for given in (lambda: nnx.Rngs(dropout=5), lambda: nnx.Rngs(dropout=5).dropout):
    np.testing.assert_array_equal(layer(x, deterministic=False, rngs=given()),
                                  layer(x, deterministic=False, rngs=given()))
  for dtype in (jnp.bfloat16, jnp.float16):
    assert Dropout(0.1, rngs=nnx.Rngs(0))(x.astype(dtype)).dtype == dtype


def test_model_train_and_eval_switch_it_under_jit():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.drop = Dropout(0.5, deterministic=True, rngs=rngs)

    def __call__(self, x):
      return self.drop(x)

  net = Net(nnx.Rngs(0))
  x = jnp.ones((64,))
  step = nnx.jit(lambda m, x: m(x))
  np.testing.assert_array_equal(step(net, x), x)
  net.train()
  a, b = step(net, x), step(net, x)
  assert 0 < int((a == 0).sum()) < 64 and not np.array_equal(a, b)  # fresh masks each call
  net.eval()
  np.testing.assert_array_equal(step(net, x), x)


def test_explicit_and_manual_sharding():
  """Under an explicit mesh the output keeps the input's sharding (on either axis) and equals
  the unsharded result for the same key; inside shard_map it runs on the local blocks."""
  from jax.sharding import AxisType, PartitionSpec as P

  if jax.device_count() < 4:
    pytest.skip("needs 4 devices (tests/conftest.py asks XLA for 4 CPU devices)")
  x = jax.random.normal(jax.random.key(0), (8, 12))
  layer = Dropout(0.3, rngs=nnx.Rngs(0))
  want = layer(x, rngs=jax.random.key(4))
  mesh = jax.make_mesh((4,), ("x",), axis_types=(AxisType.Explicit,))
  with jax.set_mesh(mesh):
    for spec in (P("x", None), P(None, "x")):
      xs = jax.device_put(x, spec)
      y = jax.jit(lambda v: layer(v, rngs=jax.random.key(4)))(xs)
      assert jax.typeof(y).sharding.spec == spec
      np.testing.assert_array_equal(np.asarray(y), np.asarray(want))
  auto = jax.make_mesh((4,), ("x",), axis_types=(AxisType.Auto,))
  f = jax.shard_map(lambda v: layer(v, rngs=jax.random.key(4)), mesh=auto, in_specs=P("x"),
                    out_specs=P("x"))
  y = np.asarray(jax.jit(f)(x))
  assert y.shape == x.shape and 0 < (y == 0).mean() < 0.6


@pytest.mark.parametrize("shape", [(0,), (0, 5), (2, 0, 5), (3, 0)])
def test_empty_shapes_give_empty_masks(shape):
  mask = keep_mask(jax.random.key(0), shape, 0.3)
  assert mask.shape == shape and mask.dtype == jnp.bool_
