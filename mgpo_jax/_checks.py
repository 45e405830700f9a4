"""One check of a scalar hyper-parameter, shared by the optimizers, perturbations and layers."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _real_scalar(value: Any) -> bool:
  """A Python real number, or a 0-d numpy/JAX array of an integer or float dtype; no bool."""
  if isinstance(value, (bool, np.bool_)):
    return False
  if isinstance(value, numbers.Real):
    return True
  if isinstance(value, (np.ndarray, np.generic, jax.Array)):
    return value.ndim == 0 and (np.issubdtype(value.dtype, np.integer)
                                or np.issubdtype(value.dtype, np.floating)
                                or value.dtype == jnp.bfloat16)
  return False


def check_scalar(where: str, name: str, value: Any, ok: Callable[[float], bool], accepted: str,
                 *, schedule_ok: bool = False) -> None:
  """Raises ``ValueError("<where>: <name> must be <accepted>; got <value>")`` unless ``value``
  is a finite real scalar with ``ok(value)``. A schedule (a callable, where ``schedule_ok``)
  and a traced value (under ``jit``, e.g. from ``optax.inject_hyperparams``) pass unchecked."""
  if (schedule_ok and callable(value)) or isinstance(value, jax.core.Tracer):
    return
  if not (_real_scalar(value) and math.isfinite(float(value)) and ok(float(value))):
    raise ValueError(f"{where}: {name} must be {accepted}; got {value!r}")
