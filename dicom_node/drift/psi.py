"""The population stability index (PSI): how far a recent distribution moved from a baseline.

``PSI = sum over bins of (r_i - b_i) * ln(r_i / b_i)`` with ``b_i`` and ``r_i`` the shares of the
baseline and the recent window in bin ``i``, each count plus :data:`SMOOTHING` (so an empty bin
costs a finite amount).  Numeric values are binned at the baseline's quantiles (fixed by the
baseline, so the recent window is measured against the baseline's own deciles), with one more
bin below and one above the baseline's range (a value the baseline never had is seen even when
the baseline was constant); categorical
values (a convolution kernel, positive yes/no) have one bin per category.  The usual reading:
below 0.1 stable, 0.1-0.25 a moderate shift, above 0.25 a significant one.

Pure functions over sequences: no catalog, no settings.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Added to every bin's count before the shares are taken (additive smoothing): an empty bin
#: would make ln(r/b) infinite, and a floor of a tiny share would make one stray value in a bin
#: the baseline never filled cost as much as a real shift.
SMOOTHING = 0.5
#: Categories kept by name (the baseline's most frequent); the rest share one ``(other)`` bin.
MAX_CATEGORIES = 12


@dataclass(frozen=True)
class Distribution:
    """The binned baseline and recent distributions of one feature and their PSI."""

    #: ``numeric`` or ``categorical``.
    kind: str
    #: One label per bin: ``< 1.25``, ``1.25 - 2.5``, ``>= 2.5``, or the category.
    bins: list[str]
    baseline: list[float]
    recent: list[float]
    psi: float


def psi(baseline_counts: Sequence[float], recent_counts: Sequence[float]) -> float:
    """PSI of two histograms over the same bins (counts or shares)."""
    b = np.asarray(baseline_counts, dtype=float)
    r = np.asarray(recent_counts, dtype=float)
    if b.shape != r.shape or b.sum() <= 0 or r.sum() <= 0:
        raise ValueError("psi needs two non-empty histograms over the same bins")
    bs = (b + SMOOTHING) / (b.sum() + SMOOTHING * b.size)
    rs = (r + SMOOTHING) / (r.sum() + SMOOTHING * r.size)
    return float(np.sum((rs - bs) * np.log(rs / bs)))


def quantile_edges(baseline: Sequence[float], bins: int) -> list[float]:
    """The baseline's minimum and the inner cut points of ``bins`` equal-count bins (ties
    merged): the lower edges of the in-range bins."""
    values = np.asarray(baseline, dtype=float)
    cuts = np.quantile(values, np.linspace(0.0, 1.0, bins + 1)[:-1], method="linear")
    return sorted({float(c) for c in cuts})


def _counts(values: Sequence[float], edges: Sequence[float], top: float) -> list[int]:
    """Counts per bin: below the baseline's minimum, each ``[edge, next edge)`` (the last up to
    and with ``top``, the baseline's maximum), above ``top``.  A constant baseline (every kVp
    120) is one in-range bin, and a value it never had lands in a bin of its own."""
    x = np.asarray(values, dtype=float)
    index = np.searchsorted(np.asarray(edges), x, side="right")
    index[x > top] = len(edges) + 1
    return [int(n) for n in np.bincount(index, minlength=len(edges) + 2)]


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def numeric(baseline: Sequence[float], recent: Sequence[float], bins: int = 10) -> Distribution:
    """PSI of a numeric feature over the baseline's quantile bins plus one bin below and one
    above the baseline's range."""
    edges = quantile_edges(baseline, bins)
    top = float(np.max(np.asarray(baseline, dtype=float)))
    uppers = [*edges[1:], top]
    labels = [f"< {_fmt(edges[0])}"]
    labels += [f"{_fmt(a)} - {_fmt(b)}" if a != b else _fmt(a) for a, b in zip(edges, uppers, strict=True)]
    labels.append(f"> {_fmt(top)}")
    b, r = _counts(baseline, edges, top), _counts(recent, edges, top)
    return Distribution("numeric", labels, _shares(b), _shares(r), psi(b, r))


def categorical(baseline: Sequence[str], recent: Sequence[str]) -> Distribution:
    """PSI of a categorical feature, one bin per category of either window."""
    base, rec = Counter(baseline), Counter(recent)
    known = [c for c, _ in base.most_common(MAX_CATEGORIES)]
    known += [c for c, _ in rec.most_common() if c not in known][: max(0, MAX_CATEGORIES - len(known))]
    labels = sorted(known)
    b = [base[c] for c in labels]
    r = [rec[c] for c in labels]
    rest_b = sum(base.values()) - sum(b)
    rest_r = sum(rec.values()) - sum(r)
    if rest_b or rest_r:
        labels.append("(other)")
        b.append(rest_b)
        r.append(rest_r)
    return Distribution("categorical", labels, _shares(b), _shares(r), psi(b, r))


def _shares(counts: Sequence[int]) -> list[float]:
    total = sum(counts)
    return [round(c / total, 4) if total else 0.0 for c in counts]


def is_number(value: object) -> bool:
    """A finite int or float (bools are categories)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
