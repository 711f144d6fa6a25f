"""A study of the built-in models' results on the chest phantom, for the viewer and library tests.

Series 1: a chest phantom CT with three nodules (14, 20 and 10 mm) and the SEG + SR of
ct-tissue, ct-lung-nodules and foreground on it.  Series 2 (same study): a chest phantom without
nodule, with the SR of ct-lung-nodules, which finds nothing there.  Every object comes from the
real models and the real encoders.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydicom.dataset import Dataset

from dicom_node.demo import Phantom, SeriesInfo, slice_datasets
from dicom_node.results import encode_results
from inference.models.ct_tissue import CtTissueModel
from inference.models.foreground import ForegroundModel
from inference.models.lung_nodules import LungNoduleModel
from inference.prediction import Prediction
from inference.volume import Volume
from tests.support.chest_nodules import chest_spec, make_nodule_phantom


@dataclass
class Study:
    """The files uploaded to Orthanc and what the models found."""

    uid: str
    files: list[Path] = field(default_factory=list)
    predictions: dict[str, Prediction] = field(default_factory=dict)
    phantom: Phantom | None = None
    sources: list[Dataset] = field(default_factory=list)
    seg: dict[str, Dataset] = field(default_factory=dict)
    #: Source image files of each series (0: with nodules, 1: without).
    series_files: dict[int, list[Path]] = field(default_factory=dict)
    #: Result files per model run (key as in ``predictions``) and the series they belong to.
    result_files: dict[str, tuple[int, list[Path]]] = field(default_factory=dict)


def _write(ds: Dataset, path: Path, study: Study) -> None:
    ds.save_as(path, enforce_file_format=True)
    study.files.append(path)


def build_study(folder: Path) -> Study:
    """Encode the real models' results on the phantom CT (two series of one study)."""
    folder.mkdir(parents=True, exist_ok=True)
    cpu = torch.device("cpu")
    case = make_nodule_phantom(chest_spec(seed=1), [14, 20, 10], vessels=4, seed=1)
    clean = make_nodule_phantom(chest_spec(seed=2), [], vessels=4, seed=2)
    info = SeriesInfo(seed="ohif-viewer")
    clean_info = SeriesInfo(
        seed="ohif-viewer-clean",
        study_uid=info.uid("study"),
        series_number=3,
        series_description="Chest phantom, no nodule",
    )
    study = Study(uid=info.uid("study"), phantom=case.phantom)
    runs = [
        (case.phantom, info, [CtTissueModel(cpu), LungNoduleModel(cpu), ForegroundModel(cpu)]),
        (clean.phantom, clean_info, [LungNoduleModel(cpu)]),
    ]
    for n, (phantom, series, models) in enumerate(runs):
        sources = slice_datasets(phantom.hu, phantom.affine, series)
        if n == 0:
            study.sources = sources
        for k, ds in enumerate(sources):
            _write(ds, folder / f"ct{n}_{k:03d}.dcm", study)
        study.series_files[n] = study.files[-len(sources) :]
        volume = Volume(phantom.hu, phantom.affine, "CT")
        refs = [(k, 1) for k in range(len(sources))]
        for model in models:
            prediction = model.predict(volume)
            key = prediction.model_name + ("" if n == 0 else " (no nodule)")
            study.predictions[key] = prediction
            result = encode_results(prediction, volume, sources, refs)
            paths = []
            if result.seg is not None:
                study.seg[key] = result.seg
                _write(result.seg, folder / f"seg{n}_{prediction.model_name}.dcm", study)
                paths.append(study.files[-1])
            _write(result.sr, folder / f"sr{n}_{prediction.model_name}.dcm", study)
            study.result_files[key] = (n, [*paths, study.files[-1]])
    return study
