"""Generate the student notebooks from the solution notebooks, or check they are in sync.

    notebooks/exercises/solutions/NN_name_solution.ipynb   (written by hand, with outputs)
    notebooks/exercises/NN_name.ipynb                       (generated: never edit by hand)

In a solution, the code between ``### BEGIN SOLUTION`` and ``### END SOLUTION`` (inside
a function body) is the answer. The student version keeps everything else -- the
signature, the docstring, the statement, the check cells -- and replaces the marked
lines with a stub that raises ``NotImplementedError``. In a markdown cell, a worked
answer to a written question sits between ``<!-- BEGIN ANSWER -->`` and
``<!-- END ANSWER -->`` lines; the student version has a blank for it. Outputs and
execution counts are cleared; notebook metadata is reduced to the kernelspec, the
solution's language_info (what JupyterLab would write) and the exercise set (which the
grader reads).
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat

from .core import tasks_of

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
BEGIN_ANSWER, END_ANSWER = "<!-- BEGIN ANSWER -->", "<!-- END ANSWER -->"
ANSWER_BLANK = "*Your answer:*"
SUFFIX = "_solution"
# The notebook metadata JupyterLab writes when it opens a notebook with the project's kernel
# (`make install` registers it as python3, "Python 3 (ipykernel)"): the kernelspec, and the
# language_info the kernel reports. Committed notebooks carry exactly this, so that opening
# and closing one leaves nothing to save. Only language_info's "version" (Python's) varies
# between machines; notebooks/execute.py writes the one of the kernel that ran them.
KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
EXERCISES = Path(__file__).resolve().parents[2] / "notebooks" / "exercises"


class BuildError(ValueError):
    """A solution notebook breaks the marker rules; the message names the file and cell."""


def _enclosing_function(lines: list[str], start: int, indent: int) -> str:
    """Name of the ``def`` that contains line ``start`` (indented ``indent``)."""
    for line in reversed(lines[:start]):
        match = re.match(r"(\s*)(?:async\s+)?def\s+(\w+)", line)
        if match and len(match.group(1)) < indent:
            return match.group(2)
    return ""


def strip_solutions(source: str, where: str) -> str:
    """Replace every BEGIN/END SOLUTION region by a NotImplementedError stub."""
    lines, out, start = source.split("\n"), [], None
    for n, line in enumerate(lines):
        marker = line.strip()
        if marker == BEGIN:
            if start is not None:
                raise BuildError(f"{where}: nested {BEGIN} at line {n + 1}")
            start = n
            indent = len(line) - len(line.lstrip())
            name = _enclosing_function(lines, n, indent)
            if indent == 0 or not name:
                raise BuildError(f"{where}: {BEGIN} at line {n + 1} must sit inside a function "
                                 "body (the stub is a `raise` in that function)")
            pad = line[:indent]
            out += [f"{pad}# YOUR CODE HERE",
                    f'{pad}raise NotImplementedError("{name}: replace this line with your code")']
        elif marker == END:
            if start is None:
                raise BuildError(f"{where}: {END} at line {n + 1} without {BEGIN}")
            start = None
        elif start is None:
            out.append(line)
    if start is not None:
        raise BuildError(f"{where}: {BEGIN} at line {start + 1} is never closed")
    return "\n".join(out)


def strip_answers(source: str, where: str) -> str:
    """Replace every BEGIN/END ANSWER region of a markdown cell by a blank for the answer."""
    out, inside = [], False
    for n, line in enumerate(source.split("\n")):
        marker = line.strip()
        if marker == BEGIN_ANSWER:
            if inside:
                raise BuildError(f"{where}: nested {BEGIN_ANSWER} at line {n + 1}")
            inside = True
            out.append(ANSWER_BLANK)
        elif marker == END_ANSWER:
            if not inside:
                raise BuildError(f"{where}: {END_ANSWER} at line {n + 1} without {BEGIN_ANSWER}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise BuildError(f"{where}: {BEGIN_ANSWER} is never closed")
    return "\n".join(out)


def set_id_of(solution: Path) -> str:
    if not solution.stem.endswith(SUFFIX):
        raise BuildError(f"{solution}: solution notebooks are named NN_name{SUFFIX}.ipynb")
    return solution.stem[: -len(SUFFIX)]


def student_notebook(solution: Path) -> nbformat.NotebookNode:
    """The student version of one solution notebook."""
    set_id = set_id_of(solution)
    nb = nbformat.read(solution, as_version=4)
    all_code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    if BEGIN not in all_code:
        raise BuildError(f"{solution.name}: no {BEGIN} marker, nothing for students to write")
    for name in tasks_of(set_id):  # every registered task needs its check cell
        if not re.search(rf"check\(\s*(['\"]){name}\1|check\(\s*{name}\s*\)", all_code):
            raise BuildError(f"{solution.name}: task {name!r} of set {set_id!r} has no "
                             f"check({name}) cell")
    for n, cell in enumerate(nb.cells):
        cell.metadata = nbformat.NotebookNode()
        if cell.cell_type == "markdown":
            cell.source = strip_answers(cell.source, f"{solution.name}, cell {n + 1}")
        if cell.cell_type == "code":
            cell.source = strip_solutions(cell.source, f"{solution.name}, cell {n + 1}")
            cell.outputs = []
            cell.execution_count = None
    nb.metadata = nbformat.NotebookNode(
        kernelspec=KERNELSPEC, language_info=nb.metadata.get("language_info", {}),
        minidsv3={"exercise_set": set_id},
    )
    return nb


def build(exercises: Path = EXERCISES, check_only: bool = False
          ) -> tuple[list[Path], list[Path]]:
    """Write (or, with ``check_only``, only compare) every student notebook.

    Returns the student notebooks that were out of date (rewritten unless
    ``check_only``) and the student notebooks that no solution generates.
    """
    solutions = sorted((exercises / "solutions").glob(f"*{SUFFIX}.ipynb"))
    if not solutions:
        raise BuildError(f"no *{SUFFIX}.ipynb notebooks in {exercises / 'solutions'}")
    stale, targets = [], []
    for solution in solutions:
        target = exercises / f"{set_id_of(solution)}.ipynb"
        targets.append(target)
        text = nbformat.writes(student_notebook(solution))
        text += "" if text.endswith("\n") else "\n"  # as nbformat.write ends a file
        current = target.read_text(encoding="utf-8") if target.exists() else None
        if current != text:
            stale.append(target)
            if not check_only:
                target.write_text(text, encoding="utf-8")
    orphans = [p for p in sorted(exercises.glob("*.ipynb")) if p not in targets]
    return stale, orphans


def main(exercises: Path = EXERCISES, check_only: bool = False) -> int:
    """CLI entry: 0 when every student notebook is (now) in sync, 1 otherwise."""
    try:
        stale, orphans = build(exercises, check_only)
    except BuildError as err:
        print(f"error: {err}")
        return 1
    for path in orphans:
        print(f"{path}: no solution notebook generates it (delete it, or add "
              f"solutions/{path.stem}{SUFFIX}.ipynb)")
    for path in stale:
        print(f"{path}: out of sync with its solution (run `python -m minidsv3.exercises "
              f"build`)" if check_only else f"wrote {path}")
    if not stale and not orphans:
        print(f"student notebooks in {exercises} are in sync with their solutions")
    return 1 if orphans or (check_only and stale) else 0
