"""Double descent: training-loss curves and test accuracy of every method at LoRA ranks 4..256
with alpha = r (scale 1) and a high learning rate, on Rotten Tomatoes with MiniLM (query/value,
classifier head trained), over several seeds. Part of the study of issue 15.

Bump size of a run: the training loss logged by :func:`mgpo_jax.finetune.run` is the mean of
each block of 10 steps, ``l_1, l_2, ...``; it is smoothed by a trailing moving average over
``SMOOTH`` blocks, ``s_k = mean(l_{max(1, k-SMOOTH+1)} .. l_k)``, and

    bump = max_k ( s_k - min_{j <= k} s_j )   (>= 0; 0 for a loss that never rises)

the largest rise of the smoothed loss above its running minimum.

Every (method, rank, seed) run writes ``<results>/<method>/r<rank>_seed<seed>.json`` and is
skipped when that file exists, so the sweep resumes where it stopped (a file made with other
settings stops it with an error instead). Then the summary (per method and rank: mean ± std
over seeds of the bump, the final loss and the test accuracy, and each method's paired
difference to LoRA, same seed, with a 95% t-interval) goes to ``--out`` and the figure to
``--plot``. The same seed gives every method the same initialisation of the head and the
adapters and the same data order (LoRA-One replaces the adapters' init with its own, from the
first training batches). Method names are the study's variants (``benchmarks/study.py``).

    .venv/bin/python benchmarks/double_descent.py           # full: 5 methods x 4 ranks x 3 seeds
    .venv/bin/python benchmarks/double_descent.py --quick   # tiny random BERT, seconds
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

if __package__ in (None, ""):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks import _common, study  # noqa: E402

SMOOTH = 3
# The five: LoRA, the two MGPO forms (paper, released-code weight space), Flat-LoRA, GGPO.
DEFAULT_METHODS = ("lora", "mgpo-paper", "mgpo-code", "flat-lora", "ggpo")
BASELINE = study.BASELINE


def smooth(losses: Sequence[float], window: int = SMOOTH) -> np.ndarray:
  """Trailing moving average: ``s_k = mean(losses[max(0, k - window + 1) : k + 1])``."""
  return _common.trailing_mean(losses, window)


def bump_size(losses: Sequence[float], window: int = SMOOTH) -> float:
  """The largest rise of the smoothed loss above its running minimum (see the module doc)."""
  s = smooth(losses, window)
  return float(np.max(s - np.minimum.accumulate(s))) if s.size else 0.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  specs, _ = study.variants()
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--quick", action="store_true", help="tiny random BERT and data, a few steps")
  p.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64, 256])
  p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(specs))
  p.add_argument("--seeds", type=int, default=3, help="seeds 0 .. SEEDS-1 per (method, rank)")
  p.add_argument("--lr", type=float, default=5e-3)
  p.add_argument("--steps", type=int, default=120)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--seq-len", type=int, default=40)
  p.add_argument("--results", type=pathlib.Path, default=None,
                 help="one JSON file per run, existing ones are not re-run (default: "
                 "benchmarks/results/double_descent; with --quick: WORK_DIR/results)")
  p.add_argument("--out", type=pathlib.Path, default=_common.RESULTS / "double_descent.json")
  p.add_argument("--plot", type=pathlib.Path, default=_common.DOCS / "double_descent.png")
  p.add_argument("--work-dir", type=pathlib.Path, default=pathlib.Path("/tmp/mgpo_dd_runs"))
  args = p.parse_args(argv)
  if args.quick:
    args.ranks, args.steps, args.batch_size, args.seq_len = [4], 30, 8, 16
  if args.results is None:
    args.results = args.work_dir / "results" if args.quick else _common.RESULTS / "double_descent"
  if min(args.ranks) < 1 or args.steps < 10 or args.seeds < 1:
    p.error("--ranks must be positive, --steps >= 10 (the loss is logged every 10 steps) and "
            "--seeds >= 1")
  args.specs = {m: specs[m] for m in args.methods}
  return args


def run_path(results: pathlib.Path, method: str, rank: int, seed: int) -> pathlib.Path:
  return results / method / f"r{rank}_seed{seed}.json"


def one_run(args, data, base, method: str, rank: int, seed: int, info) -> dict[str, Any]:
  """The result of one (method, rank, seed): read from its file when present, else trained."""
  from mgpo_jax import finetune
  from mgpo_jax.finetune.config import FinetuneConfig

  path = run_path(args.results, method, rank, seed)
  run_dir = args.work_dir / method / f"r{rank}_seed{seed}"
  config = FinetuneConfig(
      rank=rank, alpha=float(rank), lr=args.lr, weight_decay=0.0, batch_size=args.batch_size,
      seq_len=args.seq_len, steps=args.steps, eval_every=args.steps, save_every=args.steps,
      keep=1, seed=seed, run_dir=str(run_dir), **args.specs[method])
  if path.exists():
    run = json.loads(path.read_text())
    _common.check_same_config(path, run["config"], json.loads(config.to_json()))
    return run
  t0 = time.perf_counter()
  summary = finetune.run(config, overwrite=True, progress=False, data=data, base_model=base)
  records = finetune.read_metrics(run_dir / "metrics.jsonl")
  curve = [[r["step"], r["loss"]] for r in records if "loss" in r]
  losses = [v for _, v in curve]
  run = {"method": method, "rank": rank, "seed": seed, "spec": args.specs[method],
         "config": json.loads(config.to_json()), "machine": info, "loss_curve": curve,
         "smoothed": smooth(losses).tolist(), "bump": bump_size(losses),
         "final_loss": float(np.mean(losses[-SMOOTH:])),
         "min_smoothed": float(np.min(smooth(losses))),
         "test_accuracy": summary["test_accuracy"], "seconds": time.perf_counter() - t0}
  _common.write_json(path, run)
  shutil.rmtree(run_dir, ignore_errors=True)
  print(f"r={rank:<4d} {method:10s} seed {seed}: bump {run['bump']:.4f}, final loss "
        f"{run['final_loss']:.4f}, test acc {run['test_accuracy']:.4f} "
        f"({run['seconds']:.0f} s) -> {path}", flush=True)
  return run


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
  """``summary[method][rank]``: the seeds, mean ± std of bump, final loss and test accuracy,
  and (methods other than LoRA) the paired difference to LoRA's run of the same seed."""
  by = {}
  for r in runs:
    by.setdefault(r["method"], {}).setdefault(r["rank"], []).append(r)
  summary = {}
  for method, ranks in by.items():
    for rank, rs in sorted(ranks.items()):
      rs.sort(key=lambda r: r["seed"])
      row: dict[str, Any] = {"seeds": [r["seed"] for r in rs]}
      for key in ("bump", "final_loss", "test_accuracy"):
        row[key] = dict(zip(("mean", "std"), _common.mean_std([r[key] for r in rs])))
      base = {r["seed"]: r for r in by.get(BASELINE, {}).get(rank, [])}
      paired = [r for r in rs if r["seed"] in base]
      if method != BASELINE and paired:
        row["paired"] = {key: _common.paired_t_interval(
            [r[key] for r in paired], [base[r["seed"]][key] for r in paired])
            for key in ("bump", "final_loss", "test_accuracy")}
      summary.setdefault(method, {})[str(rank)] = row
  return summary


def table(summary: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
  """The summary as a markdown table: per rank and method, mean ± std over seeds and the
  paired difference to LoRA (same seeds) with its 95% t-interval."""
  def pm(stats):
    return f"{stats['mean']:.4f} ± {stats['std']:.4f}"

  def diff(row, key):
    st = row.get("paired", {}).get(key)
    if st is None:
      return "—"
    if st["low"] is None:
      return f"{st['mean']:+.4f} (1 seed)"
    bold = "**" if st["established"] else ""  # the interval excludes 0
    return f"{bold}{st['mean']:+.4f} [{st['low']:+.4f}, {st['high']:+.4f}]{bold}"

  lines = ["| r = alpha | method | seeds | bump | final loss | test acc | Δ bump vs LoRA [95% CI] "
           "| Δ test acc vs LoRA [95% CI] |", "|---|---|---|---|---|---|---|---|"]
  ranks = sorted({int(k) for rows in summary.values() for k in rows})
  for rank in ranks:
    for method, rows in summary.items():
      row = rows.get(str(rank))
      if row is not None:
        lines.append(f"| {rank} | {method} | {len(row['seeds'])} | {pm(row['bump'])} | "
                     f"{pm(row['final_loss'])} | {pm(row['test_accuracy'])} | "
                     f"{diff(row, 'bump')} | {diff(row, 'test_accuracy')} |")
  return lines


def _plot(runs: list[dict], summary: dict, path: pathlib.Path, title: str) -> None:
  """Top row: per rank, each method's smoothed training loss (mean over seeds, band: min to
  max). Bottom row: bump, final loss and test accuracy against the rank (mean ± std)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  ranks = sorted({r["rank"] for r in runs})
  methods = list(dict.fromkeys(r["method"] for r in runs))
  colors = {m: f"C{i}" for i, m in enumerate(methods)}
  cols = max(len(ranks), 3)
  fig, axes = plt.subplots(2, cols, figsize=(3.4 * cols, 6.4), squeeze=False)
  for ax, rank in zip(axes[0], ranks):
    for method in methods:
      rs = [r for r in runs if r["rank"] == rank and r["method"] == method]
      if not rs:
        continue
      n = min(len(r["smoothed"]) for r in rs)
      steps = [s for s, _ in rs[0]["loss_curve"][:n]]
      s = np.array([r["smoothed"][:n] for r in rs])
      ax.plot(steps, s.mean(0), color=colors[method], label=f"{method} ({len(rs)} seeds)")
      ax.fill_between(steps, s.min(0), s.max(0), color=colors[method], alpha=0.15)
    ax.set(title=f"r = alpha = {rank}", xlabel="step")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("training loss (smoothed)")
  axes[0][0].legend(fontsize=7)
  for ax in axes[0][len(ranks):]:
    ax.axis("off")
  for ax, key in zip(axes[1], ("bump", "final_loss", "test_accuracy")):
    for i, method in enumerate(methods):
      rows = summary.get(method, {})
      rk = sorted(int(k) for k in rows)
      ax.errorbar(np.array(rk) * (1 + 0.04 * (i - (len(methods) - 1) / 2)),
                  [rows[str(k)][key]["mean"] for k in rk],
                  yerr=[rows[str(k)][key]["std"] for k in rk], marker="o", capsize=2,
                  color=colors[method], label=method)
    ax.set(xscale="log", xlabel="rank r (= alpha)", title=key.replace("_", " "))
    ax.minorticks_off()
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.grid(alpha=0.3)
  for ax in axes[1][3:]:
    ax.axis("off")
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=75)
  plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Trains every missing (rank, method, seed); writes ``--out`` and ``--plot`` from all the
  requested runs; returns the results dict."""
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
    # The validation split is only evaluated once, at the end; the test split is whole.
    data = {**data, "validation": {n: a[:128] for n, a in data["validation"].items()}}
  base = _common.tiny_base_model if args.quick else None  # --quick: a tiny random BERT
  runs = [one_run(args, data, base, method, rank, seed, info)
          for seed in range(args.seeds) for rank in args.ranks for method in args.methods]
  summary = summarize(runs)
  results = {"machine": info,
             "protocol": {"model": "tiny random BERT" if args.quick else "all-MiniLM-L6-v2",
                          "data": "random tokens" if args.quick else "Rotten Tomatoes",
                          "ranks": args.ranks, "alpha": "= r", "lr": args.lr,
                          "steps": args.steps, "batch_size": args.batch_size,
                          "seq_len": args.seq_len, "seeds": args.seeds, "smooth_window_logs":
                          SMOOTH, "log_every_steps": finetune_job.LOG_EVERY,
                          "schedule": "3% linear warm-up, cosine decay to 0",
                          "methods": args.specs},
             "summary": summary, "runs": runs, "seconds": time.perf_counter() - t_start}
  _common.write_json(args.out, results)
  _plot(runs, summary, args.plot,
        f"{results['protocol']['model']} LoRA (alpha = r), lr {args.lr:g}, {args.steps} steps "
        f"x batch {args.batch_size}, seq {args.seq_len}, seeds 0-{args.seeds - 1}")
  print("\n".join(table(summary)))
  print(f"wrote {args.out} and {args.plot} in {results['seconds']:.0f} s")
  return results


if __name__ == "__main__":
  main()
