"""Comparisons that explain themselves: each raises ``Fail`` saying *what* is wrong.

``expect_close`` compares a student's tensor with the reference. Before giving a
generic "wrong values" verdict it tries the task's known mistakes (``variants``:
the result a typical wrong implementation would give, with the message naming that
mistake) and then a few generic ones: wrong shape or swapped axes, NaN, a flipped
sign, a constant factor, a shift by one position.
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

import torch

from .core import Fail

Variant = tuple[Union[torch.Tensor, Callable[[], torch.Tensor]], str]


def as_tensor(got, what: str, expected: torch.Tensor) -> torch.Tensor:
    """The student's result as a detached tensor; plain numbers count for 0-d results."""
    if isinstance(got, torch.Tensor):
        return got.detach()
    if isinstance(got, (int, float)) and not isinstance(got, bool) and expected.dim() == 0:
        return torch.tensor(float(got), dtype=torch.float64)
    raise Fail(f"{what}: expected a torch.Tensor of shape {tuple(expected.shape)}, "
               f"got {type(got).__name__}")


def expect_tuple(got, names: Sequence[str], what: str) -> tuple:
    """The result must be a tuple (or list) with one item per name."""
    if not isinstance(got, (tuple, list)) or len(got) != len(names):
        kind = f"{len(got)} items" if isinstance(got, (tuple, list)) else type(got).__name__
        raise Fail(f"{what}: return a tuple ({', '.join(names)}), got {kind}")
    return tuple(got)


def shape_problem(got: torch.Size, expected: torch.Size) -> str:
    msg = f"wrong shape: expected {tuple(expected)}, got {tuple(got)}"
    if len(got) != len(expected):
        msg += f" ({len(got)} dimensions instead of {len(expected)})"
    elif sorted(got) == sorted(expected):
        msg += " (the same sizes in another order: are two axes swapped?)"
    elif got.numel() == expected.numel():
        msg += " (the right number of elements: reshaped in the wrong order?)"
    return msg


def _close(a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, atol=atol, rtol=rtol))


def _at(t: torch.Tensor, idx: tuple) -> str:
    return f"{t[idx].item():.6g}"


def generic_problem(g: torch.Tensor, e: torch.Tensor, atol: float, rtol: float,
                    shift_dim: int | None) -> str:
    """Name the mistake when no task-specific variant matched."""
    bad = ~torch.isfinite(g) & torch.isfinite(e)
    if bad.any():
        first = tuple(int(i) for i in bad.nonzero()[0])
        return (f"your result has {int(bad.sum())} NaN/inf values (first at index {first}); "
                "look for a division by zero or log of zero")
    if e.abs().max() > atol and _close(g, -e, atol, rtol):
        return "sign flipped: your result is minus the expected one"
    if e.abs().max() > atol and _close(g, torch.zeros_like(e), atol, rtol):
        return "your result is all zeros"
    denominator = (e * e).sum()
    if denominator > 0:
        c = float((g * e).sum() / denominator)
        if abs(c - 1) > 1e-3 and _close(g, c * e, atol, rtol):
            return f"off by a constant factor: your result is {c:.4g} × the expected one"
    if shift_dim is not None and g.shape[shift_dim] > 1:
        n = g.shape[shift_dim] - 1
        for s, words in ((1, "one position later"), (-1, "one position earlier")):
            mine = g.narrow(shift_dim, 0 if s > 0 else 1, n)
            ref = e.narrow(shift_dim, 1 if s > 0 else 0, n)
            if _close(mine, ref, atol, rtol):
                return f"off by one position: each of your values belongs {words}"
    err = (g - e).abs()
    tol = atol + rtol * e.abs()
    ratio = err / tol
    idx = tuple(int(i) for i in torch.unravel_index(ratio.argmax(), ratio.shape))
    share = float((ratio > 1).double().mean())
    return (f"wrong values: at index {idx} expected {_at(e, idx)}, got {_at(g, idx)} "
            f"(|error| {err[idx].item():.3g} is {ratio[idx].item():.3g}× the tolerance "
            f"{tol[idx].item():.2g}; {share:.0%} of the entries are off)")


def expect_close(got, expected: torch.Tensor, what: str, case: str, *,
                 variants: Sequence[Variant] = (), atol: float = 1e-5, rtol: float = 1e-4,
                 shift_dim: int | None = None) -> None:
    """Raise Fail unless ``got`` matches ``expected``; name the mistake if it is a known one."""
    g = as_tensor(got, what, expected)
    if g.is_complex() and not expected.is_complex():
        raise Fail(f"{what}: returned a complex tensor; turn the rotated pairs back into real "
                   f"numbers with torch.view_as_real(z).flatten(-2) (case: {case})")
    g, e = g.double(), expected.detach().double()
    if _close(g, e, atol, rtol):
        return
    for variant, message in variants:  # known mistakes first: some change the shape too
        v = variant() if callable(variant) else variant
        if _close(g, v.detach().double(), atol, rtol):
            raise Fail(f"{what}: {message} (case: {case})")
    if g.shape != e.shape:
        raise Fail(f"{what}: {shape_problem(g.shape, e.shape)} (case: {case})")
    raise Fail(f"{what}: {generic_problem(g, e, atol, rtol, shift_dim)} (case: {case})")


def _same(a, b) -> bool:
    if isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool(torch.equal(a.long(), b.long()))
    return a == b


def expect_equal(got, expected, what: str, case: str, *,
                 variants: Sequence[tuple[object, str]] = ()) -> None:
    """Exact comparison for whole numbers and integer tensors, with known mistakes."""
    is_tensor = isinstance(expected, torch.Tensor)
    g = as_tensor(got, what, expected) if is_tensor else got
    if _same(g, expected):
        return
    for value, message in variants:
        if isinstance(value, torch.Tensor) == is_tensor and _same(g, value):
            raise Fail(f"{what}: {message} (case: {case})")
    if is_tensor and g.shape != expected.shape:
        raise Fail(f"{what}: {shape_problem(g.shape, expected.shape)} (case: {case})")
    shown, mine = (expected.tolist(), g.tolist()) if is_tensor else (expected, got)
    raise Fail(f"{what}: expected {shown}, got {mine} (case: {case})")
