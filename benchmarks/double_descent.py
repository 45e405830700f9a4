"""Double descent: training-loss curves of LoRA (AdamW) and LoRA-MGPO at ranks 4..256 with
alpha = r (scale 1) and a high learning rate, on Rotten Tomatoes with MiniLM (query/value,
classifier head trained), one seed.

Bump size of a run: the training loss logged by :func:`mgpo_jax.finetune.run` is the mean of
each block of 10 steps, ``l_1, l_2, ...``; it is smoothed by a trailing moving average over
``SMOOTH`` blocks, ``s_k = mean(l_{max(1, k-SMOOTH+1)} .. l_k)``, and

    bump = max_k ( s_k - min_{j <= k} s_j )   (>= 0; 0 for a loss that never rises)

the largest rise of the smoothed loss above its running minimum.

    .venv/bin/python benchmarks/double_descent.py           # full (CPU: ~9 min)
    .venv/bin/python benchmarks/double_descent.py --quick   # tiny random BERT, seconds
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

if __package__ in (None, ""):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks import _common  # noqa: E402

SMOOTH = 3
METHODS = {"lora": {"optimizer": "adamw"}, "mgpo": {"optimizer": "mgpo", "sign": 1.0},
           "lora-one": {"optimizer": "lora-one"},
           "mgpo-code": {"optimizer": "mgpo-code"}, "flat-lora": {"optimizer": "flat-lora"},
           "ggpo": {"optimizer": "ggpo"}}
DEFAULT_METHODS = ("lora", "mgpo")  # the published sweep; the others on request (--methods)


def smooth(losses: Sequence[float], window: int = SMOOTH) -> np.ndarray:
  """Trailing moving average: ``s_k = mean(losses[max(0, k - window + 1) : k + 1])``."""
  x = np.asarray(losses, dtype=np.float64)
  c = np.concatenate([[0.0], np.cumsum(x)])
  k = np.arange(1, x.size + 1)
  start = np.maximum(0, k - window)
  return (c[k] - c[start]) / (k - start)


def bump_size(losses: Sequence[float], window: int = SMOOTH) -> float:
  """The largest rise of the smoothed loss above its running minimum (see the module doc)."""
  s = smooth(losses, window)
  return float(np.max(s - np.minimum.accumulate(s))) if s.size else 0.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--quick", action="store_true", help="tiny random BERT and data, a few steps")
  p.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64, 256])
  p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(METHODS))
  p.add_argument("--lr", type=float, default=5e-3)
  p.add_argument("--steps", type=int, default=120)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--seq-len", type=int, default=40)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", type=pathlib.Path, default=_common.RESULTS / "double_descent.json")
  p.add_argument("--plot", type=pathlib.Path, default=_common.DOCS / "double_descent.png")
  p.add_argument("--work-dir", type=pathlib.Path, default=pathlib.Path("/tmp/mgpo_dd_runs"))
  args = p.parse_args(argv)
  if args.quick:
    args.ranks, args.steps, args.batch_size, args.seq_len = [4], 30, 8, 16
  if min(args.ranks) < 1 or args.steps < 10:
    p.error("--ranks must be positive and --steps >= 10 (the loss is logged every 10 steps)")
  return args


def _plot(runs: list[dict], path: pathlib.Path, title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  ranks = sorted({r["rank"] for r in runs})
  fig, axes = plt.subplots(1, len(ranks), figsize=(3.2 * len(ranks), 3.2), sharey=True,
                           squeeze=False)
  for ax, rank in zip(axes[0], ranks):
    for r in (r for r in runs if r["rank"] == rank):
      steps = [s for s, _ in r["loss_curve"]]
      (line,) = ax.plot(steps, [v for _, v in r["loss_curve"]], alpha=0.3)
      ax.plot(steps, r["smoothed"], color=line.get_color(),
              label=f"{r['method']} (bump {r['bump']:.3f})")
    ax.set(title=f"r = alpha = {rank}", xlabel="step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  axes[0][0].set_ylabel("training loss (10-step mean; bold: smoothed)")
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=75)
  plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Trains every (rank, method); writes ``--out`` and ``--plot``; returns the results dict."""
  from mgpo_jax import finetune
  from mgpo_jax.finetune import job as finetune_job
  from mgpo_jax.finetune.config import FinetuneConfig

  args = parse_args(argv)
  if not args.quick:  # the cache is process-wide: leave a test process's config alone
    _common.enable_compilation_cache()
  info = _common.machine_info("double_descent.py", argv)
  _common.print_machine(info)
  t_start = time.perf_counter()
  if args.quick:
    data = _common.random_data({"train": 256, "validation": 16, "test": 16}, args.seq_len)
  else:
    data = finetune.load_data(FinetuneConfig(seq_len=args.seq_len))
    # Only the training loss is studied: small held-out splits keep the end-of-run evals cheap.
    data = {"train": data["train"], **{k: {n: a[:128] for n, a in data[k].items()}
                                       for k in ("validation", "test")}}
  runs = []
  base = _common.tiny_base_model if args.quick else None  # --quick: a tiny random BERT
  for rank in args.ranks:
    for method in args.methods:
      config = FinetuneConfig(
          rank=rank, alpha=float(rank), lr=args.lr, weight_decay=0.0,
          batch_size=args.batch_size, seq_len=args.seq_len, steps=args.steps,
          eval_every=args.steps, save_every=args.steps, keep=1, seed=args.seed,
          run_dir=str(args.work_dir / f"{method}_r{rank}"), **METHODS[method])
      t0 = time.perf_counter()
      finetune.run(config, overwrite=True, progress=False, data=data, base_model=base)
      records = finetune.read_metrics(pathlib.Path(config.run_dir) / "metrics.jsonl")
      curve = [[r["step"], r["loss"]] for r in records if "loss" in r]
      losses = [v for _, v in curve]
      run = {"rank": rank, "method": method, "loss_curve": curve,
             "smoothed": smooth(losses).tolist(), "bump": bump_size(losses),
             "final_loss": float(np.mean(losses[-SMOOTH:])), "min_smoothed":
             float(np.min(smooth(losses))), "seconds": time.perf_counter() - t0}
      runs.append(run)
      print(f"r={rank:<4d} {method:5s} bump {run['bump']:.4f}, final loss "
            f"{run['final_loss']:.4f} ({run['seconds']:.0f} s)", flush=True)
  results = {"machine": info,
             "protocol": {"model": "tiny random BERT" if args.quick else "all-MiniLM-L6-v2",
                          "data": "random tokens" if args.quick else "Rotten Tomatoes",
                          "ranks": args.ranks, "alpha": "= r", "lr": args.lr,
                          "steps": args.steps, "batch_size": args.batch_size,
                          "seq_len": args.seq_len, "seed": args.seed, "smooth_window_logs":
                          SMOOTH, "log_every_steps": finetune_job.LOG_EVERY,
                          "schedule": "3% linear warm-up, cosine decay to 0",
                          "methods": {m: METHODS[m] for m in args.methods}},
             "runs": runs, "seconds": time.perf_counter() - t_start}
  _common.write_json(args.out, results)
  _plot(runs, args.plot, f"MiniLM LoRA (alpha = r), lr {args.lr:g}, {args.steps} steps x batch "
        f"{args.batch_size}, seq {args.seq_len}, seed {args.seed}")
  print(f"wrote {args.out} and {args.plot} in {results['seconds']:.0f} s")
  return results


if __name__ == "__main__":
  main()
