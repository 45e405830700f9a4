"""Configuration of the fine-tune job, validated without importing JAX.

Kept apart from :mod:`mgpo_jax.finetune` so that the command line can check its flags (and ask
XLA for fake CPU devices) before JAX is first imported. Each field carries its help text; the
command line's flags are generated from the fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import pathlib
import re
from typing import Any

from mgpo_jax.finetune import run_dir as run_dir_lib
from mgpo_jax.methods import METHODS

INITS = ("default", "gaussian", "pissa", "lora-one")  # mgpo_jax.lora.init.INITS, without JAX

OPTIMIZERS = tuple(METHODS)
_MAX_SEED = 2**32 - 1  # jax.random.key takes a uint32 seed


def _field(default: Any, help: str, **metadata: Any) -> Any:  # noqa: A002 (argparse's name)
  return dataclasses.field(default=default, metadata={"help": help, **metadata})


def _method_field(name: str) -> Any:
  """A method hyper-parameter: unset (``None``) means each method's registry default."""
  users = {m: h for m, method in METHODS.items() for k, h in method.hyper.items() if k == name}
  first = next(iter(users.values()))
  defaults = ", ".join(f"{m} {h.default:g}" if isinstance(h.default, float) else
                       f"{m} {h.default}" for m, h in users.items())
  return _field(None, f"{first.help}; unset: the method's default ({defaults})",
                choices=first.choices, method_default=True)


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """Everything that defines one fine-tune run; saved as ``config.json`` in the run directory.

  Defaults: MiniLM (all-MiniLM-L6-v2) + Rotten Tomatoes, LoRA r=8, alpha=16 on query and
  value, the classifier head trained in full (PEFT's ``modules_to_save``), AdamW-based
  optimizers with 3% linear warmup and cosine decay (the papers' schedule).
  """

  task: str = _field("classification", "sequence classification, or causal-lm (Llama "
                                       "models: next-token loss on the response)",
                     choices=("classification", "causal-lm"))
  model: str | None = _field(None, "a local Hugging Face checkpoint folder (BERT or Llama "
                                   "architecture); unset: the embedded all-MiniLM-L6-v2")
  train_file: str | None = _field(None, "training data: a CSV, TSV, JSONL or Parquet file; "
                                        "unset: the embedded Rotten Tomatoes")
  validation_file: str | None = _field(None, "validation data (same format); unset: "
                                             "--validation-fraction of --train-file")
  test_file: str | None = _field(None, "test data (same format); unset: no test evaluation")
  text_column: str = _field("text", "the text column, or two comma-separated for sentence "
                                    "pairs (e.g. sentence1,sentence2)")
  label_column: str = _field("label", "the label column (strings or integers)")
  prompt_column: str | None = _field(None, "causal-lm: the prompt column (no loss on its "
                                           "tokens); unset: plain language modelling of "
                                           "--text-column")
  response_column: str | None = _field(None, "causal-lm: the response column (with "
                                             "--prompt-column)")
  eval_generate: int = _field(0, "causal-lm: greedy-generate answers for this many "
                                 "validation prompts at the end and score exact match "
                                 "(GSM8K style)")
  max_new_tokens: int = _field(64, "causal-lm: tokens generated per prompt")
  validation_fraction: float = _field(0.1, "fraction of --train-file held out for "
                                           "validation when no --validation-file is given")
  optimizer: str = _field("mgpo", "the method", choices=OPTIMIZERS)
  rank: int = _field(8, "LoRA rank r")
  alpha: float = _field(16.0, "LoRA alpha (scaling alpha/r, or alpha/sqrt(r) with rsLoRA)")
  target_modules: tuple[str, ...] | str = _field(
      ("query", "value"),
      "modules that get adapters: comma-separated names (a module matches if its dotted path "
      "equals a name or ends with .name), all-linear, or re:REGEX (full match of the path)")
  use_rslora: bool = _field(False, "rank-stabilised scaling alpha/sqrt(r)")
  lora_dropout: float = _field(0.0, "dropout on the adapter input, in [0, 1)")
  init_lora_weights: str = _field(
      "default", "adapter init (alias --init); lora-one: LoRA-One's spectral init from the full "
      "gradient of the first --init-examples training examples (set by --optimizer lora-one)",
      choices=INITS, aliases=("--init",))
  init_examples: int = _field(8, "training examples whose mean full gradient the lora-one init "
                                 "uses (the released default; at most the training set)")
  precondition: bool = _field(False, "LoRA-One's r×r preconditioner of the adapter gradients "
                                     "before Adam, with any method (on in lora-one)")
  precondition_damping: float = _field(1e-6, "damping lambda of the r×r preconditioner")
  lr: float = _field(1e-3, "peak learning rate (linear warm-up, then cosine decay to 0)")
  weight_decay: float = _field(0.0, "AdamW weight decay")
  warmup_fraction: float = _field(0.03, "fraction of --steps spent in linear warm-up, in [0, 1)")
  rho: float | None = _method_field("rho")
  sign: float | None = _method_field("sign")
  rho_schedule: str | None = _method_field("rho_schedule")
  sigma: float | None = _method_field("sigma")
  beta: float | None = _method_field("beta")
  batch_size: int = _field(16, "examples per optimizer step (over all devices)")
  accum_steps: int = _field(1, "micro-batches per step (gradient accumulation); divides "
                               "--batch-size")
  seq_len: int = _field(48, "tokens per example (48 covers 95%% of the snippets)")
  steps: int = _field(300, "optimizer steps")
  eval_every: int = _field(100, "validation every N steps (and at the end)")
  save_every: int = _field(200, "checkpoint every N steps (and at the end)")
  keep: int = _field(2, "checkpoints kept")
  seed: int = _field(0, "random seed (0 .. 2**32-1): init, dropout and data order")
  devices: int = _field(1, "data-parallel devices (on CPU, fake devices are created)")
  mesh: str = _field("", "a device mesh with model axes instead of --devices, e.g. "
                         "data=2,fsdp=4 or data=2,tensor=2: the frozen base is sharded "
                         "(docs/training.md)")
  remat: bool = _field(False, "rematerialise each transformer block in the backward pass "
                              "(less activation memory, more compute)")
  compute_dtype: str = _field("float32", "forward/backward dtype; adapters, gradients and "
                                         "optimizer state stay float32",
                              choices=("float32", "bfloat16"))
  pooling: str = _field("cls", "sentence embedding for the classifier head: cls is HF's "
                               "pooler (tanh dense on [CLS]), as transformers' "
                               "BertForSequenceClassification, so the exported adapters give "
                               "the job's logits in PyTorch/PEFT; mean averages the token "
                               "states (sentence-transformers' pooling), which HF's class does "
                               "not do", choices=("cls", "mean"))
  nonfinite: str = _field("stop", "on a non-finite training loss: stop (the last checkpoint "
                                  "stays intact) or skip the step's update",
                          choices=("stop", "skip"))
  run_dir: str = _field("runs/finetune", "the run directory")

  def __post_init__(self) -> None:
    if isinstance(self.target_modules, list):  # as a config file gives it; kept as a tuple
      object.__setattr__(self, "target_modules", tuple(self.target_modules))
    if isinstance(self.model, str) and os.path.isdir(self.model):  # saved usable from anywhere
      object.__setattr__(self, "model", os.path.abspath(self.model))

  def validate(self, methods: tuple[str, ...] = ()) -> None:
    """Raises ``ValueError`` naming the first bad field and the values it accepts.

    ``methods``: the methods the config runs (``--compare``'s; default: ``optimizer``). A
    method hyper-parameter that none of them takes is an error, not silently dropped."""
    for f in dataclasses.fields(self):
      _check_type(f, getattr(self, f.name))
    for f in dataclasses.fields(self):
      choices = f.metadata.get("choices")
      unset_ok = f.metadata.get("method_default") and getattr(self, f.name) is None
      if choices and not unset_ok and getattr(self, f.name) not in choices:
        raise ValueError(f"{flag(f.name)} must be one of {choice_text(choices)}; "
                         f"got {getattr(self, f.name)!r}")
    for name in ("rank", "batch_size", "accum_steps", "seq_len", "steps", "eval_every",
                 "save_every", "keep", "devices", "init_examples"):
      _positive_int(flag(name), getattr(self, name))
    _positive("--alpha", self.alpha)
    _positive("--lr", self.lr)
    _positive("--precondition-damping", self.precondition_damping)
    where = "--compare's" if methods else "--optimizer"
    methods = methods or (self.optimizer,)
    for name in method_hypers():
      if getattr(self, name) is not None and not any(name in METHODS[m].hyper for m in methods):
        takes = sorted({flag(k) for m in methods for k in METHODS[m].hyper}) or ["none"]
        raise ValueError(f"{flag(name)} is not a hyper-parameter of {', '.join(methods)} "
                         f"(which take{'s' if len(methods) == 1 else ''}: {', '.join(takes)})")
    for name in methods:
      lora_init = METHODS[name].lora_init
      if lora_init and self.init_lora_weights not in ("default", lora_init):
        raise ValueError(f"{where} {name} uses the {lora_init} init; --init-lora-weights "
                         f"{self.init_lora_weights} conflicts with it (drop it, or run adamw "
                         "with --init and --precondition instead)")
    if not 0 <= self.seed <= _MAX_SEED:  # the types are checked above
      raise ValueError(f"--seed must be an integer in [0, {_MAX_SEED}]; got {self.seed!r}")
    for name in ("rho", "sigma", "beta"):
      value = getattr(self, name)
      if value is not None and not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{flag(name)} must be a finite number >= 0; got {value}")
    if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
      raise ValueError(f"--weight-decay must be a finite number >= 0; got {self.weight_decay}")
    if not 0 <= self.lora_dropout < 1:
      raise ValueError(f"--lora-dropout must be in [0, 1); got {self.lora_dropout}")
    if self.seq_len < 8:
      raise ValueError(f"--seq-len must be >= 8; got {self.seq_len}")
    if self.mesh:
      from mgpo_jax.train.sharding import parse_mesh  # imports JAX's modules, starts nothing

      try:
        axes = parse_mesh(self.mesh)
      except ValueError as err:
        raise ValueError(f"--mesh: {err}") from err
      if self.devices != 1:
        raise ValueError("give --mesh or --devices, not both")
      split = axes["data"] * axes.get("fsdp", 1)
      if self.batch_size % (split * self.accum_steps):
        raise ValueError(f"--batch-size ({self.batch_size}) must be divisible by the mesh's "
                         f"data x fsdp ({split}) times --accum-steps ({self.accum_steps})")
    elif self.batch_size % (self.devices * self.accum_steps):
      raise ValueError(f"--batch-size ({self.batch_size}) must be divisible by --devices "
                       f"({self.devices}) times --accum-steps ({self.accum_steps})")
    if not 0 <= self.warmup_fraction < 1:
      raise ValueError(f"--warmup-fraction must be in [0, 1); got {self.warmup_fraction}")
    targets = self.target_modules
    if not targets or (isinstance(targets, str) and targets != "all-linear"
                       and not targets.startswith("re:")):
      raise ValueError("--target-modules must be comma-separated module names, all-linear, or "
                       f"re:REGEX; got {targets!r}")
    if isinstance(targets, str) and targets.startswith("re:"):
      try:
        re.compile(targets[3:])
      except re.error as err:
        raise ValueError(f"--target-modules {targets!r} is not a valid regex ({err})") from err
    if not 0 < self.validation_fraction < 1:
      raise ValueError(f"--validation-fraction must be in (0, 1); got {self.validation_fraction}")
    if (self.validation_fraction != _default("validation_fraction")
        and (not self.train_file or self.validation_file)):
      raise ValueError("--validation-fraction splits --train-file when no --validation-file "
                       "is given; drop it here")
    if self.task == "causal-lm":
      if not (self.train_file and self.model):
        raise ValueError("--task causal-lm needs --model (a Llama checkpoint folder) and "
                         "--train-file")
      if (self.prompt_column is None) != (self.response_column is None):
        raise ValueError("--prompt-column and --response-column go together")
      if self.eval_generate and not self.prompt_column:
        raise ValueError("--eval-generate compares generated answers with --response-column; "
                         "give --prompt-column and --response-column, or drop it")
    elif self.prompt_column or self.response_column or self.eval_generate:
      raise ValueError("--prompt-column, --response-column and --eval-generate need "
                       "--task causal-lm")
    if self.eval_generate < 0:
      raise ValueError(f"--eval-generate must be an integer >= 0; got {self.eval_generate!r}")
    _positive_int("--max-new-tokens", self.max_new_tokens)
    if (self.validation_file or self.test_file) and not self.train_file:
      raise ValueError("--validation-file and --test-file need --train-file")
    if not self.text_column.strip() or not self.label_column.strip():
      raise ValueError("--text-column and --label-column must name columns")
    if not self.run_dir.strip():
      raise ValueError("--run-dir must name a directory; got ''")

  @property
  def device_count(self) -> int:
    """The devices the run uses: the product of ``--mesh``'s axes, else ``--devices``."""
    if not self.mesh:
      return self.devices
    return math.prod(int(part.split("=")[1]) for part in self.mesh.split(",") if part.strip())

  def differences(self, other: FinetuneConfig) -> list[str]:
    """``--flag value (saved: value)`` for each field that differs, ``run_dir`` aside."""
    return [f"{flag(f.name)} {_show(getattr(self, f.name))} "
            f"(saved: {_show(getattr(other, f.name))})"
            for f in dataclasses.fields(self)
            if f.name != "run_dir" and getattr(self, f.name) != getattr(other, f.name)]

  def parse_compare(self, text: str | None) -> tuple[str, ...]:
    """Parses ``--compare adamw,mgpo,...`` into optimizer names (empty: no comparison)."""
    if not text:
      return ()
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in OPTIMIZERS]
    if bad or len(set(names)) != len(names) or len(names) < 2:
      raise ValueError(
          f"--compare takes two or more distinct names from {', '.join(OPTIMIZERS)}; "
          f"got {text!r}")
    return names

  def replace(self, **changes: Any) -> FinetuneConfig:
    return dataclasses.replace(self, **changes)

  def drop_unused(self, methods: tuple[str, ...] = ()) -> FinetuneConfig:
    """The config with the settings that have no effect on its run set back (a run saved
    before they became errors may hold one): the method hyper-parameters that none of
    ``methods`` (default: ``optimizer``) takes, unset; ``validation_fraction`` with no
    ``train_file`` to split, and ``eval_generate`` without a ``prompt_column``, to their
    defaults."""
    takes = {k for m in methods or (self.optimizer,) if m in METHODS for k in METHODS[m].hyper}
    unused: dict[str, Any] = {k: None for k in method_hypers() if k not in takes}
    if not self.train_file or self.validation_file:
      unused["validation_fraction"] = _default("validation_fraction")
    if not self.prompt_column:
      unused["eval_generate"] = _default("eval_generate")
    return self.replace(**unused)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, values: dict[str, Any], source: str = "config") -> FinetuneConfig:
    """A config from a mapping of field names (a ``config.json`` or a ``--config`` file)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"{source}: unknown field(s) {', '.join(map(_suggest, unknown))}; "
                       f"known: {', '.join(sorted(known))}")
    values = dict(values)
    if "target_modules" in values:
      values["target_modules"] = parse_targets(values["target_modules"])
    return cls(**values)

  @classmethod
  def from_json(cls, text: str) -> FinetuneConfig:
    return cls.from_dict(json.loads(text))

  @classmethod
  def saved_in(cls, path: str | os.PathLike) -> FinetuneConfig:
    """The config that a run or comparison saved in the directory ``path`` (its
    ``config.json``); a damaged or foreign one is a ``RunDirError`` naming the file."""
    path = pathlib.Path(path)
    values = run_dir_lib.read_json(path, "config.json")
    try:
      return cls.from_dict(values)
    except (ValueError, TypeError) as err:
      raise run_dir_lib.RunDirError(
          f"--run-dir {path}: config.json is not a valid run config ({err}): it was changed or "
          "damaged after mgpo-jax wrote it. Restore it, or start a new run") from err


# PEFT's LoraConfig and HF's TrainingArguments names for fields this config names otherwise
# (None: no equivalent here, so no guess: a look-alike field would mislead).
_HF_NAMES = {"r": "rank", "lora_alpha": "alpha", "learning_rate": "lr", "max_steps": "steps",
             "warmup_ratio": "warmup_fraction", "warmup_steps": "warmup_fraction",
             "output_dir": "run_dir", "per_device_train_batch_size": "batch_size",
             "gradient_accumulation_steps": "accum_steps", "model_name_or_path": "model",
             "max_seq_length": "seq_len", "eval_steps": "eval_every", "save_steps": "save_every",
             "save_total_limit": "keep", "gradient_checkpointing": "remat",
             "num_train_epochs": None, "lr_scheduler_type": None,
             "per_device_eval_batch_size": None}


def _suggest(name: str) -> str:
  """``name`` with the field it probably means: PEFT's ``r`` -> ``rank``, HF's
  ``eval_steps`` -> ``eval_every``, a typo -> the closest field name."""
  key = name.replace("-", "_")
  if key in _HF_NAMES:
    guess = _HF_NAMES[key]
  else:
    fields = [f.name for f in dataclasses.fields(FinetuneConfig)]
    guess = next(iter(difflib.get_close_matches(key, fields, 1)), None)
  return f"{name} (did you mean {guess}?)" if guess else name


def method_hypers() -> tuple[str, ...]:
  """The config fields that are method hyper-parameters (unset: the method's default)."""
  return tuple(f.name for f in dataclasses.fields(FinetuneConfig)
               if f.metadata.get("method_default"))


# What each field annotation (a string: annotations are postponed) accepts, and how it is said.
_TYPES = {"str": (str, "a string"), "int": (int, "an integer"), "float": ((int, float), "a number"),
          "bool": (bool, "true or false"), "None": (type(None), "unset (null)"),
          "tuple[str, ...]": (tuple, "a list of names")}


def _check_type(f: dataclasses.Field, value: Any) -> None:
  kinds = [k.strip() for k in f.type.split("|")]
  for kind in kinds:
    types = _TYPES[kind][0]
    if kind not in ("bool", "None") and isinstance(value, bool):
      continue  # True is an int to Python, not to a config
    if isinstance(value, types) and (kind != "tuple[str, ...]"
                                     or all(isinstance(v, str) for v in value)):
      return
  raise ValueError(f"{flag(f.name)} must be {' or '.join(_TYPES[k][1] for k in kinds)}; "
                   f"got {value!r}")


def parse_targets(value: Any) -> Any:
  """``"query,value"`` -> ``("query", "value")``; ``all-linear`` and ``re:REGEX`` are kept."""
  if isinstance(value, list):
    return tuple(value)
  if isinstance(value, str) and value != "all-linear" and not value.startswith("re:"):
    return tuple(t.strip() for t in value.split(",") if t.strip())
  return value


def choice_text(choices: tuple[Any, ...]) -> str:
  return ", ".join(f"{c:+g}" if isinstance(c, float) else str(c) for c in choices)


def flag(field_name: str) -> str:
  """The command-line flag of a config field: ``batch_size`` -> ``--batch-size``."""
  return "--" + field_name.replace("_", "-")


def _default(name: str) -> Any:
  return FinetuneConfig.__dataclass_fields__[name].default


def _show(value: Any) -> str:
  return ",".join(value) if isinstance(value, tuple) else str(value)


def _positive_int(name: str, value: Any) -> None:
  if value <= 0:  # an int: the types are checked first
    raise ValueError(f"{name} must be a positive integer; got {value!r}")


def _positive(name: str, value: Any) -> None:
  if not (math.isfinite(value) and value > 0):
    raise ValueError(f"{name} must be a number > 0; got {value!r}")
