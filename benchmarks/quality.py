"""Quality: LoRA (AdamW) vs LoRA-MGPO (sign +1, paper; sign -1, released code) vs SAM-LoRA on
Rotten Tomatoes with MiniLM (all-MiniLM-L6-v2), LoRA r=8, alpha=16 on query/value, head trained.

Protocol (every method alike): the same step budget, batch, warm-up + cosine schedule and data
order; the learning rate is chosen per method on VALIDATION accuracy (seed 0, the same grid for
all); then more seeds at the chosen rate; test accuracy is read only for reporting. At the end of
each final run: the top Hessian eigenvalue of the validation loss w.r.t. the trainable params
(LoRA factors and the classifier head), at the clean params, on a fixed validation batch.

    .venv/bin/python benchmarks/quality.py            # the full protocol (CPU: ~22 min)
    .venv/bin/python benchmarks/quality.py --quick    # tiny random BERT, seconds
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

METHODS: dict[str, dict[str, Any]] = {
    "lora": {"optimizer": "adamw"},
    "mgpo+1": {"optimizer": "mgpo", "sign": 1.0},
    "mgpo-1": {"optimizer": "mgpo", "sign": -1.0},
    "sam": {"optimizer": "sam"},  # the registry's rho
    "lora-one": {"optimizer": "lora-one"},  # spectral init + r×r preconditioned AdamW
    "mgpo-code": {"optimizer": "mgpo-code"},  # the registry's defaults from here on
    "flat-lora": {"optimizer": "flat-lora"},
    "ggpo": {"optimizer": "ggpo"},
}
DEFAULT_METHODS = ("lora", "mgpo+1", "mgpo-1", "sam")  # the published run; others via --methods
HESSIAN_BATCH = 16
HESSIAN_ITERS = 10


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--quick", action="store_true", help="tiny random BERT and data, a few steps")
  p.add_argument("--steps", type=int, default=80)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--seq-len", type=int, default=32)
  p.add_argument("--eval-every", type=int, default=20)
  p.add_argument("--val-examples", type=int, default=256,
                 help="validation examples used for curves and lr selection (fixed subset)")
  p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3])
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(METHODS))
  p.add_argument("--out", type=pathlib.Path, default=_common.RESULTS / "quality.json")
  p.add_argument("--plot", type=pathlib.Path, default=_common.DOCS / "quality.png")
  p.add_argument("--work-dir", type=pathlib.Path, default=pathlib.Path("/tmp/mgpo_quality_runs"))
  args = p.parse_args(argv)
  if args.quick:
    args.steps, args.batch_size, args.seq_len, args.eval_every = 6, 8, 16, 3
    args.val_examples, args.lrs, args.seeds = 32, [1e-3, 3e-3], 2
  if args.seeds < 1 or args.steps < 1 or not args.lrs:
    p.error("--seeds, --steps must be >= 1 and --lrs must name at least one rate")
  return args


def _data(args: argparse.Namespace) -> dict[str, dict]:
  from mgpo_jax.finetune import FinetuneConfig, load_data

  if args.quick:
    data = _common.random_data({"train": 256, "validation": 64, "test": 64}, args.seq_len)
  else:
    data = load_data(FinetuneConfig(seq_len=args.seq_len))
  data["validation"] = {k: v[:args.val_examples] for k, v in data["validation"].items()}
  return data


def _sharpness(config, data: dict[str, dict], base_model=None) -> float:
  """Top Hessian eigenvalue of the eval-mode loss on the first validation examples, w.r.t. the
  trainable params, at the clean params of the run's final checkpoint
  (:func:`benchmarks._common.sharpness`)."""
  trainer, state = _common.restore_final(config, base_model, data=data)
  return _common.sharpness(trainer, state, data["validation"], iters=HESSIAN_ITERS,
                           batch=HESSIAN_BATCH, tol=1e-3)["value"]


def _one_run(args, data, method: str, lr: float, seed: int, base_model=None) -> dict[str, Any]:
  from mgpo_jax import finetune
  from mgpo_jax.finetune.config import FinetuneConfig

  config = FinetuneConfig(
      rank=8, alpha=16.0, lr=lr, weight_decay=0.0, batch_size=args.batch_size,
      seq_len=args.seq_len, steps=args.steps, eval_every=args.eval_every,
      save_every=args.steps, keep=1, seed=seed,
      run_dir=str(args.work_dir / f"{method}_lr{lr:g}_seed{seed}"), **METHODS[method])
  t0 = time.perf_counter()
  summary = finetune.run(config, overwrite=True, progress=False, data=data,
                         base_model=base_model)
  metrics = finetune.read_metrics(pathlib.Path(config.run_dir) / "metrics.jsonl")
  return {"method": method, "lr": lr, "seed": seed, "config": config, "seconds":
          time.perf_counter() - t0, "val_accuracy": summary["val_accuracy"],
          "test_accuracy": summary["test_accuracy"],
          "val_curve": [[r["step"], r["val_accuracy"]] for r in metrics if "val_accuracy" in r],
          "loss_curve": [[r["step"], r["loss"]] for r in metrics if "loss" in r]}


def _plot(final: dict[str, list[dict]], path: pathlib.Path, title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
  for method, runs in final.items():
    for ax, key in ((ax_loss, "loss_curve"), (ax_acc, "val_curve")):
      steps = np.array([s for s, _ in runs[0][key]])
      values = np.array([[v for _, v in r[key]] for r in runs])
      mean = values.mean(0)
      (line,) = ax.plot(steps, mean, label=f"{method} (lr {runs[0]['lr']:g})",
                        marker="o" if key == "val_curve" else None, ms=3)
      ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.15)
  _common.save_curve_plot(fig, ax_loss, ax_acc, title, path,
                          acc_title="validation accuracy (subset)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Runs the protocol; writes the JSON (``--out``) and the plot (``--plot``); returns the
  results dict."""
  args = parse_args(argv)
  if not args.quick:  # the cache is process-wide: leave a test process's config alone
    _common.enable_compilation_cache()
  info = _common.machine_info("quality.py", argv)
  _common.print_machine(info)
  t_start = time.perf_counter()
  data = _data(args)
  grid: dict[str, dict[str, float]] = {m: {} for m in args.methods}
  final: dict[str, list[dict]] = {m: [] for m in args.methods}
  base = _common.tiny_base_model if args.quick else None  # --quick: a tiny random BERT
  seed0 = {}
  for lr in args.lrs:
    for method in args.methods:
      r = _one_run(args, data, method, lr, 0, base)
      grid[method][f"{lr:g}"] = r["val_accuracy"]
      seed0[method, lr] = r
      print(f"grid {method:7s} lr {lr:g}: validation accuracy {r['val_accuracy']:.4f} "
            f"({r['seconds']:.0f} s)", flush=True)
  best = {m: max(args.lrs, key=lambda lr, m=m: grid[m][f"{lr:g}"]) for m in args.methods}
  for method in args.methods:
    final[method].append(seed0[method, best[method]])
    for seed in range(1, args.seeds):
      final[method].append(_one_run(args, data, method, best[method], seed, base))
    for r in final[method]:
      r["top_hessian_eigenvalue"] = _sharpness(r["config"], data, base)
      print(f"final {method:7s} lr {r['lr']:g} seed {r['seed']}: test accuracy "
            f"{r['test_accuracy']:.4f}, top Hessian eigenvalue "
            f"{r['top_hessian_eigenvalue']:.4g}", flush=True)
  for runs in final.values():
    for r in runs:
      r.pop("config")
  summary = {}
  for method, runs in final.items():
    test_mean, test_std = _common.mean_std([r["test_accuracy"] for r in runs])
    val_mean, val_std = _common.mean_std([r["val_accuracy"] for r in runs])
    sharp_mean, sharp_std = _common.mean_std([r["top_hessian_eigenvalue"] for r in runs])
    summary[method] = {"lr": best[method], "seeds": [r["seed"] for r in runs],
                       "test_accuracy_mean": test_mean, "test_accuracy_std": test_std,
                       "val_accuracy_mean": val_mean, "val_accuracy_std": val_std,
                       "top_hessian_eigenvalue_mean": sharp_mean,
                       "top_hessian_eigenvalue_std": sharp_std}
  majority = float(max(data["test"]["labels"].mean(), 1 - data["test"]["labels"].mean()))
  results = {
      "machine": info,
      "protocol": {"model": "tiny random BERT" if args.quick else "all-MiniLM-L6-v2",
                   "data": "random tokens" if args.quick else "Rotten Tomatoes",
                   "r": 8, "alpha": 16, "target_modules": ["query", "value"],
                   "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
                   "schedule": "3% linear warm-up, cosine decay to 0", "weight_decay": 0.0,
                   "eval_every": args.eval_every, "val_examples": len(data["validation"]["labels"]),
                   "test_examples": len(data["test"]["labels"]), "lr_grid": args.lrs,
                   "seeds": args.seeds, "methods": {m: METHODS[m] for m in args.methods},
                   "mgpo_rho": 0.05, "hessian": {"batch": HESSIAN_BATCH, "iters": HESSIAN_ITERS,
                                                 "tol": 1e-3}},
      "majority_class_test": majority,
      "grid_val_accuracy": grid,
      "summary": summary,
      "runs": final,
      "seconds": time.perf_counter() - t_start,
  }
  _common.write_json(args.out, results)
  _plot(final, args.plot, f"Rotten Tomatoes, MiniLM LoRA r=8: {args.steps} steps x batch "
        f"{args.batch_size}, seq {args.seq_len}; mean and min-max of {args.seeds} seeds")
  print(f"{'method':8s} {'lr':>7s} {'test acc (mean ± std)':>22s} {'top eig':>10s}")
  for m, s in summary.items():
    print(f"{m:8s} {s['lr']:>7g} {s['test_accuracy_mean']:>12.4f} ± {s['test_accuracy_std']:.4f}"
          f" {s['top_hessian_eigenvalue_mean']:>10.4g}")
  print(f"wrote {args.out} and {args.plot} in {results['seconds']:.0f} s")
  return results


if __name__ == "__main__":
  main()
