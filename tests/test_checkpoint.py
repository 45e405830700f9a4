"""Tests of mgpo_jax.train.checkpoint: exact resume, atomic saves under SIGKILL, keep/save-every, errors."""

import doctest
import inspect
import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mgpo_jax.train.checkpoint
from mgpo_jax.train.checkpoint import CheckpointError, Checkpointer


def _assert_trees_identical(actual, expected):
  """Same tree structure (NamedTuple / nnx types included), dtypes and bits in every leaf."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert a.dtype == e.dtype
    if jax.dtypes.issubdtype(e.dtype, jax.dtypes.prng_key):
      a, e = jax.random.key_data(a), jax.random.key_data(e)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


# ---------------------------------------------------------------------------------------------
# Exact resume: a tiny MLP with dropout (a typed RNG key in the state), a data position, and
# optax states with NamedTuples at several depths.

_DATA, _BATCH, _STEPS = 48, 8, 6


def _data(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(_DATA, 5)).astype(np.float32)
  y = (np.sin(x @ rng.normal(size=(5, 2))) + 0.1 * rng.normal(size=(_DATA, 2))).astype(np.float32)
  return x, y


def _adamw_multisteps():
  schedule = optax.cosine_decay_schedule(3e-2, 2 * _STEPS)
  inner = optax.inject_hyperparams(optax.adamw)(learning_rate=schedule, weight_decay=1e-2)
  return optax.MultiSteps(inner, every_k_schedule=2)


def _mgpo_adamw():
  from mgpo_jax.optim import mgpo_adamw
  return mgpo_adamw(optax.linear_schedule(3e-2, 1e-3, 2 * _STEPS), rho=0.05)


def _init(seed, tx):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  params = {"dense1": {"kernel": 0.5 * jax.random.normal(k1, (5, 16)), "bias": jnp.zeros(16)},
            "dense2": {"kernel": 0.5 * jax.random.normal(k2, (16, 2)), "bias": jnp.zeros(2)}}
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
          "key": k3}


def _make_train_step(tx):
  def loss_fn(params, x, y, key):
    h = jnp.tanh(x @ params["dense1"]["kernel"] + params["dense1"]["bias"])
    keep = jax.random.bernoulli(key, 0.8, h.shape)
    h = jnp.where(keep, h / 0.8, 0.0)
    return jnp.mean((h @ params["dense2"]["kernel"] + params["dense2"]["bias"] - y) ** 2)

  @jax.jit
  def train_step(state, x, y):
    key, dropout_key = jax.random.split(state["key"])
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], x, y, dropout_key)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
            "key": key}, loss

  return train_step


def _train(train_step, state, position, steps):
  """Runs ``steps`` steps from data ``position``; returns (state, position, losses)."""
  x, y = _data()
  losses = []
  for _ in range(steps):
    idx = np.arange(position, position + _BATCH) % _DATA
    state, loss = train_step(state, x[idx], y[idx])
    losses.append(np.asarray(loss))
    position = (position + _BATCH) % _DATA
  return state, position, losses


@pytest.mark.parametrize("make_tx", [_adamw_multisteps, _mgpo_adamw], ids=["adamw", "mgpo"])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, make_tx):
  tx = make_tx()
  train_step = _make_train_step(tx)  # compiled once: a new process would compile the same
  reference, ref_position, ref_losses = _train(train_step, _init(0, tx), 3, 2 * _STEPS)

  first, position, losses = _train(train_step, _init(0, tx), 3, _STEPS)
  with Checkpointer(tmp_path, save_every=_STEPS) as ckpt:
    assert ckpt.save(int(first["step"]), first, metadata={"data_position": position})
  del first  # what follows starts from scratch, as a new process would

  tx = make_tx()
  with Checkpointer(tmp_path, save_every=_STEPS) as ckpt:
    assert ckpt.latest_step() == _STEPS
    state, meta = ckpt.restore(jax.eval_shape(lambda: _init(0, tx)))
  resumed, position, more_losses = _train(train_step, state, meta["data_position"], _STEPS)

  _assert_trees_identical(resumed, reference)
  assert position == ref_position
  np.testing.assert_array_equal(np.stack(losses + more_losses), np.stack(ref_losses))
  assert len(set(np.stack(ref_losses).tolist())) > 1  # the run did train


def test_restores_optax_named_tuples_nnx_state_typed_keys_and_dtypes(tmp_path):
  class Model(nnx.Module):
    def __init__(self, rngs):
      self.lora = nnx.LoRA(4, 2, 3, rngs=rngs)
      self.scale = nnx.Param(jnp.ones(3, jnp.bfloat16))

  def build(seed):
    _, adapters, rest = nnx.split(Model(nnx.Rngs(seed)), nnx.LoRAParam, ...)
    tx = optax.MultiSteps(optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3), 3)
    return {"adapters": adapters, "rest": rest, "opt_state": tx.init(adapters),
            "key": jax.random.split(jax.random.key(seed), 2), "raw_key": jax.random.PRNGKey(seed),
            "step": jnp.array(7, jnp.int32)}

  saved = build(1)
  saved["opt_state"] = saved["opt_state"]._replace(
      acc_grads=jax.tree.map(lambda a: a + 0.25, saved["opt_state"].acc_grads))
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(7, saved, metadata={"config": {"rank": 2}, "data_position": 56})
    for target in (jax.eval_shape(lambda: build(0)), build(0)):  # abstract, or a fresh concrete state
      restored, meta = ckpt.restore(target)
      _assert_trees_identical(restored, saved)
      assert meta == {"config": {"rank": 2}, "data_position": 56}
  assert type(restored["opt_state"]).__name__ == "MultiStepsState"
  assert type(restored["adapters"]["lora"]["lora_a"]) is nnx.LoRAParam
  assert restored["rest"]["scale"].dtype == jnp.bfloat16


def test_restore_places_arrays_with_the_target_shardings(tmp_path):
  if jax.device_count() < 4:
    pytest.skip("needs 4 (fake) devices")
  mesh = jax.make_mesh((4,), ("data",))
  sharded = jax.sharding.NamedSharding(mesh, jax.P("data"))
  replicated = jax.sharding.NamedSharding(mesh, jax.P())
  rng = np.random.default_rng(0)
  state = {"w": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
           "key": jax.random.split(jax.random.key(3), 4)}
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, state)
    target = {"w": jax.ShapeDtypeStruct((8, 3), jnp.float32, sharding=sharded),
              "key": jax.ShapeDtypeStruct((4,), state["key"].dtype, sharding=replicated)}
    restored, _ = ckpt.restore(target)
    assert restored["w"].sharding == sharded
    assert restored["key"].sharding.is_equivalent_to(replicated, 1)
    _assert_trees_identical(restored, state)
    # Saved sharded, restored from a target without shardings: the saved layout comes back.
    ckpt.save(2, restored)
    again, _ = ckpt.restore(jax.eval_shape(lambda: restored))
    assert again["w"].sharding.is_equivalent_to(sharded, 2)
    _assert_trees_identical(again, state)


# ---------------------------------------------------------------------------------------------
# save_every / keep.


def test_save_every_and_keep_last(tmp_path):
  state = {"w": jnp.arange(4.0)}
  with Checkpointer(tmp_path, save_every=3, keep=2) as ckpt:
    written = [s for s in range(1, 11) if ckpt.save(s, {"w": state["w"] + s})]
    assert written == [s for s in range(1, 11) if s % 3 == 0]
    assert ckpt.all_steps() == [6, 9] and ckpt.latest_step() == 9
    assert ckpt.save(10, {"w": state["w"] + 10}, force=True)
    assert not ckpt.save(10, {"w": state["w"]}, force=True)  # never overwritten
    assert not ckpt.save(8, {"w": state["w"]}, force=True)  # older than the latest
    assert ckpt.all_steps() == [9, 10]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["10", "9"]
  with Checkpointer(tmp_path, save_every=3, keep=2) as ckpt:  # a later process sees the same
    assert ckpt.all_steps() == [9, 10]
    for step in (9, 10):
      np.testing.assert_array_equal(ckpt.restore(state, step)[0]["w"], np.arange(4.0) + step)
    with pytest.raises(CheckpointError, match=r"no checkpoint step 6 in .*available: \[9, 10\]"):
      ckpt.restore(state, step=6)


# ---------------------------------------------------------------------------------------------
# A save killed with SIGKILL leaves the previous checkpoint as the latest, restorable one.


def _kill_test_state(seed, n_arrays, size):
  rng = np.random.default_rng(seed)
  params = {f"w{i}": jnp.asarray(rng.normal(size=size), jnp.float32) for i in range(n_arrays)}
  return {"params": params, "key": jax.random.key(seed), "step": jnp.array(seed, jnp.int32)}


_CHILD = """
import pathlib, sys, time
import jax, jax.numpy as jnp, numpy as np
import orbax.checkpoint as ocp
from mgpo_jax.train.checkpoint import Checkpointer
{state_fn}
directory = pathlib.Path(sys.argv[1])
ckpt = Checkpointer(directory / "ckpt")
ckpt.save(1, _kill_test_state(1, 2, (16,)))
(directory / "saved-1").touch()

async def _hang(self):  # the commit (rename of the temporary directory) never happens
  (directory / "written-2").touch()
  time.sleep(600)

ocp.path.atomicity.AtomicRenameTemporaryPath.finalize = _hang
ckpt.save(2, _kill_test_state(2, 8, (1 << 20,)))
"""


def _wait_for(condition, child, what, timeout=120.0):
  deadline = time.monotonic() + timeout
  while not condition():
    if child.poll() is not None:
      pytest.fail(f"child exited with {child.returncode} before {what}")
    if time.monotonic() > deadline:
      child.kill()
      pytest.fail(f"timed out waiting for {what}")
    time.sleep(0.002)


@pytest.mark.parametrize("kill_when", ["writing", "before_commit"])
def test_save_killed_mid_way_leaves_the_previous_checkpoint(tmp_path, kill_when):
  script = tmp_path / "child.py"
  script.write_text(_CHILD.format(state_fn=textwrap.dedent(inspect.getsource(_kill_test_state))))
  directory = tmp_path / "ckpt"
  with open(tmp_path / "child.log", "w") as log:
    child = subprocess.Popen([sys.executable, str(script), str(tmp_path)],
                             stdout=log, stderr=subprocess.STDOUT)
  try:
    _wait_for((tmp_path / "saved-1").exists, child, "the step-1 save")
    if kill_when == "writing":  # as soon as the temporary directory of step 2 appears
      _wait_for(lambda: any(directory.glob("2.*tmp*")), child, "the step-2 temporary dir")
    else:  # every file of step 2 written, the commit pending
      _wait_for((tmp_path / "written-2").exists, child, "the step-2 files")
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=60)
  finally:
    if child.poll() is None:
      child.kill()
  assert child.returncode == -signal.SIGKILL
  assert any(directory.glob("2.*tmp*")) and not (directory / "2").exists()

  expected = _kill_test_state(1, 2, (16,))
  with Checkpointer(directory) as ckpt:
    assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
    restored, _ = ckpt.restore(jax.eval_shape(lambda: _kill_test_state(0, 2, (16,))))
    _assert_trees_identical(restored, expected)
    # The leftover temporary directory does not get in the way of saving step 2 again.
    assert ckpt.save(2, _kill_test_state(2, 2, (16,)))
    _assert_trees_identical(ckpt.restore(expected)[0], _kill_test_state(2, 2, (16,)))


# ---------------------------------------------------------------------------------------------
# Corrupt checkpoints and mismatched targets: one clear line, nothing deleted.


def _largest_file(path: pathlib.Path) -> pathlib.Path:
  return max((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(path.stat().st_size // 2)


def _flip_bytes(path):
  data = bytearray(path.read_bytes())
  for i in range(0, len(data), 5):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))


_CORRUPTIONS = {
    "array file deleted": lambda step: _largest_file(step / "state").unlink(),
    "array file truncated": lambda step: _truncate(_largest_file(step / "state")),
    "array file garbled": lambda step: _flip_bytes(_largest_file(step / "state")),
    "tree metadata deleted": lambda step: (step / "state" / "_METADATA").unlink(),
    "json metadata garbled": lambda step: (step / "metadata" / "metadata").write_text("{oops"),
    "state item deleted": lambda step: [p.unlink() for p in (step / "state").rglob("*")
                                        if p.is_file()],
}


@pytest.mark.parametrize("corruption", list(_CORRUPTIONS))
def test_corrupt_checkpoint_raises_one_clear_line_and_keeps_files(tmp_path, capfd, corruption):
  rng = np.random.default_rng(1)
  good = {"w": jnp.asarray(rng.normal(size=(64, 64)), jnp.float32), "key": jax.random.key(5)}
  bad = {"w": jnp.asarray(rng.normal(size=(64, 64)), jnp.float32), "key": jax.random.key(6)}
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, good, metadata={"data_position": 1})
    ckpt.save(2, bad, metadata={"data_position": 2})
  _CORRUPTIONS[corruption](tmp_path / "2")
  files_before = sorted(tmp_path.rglob("*"))
  capfd.readouterr()

  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 2
    with pytest.raises(CheckpointError) as error:
      ckpt.restore(jax.eval_shape(lambda: good))
    message = str(error.value)
    assert message.startswith(f"checkpoint step 2 in {tmp_path} is corrupt or unreadable: ")
    assert "\n" not in message and len(message) < 500
    assert "Traceback" not in capfd.readouterr().err
    assert sorted(tmp_path.rglob("*")) == files_before  # nothing deleted or rewritten
    restored, meta = ckpt.restore(good, step=1)  # the older checkpoint is intact
    _assert_trees_identical(restored, good)
    assert meta == {"data_position": 1}


@pytest.mark.parametrize("change, expected", [
    (lambda t: {**t, "extra": t["w"]}, r"not in the checkpoint: extra"),
    (lambda t: {"w": t["w"]}, r"only in the checkpoint: key"),
    (lambda t: {**t, "w": jax.ShapeDtypeStruct((3, 5), jnp.float32)},
     r"w is float32\[4, 5\] in the checkpoint, float32\[3, 5\] in the target"),
    (lambda t: {**t, "w": jax.ShapeDtypeStruct((4, 5), jnp.bfloat16)},
     r"w is float32\[4, 5\] in the checkpoint, bfloat16\[4, 5\] in the target"),
    (lambda t: {**t, "key": jax.ShapeDtypeStruct((3,), t["key"].dtype)},
     r"key is uint32\[2\] in the checkpoint, uint32\[3, 2\] in the target"),
])
def test_target_that_does_not_match_raises(tmp_path, change, expected):
  state = {"w": jnp.asarray(np.random.default_rng(2).normal(size=(4, 5)), jnp.float32),
           "key": jax.random.key(1)}
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(3, state)
    with pytest.raises(CheckpointError, match=rf"^checkpoint step 3 in .* does not match the "
                                              rf"restore target: .*{expected}"):
      ckpt.restore(change(jax.eval_shape(lambda: state)))
    _assert_trees_identical(ckpt.restore(state)[0], state)


def test_python_and_numpy_leaves_need_a_target_of_the_same_kind(tmp_path):
  state = {"epoch": 3, "position": np.arange(3, dtype=np.int64), "w": jnp.ones(2)}
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, state)
    restored, _ = ckpt.restore({"epoch": 0, "position": np.zeros(3, np.int64), "w": jnp.zeros(2)})
    assert restored["epoch"] == 3 and isinstance(restored["epoch"], int)
    np.testing.assert_array_equal(restored["position"], state["position"])
    with pytest.raises(CheckpointError, match=r"epoch is int64\[\] in the checkpoint, int32\[\]"):
      ckpt.restore(jax.eval_shape(lambda: state))  # int32 without jax_enable_x64


# ---------------------------------------------------------------------------------------------
# Bad arguments.


def test_bad_arguments(tmp_path):
  for kwargs, name in (({"save_every": 0}, "save_every"), ({"keep": 0}, "keep"),
                       ({"save_every": 2.0}, "save_every")):
    with pytest.raises(ValueError, match=f"^{name} must be a positive integer"):
      Checkpointer(tmp_path, **kwargs)
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(CheckpointError, match=f"^no checkpoint found in {re.escape(str(tmp_path))}$"):
      ckpt.restore({"w": jnp.zeros(2)})
    for step in (-1, 1.5, True):
      with pytest.raises(ValueError, match="^step must be a non-negative integer"):
        ckpt.save(step, {"w": jnp.zeros(2)})
    for metadata in ({"x": object()}, [1, 2]):
      with pytest.raises(ValueError, match="^metadata must be a JSON-serialisable dict"):
        ckpt.save(1, {"w": jnp.zeros(2)}, metadata=metadata)
    assert ckpt.all_steps() == []
    assert ckpt.save(np.int64(4), {"w": jnp.ones(2)}) and ckpt.latest_step() == 4


def test_docstring_examples():
  assert doctest.testmod(mgpo_jax.train.checkpoint, optionflags=doctest.ELLIPSIS).failed == 0
