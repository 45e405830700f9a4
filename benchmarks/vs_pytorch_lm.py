"""Causal-LM speed against PyTorch + PEFT: a random Llama's LoRA train step in both.

The step: a random Llama (hidden 512, 8 layers, 8 heads, 4 KV heads, intermediate 1376,
vocab 8192, float32) saved once in HF's layout and loaded by both frameworks; LoRA r = 8,
alpha = 16 on every linear layer but the LM head; AdamW (lr 1e-4); next-token loss on every
token. mgpo-jax: :func:`mgpo_jax.models.load_model` + :class:`mgpo_jax.train.Trainer` with
:func:`mgpo_jax.train.causal_lm_loss`; PyTorch: ``LlamaForCausalLM`` + ``peft.get_peft_model``
+ ``torch.optim.AdamW``. One process, the same thread budget
(:func:`benchmarks.vs_pytorch.set_threads`), after warm-up, interleaved rounds; reported: the
median per-round ratio jax / torch and tokens per second.

    python benchmarks/vs_pytorch_lm.py --threads 1
    python benchmarks/vs_pytorch_lm.py --quick        # a 2-layer, 64-wide Llama, seconds
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time
from typing import Any

if __package__ in (None, ""):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks import _common  # noqa: E402
from benchmarks.vs_pytorch import set_threads  # noqa: E402

SIZES = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
             intermediate_size=1376, vocab_size=8192)
QUICK = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=256)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--quick", action="store_true", help="a tiny Llama, few rounds")
  p.add_argument("--batch-size", type=int, default=4)
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--steps-per-round", type=int, default=2)
  p.add_argument("--threads", type=int, default=1)
  p.add_argument("--out", type=pathlib.Path, default=_common.RESULTS / "vs_pytorch_lm.json")
  args = p.parse_args(argv)
  if args.quick:
    args.batch_size, args.seq_len, args.rounds, args.steps_per_round = 2, 16, 2, 1
  return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  threads = set_threads(args.threads)
  import jax
  import numpy as np
  import optax
  import torch
  from flax import nnx
  from peft import LoraConfig as PeftLoraConfig, get_peft_model
  from transformers import LlamaConfig, LlamaForCausalLM

  from mgpo_jax.lora import LoraConfig, apply_lora
  from mgpo_jax.models import load_model
  from mgpo_jax.train import Trainer, causal_lm_loss

  info = _common.machine_info("vs_pytorch_lm.py", argv)
  _common.print_machine(info)
  sizes = QUICK if args.quick else SIZES
  torch.manual_seed(0)
  folder = tempfile.mkdtemp(prefix="vs_pytorch_lm_")
  LlamaForCausalLM(LlamaConfig(**sizes, max_position_embeddings=max(args.seq_len, 128))
                   ).save_pretrained(folder)
  rng = np.random.default_rng(0)
  ids = rng.integers(3, sizes["vocab_size"], (args.batch_size, args.seq_len)).astype(np.int32)
  batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}

  model = load_model(folder, task="causal-lm")
  apply_lora(model, LoraConfig(target_modules="all-linear", r=8, alpha=16.0), rngs=nnx.Rngs(0))
  trainer = Trainer(model, optax.adamw(1e-4), causal_lm_loss)
  state, jbatch = trainer.init(0), trainer.shard_batch(batch)

  peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(folder), PeftLoraConfig(
      r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)).train()
  opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4,
                          weight_decay=0.0)
  tensors = {k: torch.from_numpy(v.astype(np.int64)) for k, v in batch.items()}

  def jax_steps(n):
    nonlocal state
    for _ in range(n):
      state, m = trainer.train_step(state, jbatch)
    jax.block_until_ready((state, m))

  def torch_steps(n):
    for _ in range(n):
      opt.zero_grad(set_to_none=True)
      peft_model(**tensors, labels=tensors["input_ids"]).loss.backward()
      opt.step()

  jax_steps(2)  # compile + warm-up
  torch_steps(2)
  times: dict[str, list[float]] = {"jax": [], "torch": []}
  busy: dict[str, list[float]] = {"jax": [], "torch": []}  # CPU seconds per wall second
  for _ in range(args.rounds):
    for name, steps in (("jax", jax_steps), ("torch", torch_steps)):
      c0, t0 = _common.cpu_seconds(), time.perf_counter()
      steps(args.steps_per_round)
      wall = time.perf_counter() - t0
      times[name].append(wall / args.steps_per_round)
      busy[name].append((_common.cpu_seconds() - c0) / wall)
  j, t = np.asarray(times["jax"]), np.asarray(times["torch"])
  tokens = args.batch_size * args.seq_len
  results = {"machine": info, "threads": threads, "model": sizes, "batch_size": args.batch_size,
             "seq_len": args.seq_len, "rounds": args.rounds, "jax_step_s": j.tolist(),
             "torch_step_s": t.tolist(), "ratio_median": float(np.median(j / t)),
             "ratio_min": float((j / t).min()), "ratio_max": float((j / t).max()),
             "jax_tokens_per_s": float(tokens / np.median(j)),
             "torch_tokens_per_s": float(tokens / np.median(t)),
             "jax_cores_busy": float(np.median(busy["jax"])),
             "torch_cores_busy": float(np.median(busy["torch"]))}
  print(f"Llama {sizes['num_hidden_layers']}x{sizes['hidden_size']}, LoRA r=8 all-linear, "
        f"batch {args.batch_size} x {args.seq_len}, {args.threads} thread(s): mgpo-jax / "
        f"PyTorch+PEFT step time {results['ratio_median']:.3f} (rounds "
        f"{results['ratio_min']:.2f}-{results['ratio_max']:.2f}); tokens/s "
        f"{results['jax_tokens_per_s']:.0f} vs {results['torch_tokens_per_s']:.0f}; cores busy "
        f"{results['jax_cores_busy']:.2f} vs {results['torch_cores_busy']:.2f}")
  _common.write_json(args.out, results)
  print(f"wrote {args.out}")
  return results


if __name__ == "__main__":
  main()
