"""Classroom exercises with instant feedback (notebooks in ``notebooks/exercises/``).

In a notebook::

    from minidsv3.exercises import check, hint
    check(gate)            # runs your `gate` against the package on several inputs
    hint("gate", 1)        # the first hint for task "gate"

Instructors: ``python -m minidsv3.exercises build`` regenerates the student notebooks
from the solutions; ``python -m minidsv3.exercises grade PATH...`` grades submissions.
"""

from . import (  # noqa: F401  (importing registers each set's tasks)
    ex01_rope_yarn,
    ex02_mla,
    ex03_moe,
    ex04_balancing,
    ex05_mtp,
    ex06_training,
    ex07_speculative,
    ex08_scale,
    ex10_fp8,
)
from .core import TASKS, Verdict, check, exercise_sets, hint, run_check, tasks_of

__all__ = ["TASKS", "Verdict", "check", "exercise_sets", "hint", "run_check", "tasks_of"]
