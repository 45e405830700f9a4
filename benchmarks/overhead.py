"""Cost: per-step time, optimizer-state bytes and XLA buffer sizes of the MiniLM LoRA train step
(r=8, alpha=16 on query/value, classifier head trained) with every registered method: AdamW,
LoRA-MGPO (paper form and released code), SAM, Flat-LoRA, LoRA-GGPO and LoRA-One's
preconditioned AdamW, and the one-off cost of LoRA-One's init.

All train steps are compiled first; then rounds of ``adamw, mgpo, sam, ..., adamw, mgpo, ...``
each time a few steps (``jax.block_until_ready``) in ONE process, so slow drifts of the machine
hit every method alike. The ratio against AdamW is the median over rounds of the per-round
ratio. Memory: the bytes of the optimizer-state leaves (with a weight perturbation's state, as
"opt-state B"), and the compiled step's
``memory_analysis()`` (argument, output and temporary buffers that XLA allocates for one step).

    .venv/bin/python benchmarks/overhead.py           # MiniLM, 16x64 and 32x128 (CPU: ~6 min)
    .venv/bin/python benchmarks/overhead.py --quick   # tiny random BERT, seconds
    .venv/bin/python benchmarks/overhead.py --llama-memory  # XLA temp bytes only (see below)

``--lora-one-solvers`` times, interleaved in one process on the MiniLM step (batch 16 x 64),
AdamW, LoRA-One's preconditioned AdamW as shipped, and the same with the r x r systems solved
one by one with ``jnp.linalg.solve`` (LAPACK on CPU; the implementation before 2026-11-25):
the evidence for the solver choice in ``docs/lora_one.md``.

``--llama-memory`` compiles (does not run) the train step of a 1-layer random Llama (hidden
1024, intermediate 2048, vocab 128) with LoRA r=8 on all its linear layers, batch 2 x 64, for
every method, and prints XLA's argument and temp bytes next to the largest adapted kernel.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from typing import Any

if __package__ in (None, ""):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks import _common  # noqa: E402

from mgpo_jax.methods import METHODS  # noqa: E402

OPTIMIZERS = tuple(METHODS)  # every registered method, side by side


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--quick", action="store_true", help="tiny random BERT, few steps")
  p.add_argument("--settings", nargs="+", default=["16x64", "32x128"],
                 help="batch x sequence length, e.g. 16x64")
  p.add_argument("--rounds", type=int, default=6)
  p.add_argument("--steps-per-round", type=int, default=2)
  p.add_argument("--out", type=pathlib.Path, default=_common.RESULTS / "overhead.json")
  p.add_argument("--llama-memory", action="store_true",
                 help="only the compiled step's memory on a random hidden-1024 Llama")
  p.add_argument("--lora-one-solvers", action="store_true",
                 help="only AdamW vs LoRA-One's step with its solver as shipped and with "
                      "per-system LAPACK solves")
  args = p.parse_args(argv)
  if args.quick:
    args.settings, args.rounds, args.steps_per_round = ["4x16"], 3, 2
  args.settings = _common.parse_settings(p, args.settings)
  if args.rounds < 1:
    p.error("--rounds must be >= 1")
  return args


def _compile(trainer, state, batch):
  """The trainer's jitted step compiled ahead of time, and its buffer sizes as XLA reports them
  (``None`` if it does not). ``Trainer`` has no public ``lower``; its jitted step is used."""
  compiled = trainer.lower(state, batch).compile()
  analysis = compiled.memory_analysis()
  if analysis is None:
    return compiled, None
  keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
          "alias_size_in_bytes", "generated_code_size_in_bytes")
  return compiled, {k.removesuffix("_size_in_bytes"): int(getattr(analysis, k)) for k in keys
                    if hasattr(analysis, k)}


def _model_and_batch(args, batch_size: int, seq_len: int):
  """The timed model (MiniLM, or the tiny BERT with ``--quick``) with LoRA r=8 on query/value,
  its config, and a random token batch (timing does not depend on the text)."""
  import numpy as np

  from mgpo_jax import finetune
  from mgpo_jax.finetune.config import FinetuneConfig

  config = FinetuneConfig(rank=8, alpha=16.0, batch_size=batch_size, seq_len=seq_len)
  build = _common.build_tiny_model if args.quick else finetune.build_model
  model, _ = build(config)
  vocab = _common.tiny_bert_config().vocab_size if args.quick else 30522
  rng = np.random.default_rng(0)
  batch = {"input_ids": rng.integers(1, vocab, (batch_size, seq_len), dtype=np.int32),
           "attention_mask": np.ones((batch_size, seq_len), np.int32),
           "token_type_ids": np.zeros((batch_size, seq_len), np.int32),
           "labels": rng.integers(0, 2, batch_size, dtype=np.int32)}
  return config, model, batch


def _setting(args, batch_size: int, seq_len: int) -> dict[str, Any]:
  import jax
  import numpy as np
  from flax import nnx

  from mgpo_jax import finetune
  from mgpo_jax.lora import lora_modules
  from mgpo_jax.train import Trainer

  config, model, batch = _model_and_batch(args, batch_size, seq_len)
  trainers, states, out = {}, {}, {}
  for name in OPTIMIZERS:
    method = config.replace(optimizer=name)
    trainer = Trainer(model, finetune.build_optimizer(method),
                      perturbation=finetune.build_perturbation(method))
    batch_dev = trainer.shard_batch(batch)
    state = trainer.init(0)
    t0 = time.perf_counter()
    step, memory = _compile(trainer, state, batch_dev)
    compile_s = time.perf_counter() - t0
    state, m = step(state, trainer.rest, batch_dev)  # warm-up
    jax.block_until_ready((state, m))
    opt_state = (state.opt_state, state.perturbation_state)
    out[name] = {"compile_s": compile_s, "opt_state_bytes": _common.tree_nbytes(opt_state),
                 "opt_state_leaves": len(jax.tree.leaves(opt_state)),
                 "xla_memory": memory}
    trainers[name], states[name] = (step, trainer.rest, batch_dev), state
  times: dict[str, list[float]] = {name: [] for name in OPTIMIZERS}
  for _ in range(args.rounds):
    for name in OPTIMIZERS:
      step, rest, batch_dev = trainers[name]
      state = states[name]
      t0 = time.perf_counter()
      for _ in range(args.steps_per_round):
        state, m = step(state, rest, batch_dev)
      jax.block_until_ready((state, m))
      times[name].append((time.perf_counter() - t0) / args.steps_per_round)
      states[name] = state
  base = np.asarray(times["adamw"])
  for name in OPTIMIZERS:
    t = np.asarray(times[name])
    out[name].update({"step_s_median": float(np.median(t)), "step_s_all": t.tolist(),
                      "time_ratio_vs_adamw": float(np.median(t / base)),
                      "opt_state_extra_bytes_vs_adamw":
                          out[name]["opt_state_bytes"] - out["adamw"]["opt_state_bytes"]})
  params = states["adamw"].params
  return {"batch_size": batch_size, "seq_len": seq_len,
          "lora_one_init": _lora_one_init_cost(args, config, batch, out["adamw"]["step_s_median"]),
          "trainable_params": int(sum(np.size(x) for x in jax.tree.leaves(params))),
          "trainable_bytes": _common.tree_nbytes(params),
          "lora_modules": len(lora_modules(model)), "methods": out,
          "model_params": int(sum(np.size(x) for x in jax.tree.leaves(nnx.state(model))))}


def _lora_one_init_cost(args, config, batch, step_s: float) -> dict[str, Any]:
  """The one-off cost of LoRA-One's spectral init: ``build_model`` with the lora-one init
  (gradients of the target kernels on 8 examples of ``batch``, one SVD per module) minus
  ``build_model`` with the default init, in seconds (compilation included: it runs once) and
  as a multiple of one AdamW train step; the device's peak memory where JAX reports it (GPU),
  before and after."""
  import jax
  from flax import nnx

  from mgpo_jax import finetune

  build = _common.build_tiny_model if args.quick else finetune.build_model
  base = (lambda c: _common.tiny_base_model(c)) if args.quick else (lambda c: None)
  stats = lambda: (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")  # noqa: E731
  t0 = time.perf_counter()
  build(config.replace(optimizer="adamw"))
  plain_s = time.perf_counter() - t0
  peak_before = stats()
  lora_one = config.replace(optimizer="lora-one")
  t0 = time.perf_counter()
  model, _ = finetune.build_model(lora_one, base(lora_one), data={"train": batch})
  jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
  init_s = time.perf_counter() - t0 - plain_s
  return {"examples": lora_one.init_examples, "seconds": init_s,
          "train_steps_equivalent": init_s / step_s,
          "peak_bytes_before": peak_before, "peak_bytes_after": stats()}


def llama_memory() -> dict[str, Any]:
  """XLA memory of the train step of a random 1-layer Llama (hidden 1024) with adapters on all
  linear layers, per method (compiled, not run)."""
  import jax.numpy as jnp
  import optax
  from flax import nnx
  from transformers import LlamaConfig

  from mgpo_jax import finetune
  from mgpo_jax.finetune.config import FinetuneConfig
  from mgpo_jax.lora import LoraConfig, apply_lora, lora_modules
  from mgpo_jax.models import LlamaForCausalLM
  from mgpo_jax.train import Trainer

  def lm_loss(model, batch):
    logits = model(batch["input_ids"]).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1],
                                                         batch["input_ids"][:, 1:])
    return jnp.mean(ce), {"loss_sum": jnp.sum(ce), "count": jnp.asarray(ce.size, jnp.float32)}

  llama = LlamaConfig(hidden_size=1024, intermediate_size=2048, num_hidden_layers=1,
                      num_attention_heads=8, num_key_value_heads=8, vocab_size=128)
  model = LlamaForCausalLM(llama, rngs=nnx.Rngs(0))
  apply_lora(model, LoraConfig(target_modules="all-linear", r=8, alpha=16.0), rngs=nnx.Rngs(1))
  batch = {"input_ids": jnp.ones((2, 64), jnp.int32)}
  largest = max(m.kernel[...].nbytes for m in lora_modules(model).values())
  out = {"largest_kernel_bytes": largest, "methods": {}}
  print(f"largest adapted kernel: {largest} B")
  print(f"{'method':9s} {'XLA temp B':>12s} {'vs adamw':>10s} {'XLA arg B':>12s}")
  for name in OPTIMIZERS:
    config = FinetuneConfig(optimizer=name, steps=100)
    trainer = Trainer(model, finetune.build_optimizer(config), lm_loss,
                      perturbation=finetune.build_perturbation(config))
    _, memory = _compile(trainer, trainer.init(0), batch)
    out["methods"][name] = memory
    extra = memory["temp"] - out["methods"][OPTIMIZERS[0]]["temp"]
    print(f"{name:9s} {memory['temp']:>12d} {extra:>+10d} {memory['argument']:>12d}")
  return out


def _lapack_precondition(damping: float = 1e-6):
  """LoRA-One's preconditioner as first written: each r x r system solved on its own by
  ``jnp.linalg.solve`` (on CPU, LAPACK ``getrf`` + ``trsm`` calls)."""
  import jax
  import jax.numpy as jnp
  import optax

  from mgpo_jax.optim import lora_pairs

  def update(updates, state, params=None, **extra_args):
    del extra_args
    treedef, p = jax.tree.structure(params), jax.tree.leaves(params)
    g = list(treedef.flatten_up_to(updates))
    for ia, ib in lora_pairs(params):
      a, b = p[ia], p[ib]
      eye = damping * jnp.eye(a.shape[-1], dtype=a.dtype)
      g[ia] = jnp.linalg.solve(b @ b.T + eye, g[ia].T).T
      g[ib] = jnp.linalg.solve(a.T @ a + eye, g[ib])
    return treedef.unflatten(g), state

  return optax.GradientTransformationExtraArgs(lambda _: optax.EmptyState(), update)


def lora_one_solvers(args) -> dict[str, Any]:
  """AdamW, LoRA-One as shipped and LoRA-One with per-system LAPACK solves, interleaved."""
  import jax
  import numpy as np
  import optax

  from mgpo_jax.optim import precondition_lora
  from mgpo_jax.train import Trainer

  batch_size, seq_len = args.settings[0]
  _, model, batch = _model_and_batch(args, batch_size, seq_len)
  txs = {"adamw": optax.adamw(1e-4),
         "lora-one (shipped)": optax.chain(precondition_lora(), optax.adamw(1e-4)),
         "lora-one (per-system LAPACK)": optax.chain(_lapack_precondition(), optax.adamw(1e-4))}
  runs = {}
  for name, tx in txs.items():
    trainer = Trainer(model, tx)
    batch_dev = trainer.shard_batch(batch)
    step, _ = _compile(trainer, trainer.init(0), batch_dev)
    state, m = step(trainer.init(0), trainer.rest, batch_dev)  # warm-up
    jax.block_until_ready((state, m))
    runs[name] = {"step": step, "rest": trainer.rest, "batch": batch_dev, "state": state,
                  "custom_calls": step.as_text().count("custom-call("), "times": []}
  for _ in range(args.rounds):
    for run in runs.values():
      state = run["state"]
      t0 = time.perf_counter()
      for _ in range(args.steps_per_round):
        state, m = run["step"](state, run["rest"], run["batch"])
      jax.block_until_ready((state, m))
      run["times"].append((time.perf_counter() - t0) / args.steps_per_round)
      run["state"] = state
  base = np.asarray(runs["adamw"]["times"])
  out = {}
  print(f"batch {batch_size} x seq {seq_len}, {args.rounds} rounds x {args.steps_per_round} "
        f"steps\n{'step':30s} {'median ms':>10s} {'vs adamw':>9s} {'range':>12s} "
        f"{'custom calls':>13s}")
  for name, run in runs.items():
    t = np.asarray(run["times"])
    ratios = t / base
    out[name] = {"step_s_all": t.tolist(), "time_ratio_vs_adamw": float(np.median(ratios)),
                 "ratio_range": [float(ratios.min()), float(ratios.max())],
                 "custom_calls": run["custom_calls"]}
    print(f"{name:30s} {1e3 * np.median(t):>10.1f} {np.median(ratios):>9.3f} "
          f"{ratios.min():>5.2f}-{ratios.max():.2f} {run['custom_calls']:>13d}")
  return {"batch_size": batch_size, "seq_len": seq_len, "rounds": args.rounds,
          "steps_per_round": args.steps_per_round, "steps": out}


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Measures every setting; writes ``--out`` (JSON) and returns the results dict."""
  args = parse_args(argv)
  if args.llama_memory:
    return llama_memory()
  info = _common.machine_info("overhead.py", argv)
  _common.print_machine(info)
  if args.lora_one_solvers:
    results = {"machine": info, **lora_one_solvers(args)}
    _common.write_json(args.out, results)
    print(f"wrote {args.out}")
    return results
  results = {"machine": info, "model": "tiny random BERT" if args.quick else "all-MiniLM-L6-v2",
             "rounds": args.rounds, "steps_per_round": args.steps_per_round, "settings": []}
  for batch_size, seq_len in args.settings:
    r = _setting(args, batch_size, seq_len)
    results["settings"].append(r)
    print(f"\nbatch {batch_size} x seq {seq_len}: {r['trainable_params']} trainable params in "
          f"{r['lora_modules']} LoRA modules (+ head); {args.rounds} rounds x "
          f"{args.steps_per_round} steps")
    print(f"{'method':9s} {'step ms':>9s} {'vs adamw':>9s} {'opt-state B':>12s} {'extra B':>9s} "
          f"{'XLA temp B':>12s} {'XLA arg B':>12s}")
    for name, m in r["methods"].items():
      mem = m["xla_memory"] or {}
      print(f"{name:9s} {1e3 * m['step_s_median']:>9.1f} {m['time_ratio_vs_adamw']:>9.3f} "
            f"{m['opt_state_bytes']:>12d} {m['opt_state_extra_bytes_vs_adamw']:>9d} "
            f"{mem.get('temp', -1):>12d} {mem.get('argument', -1):>12d}")
    init = r["lora_one_init"]
    print(f"lora-one init ({init['examples']} examples, compilation included): "
          f"{init['seconds']:.2f} s = {init['train_steps_equivalent']:.1f} AdamW steps; "
          f"device peak bytes {init['peak_bytes_before']} -> {init['peak_bytes_after']}")
  _common.write_json(args.out, results)
  print(f"wrote {args.out}")
  return results


if __name__ == "__main__":
  main()
