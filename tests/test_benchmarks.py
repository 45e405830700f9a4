"""The benchmark scripts' ``--quick`` modes run end to end (tiny random BERT), and the bump
statistic of the double-descent benchmark matches a hand-written reference."""

import json
import math
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # the repo root

from benchmarks import double_descent, overhead, quality  # noqa: E402
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
    np.testing.assert_allclose(double_descent.smooth(losses, window), smoothed, rtol=1e-12)
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
                                 "--plot", str(tmp_path / "d.png"),
                                 "--work-dir", str(tmp_path / "dd")])
  assert {r["method"] for r in results["runs"]} == set(names)
  assert all(math.isfinite(v) for r in results["runs"] for _, v in r["loss_curve"])
  results = quality.main(["--quick", "--methods", *names,
                          "--out", str(tmp_path / "q.json"), "--plot", str(tmp_path / "q.png"),
                          "--work-dir", str(tmp_path / "q")])
  assert set(results["summary"]) == set(names)


def test_double_descent_quick(tmp_path):
  out, plot = tmp_path / "dd.json", tmp_path / "dd.png"
  results = double_descent.main(["--quick", "--out", str(out), "--plot", str(plot),
                                 "--work-dir", str(tmp_path / "runs")])
  assert plot.stat().st_size > 0
  runs = results["runs"]
  assert {(r["rank"], r["method"]) for r in runs} == {(4, "lora"), (4, "mgpo")}
  for r in runs:
    losses = [v for _, v in r["loss_curve"]]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert r["bump"] == pytest.approx(_bump_reference(losses, double_descent.SMOOTH)[1])


@pytest.mark.slow
def test_quick_runs_accept_lora_one(tmp_path):
  """Quick-mode quality and double-descent runs take ``lora-one`` (its init's gradient phase
  runs on the first training batches; the sharpness probe rebuilds the model with the data)."""
  results = quality.main(["--quick", "--methods", "lora-one", "--out", str(tmp_path / "q.json"),
                          "--plot", str(tmp_path / "q.png"), "--work-dir", str(tmp_path / "q")])
  assert "lora-one" in results["summary"]
  results = double_descent.main(["--quick", "--methods", "lora-one", "--out",
                                 str(tmp_path / "d.json"), "--plot", str(tmp_path / "d.png"),
                                 "--work-dir", str(tmp_path / "d")])
  assert {r["method"] for r in results["runs"]} == {"lora-one"}
  assert all(math.isfinite(v) for r in results["runs"] for _, v in r["loss_curve"])
