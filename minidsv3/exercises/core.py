"""The exercise machinery: a task registry, ``check``, ``hint`` and watched calls.

A *task* is one function a student writes. Its checker (in one of the ``exNN_*``
modules) calls the student's function on several random and edge-case inputs,
compares each result with the package's reference and raises :class:`Fail` with a
specific message at the first mistake. ``check`` turns that into a one-line verdict:

    ✓ gate: passed (5 cases)
    ✗ gate: bias leaked into the weights: ...
    … gate: not implemented yet

and never lets an exception (or a traceback) escape into the notebook.

A task names its *references*: the package functions that compute its answer. While
the student's function runs, Python's profiler watches for calls of their code, so a
function that hands the work to the package fails, however it got hold of it.
"""

from __future__ import annotations

import inspect
import linecache
import sys
from contextvars import ContextVar
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping, Sequence

SYMBOL = {"pass": "✓", "fail": "✗", "todo": "…"}


class Fail(Exception):
    """A checker found a mistake; the message says what it is, in the student's terms."""


class NotDone(Exception):
    """The student's function still raises NotImplementedError."""


class Rejected(BaseException):
    """This call cannot count: the function used a reference, or gave no answer at all.

    A BaseException, so that no checker's ``except Exception`` mistakes it for an
    exception of the student's code: it goes straight to ``run_check``.
    """


@dataclass(frozen=True)
class Task:
    name: str  # the task name, also the name of the function the student writes
    set_id: str  # the exercise set (= the student notebook's stem), e.g. "03_deepseekmoe"
    checker: Callable[[Callable], int]  # runs the cases, returns how many passed
    hints: tuple[str, ...]
    references: tuple[Callable, ...]  # package functions the student's function may not call


@dataclass(frozen=True)
class Verdict:
    task: str
    status: str  # "pass" | "fail" | "todo"
    message: str

    def line(self) -> str:
        return f"{SYMBOL.get(self.status, '?')} {self.task}: {self.message}"


TASKS: dict[str, Task] = {}


def task(set_id: str, name: str, hints: list[str], references: Sequence[Callable] = ()):
    """Register the decorated checker as task ``name`` of exercise set ``set_id``."""

    def register(checker: Callable[[Callable], int]) -> Callable[[Callable], int]:
        if name in TASKS:
            raise ValueError(f"task {name!r} is registered twice; task names must be unique")
        TASKS[name] = Task(name, set_id, checker, tuple(hints), tuple(references))
        return checker

    return register


def tasks_of(set_id: str) -> list[str]:
    """Task names of one exercise set, in the order they were registered."""
    return [t.name for t in TASKS.values() if t.set_id == set_id]


def exercise_sets() -> list[str]:
    return sorted({t.set_id for t in TASKS.values()})


# ---------------------------------------------------------------------------------
# Calling student code
# ---------------------------------------------------------------------------------
# The references of the task run_check is checking: code object -> "minidsv3.moe.balance_loss"
WATCHED: ContextVar[Mapping] = ContextVar("WATCHED", default=MappingProxyType({}))


def references_of(name: str) -> dict:
    """Code objects of task ``name``'s references (decorators unwrapped), with their names."""
    return {inspect.unwrap(ref).__code__: f"{ref.__module__}.{ref.__qualname__}"
            for ref in TASKS[name].references} if name in TASKS else {}


def run_watched(fn: Callable, args: tuple, watched: Mapping):
    """``fn(*args)``, but raise Rejected if it called (at any depth) a function in ``watched``."""
    if not watched:
        return fn(*args)
    called = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code in watched:
            called.append(watched[frame.f_code])

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        return fn(*args)
    finally:  # raising here replaces whatever the function returned or raised
        switched_off = sys.getprofile() is not profile
        sys.setprofile(previous)
        if called:
            raise Rejected(f"your function calls {called[0]}, the package's own answer to "
                           "this task: write the computation yourself")
        if switched_off:
            raise Rejected("your function switched off the profiler (sys.setprofile) that "
                           "the check uses to see which functions it calls")


def describe_exception(err: BaseException, fn: Callable) -> str:
    """'ValueError: msg (line 4 of your function: `x = ...`)': no traceback, just the line."""
    if hasattr(err, "student_description"):  # raised in the notebook's kernel, described there
        return err.student_description
    text = type(err).__name__ + (f": {err}" if str(err) else "")
    code = getattr(fn, "__code__", None)
    tb, where = err.__traceback__, None
    while tb is not None:  # the innermost frame that is in the student's cell
        if code is not None and tb.tb_frame.f_code.co_filename == code.co_filename:
            where = tb
        tb = tb.tb_next
    if where is not None:
        line = linecache.getline(code.co_filename, where.tb_lineno).strip()
        shown = f": `{line}`" if line else ""
        text += f" (line {where.tb_lineno - code.co_firstlineno + 1} of your function{shown})"
    return text


def call(fn: Callable, *args, case: str = ""):
    """Call the student's function; turn any exception into a Fail that names it."""
    try:
        return run_watched(fn, args, WATCHED.get())
    except NotImplementedError as err:
        raise NotDone(str(err)) from err
    except Exception as err:  # anything the student's code raises becomes a verdict
        where = f" on {case}" if case else ""
        raise Fail(f"your function raised {describe_exception(err, fn)}{where}") from None


def run_check(name: str, fn: Callable) -> Verdict:
    """Run the checker of task ``name`` on ``fn`` and return the verdict (prints nothing)."""
    if name not in TASKS:
        return Verdict(name, "fail", f"there is no task named {name!r}; tasks are "
                                     f"{', '.join(sorted(TASKS))}")
    if not callable(fn):
        return Verdict(name, "fail", f"check needs your function, got {type(fn).__name__}; "
                                     f"write check({name!r}, your_function)")
    watching = WATCHED.set(references_of(name))
    try:
        n_cases = TASKS[name].checker(fn)
    except Rejected as err:
        return Verdict(name, "fail", str(err))
    except NotDone as err:
        other = str(err).split(":")[0]
        if other != name and other in TASKS:  # e.g. gate calls a group_limited_topk stub
            return Verdict(name, "todo", f"not implemented yet: it calls {other}, which is "
                                         "still a stub")
        return Verdict(name, "todo", "not implemented yet (replace the "
                                     "`raise NotImplementedError` line with your code)")
    except Fail as err:
        return Verdict(name, "fail", str(err))
    except Exception as err:  # the result had a form the checker could not even compare
        return Verdict(name, "fail", "your function returned something the check could not "
                                     f"compare ({type(err).__name__}: {err})")
    finally:
        WATCHED.reset(watching)
    return Verdict(name, "pass", f"passed ({n_cases} case{'s' if n_cases != 1 else ''})")


# ---------------------------------------------------------------------------------
# What students call
# ---------------------------------------------------------------------------------
def check(task_or_fn, fn: Callable | None = None) -> None:
    """``check(my_function)`` or ``check("task_name", my_function)``: print the verdict."""
    if fn is None and isinstance(task_or_fn, str):
        print(f"✗ check: pass your function as well: check({task_or_fn!r}, your_function)")
        return
    if fn is None:
        fn = task_or_fn
        name = getattr(fn, "__name__", None)
        if name not in TASKS:
            print(f"✗ check: {name!r} is not a task name; write check(\"task_name\", {name}) "
                  f"with one of: {', '.join(sorted(TASKS))}")
            return
    else:
        name = task_or_fn
    print(run_check(name, fn).line())


def hint(name: str, number: int = 1) -> None:
    """Print hint ``number`` (1, 2, ...) of task ``name``."""
    if name not in TASKS:
        print(f"no task named {name!r}; tasks are {', '.join(sorted(TASKS))}")
        return
    hints = TASKS[name].hints
    if not isinstance(number, int) or not 1 <= number <= len(hints):
        print(f"{name} has {len(hints)} hints: hint({name!r}, 1) ... hint({name!r}, {len(hints)})")
        return
    more = f"  (more: hint({name!r}, {number + 1}))" if number < len(hints) else ""
    print(f"hint {number}/{len(hints)} for {name}: {hints[number - 1]}{more}")
