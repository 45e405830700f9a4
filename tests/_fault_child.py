"""A fine-tune run that SIGKILLs itself at its K-th file-system or training event.

``python tests/_fault_child.py RUN_DIR KILL_AT [--resume]`` runs a tiny, fixed fine-tune job
(a 2-layer random BERT on random tokens) into ``RUN_DIR`` with :func:`mgpo_jax.job.run`.
Every call of the functions wrapped below is an *event*, counted before and after the call;
at event ``KILL_AT`` the process kills itself with SIGKILL (no cleanup of any kind runs).
``KILL_AT = 0`` never kills and prints ``events N`` at the end: the number of kill points.
"""

import os
import shutil
import signal
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks import _common  # noqa: E402
from mgpo_jax.finetune import job, run_dir  # noqa: E402
from mgpo_jax.train import checkpoint  # noqa: E402
from mgpo_jax.lora import peft_io  # noqa: E402
from mgpo_jax.finetune.config import FinetuneConfig  # noqa: E402

CONFIG = dict(optimizer="mgpo", rank=2, alpha=4.0, batch_size=8, seq_len=16, steps=7,
              eval_every=3, save_every=2, keep=2, seed=3)
_events = 0


def _tick(kill_at: int) -> None:
  global _events
  _events += 1
  if _events == kill_at:
    os.kill(os.getpid(), signal.SIGKILL)


def _wrap(owner, name: str, kill_at: int) -> None:
  real = getattr(owner, name)

  def wrapped(*args, **kwargs):
    _tick(kill_at)
    out = real(*args, **kwargs)
    _tick(kill_at)
    return out

  setattr(owner, name, wrapped)


def main() -> None:
  path, kill_at, resume = sys.argv[1], int(sys.argv[2]), "--resume" in sys.argv
  for owner, name in [(os, "replace"), (os, "rename"), (os, "unlink"), (os, "remove"),
                      (os, "rmdir"), (os, "mkdir"), (shutil, "rmtree"),
                      (job.Trainer, "train_step"), (job, "_write"),
                      (checkpoint.Checkpointer, "save"), (job, "save_adapters"),
                      (job, "plot_curves"), (run_dir, "write_atomic"),
                      (peft_io, "save_file")]:
    _wrap(owner, name, kill_at)
  data = _common.random_data({"train": 64, "validation": 16, "test": 16}, CONFIG["seq_len"])
  config = FinetuneConfig(**CONFIG, run_dir=path)
  job.run(config, resume=resume, progress=False, data=data,
               base_model=_common.tiny_base_model)
  print(f"events {_events}")


if __name__ == "__main__":
  main()
