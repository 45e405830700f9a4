"""Scale-out: the frozen base of a Llama sharded over 8 devices (FSDP) against the replicated
layout, at about 1B parameters in bfloat16; and what rematerialisation saves.

Part 1, bytes (~1B). A random Llama of 1.04B frozen parameters (Llama-3.2-1B's widths, 16
layers, a 32k vocabulary), built abstractly (shapes only), with LoRA r = 8 on q_proj and
v_proj. For ``fsdp = 1, 2, 4, 8`` and ``data = 8 / fsdp`` (``fsdp = 1`` is the replicated
layout, plain data parallelism), the frozen-weight bytes each device would hold under the
shardings ``Trainer`` gives them (``sharding.param_shardings``, the function the Trainer
calls); the test checks this count against the bytes actually placed, at a small size.

Part 2, step time. The same train step (MGPO around AdamW, ``compute_dtype=bfloat16``,
adapters and optimizer state in float32) on a smaller random Llama (0.2B, hidden 1024, 12
layers), in every layout, run for real: the measured per-device frozen bytes, XLA's argument
and temp bytes of the compiled step (per device), and the step time as the median over rounds
of the per-round ratio to the replicated step. Rounds interleave the layouts in one process (a
layout's frozen weights are placed before its turn and freed after it; placement is not
timed; each round starts with another layout). Why not 1B here: on 8 fake CPU devices every replica lives in host RAM, and XLA:CPU's
replicated 1B step needs 2.1 GB of weights plus 4.2 GB of temp per device (it computes bf16
matmuls in float32), about 50 GB in all on a 24 GB machine.

Part 3, remat. A small random Llama on one device: XLA temp bytes of the train step with and
without ``remat=True``, and the step-time ratio, interleaved.

    .venv/bin/python benchmarks/scale.py           # 2-core CPU: ~6 min, ~12 GB of RAM
    .venv/bin/python benchmarks/scale.py --quick   # tiny Llamas, seconds (the test)

On fake CPU devices the 8 "devices" share the host's cores, so the step-time ratios measure
the partitioned program's extra work (collectives, copies, smaller matmuls), not a speed-up.
"""

from __future__ import annotations

import os

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):  # before JAX is imported
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=8".strip()

import argparse  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

if __package__ in (None, ""):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks import _common  # noqa: E402

DEVICES = 8
# About 1B parameters: Llama-3.2-1B's widths with a 32k vocabulary (Llama 2's) and 16 layers.
BYTES_FULL = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=8, vocab_size=32000)
STEP_FULL = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=12,
                 num_attention_heads=16, num_key_value_heads=4, vocab_size=32000)
QUICK = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
REMAT_FULL = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=8, vocab_size=1024)
REMAT_QUICK = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=4, vocab_size=128)
TARGETS = ("q_proj", "v_proj")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--quick", action="store_true", help="tiny Llama, few steps")
  p.add_argument("--fsdp", type=int, nargs="+", default=[1, 2, 4, 8],
                 help="fsdp sizes (data = 8 / fsdp); 1 is the replicated layout")
  p.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
  p.add_argument("--seq", type=int, default=32)
  p.add_argument("--rounds", type=int, default=4, help="each layout leads one round of 4")
  p.add_argument("--steps-per-round", type=int, default=1)
  p.add_argument("--remat-batch", type=int, default=8)
  p.add_argument("--remat-seq", type=int, default=256)
  p.add_argument("--out", type=pathlib.Path, default=_common.RESULTS / "scale.json")
  args = p.parse_args(argv)
  if args.quick:
    args.seq, args.rounds, args.remat_seq = 16, 2, 32
  if 1 not in args.fsdp or any(f < 1 or DEVICES % f for f in args.fsdp):
    p.error(f"--fsdp takes divisors of {DEVICES} and must include 1 (the replicated layout)")
  if args.batch % DEVICES or args.rounds < 1 or args.steps_per_round < 1:
    p.error(f"--batch must be a multiple of {DEVICES}; --rounds, --steps-per-round >= 1")
  return args


def _model(sizes: dict[str, int], param_dtype):
  from flax import nnx
  from transformers import LlamaConfig

  from mgpo_jax.lora import LoraConfig, apply_lora
  from mgpo_jax.models import LlamaForCausalLM

  config = LlamaConfig(**sizes, max_position_embeddings=4096, tie_word_embeddings=True)
  model = LlamaForCausalLM(config, rngs=nnx.Rngs(0), param_dtype=param_dtype)
  apply_lora(model, LoraConfig(target_modules=TARGETS, r=8, alpha=16.0), rngs=nnx.Rngs(1))
  return model


def _xla_memory(compiled) -> dict[str, int] | None:
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  return {k: int(getattr(analysis, f"{k}_size_in_bytes"))
          for k in ("argument", "output", "temp") if hasattr(analysis, f"{k}_size_in_bytes")}


def _time(step, state, rest, batch, steps: int) -> tuple[Any, float]:
  import jax

  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, rest, batch)
  jax.block_until_ready((state, metrics))
  return state, (time.perf_counter() - t0) / steps


def _floats(tree) -> list:
  import jax
  import jax.numpy as jnp

  return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]


def sharded_bytes(model, mesh) -> dict[Any, int]:
  """Bytes of ``model``'s frozen floating-point weights each device of ``mesh`` holds under the
  shardings :class:`~mgpo_jax.train.Trainer` gives them; ``model`` may be abstract."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from mgpo_jax.train import sharding as sh

  _, params, rest = nnx.split(model, nnx.LoRAParam, ...)
  rest_sh, _ = sh.param_shardings(rest, nnx.to_pure_dict(params), mesh)
  out: dict[Any, int] = {}
  for leaf, where in zip(jax.tree.leaves(rest), jax.tree.leaves(rest_sh)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      nbytes = int(np.prod(where.shard_shape(leaf.shape))) * leaf.dtype.itemsize
      for device in where.device_set:
        out[device] = out.get(device, 0) + nbytes
  return out


def layout_bytes(args) -> dict[str, Any]:
  """Part 1: per-device frozen bytes of each layout at ~1B parameters (abstract model)."""
  import jax.numpy as jnp
  from flax import nnx

  from mgpo_jax.train import make_mesh

  sizes = QUICK if args.quick else BYTES_FULL
  model = nnx.eval_shape(lambda: _model(sizes, jnp.bfloat16))
  n_params = sum(x.size for x in _floats(_frozen(model)))
  out = {"model": sizes, "frozen_params": int(n_params), "layouts": {}}
  for f in args.fsdp:
    axes = f"data={DEVICES // f},fsdp={f}"
    per_device = sharded_bytes(model, make_mesh(axes=axes))
    out["layouts"][str(f)] = {"axes": axes, "frozen_bytes_per_device": max(per_device.values())}
  base = out["layouts"]["1"]["frozen_bytes_per_device"]
  for lay in out["layouts"].values():
    lay["vs_replicated"] = lay["frozen_bytes_per_device"] / base
  return out


def layout_steps(args) -> dict[str, Any]:
  """Part 2: measured bytes, XLA memory and step-time ratios of the layouts."""
  import jax
  import jax.numpy as jnp

  from mgpo_jax import mgpo_adamw
  from mgpo_jax.train import Trainer, causal_lm_loss, make_mesh
  from mgpo_jax.train import sharding as sh

  sizes = QUICK if args.quick else STEP_FULL
  t0 = time.perf_counter()
  model = _model(sizes, jnp.bfloat16)
  n_params = sum(x.size for x in _floats(_frozen(model)))
  print(f"random Llama {sizes}: {n_params:,} frozen parameters in bfloat16 "
        f"({time.perf_counter() - t0:.0f} s to build)", flush=True)
  rng = np.random.default_rng(0)
  host_batch = {"input_ids": rng.integers(0, sizes["vocab_size"], (args.batch, args.seq),
                                          dtype=np.int32)}
  layouts: dict[int, dict[str, Any]] = {}
  for f in args.fsdp:
    axes = f"data={DEVICES // f},fsdp={f}"
    t0 = time.perf_counter()
    trainer = Trainer(model, mgpo_adamw(1e-4), causal_lm_loss, mesh=make_mesh(axes=axes),
                      compute_dtype=jnp.bfloat16)
    per_device = sh.per_device_bytes(_floats(trainer.rest))
    computed = sharded_bytes(model, trainer.mesh)
    batch = trainer.shard_batch(host_batch)
    state = trainer.init(0)
    compiled = trainer.lower(state, batch).compile()
    rest_sh = jax.tree.map(lambda x: x.sharding, trainer.rest)
    # Warm-up step on this layout, then its frozen weights leave until its turn comes.
    state, _ = _time(compiled, state, trainer.rest, batch, 1)
    if f == max(args.fsdp):  # the most sharded copy is the source every round places from
      source = trainer.rest
    del trainer
    layouts[f] = {"axes": axes, "compiled": compiled, "rest_sh": rest_sh, "state": state,
                  "batch": batch, "times": [],
                  "frozen_bytes_per_device": sorted(set(per_device.values())),
                  "computed_equals_placed": computed == per_device,
                  "xla_memory": _xla_memory(compiled)}
    print(f"{axes}: compiled and warmed up in {time.perf_counter() - t0:.0f} s; frozen bytes "
          f"per device {layouts[f]['frozen_bytes_per_device']}", flush=True)
  del model  # only the most sharded copy stays resident between turns
  order = list(layouts)
  for r in range(args.rounds):
    for f in order[r % len(order):] + order[:r % len(order)]:  # each layout leads a round
      lay = layouts[f]
      rest = jax.device_put(source, lay["rest_sh"])
      jax.block_until_ready(rest)
      lay["state"], t = _time(lay["compiled"], lay["state"], rest, lay["batch"],
                              args.steps_per_round)
      lay["times"].append(t)
      del rest
    print(f"round {r + 1}/{args.rounds} (led by fsdp={order[r % len(order)]}): "
          + ", ".join(f"fsdp={f} {lay['times'][-1]:.2f} s" for f, lay in layouts.items()),
          flush=True)
  base = layouts[1]
  out = {"model": sizes, "frozen_params": int(n_params), "lora_targets": list(TARGETS),
         "batch": args.batch, "seq": args.seq, "rounds": args.rounds,
         "steps_per_round": args.steps_per_round, "layouts": {}}
  for f, lay in layouts.items():
    ratios = np.asarray(lay["times"]) / np.asarray(base["times"])
    del lay["compiled"], lay["state"], lay["batch"], lay["rest_sh"]
    bytes_dev = max(lay["frozen_bytes_per_device"])
    out["layouts"][str(f)] = {
        "axes": lay["axes"], "frozen_bytes_per_device": lay["frozen_bytes_per_device"],
        "frozen_bytes_vs_replicated": bytes_dev / max(base["frozen_bytes_per_device"]),
        "computed_equals_placed": lay["computed_equals_placed"],
        "xla_memory": lay["xla_memory"], "step_s": lay["times"],
        "step_time_vs_replicated": float(np.median(ratios)),
        "ratio_range": [float(ratios.min()), float(ratios.max())]}
  return out


def _frozen(model):
  """The frozen (non-LoRA) leaves of ``model``'s state, as the Trainer splits them."""
  from flax import nnx

  _, _, rest = nnx.split(model, nnx.LoRAParam, ...)
  return rest


def remat(args) -> dict[str, Any]:
  """Part 3: XLA temp bytes and step time with and without remat, one device."""
  import jax

  from mgpo_jax import mgpo_adamw
  from mgpo_jax.train import Trainer, causal_lm_loss

  sizes = REMAT_QUICK if args.quick else REMAT_FULL
  model = _model(sizes, jax.numpy.float32)
  rng = np.random.default_rng(1)
  batch = {"input_ids": jax.numpy.asarray(rng.integers(
      0, sizes["vocab_size"], (args.remat_batch, args.remat_seq), dtype=np.int32))}
  runs = {}
  for name, flag in (("plain", False), ("remat", True)):
    trainer = Trainer(model, mgpo_adamw(1e-4), causal_lm_loss, remat=flag)
    state = trainer.init(0)
    compiled = trainer.lower(state, batch).compile()
    state, _ = _time(compiled, state, trainer.rest, batch, 1)
    runs[name] = {"compiled": compiled, "state": state, "rest": trainer.rest, "times": [],
                  "xla_memory": _xla_memory(compiled)}
  for _ in range(args.rounds + 2):
    for run in runs.values():
      run["state"], t = _time(run["compiled"], run["state"], run["rest"], batch, 1)
      run["times"].append(t)
  ratios = np.asarray(runs["remat"]["times"]) / np.asarray(runs["plain"]["times"])
  temp = {k: (v["xla_memory"] or {}).get("temp") for k, v in runs.items()}
  return {"model": sizes, "batch": args.remat_batch, "seq": args.remat_seq,
          "temp_bytes": temp,
          "temp_ratio": temp["remat"] / temp["plain"] if temp["plain"] else None,
          "step_time_ratio": float(np.median(ratios)),
          "ratio_range": [float(ratios.min()), float(ratios.max())]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  import jax

  if jax.device_count() < DEVICES:
    raise SystemExit(f"scale.py needs {DEVICES} devices; JAX sees {jax.device_count()} (run it "
                     f"as a script: it sets {_FLAG}={DEVICES} before importing JAX)")
  info = _common.machine_info("scale.py", argv)
  _common.print_machine(info)
  results = {"machine": info, "bytes": layout_bytes(args)}
  by = results["bytes"]
  print(f"\nPart 1: frozen bytes per device, {by['frozen_params']:,} bf16 frozen parameters")
  print(f"{'layout':16s} {'frozen B/device':>16s} {'vs replicated':>14s}")
  for lay in by["layouts"].values():
    print(f"{lay['axes']:16s} {lay['frozen_bytes_per_device']:>16,d} "
          f"{lay['vs_replicated']:>14.3f}", flush=True)
  results["steps"] = layout_steps(args)
  st = results["steps"]
  print(f"\nPart 2: {st['frozen_params']:,} bf16 frozen parameters, batch {args.batch} x "
        f"{args.seq}, {args.rounds} rounds x {args.steps_per_round} step(s)")
  print(f"{'layout':16s} {'frozen B/device':>16s} {'vs repl.':>9s} {'XLA arg B':>14s} "
        f"{'XLA temp B':>14s} {'step vs repl.':>14s} {'range':>12s}")
  for lay in st["layouts"].values():
    mem = lay["xla_memory"] or {}
    print(f"{lay['axes']:16s} {max(lay['frozen_bytes_per_device']):>16,d} "
          f"{lay['frozen_bytes_vs_replicated']:>9.3f} {mem.get('argument', -1):>14,d} "
          f"{mem.get('temp', -1):>14,d} {lay['step_time_vs_replicated']:>14.3f} "
          f"{lay['ratio_range'][0]:>5.2f}-{lay['ratio_range'][1]:.2f}")
  results["remat"] = remat(args)
  rm = results["remat"]
  print(f"\nPart 3, remat ({rm['model']['num_hidden_layers']} layers, hidden "
        f"{rm['model']['hidden_size']}, batch {rm['batch']} x {rm['seq']}): XLA temp bytes "
        f"{rm['temp_bytes']['plain']:,} -> {rm['temp_bytes']['remat']:,} "
        f"({rm['temp_ratio']:.3f}x); step time {rm['step_time_ratio']:.3f}x")
  _common.write_json(args.out, results)
  print(f"wrote {args.out}")
  return results


if __name__ == "__main__":
  main()
