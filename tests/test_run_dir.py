"""Run directories: mgpo-jax deletes only what it wrote; failed starts leave nothing; resume
edge cases (a kill during the first save, changed flags, pruning, non-finite losses)."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # the repo root

from benchmarks import _common  # noqa: E402
from mgpo_jax import cli  # noqa: E402
from mgpo_jax.finetune import job, run_dir  # noqa: E402
from mgpo_jax.finetune.fingerprint import fingerprint  # noqa: E402
from mgpo_jax.train.checkpoint import Checkpointer  # noqa: E402
from mgpo_jax.finetune.config import FinetuneConfig  # noqa: E402

TINY = dict(batch_size=4, seq_len=16, steps=6, eval_every=3, save_every=3, rank=2, alpha=4.0)


@pytest.fixture(scope="module")
def data():
  return _common.random_data({"train": 32, "validation": 8, "test": 8}, TINY["seq_len"])


def _run(config, data, **kwargs):
  return job.run(config, progress=False, data=data, base_model=_common.tiny_base_model,
                      **kwargs)


def _tree(path):
  return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None
          for p in sorted(path.rglob("*"))}


def _one_line_error(capsys, *needles):
  err = capsys.readouterr().err.strip()
  assert err.startswith("mgpo-jax: error:") and len(err.splitlines()) == 1, err
  for needle in needles:
    assert needle in err, err
  return err


# -- the data-loss reproduction and other folders that are not runs ---------------------------

def test_overwrite_never_deletes_a_users_files(tmp_path):
  """The reported command: a home folder with a thesis and a project; exit 2, all kept."""
  home = tmp_path / "home"
  (home / "someproject").mkdir(parents=True)
  (home / "thesis.txt").write_text("precious")
  (home / "someproject" / "config.json").write_text("{}")
  before = _tree(home)
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  result = subprocess.run(
      [sys.executable, "-m", "mgpo_jax.cli", "finetune", "--run-dir", "home", "--overwrite",
       "--steps", "2", "--eval-every", "2", "--save-every", "2", "--seq-len", "16",
       "--no-progress"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "someproject/" in lines[0] and "thesis.txt" in lines[0], lines
  assert _tree(home) == before


@pytest.mark.parametrize("flags", [["--overwrite"], [], ["--resume"]])
def test_a_hugging_face_model_folder_is_never_touched(tmp_path, capsys, flags):
  model = tmp_path / "my-bert"
  model.mkdir()
  for name in ("config.json", "model.safetensors", "tokenizer.json"):
    (model / name).write_text("{}")
  before = _tree(model)
  assert cli.main(["finetune", "--run-dir", str(model), "--no-progress", *flags]) == 2
  _one_line_error(capsys, "--run-dir")
  assert _tree(model) == before


def test_run_dir_that_is_a_file_or_cannot_be_created(tmp_path, capsys):
  file = tmp_path / "file.txt"
  file.write_text("x")
  assert cli.main(["finetune", "--run-dir", str(file)]) == 2
  _one_line_error(capsys, "--run-dir", "not a directory")
  assert cli.main(["finetune", "--run-dir", str(file / "sub")]) == 2
  _one_line_error(capsys, "--run-dir", "is not a directory")
  if os.path.isdir("/proc/self"):
    assert cli.main(["finetune", "--run-dir", "/proc/x"]) == 2
    _one_line_error(capsys, "--run-dir /proc/x", "cannot create files in /proc")


def test_a_failed_start_writes_nothing(tmp_path, capsys, data, monkeypatch):
  monkeypatch.setattr(job, "load_data", lambda config: data)
  assert cli.main(["finetune", "--run-dir", str(tmp_path / "r"), "--batch-size", "100000",
                   "--no-progress"]) == 2
  _one_line_error(capsys, "--batch-size 100000", "training split")
  assert not (tmp_path / "r").exists()
  with pytest.raises(job.UserError, match="max_position_embeddings"):  # tiny BERT: 64
    _run(FinetuneConfig(**{**TINY, "seq_len": 65}, run_dir=str(tmp_path / "r")),
         _common.random_data({"train": 8, "validation": 8, "test": 8}, 65))
  assert not (tmp_path / "r").exists()


# -- overwrite removes exactly what a run wrote -------------------------------------------------

def test_overwrite_removes_only_the_runs_entries(tmp_path, data):
  config = FinetuneConfig(**TINY, run_dir=str(tmp_path / "run"))
  _run(config, data)
  made = sorted(p.name for p in (tmp_path / "run").iterdir())
  assert made == [".mgpo-jax-run.json", "adapters", "checkpoints", "config.json", "curves.png",
                  "data.json", "labels.json", "metrics.jsonl", "summary.json"]
  (tmp_path / "run" / "adapters" / "README.md").write_text("my notes")
  with pytest.raises(job.UserError, match=r"adapters/README.md"):
    _run(config, data, overwrite=True)
  (tmp_path / "run" / "adapters" / "README.md").unlink()
  (tmp_path / "run" / "extra.txt").write_text("mine")
  with pytest.raises(job.UserError, match=r"1 entry mgpo-jax did not write \(extra.txt\)"):
    _run(config, data, overwrite=True)
  assert (tmp_path / "run" / "extra.txt").read_text() == "mine"
  (tmp_path / "run" / "extra.txt").unlink()
  _run(config.replace(steps=3), data, overwrite=True)
  assert json.loads((tmp_path / "run" / "config.json").read_text())["steps"] == 3


def test_run_dir_module(tmp_path):
  root = tmp_path / "cmp"
  run_dir.create(root, "compare", {**run_dir.COMPARE_FILES, "a": run_dir.SUB_RUN})
  run_dir.create(root / "a", "run", run_dir.RUN_ENTRIES)
  (root / "a" / "checkpoints" / "3").mkdir(parents=True)
  (root / "a" / "metrics.jsonl").write_text("{}\n")
  (root / "summary.json").write_text("{}")
  assert run_dir.foreign_entries(root, "compare") == []
  assert run_dir.foreign_entries(root, "run") == [".mgpo-jax-run.json", "a/", "summary.json"]
  (root / "a" / "checkpoints" / "notes").write_text("x")
  (root / "b").mkdir()
  assert run_dir.foreign_entries(root, "compare") == ["a/checkpoints/notes", "b/"]
  with pytest.raises(run_dir.RunDirError, match="2 entries"):
    run_dir.clear(root, "compare")
  (root / "a" / "checkpoints" / "notes").unlink()
  (root / "b").rmdir()
  run_dir.clear(root, "compare")
  assert root.is_dir() and not any(root.iterdir())  # the folder itself is kept
  (root / (run_dir.MANIFEST + ".tmp")).write_text("{")  # a start killed mid-manifest
  assert run_dir.is_unstarted(root, "run") and run_dir.foreign_entries(root, "run") == []


# -- resume edge cases ---------------------------------------------------------------------------

def test_resume_after_a_kill_during_the_first_save(tmp_path, data, monkeypatch):
  """Records written before the first checkpoint are dropped: metrics match step 0."""
  full = FinetuneConfig(**TINY, run_dir=str(tmp_path / "full"))
  _run(full, data)
  killed = full.replace(run_dir=str(tmp_path / "killed"))
  real = Checkpointer.save
  with monkeypatch.context() as m:
    def dies_in_first_save(self, step, *args, **kwargs):
      if step % TINY["save_every"] == 0:
        raise KeyboardInterrupt
      return real(self, step, *args, **kwargs)

    m.setattr(Checkpointer, "save", dies_in_first_save)
    with pytest.raises(KeyboardInterrupt):
      _run(killed, data)
  assert job.read_metrics(tmp_path / "killed" / "metrics.jsonl")  # step-1 records exist
  assert not any((tmp_path / "killed" / "checkpoints").iterdir())
  _run(killed, data, resume=True)
  for name in ("metrics.jsonl", "summary.json", "adapters/adapter_model.safetensors"):
    assert ((tmp_path / "full" / name).read_bytes()
            == (tmp_path / "killed" / name).read_bytes()), name


def test_resume_refuses_changed_flags(tmp_path, data, capsys, monkeypatch):
  config = FinetuneConfig(**TINY, run_dir=str(tmp_path / "run"))
  _run(config, data)
  before = _tree(tmp_path / "run")
  monkeypatch.setattr(job, "load_data", lambda config: data)
  assert cli.main(["finetune", "--resume", "--run-dir", str(tmp_path / "run"), "--steps", "40",
                   "--lr", "0.5"]) == 2
  _one_line_error(capsys, "--steps 40 (saved: 6)", "--lr 0.5 (saved: 0.001)")
  assert _tree(tmp_path / "run") == before


def test_resume_refuses_changed_data(tmp_path, data):
  """Other tokenised splits or label names than the run started with (an edited data file, a
  new tokenizer) are refused, naming the splits; a run saved without data.json resumes."""
  config = FinetuneConfig(**{**TINY, "steps": 3, "save_every": 3, "eval_every": 3},
                          run_dir=str(tmp_path / "r"))
  finished = _run(config, data)
  before = _tree(tmp_path / "r")
  relabelled = {**data, "train": {**data["train"], "labels": 1 - data["train"]["labels"]}}
  with pytest.raises(job.UserError, match=r"the data differ from the saved run's \(train\)"):
    _run(config, relabelled, resume=True)
  shorter = {**data, "validation": {k: v[:-1] for k, v in data["validation"].items()},
             "label_names": ["no", "yes"]}
  with pytest.raises(job.UserError, match=r"saved run's \(validation, label_names\)"):
    _run(config, shorter, resume=True)
  assert _tree(tmp_path / "r") == before
  assert _run(config, data, resume=True) == finished
  (tmp_path / "r" / "data.json").unlink()  # as saved by mgpo-jax before data.json
  assert _run(config, data, resume=True) == finished
  prompts = {"prompts": ["2 + 2 ="], "responses": ["4"]}  # a causal LM's --eval-generate set
  generation = [fingerprint({**data, "generation": g}, [0, 1], None)["generation"]
                for g in (prompts, {**prompts, "responses": ["5"]})]
  assert generation[0] != generation[1]


def test_a_kill_while_the_folder_was_probed_leaves_a_run_that_resumes(tmp_path, data):
  """check_usable's probe folder, left by a kill inside the run directory (before its manifest
  or after), is mgpo-jax's scratch: --resume starts or continues the run and removes it."""
  config = FinetuneConfig(**{**TINY, "steps": 3, "save_every": 3, "eval_every": 3},
                          run_dir=str(tmp_path / "probed"))
  (tmp_path / "probed" / ".mgpo-jax-probe-x1").mkdir(parents=True)  # killed before anything
  finished = _run(config, data, resume=True)
  assert not list((tmp_path / "probed").glob(".mgpo-jax-probe-*"))
  (tmp_path / "probed" / ".mgpo-jax-probe-x2").mkdir()  # killed in a later probe
  assert run_dir.is_unstarted(tmp_path / "probed", "run") is False
  assert _run(config, data, resume=True) == finished
  assert not list((tmp_path / "probed").glob(".mgpo-jax-probe-*"))
  (tmp_path / "probed" / ".mgpo-jax-probe-x3").mkdir()
  _run(config, data, overwrite=True)  # --overwrite accepts it too, and removes it
  assert not list((tmp_path / "probed").glob(".mgpo-jax-probe-*"))


def test_resume_of_a_folder_that_does_not_exist_says_so(tmp_path, data, capsys):
  """A kill before the run folder was made leaves nothing to resume: the run starts there
  (as tests/test_fault_injection.py needs), and says so, in case --run-dir was mistyped."""
  config = FinetuneConfig(**{**TINY, "steps": 3, "save_every": 3, "eval_every": 3},
                          run_dir=str(tmp_path / "new"))
  _run(config, data, resume=True)
  assert f"--resume: {tmp_path / 'new'} does not exist; starting the run there" in \
      capsys.readouterr().err
  assert (tmp_path / "new" / "summary.json").exists()


def test_a_run_directory_in_use_is_refused(tmp_path, data):
  """A second process on a --run-dir that another holds stops before it reads the folder's
  files or writes any (a new run, a resume, an overwrite, a comparison); the lock goes with
  the holder, even one killed with SIGKILL."""
  config = FinetuneConfig(**{**TINY, "steps": 3, "save_every": 3, "eval_every": 3},
                          run_dir=str(tmp_path / "r"))
  _run(config, data)
  before = _tree(tmp_path / "r")
  kwargs = dict(progress=False, data=data, base_model=_common.tiny_base_model)
  with run_dir.Lock(tmp_path / "r") as held:
    held.acquire()  # flock: a second open of the folder, even in this process, is refused
    for flags in ({}, {"resume": True}, {"overwrite": True}):
      with pytest.raises(job.UserError, match=f"--run-dir {tmp_path / 'r'} is in use by "
                                               "another mgpo-jax job"):
        _run(config, data, **flags)
    with pytest.raises(job.UserError, match="is in use"):
      job.run_compare(config, ("adamw", "mgpo"), overwrite=True, **kwargs)
  assert _tree(tmp_path / "r") == before
  with run_dir.Lock(tmp_path / "new") as held:  # a new run's folder, made by its holder
    held.acquire()
    with pytest.raises(job.UserError, match="is in use"):
      _run(config.replace(run_dir=str(tmp_path / "new")), data)
  assert not any((tmp_path / "new").iterdir())
  # A job's new folder that another job fills while the first loads: checked again once locked.
  def fills_the_folder_first(cfg):
    _run(cfg.replace(seed=7), data)
    return _common.tiny_base_model(cfg)
  with pytest.raises(job.UserError, match="is not empty"):
    job.run(config.replace(run_dir=str(tmp_path / "raced")), progress=False, data=data,
            base_model=fills_the_folder_first)
  assert json.loads((tmp_path / "raced" / "config.json").read_text())["seed"] == 7
  # A comparison's --overwrite deletes no sub-run while another job holds it.
  job.run_compare(config.replace(run_dir=str(tmp_path / "cmp")), ("adamw", "mgpo"), **kwargs)
  before_cmp = _tree(tmp_path / "cmp")
  with run_dir.Lock(tmp_path / "cmp" / "mgpo") as held:
    held.acquire()
    with pytest.raises(job.UserError, match="cmp/mgpo is in use"):
      job.run_compare(config.replace(run_dir=str(tmp_path / "cmp")), ("adamw", "mgpo"),
                      overwrite=True, **kwargs)
  assert _tree(tmp_path / "cmp") == before_cmp
  holder = subprocess.Popen(  # holds the lock until killed
      [sys.executable, "-c", "import pathlib, sys, time\n"
       "from mgpo_jax.finetune.run_dir import Lock\n"
       f"Lock(pathlib.Path({str(tmp_path / 'r')!r})).acquire(); print('held', flush=True)\n"
       "time.sleep(600)"], stdout=subprocess.PIPE, text=True,
      cwd=pathlib.Path(__file__).resolve().parent.parent)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(job.UserError, match="is in use"):
      _run(config, data, resume=True)
  finally:
    holder.kill()
    holder.wait()
  assert _run(config, data, overwrite=True) == json.loads((tmp_path / "r" / "summary.json")
                                                          .read_text())


def test_non_finite_parameters_are_not_saved(tmp_path, data):
  """A step whose update overflows the parameters (the loss before it was finite) stops the
  run before its checkpoint: nothing non-finite is saved (and one step is a valid run)."""
  config = FinetuneConfig(**{**TINY, "lr": 1e39, "steps": 1, "save_every": 1, "eval_every": 1},
                          optimizer="adamw", run_dir=str(tmp_path / "run"))
  with pytest.raises(job.UserError, match="parameters became non-finite by step 1; the run "
                                          "stopped before saving them"):
    _run(config, data)
  assert not any((tmp_path / "run" / "checkpoints").iterdir())
  _run(config.replace(lr=1e-3), data, overwrite=True)  # --steps 1 trains (no warm-up step)


def test_an_interrupted_overwrite_never_looks_finished(tmp_path, data, monkeypatch):
  """summary.json and the adapters go first, so a clear cut short leaves no finished run."""
  config = FinetuneConfig(**{**TINY, "steps": 3, "save_every": 3, "eval_every": 3},
                          run_dir=str(tmp_path / "run"))
  _run(config, data)

  def interrupted(path, *args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(run_dir.shutil, "rmtree", interrupted)
  with pytest.raises(KeyboardInterrupt):
    run_dir.clear(tmp_path / "run", "run")
  assert not (tmp_path / "run" / "summary.json").exists()
  assert (tmp_path / "run" / "config.json").exists()  # the rest: not yet


def test_opening_checkpoints_prunes_beyond_keep(tmp_path):
  """A kill between a save and orbax's pruning leaves keep + 1 checkpoints; the next open
  prunes them."""
  state = {"w": __import__("numpy").arange(3.0)}
  with Checkpointer(tmp_path, keep=None) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, state)
  with Checkpointer(tmp_path, keep=2) as ckpt:
    assert ckpt.all_steps() == [2, 3]


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_non_finite_loss(tmp_path, data, policy):
  config = FinetuneConfig(**{**TINY, "lr": 1e30, "steps": 12, "save_every": 2, "eval_every": 12},
                          nonfinite=policy, run_dir=str(tmp_path / "run"))
  if policy == "stop":
    with pytest.raises(job.UserError, match="non-finite by step .* last checkpoint"):
      _run(config, data)
    with Checkpointer(tmp_path / "run" / "checkpoints") as ckpt:
      last = ckpt.latest_step()
    assert last is None or last < 12
  else:
    _run(config, data)
  text = (tmp_path / "run" / "metrics.jsonl").read_text()

  def strict(name):
    raise ValueError(f"{name} is not JSON")

  records = [json.loads(line, parse_constant=strict) for line in text.splitlines()]
  assert any(r.get("loss", 0) is None for r in records)  # null, never NaN


# -- flags ---------------------------------------------------------------------------------------

def test_every_config_field_is_a_flag_with_help_and_default(capsys):
  assert cli.main(["finetune", "--help"]) == 0
  text = " ".join(capsys.readouterr().out.split())
  for name, value in FinetuneConfig().__dict__.items():
    flag = "--" + name.replace("_", "-")
    assert flag in text, flag
  assert text.count("(default:") == len(FinetuneConfig().__dict__)
  assert "(default: None)" not in text and "(default: )" not in text
  # "the method's" only for the fields each method fills in; other unset fields say so.
  method_fields = [f.name for f in dataclasses.fields(FinetuneConfig)
                   if f.metadata.get("method_default")]
  assert method_fields and text.count("(default: the method's)") == len(method_fields)
  assert "(default: unset)" in text


def test_config_file_with_flags_overriding(tmp_path):
  toml = tmp_path / "run.toml"
  toml.write_text('rank = 4\nalpha = 8.0\ntarget_modules = "query,attention.output.dense"\n'
                  'optimizer = "sam"\n')
  args = cli._parser().parse_args(["finetune", "--config", str(toml), "--rank", "2"])
  config = cli._config(args)
  assert (config.rank, config.alpha, config.optimizer) == (2, 8.0, "sam")
  assert config.target_modules == ("query", "attention.output.dense")
  (tmp_path / "bad.json").write_text(json.dumps({"rnak": 3}))
  args = cli._parser().parse_args(["finetune", "--config", str(tmp_path / "bad.json")])
  with pytest.raises(ValueError, match=r"unknown field\(s\) rnak \(did you mean rank\?\)"):
    cli._config(args)


def test_config_file_with_peft_names_says_which_field_they_mean(tmp_path):
  """PEFT's ``r`` / ``lora_alpha`` and HF's ``learning_rate`` are refused, naming ours."""
  (tmp_path / "peft.json").write_text(json.dumps({"r": 8, "lora_alpha": 16, "learning_rate": 1e-3,
                                                  "zzz": 1}))
  args = cli._parser().parse_args(["finetune", "--config", str(tmp_path / "peft.json")])
  with pytest.raises(ValueError) as err:
    cli._config(args)
  assert ("unknown field(s) learning_rate (did you mean lr?), lora_alpha (did you mean alpha?), "
          "r (did you mean rank?), zzz; known: accum_steps") in str(err.value)
  # HF's eval_steps is not --steps (the closest name), and an epoch count has no equivalent.
  (tmp_path / "hf.json").write_text(json.dumps({"eval_steps": 50, "num_train_epochs": 1}))
  args = cli._parser().parse_args(["finetune", "--config", str(tmp_path / "hf.json")])
  with pytest.raises(ValueError, match=r"field\(s\) eval_steps \(did you mean eval_every\?\), "
                                       r"num_train_epochs; known"):
    cli._config(args)


def test_config_file_values_json_gives_are_accepted(tmp_path):
  """Integers where floats go, a list of targets, null: what JSON and TOML files hold."""
  path = tmp_path / "run.json"
  path.write_text('{"alpha": 16, "sign": -1, "rho": 0, "weight_decay": 0, "model": null, '
                  '"target_modules": ["query", "value"]}')
  config = cli._config(cli._parser().parse_args(["finetune", "--config", str(path)]))
  config.validate()
  assert config.target_modules == ("query", "value") and config.alpha == 16
  assert FinetuneConfig(target_modules=["query"]).target_modules == ("query",)


@pytest.mark.parametrize("field,value,needle", [
    ("weight_decay", "0.1", "--weight-decay must be a number; got '0.1'"),
    ("precondition", "false", "--precondition must be true or false; got 'false'"),
    ("text_column", 3, "--text-column must be a string; got 3"),
    ("model", 5, "--model must be a string or unset (null); got 5"),
    ("rank", True, "--rank must be an integer; got True"),
    ("target_modules", [1, 2], "--target-modules must be a list of names or a string"),
])
def test_config_file_values_of_the_wrong_type_are_one_line_errors(field, value, needle, tmp_path,
                                                                   capsys):
  """A config file can say anything JSON can: each field's type is checked before anything
  runs (a string "false" would otherwise turn --precondition on)."""
  path = tmp_path / "run.json"
  path.write_text(json.dumps({field: value}))
  assert cli.main(["finetune", "--config", str(path), "--run-dir", str(tmp_path / "r")]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"mgpo-jax: error: {needle}") and len(err.splitlines()) == 1
  assert not (tmp_path / "r").exists()


def test_dotted_target_names_follow_peft(data):
  """`--target-modules attention.self.query` is a PEFT name (suffix at a dot), not a regex."""
  from mgpo_jax.lora import lora_modules

  args = cli._parser().parse_args(["finetune", "--target-modules", "attention.self.query"])
  config = cli._config(args)
  assert config.target_modules == ("attention.self.query",)
  model, _ = job.build_model(config, _common.tiny_base_model(config))
  paths = sorted(lora_modules(model))
  assert len(paths) == 2 and all(p.endswith("attention.self.query") for p in paths), paths
  args = cli._parser().parse_args(["finetune", "--target-modules", r"re:.*\.layer\.1\..*"])
  model, _ = job.build_model(cli._config(args), _common.tiny_base_model(config))
  assert lora_modules(model) and all(".layer.1." in p for p in lora_modules(model))


def test_compare_follows_the_same_rule(tmp_path, data, capsys):
  config = FinetuneConfig(**{**TINY, "steps": 2, "eval_every": 2, "save_every": 2},
                          run_dir=str(tmp_path / "cmp"))
  kwargs = dict(progress=False, data=data, base_model=_common.tiny_base_model)
  first = job.run_compare(config, ("adamw", "mgpo"), **kwargs)
  (tmp_path / "cmp" / "mgpo" / "notes.txt").write_text("mine")
  with pytest.raises(job.UserError, match=r"mgpo/notes.txt"):
    job.run_compare(config, ("adamw", "mgpo"), overwrite=True, **kwargs)
  (tmp_path / "cmp" / "mgpo" / "notes.txt").unlink()
  with pytest.raises(job.UserError, match="differs from the saved comparison"):
    job.run_compare(config, ("adamw", "sam"), resume=True, **kwargs)
  with pytest.raises(job.UserError, match=r"--lr 0.5 \(saved: 0.001\)"):  # before any sub-run
    job.run_compare(config.replace(lr=0.5), ("adamw", "mgpo"), resume=True, **kwargs)
  assert job.run_compare(config, ("adamw", "mgpo"), resume=True, **kwargs) == first
  # A sub-run killed after its manifest, before its config.json: the resume starts it afresh.
  run_dir.clear(tmp_path / "cmp" / "mgpo", "run")
  run_dir.create(tmp_path / "cmp" / "mgpo", "run", run_dir.RUN_ENTRIES)
  assert job.run_compare(config, ("adamw", "mgpo"), resume=True, **kwargs) == first
  job.run_compare(config, ("adamw", "sam"), overwrite=True, **kwargs)
  assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == [
      ".mgpo-jax-run.json", "adamw", "compare.png", "config.json", "sam", "summary.json"]


def test_mesh_and_remat_flags_give_the_unsharded_run(tmp_path, data):
  """`--mesh data=2,fsdp=2 --remat` (the frozen base sharded, blocks rematerialised) trains
  to the same metrics as one device."""
  base = FinetuneConfig(**{**TINY, "steps": 3, "eval_every": 3, "save_every": 3},
                        run_dir=str(tmp_path / "one"))
  one = _run(base, data)
  sharded = _run(base.replace(mesh="data=2,fsdp=2", remat=True, run_dir=str(tmp_path / "m")),
                 data)
  for key in ("val_loss", "val_accuracy", "test_loss"):
    assert sharded[key] == pytest.approx(one[key], rel=1e-4, abs=1e-5), key


@pytest.mark.parametrize("args, needle", [
    (["--mesh", "data=2,pipe=2"], "--mesh"),
    (["--mesh", "data=2", "--devices", "2"], "not both"),
    (["--mesh", "data=2,fsdp=2", "--batch-size", "6"], "data x fsdp (4)"),
])
def test_bad_mesh_flags(tmp_path, capsys, args, needle):
  assert cli.main(["finetune", "--run-dir", str(tmp_path / "r"), *args]) == 2
  _one_line_error(capsys, needle)
  assert not (tmp_path / "r").exists()
