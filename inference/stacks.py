"""A volume made of several regular stacks, and a model run over it stack by stack.

Some protocols acquire one series as consecutive regular stacks of different slice spacing (a
head CT: 4 mm through the posterior fossa, then 7 mm above).  No single affine maps such a
series, and resampling it would move the results off the source voxels.  Instead each stack is
a :class:`~inference.volume.Volume` of its own (its exact affine, gantry tilt included), the
model runs on each, and the predictions are joined slice for slice into one prediction over
the whole series, so that every result voxel stays exactly on a source voxel.

Joining: a region (same tracking id in several stacks) becomes one segment whose volume is the
sum and whose mean is the volume-weighted mean of its parts (other measurements of a region have
no exact join and are left out, with a note); a lesion stays one segment of its stack, renamed
when its tracking id is already taken.  A lesion crossing the border of two stacks is found in
each stack separately: it is reported once per stack.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from inference.model import Model
from inference.prediction import MEAN, ML, VOLUME, Measurement, Prediction, Segment, SegmentKind
from inference.volume import Volume


@dataclass(frozen=True)
class StackedVolume(Volume):
    """Consecutive regular stacks sharing one orientation and pixel grid, each with its affine.

    ``affine`` is that of the first stack; ``index_to_patient`` and ``patient_to_index`` follow
    every slice to its own position.  There is no single slice spacing: :attr:`spacing` and
    :attr:`voxel_volume_ml` refuse; models get :meth:`stack_volumes`.
    """

    #: ``(start, stop)`` slice range of each stack, consecutive and covering the volume.
    stacks: tuple[tuple[int, int], ...] = ()
    #: The 4x4 voxel -> LPS affine of each stack (its slice 0 is the stack's first slice).
    stack_affines: tuple[np.ndarray, ...] = ()
    #: Metadata of each stack (e.g. its ``gantry_tilt_deg``), added to the shared ``metadata``.
    stack_metadata: tuple[dict[str, str], ...] = ()
    _origins: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.stacks) < 2 or len(self.stack_affines) != len(self.stacks):
            raise ValueError(f"a StackedVolume needs two or more stacks with one affine each, "
                             f"got {len(self.stacks)} stacks and {len(self.stack_affines)} affines")
        if self.stacks[0][0] != 0 or self.stacks[-1][1] != self.shape[0] or any(
            a[1] != b[0] or a[0] >= a[1] for a, b in zip(self.stacks, self.stacks[1:], strict=False)
        ):
            raise ValueError(f"stacks {self.stacks} do not cover the {self.shape[0]} slices in order")
        origins = np.concatenate([
            affine[:3, 3] + np.arange(stop - start)[:, None] * affine[:3, 0]
            for (start, stop), affine in zip(self.stacks, self.stack_affines, strict=True)
        ])
        object.__setattr__(self, "_origins", origins)

    @property
    def slice_origins(self) -> np.ndarray:
        """LPS position (mm) of voxel (row 0, column 0) of every slice, ``(slices, 3)``."""
        return self._origins

    @property
    def spacing(self) -> tuple[float, float, float]:
        raise ValueError("a volume of several stacks has no single slice spacing; use stack_volumes()")

    @property
    def voxel_volume_ml(self) -> float:
        raise ValueError("a volume of several stacks has no single voxel volume; use stack_volumes()")

    def stack_volumes(self) -> list[Volume]:
        """Each stack as a regular volume (a view of this one's voxels, no copy)."""
        return [
            Volume(array=self.array[start:stop], affine=affine, modality=self.modality,
                   metadata={**self.metadata, **meta})
            for (start, stop), affine, meta in zip(
                self.stacks, self.stack_affines, self.stack_metadata or ({},) * len(self.stacks),
                strict=True)
        ]

    def _origin_at(self, k: np.ndarray) -> np.ndarray:
        """Slice origin at fractional slice index ``k``, linear between (and beyond) slices."""
        n = len(self._origins)
        lower = np.clip(np.floor(k), 0, n - 2).astype(np.int64)
        t = (k - lower)[..., None]
        return np.asarray(self._origins[lower] * (1.0 - t) + self._origins[lower + 1] * t)

    def index_to_patient(self, index: np.ndarray) -> np.ndarray:
        idx = np.asarray(index, dtype=np.float64)
        in_plane = idx[..., 1:] @ self.affine[:3, 1:3].T
        return np.asarray(self._origin_at(idx[..., 0]) + in_plane)

    def patient_to_index(self, points: np.ndarray) -> np.ndarray:
        pts = np.asarray(points, dtype=np.float64)
        axes = self.affine[:3, 1:3]
        normal = np.cross(axes[:, 0], axes[:, 1])
        normal /= np.linalg.norm(normal)
        depth = self._origins @ normal
        if depth[-1] < depth[0]:  # the slices go against this normal: measure along them
            normal, depth = -normal, -depth
        order = np.arange(len(depth), dtype=np.float64)
        d = pts @ normal
        # Slice index along the normal, extrapolated linearly past the first and last slice.
        k = np.interp(d, depth, order)
        below, above = d < depth[0], d > depth[-1]
        k = np.where(below, (d - depth[0]) / (depth[1] - depth[0]), k)
        k = np.where(above, len(depth) - 1 + (d - depth[-1]) / (depth[-1] - depth[-2]), k)
        rows_cols = (pts - self._origin_at(k)) @ np.linalg.pinv(axes).T
        return np.concatenate([k[..., None], rows_cols], axis=-1)


def predict_stacked(model: Model, volume: StackedVolume) -> Prediction:
    """Run ``model`` on every stack of ``volume`` and join the predictions (see module doc)."""
    parts = [model.predict(stack) for stack in volume.stack_volumes()]
    return join_predictions(parts, volume)


def join_predictions(parts: Sequence[Prediction], volume: StackedVolume) -> Prediction:
    """One prediction over ``volume`` from one prediction per stack, in stack order."""
    stacks = volume.stacks
    shape = volume.shape
    voxel_ml = [float(abs(np.linalg.det(a[:3, :3]))) / 1000.0 for a in volume.stack_affines]
    out = Prediction(model_name=parts[0].model_name, model_version=parts[0].model_version)
    regions: dict[str, list[tuple[int, Segment]]] = {}
    used: set[str] = set()
    for i, part in enumerate(parts):
        for seg in part.segments:
            if seg.label.kind == SegmentKind.REGION:
                regions.setdefault(seg.tracking_id, []).append((i, seg))
    for tracking_id, members in regions.items():
        mask = np.zeros(shape, dtype=bool)
        for i, seg in members:
            mask[stacks[i][0]:stacks[i][1]] = seg.mask
        measurements, dropped = _join_measurements(members, voxel_ml)
        out.segments.append(replace(members[0][1], mask=mask, measurements=measurements))
        used.add(tracking_id)
        if dropped:
            out.notes.append(f"{tracking_id}: {', '.join(dropped)} measured per stack, not reported "
                             "for the series")
    for i, part in enumerate(parts):
        for seg in part.segments:
            if seg.label.kind == SegmentKind.REGION:
                continue
            mask = np.zeros(shape, dtype=bool)
            mask[stacks[i][0]:stacks[i][1]] = seg.mask
            tracking_id = seg.tracking_id
            if tracking_id in used:
                tracking_id = f"{tracking_id} (stack {i + 1})"
            used.add(tracking_id)
            key = None if seg.key_slice is None else seg.key_slice + stacks[i][0]
            out.segments.append(replace(seg, mask=mask, tracking_id=tracking_id, key_slice=key))
    notes = [describe_stacks(volume)]
    for part in parts:
        notes.extend(part.notes)
    out.notes = list(dict.fromkeys([*notes, *out.notes]))
    return out


def describe_stacks(volume: StackedVolume) -> str:
    """E.g. ``"processed as 2 regular stacks: 14 slices at 4.2 mm, then 14 at 7.4 mm"``."""
    parts = [
        f"{stop - start} slice{'s' if stop - start > 1 else ''} at "
        f"{float(np.linalg.norm(affine[:3, 0])):.3g} mm"
        for (start, stop), affine in zip(volume.stacks, volume.stack_affines, strict=True)
    ]
    return f"processed as {len(parts)} regular stacks: {', then '.join(parts)}"


def _join_measurements(
    members: list[tuple[int, Segment]], voxel_ml: list[float]
) -> tuple[list[Measurement], list[str]]:
    """Volume (ml) summed, mean weighted by each part's volume; the names of the others."""
    weights = [float(seg.mask.sum()) * voxel_ml[i] for i, seg in members]
    first = members[0][1]
    out: list[Measurement] = []
    dropped: list[str] = []
    for m in first.measurements:
        values = [next((x for x in seg.measurements if x.name == m.name and x.unit == m.unit), None)
                  for _, seg in members]
        if any(v is None for v in values):
            dropped.append(m.name.meaning)
            continue
        numbers = [float(v.value) for v in values if v is not None]
        if m.name == VOLUME and m.unit == ML:
            out.append(Measurement(m.name, sum(numbers), m.unit))
        elif m.name == MEAN and sum(weights) > 0:
            out.append(Measurement(m.name, float(np.average(numbers, weights=weights)), m.unit))
        else:
            dropped.append(m.name.meaning)
    return out, dropped
