"""[[models]] entries for MONAI bundles and nnU-Net folders: settings, label codes, digests,
orientation, and the Device UID that follows the weights (no network is trained here)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from dicom_node.demo import axial_affine
from dicom_node.errors import ConfigError
from dicom_node.results.common import ResultUIDs, device_uid
from dicom_node.settings import load_settings
from inference import PermanentError
from inference.formats import (
    builtin_descriptions,
    checkpoint_paths,
    describe_bundle,
    describe_configured,
    describe_nnunet,
)
from inference.identity import file_digest, weights_digest
from inference.labels import LOCAL_SCHEME, LabelOverride, build_labels, label_for_name
from inference.nnunet import canonical_axes
from inference.prediction import SCT, Code, SegmentKind


def _config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(body)
    return path


def test_bundle_and_nnunet_entries_resolve_against_the_config_folder(tmp_path: Path) -> None:
    """bundle = and nnunet = paths resolve next to the config file; kind, options and labels are kept."""
    s = load_settings(_config(tmp_path, """
[[models]]
name = "spleen"
bundle = "models/spleen_ct_segmentation"
version = "0.5.3-site"

[[models.labels]]
index = 1
name = "Spleen"
category = { value = "91723000", scheme = "SCT", meaning = "Anatomical Structure" }
type = { value = "78961009", scheme = "SCT", meaning = "Spleen" }
color = [157, 108, 162]

[[models]]
name = "organs"
nnunet = "/models/Dataset291/nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres"
folds = [0]
checkpoint = "checkpoint_best.pth"
mirroring = false
"""))
    bundle, nnunet = s.models
    assert bundle.kind == "monai-bundle" and bundle.source == tmp_path / "models" / "spleen_ct_segmentation"
    assert bundle.options() == {"weights": None, "batch_size": None, "amp": None}
    assert bundle.labels[0].type is not None and bundle.device == "auto"
    assert nnunet.kind == "nnunet"
    assert nnunet.source == Path("/models/Dataset291/nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres")
    assert nnunet.options() == {"folds": [0], "checkpoint": "checkpoint_best.pth", "orientation": "RAS",
                                "mirroring": False, "tile_step_size": 0.5}
    assert callable(bundle.factory()) and callable(nnunet.factory())


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('name = "m"\n', r"exactly one of path, bundle, nnunet \(got none\)"),
        ('name = "m"\nbundle = "b"\nnnunet = "n"\n', r"exactly one of path, bundle, nnunet \(got bundle, nnunet\)"),
        ('name = "m"\nbundle = "b"\nfolds = [0]\n', r"folds apply to nnunet models only"),
        ('name = "m"\nnnunet = "n"\nweights = "model.ts"\n', r"weights applies to bundle models only"),
        ('name = "m"\npath = "p"\nlabels = [{ index = 1, name = "x" }]\n', r"labels are in its model.toml"),
        ('name = "m"\nbundle = "b"\nlabels = [{ index = 1, type = { value = "1", scheme = "SCT", meaning = "x" } }]\n',
         r"label 1: give both category and type"),
        ('name = "m"\nnnunet = "n"\norientation = "LPS"\n', r"models\.0\.orientation"),
        ('name = "m"\nnnunet = "n"\nbatch_size = 2\n', r"batch_size do not apply to nnU-Net models"),
        ('name = "m"\nnnunet = "n"\namp = false\n', r"amp do not apply to nnU-Net models"),
        ('name = "m"\nbundle = "b"\ndevice = "gpu0"\n', r"models\.0\.device"),
        ('name = "m"\nbundle = "b"\nbatch_size = 0\n', r"models\.0\.batch_size"),
    ],
)
def test_wrong_model_entries_name_the_problem(tmp_path: Path, body: str, message: str) -> None:
    """A [[models]] entry with no or two sources, or keys of another kind, is refused with the reason."""
    with pytest.raises(ConfigError, match=message):
        load_settings(_config(tmp_path, "[[models]]\n" + body))


def test_label_names_get_snomed_codes_and_unknown_names_a_local_code() -> None:
    """Common anatomy names map to SNOMED CT; lesions get their category; others a 99DICOMNODE code."""
    spleen = label_for_name("Spleen")
    assert spleen.type == Code("78961009", SCT, "Spleen") and spleen.category.value == "91723000"
    assert label_for_name("kidney_left").type.value == "18639004"
    assert label_for_name("Left Kidney").type.value == "18639004"
    assert label_for_name("lungs").type.value == "39607008"
    tumour = label_for_name("liver tumor")
    assert tumour.category.value == "49755003" and tumour.type.value == "108369006"
    odd = label_for_name("vertebrae_T12_whatever_long")
    assert odd.type.scheme_designator == LOCAL_SCHEME and len(odd.type.value) <= 16
    assert odd.type.meaning == "vertebrae_T12_whatever_long"


def test_overrides_win_and_background_is_dropped() -> None:
    """Configured codes replace the defaults; background is not a segment; an index given twice fails."""
    own = Code("12345", "99HOSP", "Special")
    labels = build_labels(
        {0: "background", 1: "spleen", 2: "liver"},
        [LabelOverride(2, name="Liver (site)", category=own, type=own, kind=SegmentKind.LESION, color=(1, 2, 3)),
         LabelOverride(5, name="extra")],
        model="m",
    )
    assert [i for i, _ in labels] == [1, 2, 5]
    assert labels[1][1].name == "Liver (site)" and labels[1][1].type == own
    assert labels[1][1].kind is SegmentKind.LESION and labels[1][1].color == (1, 2, 3)
    with pytest.raises(PermanentError, match="label index 1 is configured twice"):
        build_labels({1: "a"}, [LabelOverride(1), LabelOverride(1)], model="m")
    with pytest.raises(PermanentError, match="names no label"):
        build_labels({0: "background"}, [], model="m")


def test_digest_is_the_weights_sha256_and_changes_with_them(tmp_path: Path) -> None:
    """One file: its own SHA-256; several: a digest of the digests; a rewrite changes it."""
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    a.write_bytes(b"weights one")
    b.write_bytes(b"weights two")
    assert file_digest(a) == hashlib.sha256(b"weights one").hexdigest()
    both = weights_digest([a, b])
    assert both != weights_digest([b, a]) and both != file_digest(a)
    a.write_bytes(b"weights one, retrained")
    assert weights_digest([a, b]) != both


def test_device_uid_follows_version_and_digest() -> None:
    """The Device UID changes with the version and the digest; no digest keeps the old UID."""
    base = device_uid("m", "1.0.0")
    assert base == ResultUIDs("1.2.3", "m", "1.0.0").device
    assert device_uid("m", "1.0.1") != base
    assert device_uid("m", "1.0.0", "ab" * 32) not in (base, device_uid("m", "1.0.0", "cd" * 32))
    assert ResultUIDs("1.2.3", "m", "1.0.0", "ab" * 32).device == device_uid("m", "1.0.0", "ab" * 32)
    # The series UIDs stay those of the version: a re-run replaces its results.
    assert ResultUIDs("1.2.3", "m", "1.0.0", "ab" * 32).seg_series == ResultUIDs("1.2.3", "m", "1.0.0").seg_series


def _bundle_folder(root: Path, *, weights: tuple[str, ...] = ("model.pt",)) -> Path:
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "configs" / "metadata.json").write_text(json.dumps({
        "version": "0.3.1",
        "network_data_format": {"inputs": {"image": {"modality": "MRI"}},
                                "outputs": {"pred": {"channel_def": {"0": "background", "1": "spleen"}}}},
    }))
    (root / "configs" / "inference.json").write_text("{}")
    for name in weights:
        (root / "models" / name).write_bytes(name.encode())
    return root


def test_bundle_description_reads_version_labels_and_digest(tmp_path: Path) -> None:
    """describe_bundle reads metadata.json and hashes model.pt (or the chosen model.ts)."""
    root = _bundle_folder(tmp_path / "b", weights=("model.pt", "model.ts"))
    info = describe_bundle(root)
    assert info["version"] == "0.3.1" and info["modalities"] == ["MR"]
    assert info["labels"] == {"0": "background", "1": "spleen"}
    assert info["digest"] == hashlib.sha256(b"model.pt").hexdigest()
    assert describe_bundle(root, "model.ts")["digest"] == hashlib.sha256(b"model.ts").hexdigest()
    assert describe_configured("monai-bundle", root, version="9")["version"] == "9"
    with pytest.raises(PermanentError, match=r"models/model.pt or models/model.ts does not exist"):
        describe_bundle(_bundle_folder(tmp_path / "empty", weights=()))
    with pytest.raises(PermanentError, match=r"configs/metadata.json does not exist"):
        describe_bundle(tmp_path)


def test_nnunet_folds_and_checkpoints_are_selectable(tmp_path: Path) -> None:
    """Every fold with the checkpoint by default, or the folds asked for; a missing one is named."""
    root = tmp_path / "Dataset001_X" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    for fold in ("0", "1", "all"):
        (root / f"fold_{fold}").mkdir(parents=True)
        (root / f"fold_{fold}" / "checkpoint_final.pth").write_bytes(fold.encode())
    (root / "fold_1" / "checkpoint_best.pth").write_bytes(b"best")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"},
                                                   "labels": {"background": 0, "liver": 1}}))
    folds, paths = checkpoint_paths(root, None, "checkpoint_final.pth")
    assert folds == [0, 1, "all"] and paths[2] == root / "fold_all" / "checkpoint_final.pth"
    assert describe_nnunet(root, [1])["digest"] == hashlib.sha256(b"1").hexdigest()
    assert describe_nnunet(root, [1], "checkpoint_best.pth")["digest"] == hashlib.sha256(b"best").hexdigest()
    info = describe_nnunet(root)
    assert info["version"] == "sha256-" + info["digest"][:12] and info["labels"] == {"0": "background", "1": "liver"}
    with pytest.raises(PermanentError, match=r"fold_0/checkpoint_best.pth does not exist"):
        describe_nnunet(root, [0], "checkpoint_best.pth")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"a": [1, 2]}}))
    with pytest.raises(PermanentError, match="region-based"):
        describe_nnunet(root)


@pytest.mark.parametrize("flip", [(), (1,), (1, 2), (0, 2)])
def test_canonical_axes_turn_any_axial_layout_to_superior_anterior_right(flip: tuple[int, ...]) -> None:
    """After canonical_axes the array's axes run to superior, anterior, right whatever the storage order."""
    shape = (4, 5, 6)
    affine = axial_affine(shape, 2.0, 3.0)
    for axis in flip:  # the same voxels stored with this axis reversed
        affine[:3, 3] += affine[:3, axis] * (shape[axis] - 1)
        affine[:3, axis] *= -1
    perm, flips = canonical_axes(affine)
    index = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), -1).astype(float)
    lps = index @ affine[:3, :3].T + affine[:3, 3]
    canon = np.flip(lps, flips).transpose(*perm, 3) if flips else lps.transpose(*perm, 3)
    assert np.all(np.diff(canon[..., 2], axis=0) > 0)  # superior: +z
    assert np.all(np.diff(canon[..., 1], axis=1) < 0)  # anterior: -y
    assert np.all(np.diff(canon[..., 0], axis=2) < 0)  # right: -x


def test_builtin_descriptions_read_without_torch_match_the_registry() -> None:
    """The name/version constants /api/models reads from the built-ins' source are the classes' own."""
    from inference.registry import builtin_factories

    expected = {name: getattr(cls, "version") for name, cls in builtin_factories().items()}  # noqa: B009
    assert builtin_descriptions() == expected


def test_config_check_knows_bundle_and_nnunet_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`config check` accepts rules naming bundle and nnU-Net models, checks their modalities from
    metadata.json / dataset.json, and names a folder whose metadata is missing."""
    from dicom_node.cli import main

    bundle = _bundle_folder(tmp_path / "bundle")  # modality MRI -> MR
    nnunet = tmp_path / "nn"
    nnunet.mkdir()
    (nnunet / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0}}))

    def check(rules: str, models: str) -> int:
        path = tmp_path / "node.toml"
        path.write_text(models + rules)
        return int(main(["config", "check", "--config", str(path)]))

    models = f'[[models]]\nname = "b"\nbundle = "{bundle}"\n[[models]]\nname = "n"\nnnunet = "{nnunet}"\n'
    ok = '[[rules]]\nname = "mr"\nmatch = { Modality = "MR" }\nmodels = ["b"]\n' \
         '[[rules]]\nname = "ct"\nmatch = { Modality = "CT" }\nmodels = ["n"]\n'
    assert check(ok, models) == 0
    assert "configuration OK" in capsys.readouterr().out
    assert check('[[rules]]\nname = "wrong"\nmatch = { Modality = "CT" }\nmodels = ["b"]\n', models) == 2
    assert "rule 'wrong' sends Modality CT to 'b', which accepts only MR" in capsys.readouterr().err
    gone = f'[[models]]\nname = "b"\nbundle = "{tmp_path / "nowhere"}"\n'
    assert check('[[rules]]\nname = "mr"\nmatch = { Modality = "MR" }\nmodels = ["b"]\n', gone) == 2
    assert "model b: MONAI bundle folder" in capsys.readouterr().err
