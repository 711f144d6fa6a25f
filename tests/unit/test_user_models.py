"""User TorchScript models: card validation, loading, patch-wise inference on the chest phantom."""

from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from dicom_node.demo import Phantom, make_chest_phantom
from inference import PermanentError, TransientError, Volume
from inference.model import Model
from inference.prediction import ML, VOLUME, SegmentKind
from inference.user_models import (
    CardError,
    TorchScriptModel,
    entry_point_factories,
    load_user_model,
    read_card,
    user_model_factory,
)

# The tiny test network is exported with torch.jit.script, deprecated (but supported) in torch 2.x.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)

CPU = torch.device("cpu")
# HU 300 after the [-1000, 400] window.
BONE_LEVEL = (300.0 + 1000.0) / 1400.0


class BoneThreshold(torch.nn.Module):
    """A fixed 1x1x1 convolution: logit > 0 where HU > 300 (channel 0 bone, channel 1 the rest)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, kernel_size=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([50.0, -50.0]).view(2, 1, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([-50.0 * BONE_LEVEL, 50.0 * BONE_LEVEL]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


CARD = """
name = "ct-bone-threshold"
version = "0.1.0"
modalities = ["CT"]

[input]
spacing = {spacing}
orientation = "{orientation}"
normalisation = {{ kind = "window", min = -1000, max = 400 }}

[inference]
patch_size = {patch}
overlap = {overlap}
blend = "gaussian"
amp = true

[output]
activation = "sigmoid"
threshold = 0.5

[[labels]]
name = "Bone"
channel = 0
kind = "region"
category = {{ value = "91723000", scheme = "SCT", meaning = "Anatomical Structure" }}
type = {{ value = "272673000", scheme = "SCT", meaning = "Bone" }}
color = [255, 255, 255]
"""


def _model_dir(
    root: Path,
    *,
    spacing: str = '"native"',
    orientation: str = "native",
    patch: str = "[16, 32, 32]",
    overlap: float = 0.5,
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    torch.jit.script(BoneThreshold()).save(str(root / "model.pt"))
    text = CARD.format(spacing=spacing, orientation=orientation, patch=patch, overlap=overlap)
    (root / "model.toml").write_text(text)
    return root


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2.0 * (a & b).sum() / (a.sum() + b.sum()))


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return make_chest_phantom()


def _volume(p: Phantom) -> Volume:
    return Volume(p.hu, p.affine, "CT")


def test_bone_model_matches_phantom_bone(tmp_path: Path, phantom: Phantom) -> None:
    """A scripted HU > 300 network, run patch-wise, segments the phantom's spine (Dice >= 0.9)."""
    model = load_user_model(_model_dir(tmp_path), CPU)
    assert isinstance(model, Model)
    assert (model.name, model.version, model.modalities) == ("ct-bone-threshold", "0.1.0", {"CT"})
    prediction = model.predict(_volume(phantom))
    (segment,) = prediction.segments
    assert segment.label.name == "Bone" and segment.label.kind is SegmentKind.REGION
    assert segment.label.type.value == "272673000" and segment.label.color == (255, 255, 255)
    assert _dice(segment.mask, phantom.masks["bone"]) >= 0.9
    (measurement,) = segment.measurements
    assert measurement.name == VOLUME and measurement.unit == ML
    assert measurement.value == pytest.approx(phantom.volumes_ml["bone"], rel=0.1)


def test_overlapping_windows_equal_one_whole_volume_pass(tmp_path: Path, phantom: Phantom) -> None:
    """Small overlapping patches give exactly the mask of one patch covering the whole volume."""
    small = load_user_model(_model_dir(tmp_path / "small", patch="[8, 24, 40]", overlap=0.4), CPU)
    shape = "[" + ", ".join(str(s) for s in phantom.hu.shape) + "]"
    whole = load_user_model(_model_dir(tmp_path / "whole", patch=shape, overlap=0.0), CPU)
    a = small.predict(_volume(phantom)).segments[0].mask
    b = whole.predict(_volume(phantom)).segments[0].mask
    assert a.any()
    np.testing.assert_array_equal(a, b)


def test_resampling_to_card_spacing_and_back(tmp_path: Path, phantom: Phantom) -> None:
    """A card asking for 7 mm voxels still returns a mask on the source grid close to the truth."""
    model = load_user_model(_model_dir(tmp_path, spacing="[7.0, 7.0, 7.0]"), CPU)
    mask = model.predict(_volume(phantom)).segments[0].mask
    assert mask.shape == phantom.hu.shape
    assert _dice(mask, phantom.masks["bone"]) >= 0.8


def test_lps_orientation_undoes_flipped_axes(tmp_path: Path, phantom: Phantom) -> None:
    """With orientation LPS, a volume stored with flipped rows gives the same (flipped) mask."""
    model = load_user_model(_model_dir(tmp_path, orientation="LPS"), CPU)
    affine = phantom.affine.copy()
    rows = phantom.hu.shape[1]
    affine[:3, 3] = affine[:3, 3] + (rows - 1) * affine[:3, 1]
    affine[:3, 1] = -affine[:3, 1]
    flipped = Volume(np.ascontiguousarray(phantom.hu[:, ::-1]), affine, "CT")
    mask = model.predict(flipped).segments[0].mask
    reference = model.predict(_volume(phantom)).segments[0].mask
    np.testing.assert_array_equal(mask[:, ::-1], reference)


def test_wrong_modality_is_refused(tmp_path: Path, phantom: Phantom) -> None:
    """An MR volume sent to a CT-only user model fails permanently, naming the modality."""
    model = load_user_model(_model_dir(tmp_path), CPU)
    with pytest.raises(PermanentError, match="accepts CT, got modality 'MR'"):
        model.predict(Volume(phantom.hu, phantom.affine, "MR"))


def test_cuda_out_of_memory_is_transient(tmp_path: Path, phantom: Phantom) -> None:
    """A network running out of CUDA memory surfaces as TransientError, so the job is retried."""
    card = read_card(_model_dir(tmp_path) / "model.toml")

    def out_of_memory(batch: torch.Tensor) -> torch.Tensor:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    model = TorchScriptModel(card, out_of_memory, CPU)  # type: ignore[arg-type]
    with pytest.raises(TransientError, match="CUDA out of memory running ct-bone-threshold"):
        model.predict(_volume(phantom))


def test_factory_loads_on_the_given_device(tmp_path: Path) -> None:
    """user_model_factory(path) builds the model for the device the registry passes."""
    model = user_model_factory(_model_dir(tmp_path))(CPU)
    assert model.name == "ct-bone-threshold"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace('name = "ct-bone-threshold"\n', ""), r"'name' is missing"),
        (
            lambda t: t.replace("overlap = 0.5", "overlap = 1.5"),
            r"'inference.overlap' must be in \[0, 1\), got 1.5",
        ),
        (
            lambda t: t.replace("patch_size = [16, 32, 32]", "patch_size = [16, 32]"),
            r"'inference.patch_size' must be three positive integers",
        ),
        (
            lambda t: t.replace('kind = "window"', 'kind = "minmax"'),
            r"'input.normalisation.kind' must be one of 'window', 'zscore', 'none', got 'minmax'",
        ),
        (
            lambda t: t.replace("min = -1000, max = 400", "min = 400, max = -1000"),
            r"'input.normalisation.max' must be above min",
        ),
        (
            lambda t: t.replace('spacing = "native"', 'spacing = "fine"'),
            r"'input.spacing' must be 'native' or \[slice, row, column\] mm",
        ),
        (
            lambda t: t.replace('scheme = "SCT", meaning = "Bone"', 'meaning = "Bone"'),
            r"'labels\[0\].type.scheme' is missing",
        ),
        (
            lambda t: t.replace('kind = "region"', 'kind = "organ"'),
            r"'labels\[0\].kind' must be one of 'region', 'lesion'",
        ),
        (
            lambda t: t.replace("threshold = 0.5", "threshold = 2"),
            r"'output.threshold' must be in \(0, 1\), got 2.0",
        ),
        (lambda t: t + "\n[[[", r"is not valid TOML"),
    ],
)
def test_card_errors_name_the_key(tmp_path: Path, edit: object, message: str) -> None:
    """Each broken card is refused with a CardError (a PermanentError) naming the offending key."""
    d = _model_dir(tmp_path)
    card = d / "model.toml"
    card.write_text(edit(card.read_text()))  # type: ignore[operator]
    with pytest.raises(CardError, match=message):
        load_user_model(d, CPU)
    assert issubclass(CardError, PermanentError)


def test_missing_files_are_reported(tmp_path: Path) -> None:
    """A missing directory, card or TorchScript file, or a non-TorchScript file, is named."""
    with pytest.raises(PermanentError, match=r"model directory .* does not exist"):
        load_user_model(tmp_path / "nope", CPU)
    d = _model_dir(tmp_path / "m")
    (d / "model.pt").write_bytes(b"not a zip archive")
    with pytest.raises(PermanentError, match="is not a TorchScript file"):
        load_user_model(d, CPU)
    (d / "model.pt").unlink()
    with pytest.raises(PermanentError, match=r"TorchScript file .*model.pt does not exist"):
        load_user_model(d, CPU)
    (d / "model.toml").unlink()
    with pytest.raises(CardError, match=r"model.toml does not exist"):
        load_user_model(d, CPU)


def test_entry_points_are_discovered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed distribution's dicom_node.models entry point becomes a factory by name."""
    pkg = tmp_path / "acme_models"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        textwrap.dedent(
            """
            class Echo:
                name = "acme-echo"
                version = "1"
                modalities = frozenset()
                labels = ()

                def __init__(self, device):
                    self.device = device

                def predict(self, volume):
                    raise NotImplementedError
            """
        )
    )
    dist = tmp_path / "acme_models-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-models\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[dicom_node.models]\nacme-echo = acme_models:Echo\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    factories = entry_point_factories()
    assert "acme-echo" in factories
    model = factories["acme-echo"](CPU)
    assert model.name == "acme-echo" and isinstance(model, Model)
    sys.modules.pop("acme_models", None)


def test_broken_entry_point_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry point whose module cannot be imported is reported with its name."""
    dist = tmp_path / "broken_models-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-models\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[dicom_node.models]\nbroken = no_such_module_xyz:Model\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PermanentError, match=r"model entry point 'broken' .* cannot be loaded"):
        entry_point_factories()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_models_entry_batch_size_and_amp_reach_a_card_model(tmp_path: Path, phantom: Phantom, device: str) -> None:
    """``[[models]] batch_size`` and ``amp`` (the factory's options) override the defaults and
    the card (which says amp = true); batching four patches a call gives the same mask."""
    from inference.user_models import configured_model_factory

    folder = _model_dir(tmp_path)
    dev = torch.device(device)
    default = configured_model_factory("torchscript", folder, name="ct-bone-threshold")(dev)
    tuned = configured_model_factory("torchscript", folder, name="ct-bone-threshold", batch_size=4, amp=False)(dev)
    assert isinstance(default, TorchScriptModel) and isinstance(tuned, TorchScriptModel)
    assert (default.batch_size, default.amp) == (1, True) and (tuned.batch_size, tuned.amp) == (4, False)
    calls: list[int] = []
    network = tuned.network

    def counted(batch: torch.Tensor) -> torch.Tensor:
        calls.append(int(batch.shape[0]))
        return network(batch)  # type: ignore[no-any-return]

    tuned._run = counted  # type: ignore[method-assign]  # count the calls at the network
    a = default.predict(_volume(phantom)).segments[0].mask
    b = tuned.predict(_volume(phantom)).segments[0].mask
    assert max(calls) == 4 and len(calls) == math.ceil(sum(calls) / 4)
    if dev.type == "cuda":  # the default runs in float16 there: a border voxel may flip
        assert _dice(a, b) > 0.999
    else:
        np.testing.assert_array_equal(a, b)
