"""Which slices of a series form regular stacks (loader rule 6), or why none do.

A series is one regular stack, or consecutive regular stacks of different spacing (a head CT's
posterior fossa at 4 mm then the cerebrum at 7 mm).  Every other arrangement is refused with its
cause: slices missing between two positions, a gap between two stacks, steps forming no stack.
"""

from __future__ import annotations

import numpy as np

from dicom_node.imaging.errors import SeriesError

#: Two positions closer than this (mm, along the slice normal) are "the same position".
POSITION_TOLERANCE_MM = 0.01
#: Slice positions may deviate from the regular grid by max(this fraction of a step, 0.01 mm).
RELATIVE_SPACING_TOLERANCE = 0.01
#: Fewest slices of one regular stack of a series made of stacks of different spacing.
MIN_STACK_SLICES = 3


def regular_stacks(positions: np.ndarray, normal: np.ndarray) -> list[tuple[int, int]]:
    """``(start, stop)`` of the regular stacks the slice ``positions`` (``(n, 3)`` LPS mm,
    sorted along the slice ``normal``) form, or SeriesError naming what is wrong.

    Consecutive equal steps make a run; a run of fewer than ``MIN_STACK_SLICES`` slices gives
    its slices back to the run after it when they are on that run's step.  Runs of that length
    meeting at one step of at most the larger spacing are stacks; a step that is a whole
    multiple of the spacing on both sides is slices missing, and any other odd step is refused.
    """
    n = len(positions)
    if n < MIN_STACK_SLICES:
        return [(0, n)]
    steps = np.diff(positions, axis=0)
    lengths = np.linalg.norm(steps, axis=1)

    def same(i: int, j: int) -> bool:
        tol = max(POSITION_TOLERANCE_MM, RELATIVE_SPACING_TOLERANCE * float(lengths[i]))
        return float(np.linalg.norm(steps[i] - steps[j])) <= tol

    runs: list[list[int]] = []
    start = 0
    while start < n:
        stop = min(start + 2, n)
        while stop < n and same(start, stop - 1):
            stop += 1
        runs.append([start, stop])
        start = stop
    if len(runs) == 1:
        return [(0, n)]
    for i in range(1, len(runs)):
        run, before = runs[i], runs[i - 1]
        while (run[1] - run[0] >= MIN_STACK_SLICES and 0 < before[1] - before[0] < MIN_STACK_SLICES
               and same(run[0], run[0] - 1)):
            run[0] -= 1
            before[1] -= 1
    runs = [r for r in runs if r[1] > r[0]]
    if len(runs) == 1:
        return [(0, n)]
    _explain_odd_steps(runs, positions, lengths, normal)
    return [(a, b) for a, b in runs]


def _explain_odd_steps(runs: list[list[int]], positions: np.ndarray, lengths: np.ndarray,
                       normal: np.ndarray) -> None:
    """Raise SeriesError naming the first step between ``runs`` that is not a change of
    spacing between two regular stacks; return when every one is."""
    axis = int(np.argmax(np.abs(normal)))

    def where(i: int, j: int | None = None, words: tuple[str, str] = ("between", "and")) -> str:
        """Positions i and j (i + 1), as the patient coordinate closest to the slice normal."""
        name, j = "xyz"[axis], i + 1 if j is None else j
        return (f"{words[0]} {name}={positions[i][axis]:.4g} {words[1]} "
                f"{name}={positions[j][axis]:.4g} mm")

    def spacing(run: list[int] | None) -> float | None:
        if run is None or run[1] - run[0] < MIN_STACK_SLICES:
            return None
        return float(lengths[run[0]])

    def close(a: float, b: float) -> bool:
        return abs(a - b) <= max(POSITION_TOLERANCE_MM, RELATIVE_SPACING_TOLERANCE * max(a, b))

    def describe(pair: list[list[int]]) -> str:
        words = ("two", "three", "four")
        counts = [f"{r[1] - r[0]} slices at {lengths[r[0]]:.3g} mm" for r in pair]
        return f"{words[len(pair) - 2] if len(pair) <= 4 else len(pair)} spacings: {' then '.join(counts)}"

    for i, run in enumerate(runs):
        prev = runs[i - 1] if i > 0 else None
        nxt = runs[i + 1] if i + 1 < len(runs) else None
        if run[1] - run[0] < MIN_STACK_SLICES:
            # Odd steps: those into, inside and out of this short run.
            odd = list(range(max(run[0] - 1, 0), min(run[1], len(lengths))))
            around = [s for s in (spacing(prev), spacing(nxt)) if s is not None]
            if around and all(close(around[0], s) for s in around):
                step = around[0]
                multiples = [round(float(lengths[j]) / step) for j in odd]
                if all(m >= 1 and close(float(lengths[j]), m * step) for j, m in zip(odd, multiples,
                                                                                   strict=True)) \
                        and max(multiples) >= 2:
                    j = next(j for j, m in zip(odd, multiples, strict=True) if m >= 2)
                    raise _missing(multiples[odd.index(j)] - 1, where(j), float(lengths[j]), step)
            lo, hi = float(lengths.min()), float(lengths.max())
            shown = ", ".join(f"{lengths[j]:.4g}" for j in odd[:6])
            raise SeriesError(
                f"irregular slice spacing: steps between {lo:.4g} and {hi:.4g} mm over "
                f"{len(positions)} slices; {where(odd[0], odd[-1] + 1, ('from', 'to'))} the steps "
                f"({shown} mm) form no regular stack of at least {MIN_STACK_SLICES} slices")
        if prev is None or prev[1] - prev[0] < MIN_STACK_SLICES:
            continue
        j = run[0] - 1  # the step from the last slice of prev to the first of run
        before, after, step = float(lengths[prev[0]]), float(lengths[run[0]]), float(lengths[j])
        if close(before, after):
            m = round(step / before)
            if m >= 2 and close(step, m * before):
                raise _missing(m - 1, where(j), step, before)
            if step > before and not close(step, before):
                raise SeriesError(
                    f"a gap of {step:.4g} mm {where(j)}, where the slices on either side are "
                    f"{before:.4g} mm apart: not a whole number of missing slices")
        elif step > max(before, after) and not close(step, max(before, after)):
            raise SeriesError(
                f"{describe([prev, run])}, with a gap of {step:.4g} mm {where(j)}: slices are "
                "missing between the two stacks")


def _missing(count: int, where: str, step: float, spacing: float) -> SeriesError:
    what = "a slice is" if count == 1 else f"{count} slices are"
    return SeriesError(f"{what} missing {where}: a {step:.4g} mm step where the slices on "
                       f"either side are {spacing:.4g} mm apart")
