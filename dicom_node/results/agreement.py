"""Agreement of two models' predictions on the same series: volumes, findings, Dice.

Shadow mode (``dicom_node.shadow``) compares a shadow model with a live model.  The source of
the comparison is a compact file the worker writes next to a job's results in the outbox,
``prediction.npz`` (:func:`prediction_archive`): every segment's mask bit-packed and
compressed, its label (name, type code, kind), tracking id, confidence, and the geometry of
every slice.  It was preferred over decoding the SEG objects because (1) a rule's destinations
may not ask for a SEG at all (an SR-only archive), (2) a SEG stores only frames with content
and its decoding back to the voxel grid depends on frame-ordering details, and (3) both masks
are in the very voxel grid of the series the worker loaded, so Dice is exact, with no
resampling.  It costs little: 0.6 MB for 4 body-sized regions and 10 nodules on 512x512x300.

Everything here is numpy only (no DICOM, no catalog), so the maths is unit-testable.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from inference.prediction import VOLUME, Prediction, SegmentKind
from inference.volume import Volume

#: File name of the saved prediction inside a job's outbox folder.
PREDICTION_FILE = "prediction.npz"
#: Two findings match when their centres are at most this far apart (mm), or their masks overlap.
DEFAULT_RADIUS_MM = 10.0


@dataclass
class StoredSegment:
    """One segment of a saved prediction."""

    name: str
    type_code: str
    kind: str
    tracking_id: str
    mask: np.ndarray
    confidence: float | None = None
    #: Centre in LPS mm (the model's, else the mask's centroid).
    centre: tuple[float, float, float] | None = None
    volume_ml: float = 0.0


@dataclass
class StoredPrediction:
    """A saved prediction: its segments and the voxel grid they live in."""

    model: str
    version: str
    shape: tuple[int, int, int]
    #: Per slice: LPS origin (3), row step (3), column step (3), voxel volume in ml (1).
    slices: np.ndarray
    segments: list[StoredSegment] = field(default_factory=list)

    @property
    def findings(self) -> list[StoredSegment]:
        return [s for s in self.segments if s.kind == SegmentKind.LESION.value]


def slice_geometry(volume: Volume) -> np.ndarray:
    """Per slice ``[origin(3), row step(3), column step(3), voxel ml]``: one regular volume or
    every stack of a ``StackedVolume`` (which has no single affine)."""
    parts = volume.stack_volumes() if hasattr(volume, "stack_volumes") else [volume]
    rows = []
    for part in parts:
        a = part.affine
        n = part.shape[0]
        origins = a[:3, 3] + np.arange(n)[:, None] * a[:3, 0]
        ml = abs(float(np.linalg.det(a[:3, :3]))) / 1000.0
        rows.append(np.column_stack([origins, np.tile(a[:3, 1], (n, 1)), np.tile(a[:3, 2], (n, 1)),
                                     np.full(n, ml)]))
    return np.concatenate(rows).astype(np.float64)


def centroid_mm(mask: np.ndarray, slices: np.ndarray) -> tuple[float, float, float] | None:
    """Centroid of ``mask`` in LPS mm from the per-slice geometry (None when empty).

    From per-slice sums (voxel count, row and column index sums), so a body-sized mask needs no
    voxel list: the position is linear in (row, column) within each slice.
    """
    per_row = mask.sum(axis=2, dtype=np.int64)  # (slices, rows)
    counts = per_row.sum(axis=1)
    total = int(counts.sum())
    if total == 0:
        return None
    row_sums = per_row @ np.arange(mask.shape[1], dtype=np.int64)
    col_sums = mask.sum(axis=1, dtype=np.int64) @ np.arange(mask.shape[2], dtype=np.int64)
    centre = (counts @ slices[:, 0:3] + row_sums @ slices[:, 3:6] + col_sums @ slices[:, 6:9]) / total
    return (float(centre[0]), float(centre[1]), float(centre[2]))


def mask_volume_ml(mask: np.ndarray, slices: np.ndarray) -> float:
    """Volume of ``mask`` in ml (voxel volume may differ per stack)."""
    per_slice = mask.reshape(mask.shape[0], -1).sum(axis=1, dtype=np.int64)
    return float((per_slice * slices[:, 9]).sum())


def prediction_archive(prediction: Prediction, volume: Volume) -> bytes:
    """The bytes of ``prediction.npz`` for ``prediction`` in ``volume``'s grid (see the module)."""
    slices = slice_geometry(volume)
    meta: list[dict[str, Any]] = []
    arrays: dict[str, np.ndarray] = {"slices": slices}
    for i, seg in enumerate(prediction.segments):
        volume_ml = next((m.value for m in seg.measurements if m.name == VOLUME), None)
        meta.append({
            "name": seg.label.name,
            "type_code": f"{seg.label.type.scheme_designator}:{seg.label.type.value}",
            "kind": seg.label.kind.value,
            "tracking_id": seg.tracking_id,
            "confidence": seg.confidence,
            "centre": list(seg.centre) if seg.centre is not None else None,
            "volume_ml": float(volume_ml) if volume_ml is not None else None,
        })
        arrays[f"mask{i}"] = np.packbits(seg.mask.ravel())
    header = {"model": prediction.model_name, "version": prediction.model_version,
              "shape": list(volume.shape), "segments": meta}
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub wants a path-like
    return buf.getvalue()


def read_prediction(path: Path) -> StoredPrediction:
    """Read a ``prediction.npz`` (``FileNotFoundError`` when the job kept none)."""
    with np.load(path, allow_pickle=False) as data:
        header = json.loads(bytes(data["header"]).decode())
        n0, n1, n2 = (int(n) for n in header["shape"])
        shape = (n0, n1, n2)
        slices = np.array(data["slices"])
        size = int(np.prod(shape))
        segments = []
        for i, m in enumerate(header["segments"]):
            mask = np.unpackbits(data[f"mask{i}"], count=size).view(bool).reshape(shape)
            # Only findings are matched by their centres: no centroid for region masks.
            centre = (float(m["centre"][0]), float(m["centre"][1]), float(m["centre"][2])) if m.get("centre") \
                else centroid_mm(mask, slices) if m["kind"] == SegmentKind.LESION.value else None
            vol = m.get("volume_ml")
            segments.append(StoredSegment(
                name=m["name"], type_code=m["type_code"], kind=m["kind"], tracking_id=m["tracking_id"],
                mask=mask, confidence=m.get("confidence"), centre=centre,
                volume_ml=float(vol) if vol is not None else mask_volume_ml(mask, slices),
            ))
    return StoredPrediction(header["model"], header["version"], shape, slices, segments)


# -- the maths --------------------------------------------------------------------------------


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient 2|A∩B| / (|A|+|B|); 1.0 when both masks are empty (both found nothing:
    they agree)."""
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(a, b).sum()) / total


def _same_label(x: StoredSegment, y: StoredSegment) -> bool:
    """Labels match by name (case-insensitive) or by their coded type."""
    return x.name.casefold() == y.name.casefold() or (bool(x.type_code) and x.type_code == y.type_code)


def label_pairs(shadow: Sequence[StoredSegment], live: Sequence[StoredSegment]) -> list[tuple[str, str]]:
    """(shadow label name, live label name) pairs that denote the same thing."""
    names_s = list(dict.fromkeys(s.name for s in shadow))
    names_l = list(dict.fromkeys(s.name for s in live))
    first = {s.name: s for s in reversed(shadow)}
    first_l = {s.name: s for s in reversed(live)}
    pairs, used = [], set()
    for ns in names_s:
        # Same name first, else same code: "bone"/"Bone", or "Bone"/"Osseous tissue" coded alike.
        match = next((nl for nl in names_l if nl not in used and nl.casefold() == ns.casefold()), None)
        if match is None:
            match = next((nl for nl in names_l if nl not in used and _same_label(first[ns], first_l[nl])), None)
        if match is not None:
            used.add(match)
            pairs.append((ns, match))
    return pairs


def _union(segments: Sequence[StoredSegment], shape: tuple[int, ...], name: str | None = None) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    for s in segments:
        if name is None or s.name == name:
            out |= s.mask
    return out


def _bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The bounding box of ``mask`` (None when empty)."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def _overlap(a: StoredSegment, box_a: tuple[slice, ...] | None, b: StoredSegment,
             box_b: tuple[slice, ...] | None) -> bool:
    """Whether two masks share a voxel, looking only where their bounding boxes meet."""
    if box_a is None or box_b is None:
        return False
    common = tuple(slice(max(x.start, y.start), min(x.stop, y.stop)) for x, y in zip(box_a, box_b, strict=True))
    if any(c.start >= c.stop for c in common):
        return False
    return bool(np.logical_and(a.mask[common], b.mask[common]).any())


def match_findings(shadow: Sequence[StoredSegment], live: Sequence[StoredSegment],
                   radius_mm: float = DEFAULT_RADIUS_MM) -> list[dict[str, Any]]:
    """Greedy one-to-one matching of findings: nearest centres first; a pair matches when its
    centres are within ``radius_mm`` or its masks overlap."""
    candidates = []
    boxes_s = [_bbox(s.mask) for s in shadow]
    boxes_l = [_bbox(lv.mask) for lv in live]
    for i, s in enumerate(shadow):
        for j, lv in enumerate(live):
            overlap = _overlap(s, boxes_s[i], lv, boxes_l[j])
            dist = (float(np.linalg.norm(np.subtract(s.centre, lv.centre)))
                    if s.centre is not None and lv.centre is not None else float("inf"))
            if overlap or dist <= radius_mm:
                candidates.append((dist, i, j, overlap))
    matched, used_s, used_l = [], set(), set()
    for dist, i, j, overlap in sorted(candidates, key=lambda c: c[0]):
        if i in used_s or j in used_l:
            continue
        used_s.add(i)
        used_l.add(j)
        matched.append({"shadow": shadow[i].tracking_id, "live": live[j].tracking_id,
                        "distance_mm": round(dist, 2) if np.isfinite(dist) else None, "overlap": overlap,
                        "dice": round(dice(shadow[i].mask, live[j].mask), 4)})
    return matched


@dataclass(frozen=True)
class Agreement:
    """What :func:`compare` found."""

    dice: float | None
    basis: str
    shadow_findings: int
    live_findings: int
    matched_findings: int
    detail: dict[str, Any]


def compare(shadow: StoredPrediction, live: StoredPrediction, radius_mm: float = DEFAULT_RADIUS_MM) -> Agreement:
    """Volumes per label of each model, Dice per matched label pair (their mean is ``dice``,
    ``basis = "labels"``; with no label in common the Dice of the overall foreground,
    ``basis = "foreground"``), and the matched findings."""
    volumes = {
        "shadow": {n: round(sum(s.volume_ml for s in shadow.segments if s.name == n), 3)
                   for n in dict.fromkeys(s.name for s in shadow.segments)},
        "live": {n: round(sum(s.volume_ml for s in live.segments if s.name == n), 3)
                 for n in dict.fromkeys(s.name for s in live.segments)},
    }
    s_find, l_find = shadow.findings, live.findings
    if shadow.shape != live.shape:
        return Agreement(None, "grid differs", len(s_find), len(l_find), 0,
                         {"volumes_ml": volumes, "why": f"shadow grid {shadow.shape} != live grid {live.shape}"})
    per_label = {}
    for ns, nl in label_pairs(shadow.segments, live.segments):
        d = dice(_union(shadow.segments, shadow.shape, ns), _union(live.segments, live.shape, nl))
        per_label[ns if ns == nl else f"{ns} / {nl}"] = round(d, 4)
    if per_label:
        value, basis = float(np.mean(list(per_label.values()))), "labels"
    else:
        value = dice(_union(shadow.segments, shadow.shape), _union(live.segments, live.shape))
        basis = "foreground"
    matched = match_findings(s_find, l_find, radius_mm)
    detail = {"volumes_ml": volumes, "dice_per_label": per_label, "matched": matched, "radius_mm": radius_mm,
              "shadow_version": shadow.version, "live_version": live.version}
    return Agreement(round(value, 4), basis, len(s_find), len(l_find), len(matched), detail)
