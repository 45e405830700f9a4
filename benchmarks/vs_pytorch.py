"""Speed against PyTorch + PEFT: the same LoRA train step in mgpo-jax and in PyTorch.

The step: MiniLM (all-MiniLM-L6-v2) sequence classifier with HF's architecture (cls pooler,
a 2-way head), LoRA r = 8, alpha = 16 on query and value, the head trained in full, AdamW
(lr 1e-3, weight decay 0), dropout on (train mode, the checkpoint's rates), float32.

* mgpo-jax: :class:`mgpo_jax.train.Trainer` on :func:`mgpo_jax.finetune.build_model` (its
  jitted step: forward, backward, AdamW update).
* PyTorch: ``transformers.BertForSequenceClassification`` from the same local folder
  (:func:`mgpo_jax.data.minilm_path`) with ``peft.get_peft_model`` (task SEQ_CLS, so the
  classifier is in ``modules_to_save``), ``torch.optim.AdamW`` on the trainable params;
  ``zero_grad``, forward with labels, ``backward``, ``step``.

Both run in ONE process with the same CPU budget: :func:`set_threads` pins the process to
``--threads`` CPUs and sets ``torch.set_num_threads``; each timed block also records the CPU
seconds per wall second it kept busy ("cores busy"), which shows the budget was equal. After
warm-up, interleaved: rounds of ``jax, torch`` each timing a few steps (``--also`` adds
variants of mgpo-jax's step to the same rounds, :data:`DIAGNOSTICS`: A/B tests of our model
code). Reported: the median over rounds of the per-round ratio jax / torch, and tokens (batch
x sequence) per second. On a machine shared with other jobs, ``--threads 1`` avoids PyTorch's
OpenMP threads contending for oversubscribed cores.

    python benchmarks/vs_pytorch.py           # MiniLM at 16x64, 32x64, 32x128
    python benchmarks/vs_pytorch.py --quick   # a tiny random BERT, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import sys
import tempfile
import time
from typing import Any

if __package__ in (None, ""):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks import _common  # noqa: E402


def _gelu_erf(x):
  import jax
  import numpy as np

  return 0.5 * x * (1.0 + jax.lax.erf(x * np.sqrt(0.5).astype(x.dtype)))


# Variants of mgpo-jax's step for --also, each timed in the same rounds as the library's own.
DIAGNOSTICS = {
    "gelu-erf": "exact GELU written 0.5 x (1 + erf(x / sqrt 2)), as HF and PyTorch write it, "
                "instead of jax.nn.gelu's erfc form (the same model)",
    "gelu-tanh": "the tanh approximation of GELU (NOT the same model)",
    "nnx-dropout": "flax's nnx.Dropout (a 32-bit uniform per element) instead of "
                   "mgpo_jax.Dropout (16-bit: the same model, other masks)",
    "no-dropout": "every dropout rate 0 (NOT the same step)",
    "rbg-keys": "keys of JAX's 'rbg' implementation (jax_default_prng_impl='rbg'): the dropout "
                "words from XLA's RngBitGenerator instead of threefry (the same model; other "
                "masks and initial adapters, which depend on the backend)",
}


def _keys(variant: str | None):
  """The PRNG implementation ``variant`` builds, initialises and steps with."""
  import jax

  return jax.default_prng_impl("rbg") if variant == "rbg-keys" else contextlib.nullcontext()


@contextlib.contextmanager
def _patched(variant: str | None):
  """Builds the model of ``variant`` (a :data:`DIAGNOSTICS` key; ``None``: the library's)."""
  import jax
  from flax import nnx

  from mgpo_jax.models import _hf, bert

  saved = _hf._ACTIVATIONS["gelu"], bert.Dropout
  if variant == "gelu-erf":
    _hf._ACTIVATIONS["gelu"] = _gelu_erf
  elif variant == "gelu-tanh":
    _hf._ACTIVATIONS["gelu"] = lambda x: jax.nn.gelu(x, approximate=True)
  elif variant == "nnx-dropout":
    bert.Dropout = nnx.Dropout
  elif variant == "no-dropout":
    bert.Dropout = lambda rate, **kwargs: saved[1](0.0, **kwargs)
  try:
    yield
  finally:
    _hf._ACTIVATIONS["gelu"], bert.Dropout = saved


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--quick", action="store_true", help="tiny random BERT, few steps")
  p.add_argument("--settings", nargs="+", default=["16x64", "32x64", "32x128"],
                 help="batch x sequence length, e.g. 16x64")
  p.add_argument("--rounds", type=int, default=7)
  p.add_argument("--steps-per-round", type=int, default=2)
  p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                 help="threads for both frameworks (default: the CPU count)")
  p.add_argument("--also", nargs="*", default=[], choices=list(DIAGNOSTICS),
                 help="also time these variants of mgpo-jax's step in the same rounds: "
                      + "; ".join(f"{k}: {v}" for k, v in DIAGNOSTICS.items()))
  p.add_argument("--out", type=pathlib.Path, default=_common.RESULTS / "vs_pytorch.json")
  args = p.parse_args(argv)
  if args.quick:
    args.settings, args.rounds, args.steps_per_round = ["4x16"], 3, 2
  args.settings = _common.parse_settings(p, args.settings)
  if args.rounds < 1 or args.steps_per_round < 1 or args.threads < 1:
    p.error("--rounds, --steps-per-round and --threads must be >= 1")
  return args


def set_threads(n: int) -> dict[str, Any]:
  """Gives both frameworks ``n`` CPUs: pins this process (and every thread it starts later)
  to ``n`` of its CPUs, and sets torch's thread count. XLA:CPU runs independent operations
  concurrently whatever its Eigen flag says (1.6 cores busy "with one thread", measured), so
  only the pinning makes the budget equal. Threads started before (JAX imported already, as
  in the tests) stay where they were."""
  jax_ready = "jax" in sys.modules
  cpus = sorted(os.sched_getaffinity(0))[:n] if hasattr(os, "sched_setaffinity") else None
  if cpus is not None:
    os.sched_setaffinity(0, cpus)
  if n == 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_multi_thread_eigen=false").strip()
  import torch

  torch.set_num_threads(n)
  return {"threads": n, "torch_threads": torch.get_num_threads(), "cpus": cpus,
          "pinned_before_jax_started": not jax_ready,
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def _tiny_checkpoint(folder: pathlib.Path) -> str:
  """A random tiny BERT classifier saved in HF's layout, loaded by both frameworks."""
  import torch
  from transformers import BertForSequenceClassification

  torch.manual_seed(0)
  BertForSequenceClassification(_common.tiny_bert_config()).save_pretrained(folder)
  return str(folder)


def _jax_step(model_dir: str, batch_size: int, seq_len: int, batch, variant: str | None = None):
  """The Trainer, state and device batch of the library's step, or of a :data:`DIAGNOSTICS`
  ``variant``."""
  from mgpo_jax import finetune
  from mgpo_jax.finetune.config import FinetuneConfig
  from mgpo_jax.train import Trainer

  config = FinetuneConfig(model=model_dir, optimizer="adamw", rank=8, alpha=16.0,
                          target_modules=("query", "value"), lr=1e-3, weight_decay=0.0,
                          batch_size=batch_size, seq_len=seq_len, steps=1000, pooling="cls")
  with _patched(variant), _keys(variant):
    model, _ = finetune.build_model(config)
    trainer = Trainer(model, finetune.build_optimizer(config))
    state = trainer.init(0)
  batch = trainer.shard_batch(batch)
  return trainer, state, batch


def _torch_step(model_dir: str, batch):
  import torch
  from peft import LoraConfig, get_peft_model
  from transformers import BertForSequenceClassification

  torch.manual_seed(0)
  base = BertForSequenceClassification.from_pretrained(model_dir, num_labels=2,
                                                       dtype=torch.float32)
  model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16,
                                          target_modules=["query", "value"], lora_dropout=0.0))
  model.train()
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                          weight_decay=0.0)
  tensors = {k: torch.from_numpy(v.astype("int64")) for k, v in batch.items()}
  attn = getattr(base.config, "_attn_implementation", None)
  return model, opt, tensors, attn


def _setting(args, model_dir: str, batch_size: int, seq_len: int, vocab: int) -> dict[str, Any]:
  import jax
  import numpy as np

  rng = np.random.default_rng(0)
  batch = {"input_ids": rng.integers(1000 % vocab, vocab, (batch_size, seq_len)).astype(np.int32),
           "attention_mask": np.ones((batch_size, seq_len), np.int32),
           "token_type_ids": np.zeros((batch_size, seq_len), np.int32),
           "labels": rng.integers(0, 2, batch_size).astype(np.int32)}
  contenders = {"jax": _jax_step(model_dir, batch_size, seq_len, batch)}
  for variant in args.also:
    contenders[f"jax[{variant}]"] = _jax_step(model_dir, batch_size, seq_len, batch, variant)
  model, opt, tensors, attn = _torch_step(model_dir, batch)
  states = {name: c[1] for name, c in contenders.items()}

  def run_jax(name, n):
    trainer, _, jbatch = contenders[name]
    state = states[name]
    with _keys(name[4:-1] if name.startswith("jax[") else None):
      for _ in range(n):
        state, m = trainer.train_step(state, jbatch)
      jax.block_until_ready((state, m))
    states[name] = state

  def run_torch(n):
    for _ in range(n):
      opt.zero_grad(set_to_none=True)
      loss = model(**tensors).loss
      loss.backward()
      opt.step()
    return loss.item()

  compile_s = {}
  for name in contenders:
    t0 = time.perf_counter()
    run_jax(name, 2)  # compile + warm-up
    compile_s[name] = time.perf_counter() - t0
  run_torch(2)
  times: dict[str, list[float]] = {name: [] for name in [*contenders, "torch"]}
  busy: dict[str, list[float]] = {name: [] for name in times}  # CPU seconds per wall second
  for _ in range(args.rounds):
    for name in times:
      c0, t0 = _common.cpu_seconds(), time.perf_counter()
      run_torch(args.steps_per_round) if name == "torch" else run_jax(name, args.steps_per_round)
      wall = time.perf_counter() - t0
      times[name].append(wall / args.steps_per_round)
      busy[name].append((_common.cpu_seconds() - c0) / wall)
  t = np.asarray(times["torch"])
  tokens = batch_size * seq_len
  out = {"batch_size": batch_size, "seq_len": seq_len, "torch_step_s": t.tolist(),
         "torch_cores_busy": float(np.median(busy["torch"])),
         "torch_tokens_per_s": float(tokens / np.median(t)), "torch_attn_implementation": attn,
         "trainable_params_torch": int(sum(p.numel() for p in model.parameters()
                                           if p.requires_grad)), "jax": {}}
  for name in contenders:
    j = np.asarray(times[name])
    ratios = j / t
    out["jax"][name] = {"step_s": j.tolist(), "ratio_median": float(np.median(ratios)),
                        "ratio_min": float(ratios.min()), "ratio_max": float(ratios.max()),
                        "tokens_per_s": float(tokens / np.median(j)),
                        "cores_busy": float(np.median(busy[name])),
                        "compile_and_warmup_s": compile_s[name]}
  out.update({k: out["jax"]["jax"][k] for k in ("ratio_median", "ratio_min", "ratio_max")},
             jax_step_s=out["jax"]["jax"]["step_s"],
             jax_tokens_per_s=out["jax"]["jax"]["tokens_per_s"])
  return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Measures every setting; writes ``--out`` (JSON) and returns the results dict."""
  args = parse_args(argv)
  threads = set_threads(args.threads)
  import numpy as np

  info = _common.machine_info("vs_pytorch.py", argv)
  _common.print_machine(info)
  print(f"threads: torch {threads['torch_threads']}; process pinned to CPUs {threads['cpus']}")
  results: dict[str, Any] = {
      "machine": info, "threads": threads, "rounds": args.rounds,
      "steps_per_round": args.steps_per_round,
      "model": "tiny random BERT" if args.quick else "all-MiniLM-L6-v2",
      "step": "LoRA r=8 alpha=16 on query/value, head trained, AdamW lr 1e-3 wd 0, dropout "
              "on (train mode), float32, random tokens", "settings": []}
  with tempfile.TemporaryDirectory() as tmp:
    if args.quick:
      model_dir, vocab = _tiny_checkpoint(pathlib.Path(tmp) / "tiny"), 128
    else:
      from mgpo_jax.data import minilm_path

      model_dir, vocab = minilm_path(), 30522
    print(f"{'batch x seq':>12s} {'step':16s} {'ms':>8s} {'/ torch':>8s} {'range':>13s} "
          f"{'tokens/s':>9s} {'cores busy':>10s}")
    for batch_size, seq_len in args.settings:
      r = _setting(args, model_dir, batch_size, seq_len, vocab)
      results["settings"].append(r)
      for name, j in r["jax"].items():
        print(f"{batch_size:>5d} x {seq_len:<5d} {name:16s} {1e3 * np.median(j['step_s']):>8.1f} "
              f"{j['ratio_median']:>8.3f} {j['ratio_min']:>6.2f}-{j['ratio_max']:<6.2f} "
              f"{j['tokens_per_s']:>9.0f} {j['cores_busy']:>10.2f}")
      print(f"{batch_size:>5d} x {seq_len:<5d} {'torch + peft':16s} "
            f"{1e3 * np.median(r['torch_step_s']):>8.1f} {1.0:>8.3f} {'':13s} "
            f"{r['torch_tokens_per_s']:>9.0f} {r['torch_cores_busy']:>10.2f}", flush=True)
  _common.write_json(args.out, results)
  print(f"wrote {args.out}")
  return results


if __name__ == "__main__":
  main()
