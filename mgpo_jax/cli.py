"""The ``mgpo-jax`` command line: ``mgpo-jax finetune [flags]``.

The flags are generated from :class:`mgpo_jax.finetune.config.FinetuneConfig`'s fields (help
text and defaults included); ``--config FILE`` (TOML or JSON) sets fields, flags override it.
Everything is validated before any heavy import, and bad input ends with one clear line on
stderr and exit status 2; nothing is written or deleted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import tomllib
import typing
from typing import Any

from mgpo_jax.finetune.config import OPTIMIZERS, FinetuneConfig, choice_text, flag


class _Parser(argparse.ArgumentParser):
  """Reports a bad flag as one line (``mgpo-jax: error: ...``, exit 2), like every other
  input error."""

  def error(self, message: str) -> typing.NoReturn:
    self.exit(2, f"mgpo-jax: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="mgpo-jax", description="Flat-minima LoRA fine-tuning in JAX: "
                   "`finetune` trains a run, `predict` applies a finished one.")
  sub = parser.add_subparsers(dest="command", required=True, metavar="{finetune,predict}")
  ft = sub.add_parser(
      "finetune", help="LoRA fine-tune MiniLM on Rotten Tomatoes (defaults: r=8, alpha=16, "
                       "query/value, mgpo)",
      description="LoRA fine-tuning of MiniLM on Rotten Tomatoes; every flag sets the config "
                  "field of the same name (see --config).")
  ft.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                  help="a TOML or JSON file of config fields (e.g. rank = 16); flags override it")
  hints = typing.get_type_hints(FinetuneConfig)
  for f in dataclasses.fields(FinetuneConfig):
    kind = hints[f.name]
    choices = f.metadata.get("choices")
    text = f.metadata["help"] + (f"; one of {choice_text(choices)}" if choices else "")
    text += f" (default: {_default_text(f)})"
    if kind is bool:
      ft.add_argument(flag(f.name), action=argparse.BooleanOptionalAction,
                      default=argparse.SUPPRESS, help=text)
      continue
    optional = [a for a in typing.get_args(kind) if a is not type(None)]
    parse = {int: int, float: float}.get(optional[0] if len(optional) == 1 else kind, str)
    ft.add_argument(flag(f.name), *f.metadata.get("aliases", ()), type=parse,
                    default=argparse.SUPPRESS, help=text,
                    metavar=f.name.upper())  # choices are checked by the config, in one line
  ft.add_argument("--compare", default=None, metavar="M1,M2,...",
                  help=f"run several methods ({', '.join(OPTIMIZERS)}) one after another with "
                       "the same seed and data into --run-dir/<method>; overrides --optimizer")
  group = ft.add_mutually_exclusive_group()
  group.add_argument("--resume", action="store_true",
                     help="continue the run in --run-dir from its last checkpoint (flags that "
                          "differ from the saved config are refused)")
  group.add_argument("--overwrite", action="store_true",
                     help="replace the previous mgpo-jax run in --run-dir (only files it wrote)")
  ft.add_argument("--no-progress", action="store_true", help="no progress bar")

  pr = sub.add_parser("predict", help="label new texts (or answer prompts, for a causal-LM "
                                      "run) with a finished fine-tune run",
                      description="Labels texts with a finished run (its saved config, labels "
                                  "and adapters), or greedily generates answers for a causal-LM "
                                  "run; prints one JSON object per text.")
  pr.add_argument("--run-dir", required=True, help="the run directory of `mgpo-jax finetune`")
  source = pr.add_mutually_exclusive_group(required=True)
  source.add_argument("--text", action="append", help="a text to label (repeatable)")
  source.add_argument("--input-file", help="a .txt file (one text per line) or a CSV, JSONL "
                                           "or Parquet file with the run's --text-column")
  pr.add_argument("--output", help="write the JSONL here instead of printing it")
  return parser


def _predict(args: argparse.Namespace) -> int:
  from mgpo_jax.data import DataUnavailableError
  from mgpo_jax.finetune import predict

  try:
    texts = args.text
    if args.input_file:
      run_dir = pathlib.Path(args.run_dir)
      run = (FinetuneConfig.saved_in(run_dir) if (run_dir / "config.json").is_file()
             else FinetuneConfig())
      text_column = run.prompt_column or run.text_column
      texts = predict.read_texts(args.input_file, text_column)
    lines = [json.dumps(r) for r in predict.predict(args.run_dir, texts)]
    if args.output:
      pathlib.Path(args.output).write_text("".join(line + "\n" for line in lines))
    else:
      print("\n".join(lines))
  except (ValueError, OSError, DataUnavailableError) as err:
    print(f"mgpo-jax: error: {' '.join(str(err).split())}", file=sys.stderr)
    return 2
  return 0


def _default_text(field: dataclasses.Field) -> str:
  if field.default in (None, ""):
    return "the method's" if field.metadata.get("method_default") else "unset"
  return ",".join(field.default) if isinstance(field.default, tuple) else str(field.default)


def _read_config_file(path: str) -> dict[str, Any]:
  try:
    text = pathlib.Path(path).read_text()
    return tomllib.loads(text) if not path.endswith(".json") else json.loads(text)
  except (OSError, ValueError) as err:  # TOMLDecodeError and JSONDecodeError are ValueErrors
    raise ValueError(f"--config {path}: {err}") from err


def _config(args: argparse.Namespace) -> FinetuneConfig:
  """Defaults, or on ``--resume`` the saved config; then ``--config FILE``; then flags."""
  given = {f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneConfig)
           if hasattr(args, f.name)}
  base = FinetuneConfig()
  if args.resume:
    run_dir = pathlib.Path(given.get("run_dir", base.run_dir))
    # Without a saved config the job decides (a start cut short begins afresh).
    if (run_dir / "config.json").is_file():
      base = FinetuneConfig.saved_in(run_dir)
      base = base.drop_unused(base.parse_compare(getattr(args, "compare", None)))
  values, source = dataclasses.asdict(base), "config"
  if hasattr(args, "config"):
    values.update(_read_config_file(args.config))
    source = f"--config {args.config}"
  values.update(given)
  return FinetuneConfig.from_dict(values, source)


def _use_fake_cpu_devices(n: int) -> None:
  """Asks XLA for ``n`` CPU devices (read when JAX's backend starts, i.e. at first use)."""
  if n > 1:
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
      os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def main(argv: list[str] | None = None) -> int:
  try:
    args = _parser().parse_args(argv)
  except SystemExit as done:  # --help (0) or a flag argparse rejects (2, one line printed)
    return int(done.code or 0)
  if args.command == "predict":
    return _predict(args)
  try:
    config = _config(args)
    compare = config.parse_compare(args.compare)
    config.validate(compare)
  except ValueError as err:
    print(f"mgpo-jax: error: {' '.join(str(err).split())}", file=sys.stderr)
    return 2
  _use_fake_cpu_devices(config.device_count)
  from mgpo_jax import finetune  # heavy imports (jax, flax, transformers) only now

  try:
    if compare:
      finetune.run_compare(config, compare, resume=args.resume, overwrite=args.overwrite,
                           progress=not args.no_progress)
    else:
      finetune.run(config, resume=args.resume, overwrite=args.overwrite,
                   progress=not args.no_progress)
  except finetune.UserError as err:
    print(f"mgpo-jax: error: {err}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("mgpo-jax: interrupted; the last saved checkpoint is intact (use --resume)",
          file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
