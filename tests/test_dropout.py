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
