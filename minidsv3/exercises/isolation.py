"""One child process per notebook, a signed answer, and no process left behind.

``in_child(work, key, name, limit)`` forks. The child computes ``work()`` (JSON data:
the notebook's rows) and writes it to a pipe, signed with HMAC-SHA256 under ``key``.
The parent accepts only a correctly signed answer for ``name``. A notebook whose
kernel kills its parent (``os.getppid()`` is the child, not the grader), stops it,
or writes into its pipe through ``/proc`` therefore costs only its own rows.

``subreaper()`` makes the grader a *child subreaper* (Linux): a process that a
notebook starts stays below the grader even in a new session and after its parents
have died, so ``kill_descendants`` finds it after the notebook and kills it.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import json
import os
import select
import signal
import time
import traceback
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Callable

ANSWER_LIMIT = 64 * 2**20  # bytes: rows are small; more means something else is writing
PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 36, 37  # from <linux/prctl.h>


def _sign(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, body, hashlib.sha256).hexdigest().encode()


def _ended(status: int) -> str:
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        return f"was killed by signal {number} ({signal.strsignal(number)})"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


def _stop(pid: int, why: str) -> tuple[bytes, str]:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return b"", why


def _read_answer(pipe: int, pid: int, limit: float) -> tuple[bytes, str | None]:
    """Everything the child wrote once it has exited, and what went wrong, if anything."""
    chunks, size = [], 0
    deadline = time.monotonic() + limit
    while True:
        chunk = os.read(pipe, 1 << 16) if select.select([pipe], [], [], 0.2)[0] else None
        if chunk:
            chunks.append(chunk)
            size += len(chunk)
            if size > ANSWER_LIMIT:
                return _stop(pid, f"wrote more than {ANSWER_LIMIT >> 20} MiB and was stopped")
            continue
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:  # take what is still in the pipe (another process may hold it open)
            while size <= ANSWER_LIMIT and select.select([pipe], [], [], 0)[0] and (
                    chunk := os.read(pipe, 1 << 16)):
                chunks.append(chunk)
                size += len(chunk)
            clean = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
            return b"".join(chunks), None if clean else f"{_ended(status)} before it answered"
        if time.monotonic() > deadline:
            return _stop(pid, f"did not answer within {limit:g} s and was stopped")
        if chunk == b"":  # end of file: the child is exiting
            time.sleep(0.01)


def in_child(work: Callable[[], object], key: bytes, name: str, limit: float
             ) -> tuple[object, str | None]:
    """``(work(), None)`` computed in a child process, or ``(None, what went wrong)``."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never returns into the caller's code
        status = 1
        try:
            os.close(read_end)
            body = json.dumps({"name": name, "result": work()}).encode()
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(body + b"\n" + _sign(key, body))
            status = 0
        except BrokenPipeError:  # the grader is gone: there is no one to answer
            pass
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    os.close(write_end)
    try:
        data, problem = _read_answer(read_end, pid, limit)
    finally:
        os.close(read_end)
    if problem is not None:
        return None, f"the grader's process for this notebook {problem}"
    body, _, signature = data.rpartition(b"\n")
    if hmac.compare_digest(signature, _sign(key, body)):
        answer = json.loads(body)
        if answer["name"] == name:
            return answer["result"], None
    return None, ("the grader's answer for this notebook does not carry the grader's "
                  "signature (something else wrote to it): none of its results count")


# ---------------------------------------------------------------------------------
# Processes a notebook leaves behind
# ---------------------------------------------------------------------------------
def _set_subreaper(on: bool) -> bool:
    """Set this process's child-subreaper flag; return the previous one (False off Linux)."""
    prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)
    if prctl is None:
        return False
    was = ctypes.c_int(0)
    prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(was), 0, 0, 0)
    prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)
    return bool(was.value)


@contextmanager
def subreaper():
    """Within: orphaned descendants are re-parented to this process instead of init."""
    previous = _set_subreaper(True)
    try:
        yield
    finally:
        _set_subreaper(previous)


def _process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time) of every process, from /proc (empty without it)."""
    table = {}
    for entry in os.scandir("/proc") if os.path.isdir("/proc") else ():
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:  # it has just exited
                continue
            fields = stat.rsplit(")", 1)[1].split()  # after the name, which may hold spaces
            table[int(entry.name)] = (int(fields[1]), int(fields[19]))
    return table


def descendants() -> set[tuple[int, int]]:
    """(pid, start time) of every process below this one; the start time tells reused pids."""
    table = _process_table()
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, todo = set(), [os.getpid()]
    while todo:
        for pid in children.get(todo.pop(), []):
            found.add((pid, table[pid][1]))
            todo.append(pid)
    return found


def kill_descendants(keep: set[tuple[int, int]], rounds: int = 50) -> None:
    """SIGKILL (and reap) every process below this one that is not in ``keep``."""
    for _ in range(rounds):
        new = descendants() - keep
        if not new:
            return
        for pid, _ in new:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
        for pid, _ in new:  # our children (orphans included) are zombies until reaped
            with suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
