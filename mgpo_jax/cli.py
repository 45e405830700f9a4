"""The ``mgpo-jax`` command line: ``mgpo-jax finetune [flags]``.

Parses flags into a :class:`mgpo_jax.finetune.FinetuneConfig`, validates them before any
heavy import, and runs :func:`mgpo_jax.finetune.run`. Bad input ends with one clear line on
stderr and exit status 2; nothing is overwritten.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from mgpo_jax.finetune_config import OPTIMIZERS, FinetuneConfig


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="mgpo-jax", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  ft = sub.add_parser(
      "finetune",
      help="LoRA fine-tune MiniLM on Rotten Tomatoes (defaults: r=8, alpha=16, query/value, mgpo)",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  d = FinetuneConfig()
  ft.add_argument("--optimizer", default=d.optimizer, help=f"one of {', '.join(OPTIMIZERS)}")
  ft.add_argument("--compare", default=None,
                  help="comma-separated optimizers run one after another with the same seed and "
                       "data, e.g. adamw,mgpo,sam; overrides --optimizer")
  ft.add_argument("--rank", type=int, default=d.rank, help="LoRA rank r")
  ft.add_argument("--alpha", type=float, default=d.alpha, help="LoRA alpha")
  ft.add_argument("--target-modules", default=",".join(d.target_modules),
                  help="comma-separated module names, a regex, or all-linear")
  ft.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (warmup + cosine)")
  ft.add_argument("--rho", type=float, default=d.rho, help="MGPO rho / SAM rho")
  ft.add_argument("--sign", type=float, default=d.sign,
                  help="MGPO sign: +1 (paper) or -1 (released code)")
  ft.add_argument("--batch-size", type=int, default=d.batch_size)
  ft.add_argument("--seq-len", type=int, default=d.seq_len)
  ft.add_argument("--steps", type=int, default=d.steps)
  ft.add_argument("--eval-every", type=int, default=d.eval_every)
  ft.add_argument("--save-every", type=int, default=d.save_every)
  ft.add_argument("--keep", type=int, default=d.keep, help="checkpoints kept")
  ft.add_argument("--seed", type=int, default=d.seed)
  ft.add_argument("--run-dir", default=d.run_dir)
  ft.add_argument("--devices", type=int, default=d.devices,
                  help="data-parallel devices (on CPU, fake devices are created)")
  group = ft.add_mutually_exclusive_group()
  group.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
  group.add_argument("--overwrite", action="store_true", help="replace the run in --run-dir")
  ft.add_argument("--no-progress", action="store_true", help="no progress bar")
  return parser


def _config_from_args(args: argparse.Namespace) -> FinetuneConfig:
  fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
  values = {k: v for k, v in vars(args).items() if k in fields}
  targets = args.target_modules.strip()
  values["target_modules"] = (
      targets if targets == "all-linear" or not _is_name_list(targets)
      else tuple(t.strip() for t in targets.split(",") if t.strip()))
  return FinetuneConfig(**values)


def _is_name_list(text: str) -> bool:
  return all(part.strip().replace("_", "").isalnum() for part in text.split(","))


def _use_fake_cpu_devices(n: int) -> None:
  """Asks XLA for ``n`` CPU devices (read when JAX's backend starts, i.e. at first use)."""
  if n > 1:
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
      os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    config = _config_from_args(args)
    config.validate()
    compare = config.parse_compare(args.compare)
  except ValueError as err:
    print(f"mgpo-jax: error: {err}", file=sys.stderr)
    return 2
  _use_fake_cpu_devices(config.devices)
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
