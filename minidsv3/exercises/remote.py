"""Calling a student's function in the notebook's own kernel, from the grader.

The grader never runs student code in its own process: there, a notebook could replace
anything (``run_check``, the comparisons, torch itself). Each call goes to the kernel
that ran the notebook, and only *values* come back:

    grader (checker)                                 kernel (after the notebook's cells)
    StudentFunction("gate")(x, weight, ...)
      torch.save(args)        -> gate-1.pt  ───────▶ answer(globals(), "gate", ...)
                                                       gate(*args), watched for references
      torch.load(gate-1.reply, weights_only=True) ◀── torch.save(("returned", result))

The checker compares those values with the reference in the grader, so a notebook
passes only by returning the right results. ``weights_only`` loading accepts tensors,
numbers, strings and containers of them: a reply cannot run code in the grader.
"""

from __future__ import annotations

import builtins
import io
from pathlib import Path
from typing import Callable

import torch

from .core import Rejected, describe_exception, references_of, run_watched

REPLY_LIMIT = 256 * 2**20  # bytes; checker results are a few KiB


# ---------------------------------------------------------------------------------
# In the kernel
# ---------------------------------------------------------------------------------
def _builtin_base(cls: type) -> str:
    """The nearest built-in Exception class ``cls`` derives from: what the grader raises."""
    return next((c.__name__ for c in cls.__mro__
                 if c.__module__ == "builtins" and issubclass(c, Exception)), "Exception")


def answer(namespace: dict, name: str, request: str, reply: str) -> None:
    """Call the notebook's function ``name`` on the grader's arguments; save the outcome."""
    fn = namespace.get(name)
    if not callable(fn):
        outcome = ("missing",)
    else:
        args = torch.load(request, weights_only=False)  # the grader's own pickle (configs, modules)
        try:
            outcome = ("returned", run_watched(fn, args, references_of(name)))
        except Rejected as err:
            outcome = ("rejected", str(err))
        except NotImplementedError as err:
            outcome = ("todo", str(err))
        except BaseException as err:  # even sys.exit(): the grader reports it as a verdict
            outcome = ("raised", _builtin_base(type(err)), describe_exception(err, fn))
    try:
        torch.save(outcome, reply)
    except Exception as err:  # the result cannot be pickled (a generator, a lambda, ...)
        torch.save(("unsendable", f"{type(outcome[1]).__name__} ({err})"), reply)


# ---------------------------------------------------------------------------------
# In the grader
# ---------------------------------------------------------------------------------
def _rebuilt(base: str, description: str) -> Exception:
    """The student's exception, as its built-in base class, carrying the kernel's description."""
    cls = getattr(builtins, base, None)
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        cls = Exception
    try:
        err = cls(description)
    except TypeError:  # a class with a special constructor (UnicodeDecodeError, ...)
        err = Exception(description)
    err.student_description = description
    return err


def unpack(reply: Path, name: str):
    """Return what the function returned, or raise what it raised, from its reply file."""
    try:
        with open(reply, "rb") as f:
            data = f.read(REPLY_LIMIT + 1)
    except OSError:
        raise Rejected("the grader got no answer from your function (did the notebook "
                       "change the grader's way of calling it?)") from None
    if len(data) > REPLY_LIMIT:
        raise Rejected(f"your function's result is larger than {REPLY_LIMIT >> 20} MiB")
    try:
        outcome = torch.load(io.BytesIO(data), weights_only=True)
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise Rejected("the grader cannot read your function's result back; return tensors, "
                       f"numbers, strings or tuples and lists of them ({reason})") from None
    match outcome:
        case ("returned", value):
            return value
        case ("todo", str() as message):
            raise NotImplementedError(message)
        case ("raised", str() as base, str() as description):
            raise _rebuilt(base, description)
        case ("rejected", str() as message):
            raise Rejected(message)
        case ("missing",):
            raise Rejected(f"function {name} is not defined (was it renamed, or did its cell "
                           "fail?)")
        case ("unsendable", str() as what):
            raise Rejected(f"your function returned a {what} that cannot be sent to the grader; "
                           "return tensors, numbers, strings or tuples and lists of them")
    raise Rejected("the grader got an answer from your function that it does not understand")


class StudentFunction:
    """The notebook's function ``name`` as the checkers see it: every call runs in the kernel.

    ``run_in_kernel(code, name)`` executes one line of code in the kernel (raising
    Rejected when the notebook has stopped); arguments and replies are files in ``folder``.
    """

    def __init__(self, name: str, run_in_kernel: Callable[[str, str], None], folder: Path):
        self.__name__ = name
        self._run_in_kernel, self._folder, self._calls = run_in_kernel, folder, 0

    def __call__(self, *args):
        self._calls += 1
        request = self._folder / f"{self.__name__}-{self._calls}.pt"
        reply = request.with_suffix(".reply")
        torch.save(args, request)
        self._run_in_kernel(f"__import__('minidsv3.exercises.remote', fromlist=['answer'])"
                            f".answer(globals(), {self.__name__!r}, {str(request)!r}, "
                            f"{str(reply)!r})", self.__name__)
        return unpack(reply, self.__name__)
