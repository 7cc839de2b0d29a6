"""Grade completed exercise notebooks: one row per student file and task.

    python -m minidsv3.exercises grade submissions/ [--csv marks.csv] [--timeout 300]

Each notebook is graded in a child process of its own (``isolation``), which runs the
notebook in a fresh kernel (this Python environment), inside a temporary copy of its
folder, with a time limit for the whole notebook. Cells are executed with
``allow_errors``: one broken cell costs only the tasks that depend on it. Then the
child checks every task of the set on the notebook's final functions: the checkers
run in the child, and each call of a student function runs in the kernel and sends
back only its result (``remote``). Whatever the notebook did to its own process --
replacing ``run_check``, the comparisons, writing results files -- changes no verdict.

A notebook that raises, crashes or kills its kernel, kills the grading child, hangs or
deletes files gets failing rows, and the processes it started are killed after it.
Every notebook's rows are appended to the CSV as soon as it is graded.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import astuple, dataclass
from functools import partial
from pathlib import Path
from typing import Sequence

import nbformat
import torch
from ipykernel.kernelspec import RESOURCES, get_kernel_dict
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellTimeoutError, DeadKernelError

from . import isolation
from .core import Rejected, Verdict, exercise_sets, run_check, tasks_of
from .remote import StudentFunction

NOTEBOOK_ROW = "(notebook)"
FILES_ROW = "(files)"
METADATA_ROW = "(metadata)"
PROBLEM_ROWS = (NOTEBOOK_ROW, FILES_ROW, METADATA_ROW)
IGNORED = shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__", ".git")
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding minidsv3/
STARTUP_S = 180  # on top of --timeout: the kernel's start (nbclient allows 120 s) and slack


@dataclass(frozen=True)
class Row:
    file: str
    task: str
    result: str  # "pass" | "fail"
    message: str


class _CurrentPython(KernelSpecManager):
    """Every kernel name resolves to an ipykernel of the grader's own Python."""

    def get_kernel_spec(self, kernel_name):
        return self.kernel_spec_class(resource_dir=RESOURCES, **get_kernel_dict())


def _short(text: str, width: int = 80) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _brief(err: BaseException) -> str:
    """The first line of an error's message, cut to a table cell's width."""
    lines = str(err).strip().splitlines()
    return _short(lines[0] if lines else type(err).__name__, 200)


def exercise_set(nb: nbformat.NotebookNode, path: Path) -> tuple[str | None, str | None]:
    """The notebook's set and what is wrong with how it says so (None when nothing is).

    The metadata written by ``build`` (``minidsv3.exercise_set``) comes first, but it
    is the student's file: anything else there is reported, and the file name decides.
    """
    sets = exercise_sets()
    meta = nb.metadata.get("minidsv3")
    claimed = meta.get("exercise_set") if isinstance(meta, dict) else None
    if isinstance(claimed, str) and claimed in sets:
        return claimed, None
    matches = [s for s in sets if s in path.stem]
    set_id = max(matches, key=len) if matches else None
    if meta is None and set_id:
        return set_id, None  # no metadata, e.g. alice_03_deepseekmoe.ipynb
    if meta is None:
        wrong = ("the notebook metadata has no minidsv3.exercise_set (it was not made by "
                 "`python -m minidsv3.exercises build`)")
    else:
        wrong = (f"notebook metadata minidsv3 is {_short(repr(meta))}, not "
                 f"{{'exercise_set': one of {', '.join(sets)}}}")
    if set_id:
        return set_id, f"{wrong}; graded as {set_id}, from the file name"
    return None, f"{wrong}, and the file name names no exercise set: not graded"


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} \
        if folder.is_dir() else set()


class _Kernel:
    """Runs cells in the notebook's kernel against one deadline; ``stopped`` says why not."""

    def __init__(self, client: NotebookClient, timeout: float, grader_slot: int):
        self.client, self.timeout, self.grader_slot = client, timeout, grader_slot
        self.deadline = time.monotonic() + timeout
        self.stopped: str | None = None

    def execute(self, cell: nbformat.NotebookNode, index: int, what: str) -> bool:
        left = self.deadline - time.monotonic()
        if left <= 0:
            self.stopped = f"the notebook timed out after {self.timeout:g} s (before {what})"
            return False
        self.client.timeout = max(1, math.ceil(left))
        try:
            self.client.execute_cell(cell, index)
        except CellTimeoutError:
            self.stopped = (f"the notebook timed out after {self.timeout:g} s "
                            f"({what} was still running)")
        except DeadKernelError:
            self.stopped = f"the kernel died in {what} (the notebook crashed Python)"
        return self.stopped is None

    def run_for_grader(self, code: str, task: str) -> None:
        """Run the grader's ``code`` (a call of a student function) in the kernel."""
        if self.stopped is None:
            cell = nbformat.v4.new_code_cell(code)
            self.execute(cell, self.grader_slot, f"the check of {task}")
        if self.stopped is not None:
            raise Rejected(f"not graded: {self.stopped}")


def _run(nb: nbformat.NotebookNode, set_id: str | None, workdir: Path, calls: Path,
         timeout: float) -> tuple[str | None, dict[str, Verdict]]:
    """Execute the notebook's cells, then check its tasks; what stopped it early, verdicts."""
    log = logging.getLogger("minidsv3.exercises.grade")
    log.setLevel(logging.CRITICAL)  # the grader reports problems in its table
    km = AsyncKernelManager(kernel_spec_manager=_CurrentPython(), kernel_name="python3")
    client = NotebookClient(nb, km=km, allow_errors=True, shutdown_kernel="immediate",
                            record_timing=False, log=log, startup_timeout=120)
    n_cells = len(nb.cells)
    nb.cells.append(nbformat.v4.new_code_cell())  # where the grader's calls run
    verdicts: dict[str, Verdict] = {}
    # The kernel imports the grader's own minidsv3, so both ends of a call agree.
    path = [str(PACKAGE_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONPATH": os.pathsep.join(path)}
    try:
        # The kernel's own stdout and stderr carry only start-up chatter (student output
        # comes back through the notebook protocol), and must not reach the grader's.
        with client.setup_kernel(cleanup_kc=True, env=env, cwd=str(workdir),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL):
            kernel = _Kernel(client, timeout, grader_slot=n_cells)
            for index, cell in enumerate(nb.cells[:n_cells]):
                if cell.cell_type == "code" and not kernel.execute(cell, index,
                                                                   f"cell {index + 1}"):
                    return kernel.stopped, verdicts
            for task in tasks_of(set_id) if set_id else []:
                verdicts[task] = run_check(task, StudentFunction(task, kernel.run_for_grader,
                                                                 calls))
    except Exception as err:  # kernel could not start, or could not be stopped cleanly
        return f"the notebook could not be run: {type(err).__name__}: {_brief(err)}", verdicts
    return kernel.stopped, verdicts


def _cell_errors(nb: nbformat.NotebookNode, n_student_cells: int) -> str | None:
    """'cell 5 raised NameError: ...' for the first cell that raised, if any."""
    errors = [(i, out) for i, cell in enumerate(nb.cells[:n_student_cells])
              if cell.cell_type == "code"
              for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    if not errors:
        return None
    i, out = errors[0]
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return _short(f"cell {i + 1} raised {out.get('ename')}: {out.get('evalue')}", 200) + more


def grade_notebook(path: Path, timeout: float = 300, hidden: Sequence[Path] = ()) -> list[Row]:
    """Rows for one notebook: one per task of its set, plus any problem it caused.

    ``hidden`` files (the marks CSV) are left out of the copy of the folder it runs in.
    """
    name = str(path)
    try:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
    except Exception as err:
        return [Row(name, NOTEBOOK_ROW, "fail", f"cannot read the notebook: {_brief(err)}")]
    set_id, set_problem = exercise_set(nb, path)
    n_student_cells = len(nb.cells)
    with tempfile.TemporaryDirectory(prefix="minidsv3-grade-",
                                     ignore_cleanup_errors=True) as tmp:
        workdir, calls = Path(tmp) / "work", Path(tmp) / "calls"
        left_out = {Path(tmp).resolve(), *(h.resolve() for h in hidden)}

        def ignore(folder: str, names: list[str]) -> set[str]:
            # the hidden files, and this very folder when the notebook's folder holds it
            return set(IGNORED(folder, names)) | {
                n for n in names if Path(folder, n).resolve() in left_out}

        try:
            shutil.copytree(path.parent, workdir, symlinks=True, ignore=ignore)
        except OSError as err:
            return [Row(name, NOTEBOOK_ROW, "fail", "cannot copy the notebook's folder to run "
                                                    f"it in: {_brief(err)}")]
        calls.mkdir()
        before = _files(workdir)
        stopped, verdicts = _run(nb, set_id, workdir, calls, timeout)
        deleted = sorted(before - _files(workdir))
    rows = [Row(name, METADATA_ROW, "fail", set_problem)] if set_problem else []
    problem = stopped or _cell_errors(nb, n_student_cells)
    if problem:
        rows.append(Row(name, NOTEBOOK_ROW, "fail", problem))
    if deleted:
        shown = ", ".join(deleted[:5]) + (", ..." if len(deleted) > 5 else "")
        rows.append(Row(name, FILES_ROW, "fail", f"the notebook deleted {len(deleted)} file(s) "
                                                 f"of its folder: {shown}"))
    for task in tasks_of(set_id) if set_id else []:
        v = verdicts.get(task)
        if v is None:
            rows.append(Row(name, task, "fail", f"not graded: {stopped}"))
        else:
            rows.append(Row(name, task, "pass" if v.status == "pass" else "fail", v.message))
    return rows


def _rows_in_child(path: Path, timeout: float, hidden: Sequence[Path]) -> list[tuple]:
    """grade_notebook, as the child process runs it: any failure becomes a row."""
    torch.set_num_threads(1)  # OpenMP's worker threads do not survive fork()
    try:
        rows = grade_notebook(path, timeout, hidden)
    except Exception as err:
        rows = [Row(str(path), NOTEBOOK_ROW, "fail", "the grader failed on this notebook: "
                                                     f"{type(err).__name__}: {_brief(err)}")]
    return [astuple(r) for r in rows]


def grade_isolated(path: Path, timeout: float, key: bytes, hidden: Sequence[Path] = ()
                   ) -> list[Row]:
    """grade_notebook in a child process; kill whatever the notebook left running."""
    if not path.is_file():
        return [Row(str(path), NOTEBOOK_ROW, "fail", "no such file")]
    before = isolation.descendants()
    try:
        rows, problem = isolation.in_child(partial(_rows_in_child, path, timeout, hidden),
                                           key, str(path), limit=timeout + STARTUP_S)
    finally:
        isolation.kill_descendants(keep=before)
    if problem:
        return [Row(str(path), NOTEBOOK_ROW, "fail", problem)]
    return [Row(*row) for row in rows]


def notebooks_in(paths: list[Path]) -> list[Path]:
    """Expand folders to the notebooks directly inside them, in name order."""
    found = []
    for p in paths:
        found += sorted(p.glob("*.ipynb")) if p.is_dir() else [p]
    return found


def format_table(rows: list[Row]) -> str:
    header = Row("student file", "task", "result", "message")
    w_file = max(len(r.file) for r in [header, *rows])
    w_task = max(len(r.task) for r in [header, *rows])
    lines = [f"{r.file:<{w_file}}  {r.task:<{w_task}}  {r.result:<6}  {r.message}"
             for r in [header, *rows]]
    lines.insert(1, "-" * min(max(len(line) for line in lines), 120))
    summary = {}
    for r in rows:
        passed, total = summary.get(r.file, (0, 0))
        is_task = r.task not in PROBLEM_ROWS
        summary[r.file] = (passed + (is_task and r.result == "pass"), total + is_task)
    lines.append("")
    lines += [f"{file}: {p}/{t} tasks passed" if t else f"{file}: not graded"
              for file, (p, t) in summary.items()]
    return "\n".join(lines)


def append_csv(rows: list[Row], path: Path) -> None:
    """Add rows to the CSV (the header first when the file is new) and flush them to disk."""
    new = not path.exists()
    with open(path, "a", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["file", "task", "result", "message"])
        writer.writerows(astuple(r) for r in rows)
        f.flush()
        os.fsync(f.fileno())


def write_csv(rows: list[Row], path: Path) -> None:
    """Replace the CSV by exactly these rows (atomically: the old file stays until done)."""
    partial_path = path.with_name(path.name + ".partial")
    partial_path.unlink(missing_ok=True)
    append_csv(rows, partial_path)
    os.replace(partial_path, path)


def main(paths: list[Path], csv_path: Path | None = None, timeout: float = 300) -> int:
    """Grade every notebook, print the table, optionally write the CSV. 0 unless no input."""
    notebooks = notebooks_in(paths)
    if not notebooks:
        print("no notebooks to grade: pass notebook files or folders that contain them")
        return 2
    if not hasattr(os, "fork"):
        print("the grader runs each notebook in a process of its own with os.fork, which this "
              "system lacks: grade on Linux or macOS (on Windows: in WSL)")
        return 2
    key = secrets.token_bytes(32)  # signs the children's answers; held in memory only
    rows: list[Row] = []
    if csv_path is not None:
        write_csv([], csv_path)
    with isolation.subreaper():
        for nb_path in notebooks:
            new = grade_isolated(nb_path, timeout, key, hidden=[csv_path] if csv_path else [])
            rows += new
            if csv_path is not None:  # each notebook's rows are safe once it is graded
                append_csv(new, csv_path)
    print(format_table(rows))
    if csv_path is not None:
        write_csv(rows, csv_path)  # anything a notebook wrote into the file is gone
        print(f"wrote {csv_path}")
    return 0
