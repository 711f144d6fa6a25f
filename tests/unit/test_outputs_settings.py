"""Per-destination outputs: settings, the union a job encodes, the outbox manifest, series slots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dicom_node.demo import ChestSpec, Sphere, make_chest_phantom
from dicom_node.errors import ConfigError
from dicom_node.results import encode_outputs
from dicom_node.settings import Settings, load_settings
from tests.support.result_examples import phantom_prediction, single_frame_sources, volume_of
from workers.pipeline import (
    MANIFEST,
    check_series_slots,
    job_outputs,
    read_manifest,
    result_options,
    write_outputs,
)

REPO = Path(__file__).resolve().parents[2]


def settings(tmp_path: Path, **overrides: Any) -> Settings:
    destinations = overrides.pop("destinations", [
        {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104},
        {"name": "research", "ae_title": "RESEARCH", "host": "127.0.0.1", "port": 105,
         "outputs": ["sr", "sc"], "notify_not_applied": False},
    ])
    cfg = tmp_path / "node.toml"
    cfg.write_text("")
    return load_settings(cfg, overrides={"destinations": destinations, **overrides})


class FakeJob:
    """The two fields of a catalog job the encode step reads."""

    def __init__(self, destinations: list[str]) -> None:
        self.destinations = destinations


def test_a_destination_gets_every_output_type_by_default(tmp_path: Path) -> None:
    """Unset ``outputs`` means all five types and the not-applied notice on."""
    s = settings(tmp_path)
    assert s.destination("pacs").outputs == ["seg", "sr", "gsps", "kos", "sc"]
    assert s.destination("pacs").notify_not_applied is True
    assert s.destination("research").outputs == ["sr", "sc"]
    assert s.destination("research").notify_not_applied is False


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        (["seg", "pdf"],
         r"destinations.0.outputs: .*unknown output types \['pdf'\]; known: seg, sr, seg-resampled, gsps, sc, kos"),
        ([], r"destinations.0.outputs: .*at least one of seg, sr"),
    ],
)
def test_unknown_or_no_output_types_are_config_errors(tmp_path: Path, outputs: list[str], message: str) -> None:
    """A typo in ``outputs`` stops the node with one line naming the key and the known types."""
    with pytest.raises(ConfigError, match=message):
        settings(tmp_path, destinations=[
            {"name": "pacs", "ae_title": "PACS", "host": "h", "port": 104, "outputs": outputs}])


def test_the_shipped_config_documents_outputs() -> None:
    """config/dicom-node.toml loads and mentions ``outputs`` and ``notify_not_applied``."""
    text = (REPO / "config" / "dicom-node.toml").read_text()
    assert "outputs" in text and "notify_not_applied" in text
    load_settings(REPO / "config" / "dicom-node.toml")


def test_a_job_encodes_the_union_of_its_destinations_outputs(tmp_path: Path) -> None:
    """The union, in encoding order; SEG + SR for a job without destinations."""
    s = settings(tmp_path, destinations=[
        {"name": "a", "ae_title": "A", "host": "h", "port": 1, "outputs": ["sr"]},
        {"name": "b", "ae_title": "B", "host": "h", "port": 2, "outputs": ["kos", "sc"]},
    ])
    assert job_outputs(s, FakeJob(["a", "b"])) == ["sr", "sc", "kos"]  # type: ignore[arg-type]
    assert job_outputs(s, FakeJob(["a"])) == ["sr"]  # type: ignore[arg-type]
    assert job_outputs(s, FakeJob([])) == ["seg", "sr"]  # type: ignore[arg-type]


def test_series_slots_collide_only_when_configured_so(tmp_path: Path) -> None:
    """Built-in model names get distinct blocks; two models forced into one slot are refused."""
    s = settings(tmp_path)
    check_series_slots(s, ["ct-tissue", "ct-lung-nodules", "foreground"])
    numbers = [result_options(s, m).series_numbers for m in ("ct-tissue", "ct-lung-nodules")]
    assert not set(numbers[0].values()) & set(numbers[1].values())
    assert result_options(s, "ct-tissue").series_number("seg") == 9741
    forced = settings(tmp_path, results={"model_series_slots": {"ct-tissue": 55}})
    with pytest.raises(ConfigError, match="'ct-lung-nodules' and 'ct-tissue' share series slot 55"):
        check_series_slots(forced, ["ct-tissue", "ct-lung-nodules"])


def test_the_manifest_says_what_each_outbox_file_is(tmp_path: Path) -> None:
    """Every written file has a manifest entry with its output type and SOP class; a second
    write (the notice of a later attempt) adds to the manifest."""
    phantom = make_chest_phantom(ChestSpec(slices=16, nodules=(Sphere((-60.0, 10.0, 5.0), 20.0),)))
    sources, refs = single_frame_sources(phantom)
    encoded = encode_outputs(phantom_prediction(phantom), volume_of(phantom), sources, refs, ["sr", "sc"])
    entries = write_outputs(tmp_path / "job-1", encoded)
    assert [e["output"] for e in entries] == ["seg", "sr", "sc"]
    assert {p.name for p in (tmp_path / "job-1").iterdir()} == {e["file"] for e in entries} | {MANIFEST}
    assert entries[1]["sop_class_uid"] == "1.2.840.10008.5.1.4.1.1.88.34"
    write_outputs(tmp_path / "job-1", {"notice-sr": encoded["sr"]})
    manifest = read_manifest(tmp_path / "job-1")
    assert len(manifest) == 4 and manifest[-1]["output"] == "notice-sr"
    assert json.loads((tmp_path / "job-1" / MANIFEST).read_text())["files"] == manifest
    assert read_manifest(tmp_path / "nothing") == []
