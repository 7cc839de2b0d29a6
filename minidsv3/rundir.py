"""The run directory as training owns it: one trainer at a time, and its metrics log.

* ``train.lock``    -- an exclusive lock (``fcntl.flock``) held by the one process that
  writes the run directory, naming its PID, host and start time while held. The kernel
  releases a flock when its process ends, however it ends, so a trainer that crashed
  or was killed never leaves the run locked: the next one takes the lock over (and, if
  the file still names a killed holder, says whose it was). Windows has no ``fcntl``:
  there nothing stops a second trainer.
* ``metrics.jsonl`` -- one JSON record per logged step, appended as training goes. A
  kill can cut the last line short; resuming drops such a line and redoes its step.

Readers (``checkpoint.load_model``, ``sample``) need no lock: they never write.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from . import checkpoint

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK = "train.lock"


class RunDirError(ValueError):
    """The run directory cannot be used as asked (in use, not empty, nothing to resume)."""


@contextmanager
def claim(run_dir: Path, resume: bool, lock: bool = True) -> Iterator[None]:
    """Check that ``run_dir`` fits the run and, with ``lock``, hold its lock meanwhile.

    A new run needs a missing or empty directory (an interrupted first save and a
    released lock do not count); ``resume`` needs a committed checkpoint. Under
    torchrun only rank 0 writes, so only rank 0 locks; every rank checks.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--out {run_dir} is a file, not a directory; choose another --out")
    if resume and not checkpoint.has_checkpoint(run_dir):
        torn = (run_dir / checkpoint.TMP).exists()
        raise RunDirError(
            f"--resume: {run_dir} holds no checkpoint to resume from"
            + ("; its first save was interrupted (only ckpt.tmp/ is there), so start the "
               "run again without --resume" if torn else ""))
    with _locked(run_dir) if lock else nullcontext():
        leftovers = {LOCK, checkpoint.TMP}
        if not resume and run_dir.is_dir() and any(p.name not in leftovers
                                                   for p in run_dir.iterdir()):
            raise RunDirError(f"--out {run_dir} already exists; add --resume to continue that "
                              "run, or choose another --out")
        yield


@contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir/train.lock`` exclusively, or raise RunDirError naming its holder."""
    path = run_dir / LOCK
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise RunDirError(f"--out {run_dir} cannot be written ({err.strerror}); choose "
                          "another --out") from None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunDirError(
                    f"--out {run_dir} is in use by another trainer ({_holder(path)}); wait "
                    "for it to finish or stop it, or choose another --out") from None
            except OSError as err:  # a file system without locks (some network mounts)
                print(f"note: cannot lock {path} ({err.strerror}); make sure no other trainer "
                      f"writes to {run_dir}", file=sys.stderr)
        previous = _holder(path)
        if previous:  # only a holder that was killed leaves its name in the file
            print(f"note: taking over {path} from a trainer that was killed ({previous})",
                  file=sys.stderr)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        try:
            yield
        finally:  # however the run ends, short of a kill
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def _holder(path: Path) -> str:
    """'PID 123 on host h since 2025-01-01 12:00:00', or '' for an empty lock file."""
    try:
        who = json.loads(path.read_text(encoding="utf-8") or "null")
        return f"PID {who['pid']} on host {who['host']} since {who['since']}" if who else ""
    except (ValueError, KeyError, TypeError):
        return "a process of unknown PID"


# ---------------------------------------------------------------- metrics file

def append_record(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _step(line: str) -> int | None:
    """The step of a metrics line, or None if the line is not a whole record."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else None


def truncate_records(path: Path, last_step: int) -> None:
    """Drop records written after the checkpoint we resume from (the run redoes them),
    and lines that are not records: the last one, if a kill cut it short."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    steps = [_step(line) for line in lines]
    kept = [line for line, step in zip(lines, steps) if step is not None and step <= last_step]
    damaged = sum(step is None and bool(line.strip()) for line, step in zip(lines, steps))
    if damaged:
        print(f"note: dropped {damaged} damaged line(s) of {path}", file=sys.stderr)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)  # a kill now leaves the old file or the new one, never half
