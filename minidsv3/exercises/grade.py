"""Grade completed exercise notebooks: one row per student file and task.

    python -m minidsv3.exercises grade submissions/ [--csv marks.csv] [--timeout 300]

Each notebook runs in a fresh kernel (this Python environment), inside a temporary
copy of its folder, with a time limit for the whole notebook. Its check cells record
verdicts in a results file the grader names (``$MINIDSV3_EXERCISE_RESULTS``); a last
cell, appended by the grader, checks every task of the set once more on the
notebook's final functions, so a deleted or edited check cell changes nothing. A
notebook that raises, crashes its kernel, hangs or deletes files gets failing rows;
the grader itself carries on with the next notebook. Cells are executed with
``allow_errors``: one broken cell costs only the tasks that depend on it.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat
from ipykernel.kernelspec import RESOURCES, get_kernel_dict
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellTimeoutError, DeadKernelError

from .core import RESULTS_ENV, exercise_sets, tasks_of

NOTEBOOK_ROW = "(notebook)"
FILES_ROW = "(files)"
IGNORED = shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__", ".git")


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


def exercise_set(nb: nbformat.NotebookNode, path: Path) -> str | None:
    """The set a notebook belongs to: its metadata (written by build), else its file name."""
    set_id = nb.metadata.get("minidsv3", {}).get("exercise_set")
    if set_id in exercise_sets():
        return set_id
    matches = [s for s in exercise_sets() if s in path.stem]
    return max(matches, key=len) if matches else None


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} \
        if folder.is_dir() else set()


def _run(nb: nbformat.NotebookNode, workdir: Path, results: Path, timeout: float) -> str | None:
    """Execute the notebook's code cells in order; return what stopped it early, if anything."""
    log = logging.getLogger("minidsv3.exercises.grade")
    log.setLevel(logging.CRITICAL)  # the grader reports problems in its table
    km = AsyncKernelManager(kernel_spec_manager=_CurrentPython(), kernel_name="python3")
    client = NotebookClient(nb, km=km, allow_errors=True, shutdown_kernel="immediate",
                            record_timing=False, log=log, startup_timeout=120)
    env = {**os.environ, RESULTS_ENV: str(results), "MPLBACKEND": "Agg"}
    try:
        # The kernel's own stderr carries only start-up chatter; student output comes
        # back through the notebook protocol.
        with client.setup_kernel(cleanup_kc=True, env=env, cwd=str(workdir),
                                 stderr=subprocess.DEVNULL):
            deadline = time.monotonic() + timeout
            for index, cell in enumerate(nb.cells):
                if cell.cell_type != "code":
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    return f"the notebook timed out after {timeout:g} s (before cell {index + 1})"
                client.timeout = max(1, math.ceil(left))
                try:
                    client.execute_cell(cell, index)
                except CellTimeoutError:
                    return (f"the notebook timed out after {timeout:g} s "
                            f"(cell {index + 1} was still running)")
                except DeadKernelError:
                    return f"the kernel died in cell {index + 1} (the notebook crashed Python)"
    except Exception as err:  # kernel could not start, or could not be stopped cleanly
        return f"the notebook could not be run: {type(err).__name__}: {err}"
    return None


def _cell_errors(nb: nbformat.NotebookNode, n_student_cells: int) -> str | None:
    """'cell 5 raised NameError: ...' for the first cell that raised, if any."""
    errors = [(i, out) for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
              for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    if not errors:
        return None
    i, out = errors[0]
    where = f"cell {i + 1}" if i < n_student_cells else "the grader's check cell"
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return f"{where} raised {out.get('ename')}: {out.get('evalue')}{more}"


def _read_results(results: Path) -> dict[str, dict]:
    """Task -> verdict; the grader's final check wins over the notebook's own check cells."""
    verdicts: dict[str, dict] = {}
    if not results.exists():
        return verdicts
    for line in results.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
            task, source = row["task"], row["source"]
        except (ValueError, KeyError, TypeError):
            continue  # a line the notebook wrote by other means: ignore it
        if source == "final" or verdicts.get(task, {}).get("source") != "final":
            verdicts[task] = row
    return verdicts


def grade_notebook(path: Path, timeout: float = 300) -> list[Row]:
    """Rows for one notebook: one per task of its set, plus any problem it caused."""
    name = str(path)
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as err:
        return [Row(name, NOTEBOOK_ROW, "fail", f"cannot read the notebook: {err}")]
    set_id = exercise_set(nb, path)
    n_student_cells = len(nb.cells)
    if set_id:
        nb.cells.append(nbformat.v4.new_code_cell(
            "from minidsv3.exercises.core import record_set\n"
            f"record_set({set_id!r}, globals())"))
    with tempfile.TemporaryDirectory(prefix="minidsv3-grade-",
                                     ignore_cleanup_errors=True) as tmp:
        workdir, results = Path(tmp) / "work", Path(tmp) / "results.jsonl"
        shutil.copytree(path.parent, workdir, symlinks=True, ignore=IGNORED)
        before = _files(workdir)
        stopped = _run(nb, workdir, results, timeout)
        deleted = sorted(before - _files(workdir))
        verdicts = _read_results(results)
    rows = []
    problem = stopped or _cell_errors(nb, n_student_cells)
    if problem:
        rows.append(Row(name, NOTEBOOK_ROW, "fail", problem))
    if deleted:
        shown = ", ".join(deleted[:5]) + (", ..." if len(deleted) > 5 else "")
        rows.append(Row(name, FILES_ROW, "fail", f"the notebook deleted {len(deleted)} file(s) "
                                                 f"of its folder: {shown}"))
    if not set_id:
        rows.append(Row(name, NOTEBOOK_ROW, "fail", "unknown exercise set: not a notebook made "
                                                    "by `python -m minidsv3.exercises build`"))
    for task in tasks_of(set_id) if set_id else sorted(verdicts):
        v = verdicts.get(task)
        if v is None:
            rows.append(Row(name, task, "fail", f"not graded: {stopped}" if stopped
                            else "not graded: no result was recorded"))
        elif v.get("status") == "pass":
            rows.append(Row(name, task, "pass", str(v.get("message", ""))))
        else:
            rows.append(Row(name, task, "fail", str(v.get("message", ""))))
    return rows


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
        if r.task not in (NOTEBOOK_ROW, FILES_ROW):
            passed, total = summary.get(r.file, (0, 0))
            summary[r.file] = (passed + (r.result == "pass"), total + 1)
    lines.append("")
    lines += [f"{file}: {p}/{t} tasks passed" for file, (p, t) in summary.items()]
    return "\n".join(lines)


def write_csv(rows: list[Row], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "task", "result", "message"])
        writer.writerows([r.file, r.task, r.result, r.message] for r in rows)


def main(paths: list[Path], csv_path: Path | None = None, timeout: float = 300) -> int:
    """Grade every notebook, print the table, optionally write the CSV. 0 unless no input."""
    notebooks = notebooks_in(paths)
    if not notebooks:
        print("no notebooks to grade: pass notebook files or folders that contain them")
        return 2
    rows = []
    for nb_path in notebooks:
        if not nb_path.is_file():
            rows.append(Row(str(nb_path), NOTEBOOK_ROW, "fail", "no such file"))
            continue
        rows += grade_notebook(nb_path, timeout)
    print(format_table(rows))
    if csv_path is not None:
        write_csv(rows, csv_path)
        print(f"wrote {csv_path}")
    return 0
