"""A MONAI bundle and an nnU-Net v2 result folder, trained here on the chest phantom, run as
[[models]]: directly on a Volume, and end to end (storescu -> node -> SEG + SR -> storescp);
and the bundle's GPU settings on each device this machine has: its own AMP (autocast on CUDA,
a no-op on the CPU, masks still right) and ``batch_size`` reaching MONAI's sliding window."""

from __future__ import annotations

import json
import math
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch

from dicom_node.demo import (
    ChestSpec,
    Phantom,
    SeriesInfo,
    make_chest_phantom,
    slice_datasets,
    write_datasets,
)
from dicom_node.results.common import device_uid
from inference import PermanentError, Volume
from inference.bundle import MonaiBundleModel
from inference.gpu import amp_dtype
from inference.identity import file_digest, weights_digest
from inference.labels import LabelOverride
from inference.model import Model
from inference.nnunet import NnUNetModel
from inference.prediction import Code, Prediction
from tests.conftest import require_tool
from tests.integration.test_end_to_end import SEG_CLASS, SR_CLASS, archived, storescu
from tests.support import procs
from tests.support.node import node_config, start_node, wait_until
from tests.support.tiny_models import make_bundle, make_nnunet
from tests.unit.test_results_seg import masks_by_slice

pytestmark = [
    pytest.mark.integration,
    # Training both networks takes ~20 s on an idle 2-core machine, minutes on a busy one.
    pytest.mark.timeout(900),
    # torch.jit.script (the bundle's model.ts) is deprecated but supported in torch 2.x.
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]
CPU = torch.device("cpu")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return make_chest_phantom(ChestSpec())


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, phantom: Phantom) -> dict[str, Path]:
    """The trained bundle and nnU-Net folder (fold_1 a copy of fold_0: two folds to choose from)."""
    root = tmp_path_factory.mktemp("models")
    bundle = make_bundle(root / "phantom_bundle", phantom)
    nnunet = make_nnunet(root / "Dataset999_Phantom" / "nnUNetTrainer__nnUNetPlans__3d_fullres", phantom)
    shutil.copytree(nnunet / "fold_0", nnunet / "fold_1")
    return {"bundle": bundle, "nnunet": nnunet}


def check_phantom(prediction: Prediction, phantom: Phantom) -> dict[str, float]:
    """Lung and bone masks against the phantom's truth: Dice per label."""
    by_name = {s.label.name: s for s in prediction.segments}
    assert set(by_name) == {"lung", "bone"}
    assert by_name["lung"].label.type == Code("39607008", "SCT", "Lung")
    assert by_name["bone"].label.type == Code("272673000", "SCT", "Bone")
    scores = {
        "lung": dice(by_name["lung"].mask, phantom.masks["lungs"]),
        "bone": dice(by_name["bone"].mask, phantom.masks["bone"]),
    }
    assert scores["lung"] > 0.8 and scores["bone"] > 0.9, scores
    return scores


def test_bundle_runs_as_the_bundle_defines(folders: dict[str, Path], phantom: Phantom) -> None:
    """The bundle's pipeline (orientation, 4x4x5 mm spacing, window, sliding window, Invertd)
    gives masks on the volume's grid that match the phantom; identity from metadata and weights."""
    model = MonaiBundleModel(folders["bundle"], CPU, name="phantom-bundle")
    assert isinstance(model, Model)
    assert model.version == "0.1.0" and model.modalities == frozenset({"CT"})
    assert model.digest == file_digest(folders["bundle"] / "models" / "model.pt")
    prediction = model.predict(Volume(phantom.hu, phantom.affine, "CT"))
    assert prediction.model_digest == model.digest and prediction.model_version == "0.1.0"
    check_phantom(prediction, phantom)
    # The loader and the writer of the bundle were dropped, everything else kept.
    names = [type(t).__name__ for t in model.preprocessing.transforms]
    assert names == ["EnsureChannelFirstd", "Orientationd", "Spacingd", "ScaleIntensityRanged", "EnsureTyped"]
    assert [type(t).__name__ for t in model.postprocessing.transforms] == ["Activationsd", "Invertd", "AsDiscreted"]
    assert not (folders["bundle"] / "eval").exists()
    with pytest.raises(PermanentError, match="accepts CT, got modality 'MR'"):
        model.predict(Volume(phantom.hu, phantom.affine, "MR"))


def test_bundle_result_does_not_depend_on_the_storage_order(folders: dict[str, Path], phantom: Phantom) -> None:
    """The same voxels stored with rows and columns reversed give the same masks in patient
    space: the bundle's Orientationd and the inverse do their work on the MetaTensor's affine."""
    model = MonaiBundleModel(folders["bundle"], CPU, name="phantom-bundle")
    straight = model.predict(Volume(phantom.hu, phantom.affine, "CT"))
    affine = phantom.affine.copy()
    for axis in (1, 2):
        affine[:3, 3] += affine[:3, axis] * (phantom.hu.shape[axis] - 1)
        affine[:3, axis] *= -1
    flipped = model.predict(Volume(np.ascontiguousarray(phantom.hu[:, ::-1, ::-1]), affine, "CT"))
    for a, b in zip(straight.segments, flipped.segments, strict=True):
        assert dice(a.mask, b.mask[:, ::-1, ::-1]) > 0.99


def test_bundle_torchscript_weights_and_label_codes(folders: dict[str, Path], phantom: Phantom) -> None:
    """models/model.ts gives the masks model.pt gives (another digest); configured codes win."""
    own = Code("T-28000", "99HOSP", "Lung (site)")
    ts = MonaiBundleModel(
        folders["bundle"], CPU, name="b", version="0.1.0-ts", weights="model.ts",
        labels=[LabelOverride(1, category=own, type=own, color=(0, 0, 255))],
    )
    pt = MonaiBundleModel(folders["bundle"], CPU, name="b")
    assert ts.digest == file_digest(folders["bundle"] / "models" / "model.ts") != pt.digest
    volume = Volume(phantom.hu, phantom.affine, "CT")
    a, b = ts.predict(volume), pt.predict(volume)
    assert a.model_version == "0.1.0-ts"
    assert a.segments[0].label.type == own and a.segments[0].label.color == (0, 0, 255)
    for sa, sb in zip(a.segments, b.segments, strict=True):
        assert dice(sa.mask, sb.mask) > 0.999


def test_nnunet_predicts_from_memory_with_chosen_folds(folders: dict[str, Path], phantom: Phantom) -> None:
    """nnUNetPredictor on the in-memory volume matches the phantom; folds and checkpoint choose
    the weights and so the digest; a missing checkpoint is named."""
    root = folders["nnunet"]
    model = NnUNetModel(root, CPU, name="phantom-nnunet", folds=[0], mirroring=False)
    assert model.digest == file_digest(root / "fold_0" / "checkpoint_final.pth")
    assert model.version == f"sha256-{model.digest[:12]}" and model.modalities == frozenset({"CT"})
    prediction = model.predict(Volume(phantom.hu, phantom.affine, "CT"))
    check_phantom(prediction, phantom)
    both = NnUNetModel(root, CPU, name="phantom-nnunet", mirroring=False, version="2")
    assert both.folds == [0, 1]
    assert both.digest == weights_digest([root / f"fold_{f}" / "checkpoint_final.pth" for f in (0, 1)])
    assert both.predict(Volume(phantom.hu, phantom.affine, "CT")).model_version == "2"
    with pytest.raises(PermanentError, match=r"fold_0/checkpoint_best.pth does not exist"):
        NnUNetModel(root, CPU, name="x", folds=[0], checkpoint="checkpoint_best.pth")


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[procs.Server]:
    require_tool("storescp")
    server = procs.start_storescp(tmp_path / "archive")
    yield server
    server.stop()


@pytest.mark.slow
def test_bundle_and_nnunet_end_to_end(
    tmp_path: Path, folders: dict[str, Path], phantom: Phantom, archive: procs.Server, dciodvfy_clean: object
) -> None:
    """A CT sent with storescu comes back from both models as valid SEG + SR with the models'
    labels and masks matching the phantom, each Device UID from name, version and digest; and
    /api/models lists both with their digests and the rule that uses them."""
    info = SeriesInfo(seed="framework-models")
    files = write_datasets(slice_datasets(phantom.hu, phantom.affine, info), tmp_path / "ct")
    web_port = procs.free_port()
    config = node_config(
        tmp_path / "node",
        destinations=[{"name": "archive", "ae_title": "ARCHIVE", "host": procs.LOOPBACK, "port": archive.port}],
        rules=[{"name": "chest-ct", "match": {"Modality": "CT"}, "models": ["phantom-bundle", "phantom-nnunet"],
                "destinations": ["archive"]}],
        web={"enabled": True, "host": procs.LOOPBACK, "port": web_port},
    )
    config["models"] = [
        {"name": "phantom-bundle", "bundle": str(folders["bundle"])},
        {"name": "phantom-nnunet", "nnunet": str(folders["nnunet"]), "folds": [0], "mirroring": False,
         "version": "1.0.0"},
    ]
    node = start_node(tmp_path / "node", config)
    try:
        storescu(node.port, files)

        def ready() -> dict[str, list[pydicom.Dataset]] | None:
            got = archived(archive)
            return got if len(got.get(SEG_CLASS, [])) >= 2 and len(got.get(SR_CLASS, [])) >= 2 else None

        try:
            got = wait_until(ready, 240, what="two SEG + two SR in the archive")
        except TimeoutError:
            pytest.fail(f"results did not arrive; node logs:\n{node.logs()[-8000:]}")
        with urllib.request.urlopen(f"http://{procs.LOOPBACK}:{web_port}/api/models", timeout=60) as reply:
            listed = {m["name"]: m for m in json.loads(reply.read())}
    finally:
        node.stop()

    digests = {
        "phantom-bundle": ("0.1.0", file_digest(folders["bundle"] / "models" / "model.pt")),
        "phantom-nnunet": ("1.0.0", file_digest(folders["nnunet"] / "fold_0" / "checkpoint_final.pth")),
    }
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    for seg in got[SEG_CLASS]:
        dciodvfy_clean(seg.filename)  # type: ignore[operator]
        (name,) = [str(i.ManufacturerModelName) for i in seg.ContributingEquipmentSequence
                   if i.get("ManufacturerModelName") in digests]
        version, digest = digests[name]
        assert seg.DeviceUID == device_uid(name, version, digest)
        segmentation = hd.seg.segread(seg.filename)
        labels = {segmentation.get_segment_description(n).segment_label: n for n in segmentation.segment_numbers}
        assert set(labels) == {"lung", "bone"}
        masks = masks_by_slice(segmentation, sources, [(k, 1) for k in range(len(sources))], phantom.hu.shape)
        for label, truth in (("lung", phantom.masks["lungs"]), ("bone", phantom.masks["bone"])):
            desc = segmentation.get_segment_description(labels[label])
            assert desc.segmented_property_type.scheme_designator == "SCT"
            mask = masks[labels[label]]
            assert dice(mask, truth) > (0.8 if label == "lung" else 0.9), (name, label)
    for sr in got[SR_CLASS]:
        dciodvfy_clean(sr.filename)  # type: ignore[operator]
    for name, (version, digest) in digests.items():
        assert listed[name]["version"] == version and listed[name]["digest"] == digest
        assert listed[name]["rules"] == ["chest-ct"]
    assert listed["phantom-bundle"]["kind"] == "monai-bundle" and listed["phantom-nnunet"]["kind"] == "nnunet"
    assert listed["ct-tissue"]["kind"] == "builtin" and listed["ct-tissue"]["digest"] is None



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch.cuda.is_available() is false")
def test_bundle_and_nnunet_run_on_the_device_the_worker_gives(folders: dict[str, Path], phantom: Phantom) -> None:
    """On the worker's CUDA device both models put their networks there and give the CPU's masks."""
    cuda = torch.device("cuda")
    volume = Volume(phantom.hu, phantom.affine, "CT")
    for build in (
        lambda d: MonaiBundleModel(folders["bundle"], d, name="b"),
        lambda d: NnUNetModel(folders["nnunet"], d, name="n", folds=[0], mirroring=False),
    ):
        on_gpu, on_cpu = build(cuda), build(CPU)
        net = on_gpu.network if isinstance(on_gpu, MonaiBundleModel) else on_gpu.predictor.network
        assert next(net.parameters()).device.type == "cuda"
        for a, b in zip(on_gpu.predict(volume).segments, on_cpu.predict(volume).segments, strict=True):
            assert dice(a.mask, b.mask) > 0.99


# -- GPU settings: the bundle's own AMP and [[models]] batch_size, on each device -----------------

CUDA_PARAM = pytest.param(
    "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
)
DEVICES = ["cpu", CUDA_PARAM]


class Recorder(torch.nn.Module):
    """The bundle's network, wrapped to count its calls and record each batch's size and the
    dtype its output came out in (float16 under CUDA autocast)."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network
        self.batches: list[int] = []
        self.dtypes: list[torch.dtype] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.network(x)
        self.batches.append(int(x.shape[0]))
        self.dtypes.append(out.dtype)
        return out  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, folders: dict[str, Path]) -> dict[str, Path]:
    """The tiny bundle as trained, and a copy whose inference config declares AMP the Model Zoo
    way (its evaluator's ``"amp": true``)."""
    plain = folders["bundle"]
    amp = tmp_path_factory.mktemp("gpu-bundles") / "amp"
    shutil.copytree(plain, amp)
    config = json.loads((amp / "configs" / "inference.json").read_text())
    config["evaluator"] = {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataset",
                           "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                           "amp": True}
    (amp / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
    return {"plain": plain, "amp": amp}


@pytest.mark.parametrize("device", DEVICES)
def test_bundle_amp_autocasts_on_cuda_and_is_a_no_op_on_the_cpu(
    bundles: dict[str, Path], phantom: Phantom, device: str
) -> None:
    """The bundle that declares AMP runs its network under float16 autocast on CUDA and in
    float32 on the CPU; its masks match the phantom's truth and the masks without AMP."""
    dev = torch.device(device)
    volume = Volume(phantom.hu, phantom.affine, "CT")
    declared = MonaiBundleModel(bundles["amp"], dev, name="amp")
    assert declared.amp is True
    assert MonaiBundleModel(bundles["plain"], dev, name="plain").amp is False
    overridden = MonaiBundleModel(bundles["amp"], dev, name="off", amp=False)
    assert overridden.amp is False
    recorder = Recorder(declared.network)
    declared.network = recorder
    with_amp = declared.predict(volume)
    assert recorder.batches and set(recorder.dtypes) == {amp_dtype(dev, True) or torch.float32}
    check_phantom(with_amp, phantom)
    without = overridden.predict(volume)
    for a, b in zip(with_amp.segments, without.segments, strict=True):
        if dev.type == "cpu":
            assert np.array_equal(a.mask, b.mask)  # a no-op: bit for bit the same
        else:
            assert dice(a.mask, b.mask) > 0.99  # float16 logits: a few border voxels may flip


@pytest.mark.parametrize("device", DEVICES)
def test_batch_size_reaches_the_bundle_sliding_window(
    bundles: dict[str, Path], phantom: Phantom, device: str
) -> None:
    """Unset, the bundle's own ``sw_batch_size`` (2) holds; ``batch_size = 3`` replaces it: the
    network sees batches of 3 and is called ceil(windows / 3) times, with the same masks."""
    dev = torch.device(device)
    volume = Volume(phantom.hu, phantom.affine, "CT")
    own = MonaiBundleModel(bundles["plain"], dev, name="own")
    assert own.batch_size == 2
    runs = {}
    for batch_size in (1, 3):
        model = MonaiBundleModel(bundles["plain"], dev, name=f"b{batch_size}", batch_size=batch_size)
        assert model.batch_size == batch_size and model.inferer.sw_batch_size == batch_size
        recorder = Recorder(model.network)
        model.network = recorder
        runs[batch_size] = (model.predict(volume), recorder.batches)
    windows = len(runs[1][1])
    assert windows > 3 and set(runs[1][1]) == {1}
    calls = runs[3][1]
    assert sum(calls) == windows and len(calls) == math.ceil(windows / 3) and max(calls) == 3
    for a, b in zip(runs[1][0].segments, runs[3][0].segments, strict=True):
        assert np.array_equal(a.mask, b.mask)
    check_phantom(runs[3][0], phantom)
