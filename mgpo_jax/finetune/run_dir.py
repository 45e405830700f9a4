"""Run directories that the fine-tune job owns, marked by a manifest, so that nothing else is
ever deleted.

The job writes ``.mgpo-jax-run.json`` into a run directory before anything else. The manifest
names its format version, the kind of directory (``"run"`` or ``"compare"``) and the entries
the job may create there, as exact names or ``fnmatch`` patterns, each with what it is: a file
(``null``), a folder with the child patterns it may hold, or ``"run"``, a sub-run directory with
a manifest of its own (in a comparison). ``--overwrite`` removes exactly the entries that
match, and only when every entry in the directory matches; a directory without a manifest, or
with anything the manifest does not name, is refused with an error that lists the unknown
entries. The directory itself is kept.

While a job uses a run directory it holds an exclusive lock on it (:class:`Lock`), so a
second job given the same ``--run-dir`` stops with an error instead of interleaving its files
with the first's. The lock guards against other mgpo-jax jobs, not against the folder being
deleted or moved by hand.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

try:
  import fcntl
except ImportError:  # Windows: no advisory locks; run directories are then unguarded
  fcntl = None

MANIFEST = ".mgpo-jax-run.json"
_PROBE = ".mgpo-jax-probe-"  # check_usable's scratch folder, left behind by a kill
FORMAT = 1
_LISTED = 4  # unknown entries named in an error
SUB_RUN = "run"

# What a single run writes: entry pattern -> the child patterns of a folder (None: a file).
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
RUN_ENTRIES: dict[str, tuple[str, ...] | None] = {
    "config.json": None, "config.json.tmp": None,
    "labels.json": None, "labels.json.tmp": None,
    "data.json": None, "data.json.tmp": None,
    "metrics.jsonl": None, "metrics.jsonl.tmp": None,
    "summary.json": None, "summary.json.tmp": None,
    "curves.png": None, "curves.png.tmp": None,
    "checkpoints": ("[0-9]*",),  # orbax step folders and their *.orbax-checkpoint-tmp-* drafts
    "adapters": _ADAPTER_FILES,
    ".adapters.tmp-*": _ADAPTER_FILES,  # save_adapters' draft folder
}
_FINISHED = ("summary.json", "adapters")  # what a finished run has and a started one lacks
COMPARE_FILES: dict[str, tuple[str, ...] | None] = {
    "config.json": None, "config.json.tmp": None,
    "summary.json": None, "summary.json.tmp": None,
    "compare.png": None, "compare.png.tmp": None,
}


class RunDirError(ValueError):
  """A run directory that may not be used as asked (the message names ``--run-dir``)."""


class Lock:
  """An exclusive ``flock`` on the run directory ``path``, from :meth:`acquire` to the end of
  the ``with`` block. The kernel drops it when the process ends, so a killed run never leaves
  a stale lock. On a filesystem without ``flock`` (some network mounts) the lock is skipped.

  Example::

    with Lock(path) as lock:
      lock.acquire()  # makes the folder if needed; raises RunDirError if another holds it
      ...
  """

  def __init__(self, path: pathlib.Path):
    self.path = path
    self._fd: int | None = None

  def acquire(self) -> bool:
    """Makes ``path`` if missing and locks it; whether this call took the lock (``False``
    when it was already held, or on a system without ``fcntl``)."""
    if self._fd is not None or fcntl is None:
      return False
    self.path.mkdir(parents=True, exist_ok=True)
    fd = os.open(self.path, os.O_RDONLY)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise RunDirError(f"--run-dir {self.path} is in use by another mgpo-jax job (in this "
                        "process or another); wait for it to end or choose another --run-dir"
                        ) from None
    except OSError:  # no flock here (ENOLCK, EOPNOTSUPP): unguarded, as without fcntl
      pass
    self._fd = fd
    return True

  def __enter__(self) -> Lock:
    return self

  def __exit__(self, *exc) -> None:
    if self._fd is not None:
      os.close(self._fd)  # closing the only descriptor releases the lock
      self._fd = None


def check_usable(path: pathlib.Path) -> None:
  """Raises unless ``path`` is, or can become, a directory this process may write into.

  Writes nothing that stays: the check creates and removes one temporary folder in the
  nearest existing ancestor when ``path`` does not exist yet.
  """
  if path.exists() and not path.is_dir():
    raise RunDirError(f"--run-dir {path} exists and is not a directory")
  ancestor = path
  while not ancestor.exists():
    ancestor = ancestor.parent
  if not ancestor.is_dir():
    raise RunDirError(f"--run-dir {path}: {ancestor} is not a directory")
  try:
    tempfile.TemporaryDirectory(dir=ancestor, prefix=_PROBE).cleanup()
  except OSError as err:
    raise RunDirError(
        f"--run-dir {path}: cannot create files in {ancestor} ({err.strerror or err})") from err


def is_empty(path: pathlib.Path) -> bool:
  return not (path.is_dir() and any(path.iterdir()))


def read_json(path: pathlib.Path, name: str) -> Any:
  """The JSON file ``name`` that mgpo-jax wrote in the run directory ``path``."""
  try:
    return json.loads((path / name).read_text())
  except ValueError as err:
    raise RunDirError(f"--run-dir {path}: {name} is not valid JSON ({err}): it was changed or "
                      "damaged after mgpo-jax wrote it. Restore it, or start a new run") from err


def read_manifest(path: pathlib.Path, kind: str) -> dict:
  """The manifest of ``path``, checked to be a ``kind`` directory of a known format."""
  file = path / MANIFEST
  if not file.is_file():
    raise RunDirError(f"--run-dir {path} is not an mgpo-jax {kind} directory (no {MANIFEST})")
  try:
    manifest = json.loads(file.read_text())
    ok = (isinstance(manifest, dict) and manifest.get("format") == FORMAT
          and manifest.get("kind") == kind and isinstance(manifest.get("entries"), dict))
  except ValueError:
    ok = False
  if not ok:
    raise RunDirError(
        f"--run-dir {path}: {MANIFEST} is not a format-{FORMAT} mgpo-jax {kind} manifest")
  return manifest


def create(path: pathlib.Path, kind: str,
           entries: Mapping[str, Sequence[str] | str | None]) -> None:
  """Makes ``path`` (empty or new) an mgpo-jax ``kind`` directory owning ``entries``."""
  path.mkdir(parents=True, exist_ok=True)
  if not is_empty(path):
    raise RunDirError(f"--run-dir {path} is not empty")
  manifest = {"format": FORMAT, "kind": kind,
              "entries": {k: v if v in (None, SUB_RUN) else list(v) for k, v in entries.items()}}
  write_atomic(path / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))


def foreign_entries(path: pathlib.Path, kind: str) -> list[str]:
  """The entries under ``path`` that mgpo-jax did not write: all of them without a valid
  ``kind`` manifest, else those the manifest does not name (sub-runs of a comparison are
  checked against their own manifests)."""
  try:
    return _unnamed_entries(path, kind)
  except RunDirError:
    return sorted(_shown(child) for child in path.iterdir())


def _shown(entry: pathlib.Path, parent: str = "") -> str:
  return parent + entry.name + ("/" if entry.is_dir() else "")


def _is_scratch(entry: pathlib.Path) -> bool:
  """A draft of the manifest, or a probe folder of :func:`check_usable`: what a job killed
  at any moment may leave, with or without a manifest."""
  return entry.name == MANIFEST + ".tmp" or entry.name.startswith(_PROBE)


def _unnamed_entries(path: pathlib.Path, kind: str) -> list[str]:
  children = sorted(path.iterdir())
  if all(_is_scratch(child) for child in children):
    return []  # empty, or killed while the manifest was being written or the folder probed
  entries = read_manifest(path, kind)["entries"]
  unknown = []
  for child in children:
    if child.name == MANIFEST or _is_scratch(child):
      continue
    pattern = next((p for p in entries if fnmatch.fnmatchcase(child.name, p)), None)
    if pattern is None:
      unknown.append(_shown(child))
    elif entries[pattern] == SUB_RUN:
      if not child.is_dir():
        unknown.append(_shown(child))
      else:
        unknown += [f"{child.name}/{n}" for n in foreign_entries(child, "run")]
    elif (entries[pattern] is None) != (not child.is_dir()):
      unknown.append(_shown(child))
    elif child.is_dir():
      unknown += [_shown(g, child.name + "/") for g in sorted(child.iterdir())
                  if not any(fnmatch.fnmatchcase(g.name, p) for p in entries[pattern])]
  return unknown


def check_replaceable(path: pathlib.Path, kind: str) -> None:
  """Raises unless ``--overwrite`` may clear ``path``: empty, or holding only what its
  manifest names."""
  unknown = foreign_entries(path, kind) if path.is_dir() else []
  if unknown:
    shown = ", ".join(unknown[:_LISTED]) + (", ..." if len(unknown) > _LISTED else "")
    raise RunDirError(f"--overwrite: --run-dir {path} holds {len(unknown)} entr"
                      f"{'y' if len(unknown) == 1 else 'ies'} mgpo-jax did not write "
                      f"({shown}); not deleting anything")


def check_startable(path: pathlib.Path, kind: str, *, overwrite: bool) -> None:
  """Raises unless a new ``kind`` may start in ``path``: empty, or, with ``overwrite``,
  holding only what mgpo-jax wrote (:func:`check_replaceable`)."""
  if is_empty(path):
    return
  if not overwrite:
    raise RunDirError(f"--run-dir {path} is not empty; pass --resume to continue it or "
                      "--overwrite to replace it")
  check_replaceable(path, kind)


def clear(path: pathlib.Path, kind: str) -> None:
  """Removes what the manifest of ``path`` names, then the manifest; keeps the folder.

  Checked first with :func:`check_replaceable`; an interrupted clear leaves a directory that
  can be cleared again (the manifest goes last).
  """
  check_replaceable(path, kind)
  if not (path / MANIFEST).exists():
    for child in path.iterdir():  # at most scratch entries (_unnamed_entries)
      if child.is_dir():
        shutil.rmtree(child)
      else:
        child.unlink()
    return
  entries = read_manifest(path, kind)["entries"]
  sub_runs = [c for c in path.iterdir() if entries.get(c.name) == SUB_RUN and c.is_dir()]
  with contextlib.ExitStack() as held:
    for child in sub_runs:  # all locked before anything goes: none is in use by another job
      held.enter_context(Lock(child)).acquire()
    # What marks a finished run goes first, so an interrupted clear never looks like one.
    order = {name: i for i, name in enumerate(_FINISHED)}
    for child in sorted(path.iterdir(), key=lambda c: (order.get(c.name, len(order)), c.name)):
      if child.name == MANIFEST:
        continue
      if child in sub_runs:
        clear(child, "run")
        child.rmdir()
      elif child.is_dir():
        shutil.rmtree(child)
      else:
        child.unlink()
  (path / MANIFEST).unlink()


def is_unstarted(path: pathlib.Path, kind: str) -> bool:
  """Whether ``path`` holds no saved ``kind`` yet (no ``config.json``) and nothing but what a
  start of mgpo-jax cut short may have written (perhaps not even the folder): a resume has
  nothing to continue."""
  if (path / "config.json").exists():
    return False
  return not (path.is_dir() and foreign_entries(path, kind))


def remove_drafts(path: pathlib.Path) -> None:
  """Removes the drafts (``*.tmp`` files, ``.adapters.tmp-*`` folders, named by its manifest,
  and :func:`check_usable`'s probe folders) that a killed process left in the run directory
  ``path``."""
  entries = read_manifest(path, "run")["entries"]
  for child in path.iterdir():
    draft = _is_scratch(child) or any(fnmatch.fnmatchcase(child.name, p) for p in entries
                                      if "tmp" in p)
    if draft and child.is_dir():
      shutil.rmtree(child)
    elif draft:
      child.unlink()


def write_atomic(path: pathlib.Path, text: str) -> None:
  """Writes ``text`` to ``path`` through ``path.tmp``, an fsync and a rename (then an fsync of
  the folder), so that after a crash ``path`` holds the old text or the new, never less."""
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  folder = os.open(path.parent, os.O_RDONLY)
  try:
    os.fsync(folder)
  finally:
    os.close(folder)
