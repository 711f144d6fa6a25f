"""The `dicom-node` command line: config check, rules test, jobs, readable errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dicom_node.cli import main
from dicom_node.demo import ChestSpec, SeriesInfo, make_chest_phantom, slice_datasets, write_datasets
from tests.support.node import write_config


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(
        tmp_path / "node.toml",
        {
            "database": {"url": f"sqlite:///{tmp_path / 'node.db'}"},
            "rules": [
                {
                    "name": "chest-ct",
                    "match": {"Modality": "CT", "BodyPartExamined": "CHEST", "SliceThickness": [1, 6]},
                    "models": ["ct-tissue", "ct-lung-nodules"],
                },
                {"name": "thin-only", "match": {"SliceThickness": [0, 1.5]}, "models": ["ct-tissue"]},
                {"name": "mr", "match": {"Modality": "MR"}, "models": ["foreground"]},
            ],
        },
    )


def test_rules_test_shows_matches_and_reasons(tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`rules test DIR` lists each series with every rule, whether it matches and why."""
    phantom = make_chest_phantom(ChestSpec(slices=4, rows=32, columns=32, pixel_spacing=10.0))
    write_datasets(slice_datasets(phantom.hu, phantom.affine, SeriesInfo(seed="cli-ct")), tmp_path / "dir" / "ct")
    write_datasets(
        slice_datasets(phantom.hu, phantom.affine, SeriesInfo(seed="cli-mr", modality="MR")), tmp_path / "dir" / "mr"
    )
    (tmp_path / "dir" / "notes.txt").write_text("not DICOM")
    assert main(["rules", "test", str(tmp_path / "dir"), "--config", str(config), "--json"]) == 0
    report = {entry["series_instance_uid"]: entry for entry in json.loads(capsys.readouterr().out)}
    ct = report[SeriesInfo(seed="cli-ct").uid("series")]
    assert ct["instances"] == 4
    verdicts = {r["rule"]: r for r in ct["rules"]}
    assert verdicts["chest-ct"]["matched"] and verdicts["chest-ct"]["models"] == ["ct-tissue", "ct-lung-nodules"]
    assert (
        not verdicts["thin-only"]["matched"] and "SliceThickness=5 not in [0, 1.5]" in verdicts["thin-only"]["reasons"]
    )
    assert not verdicts["mr"]["matched"]
    mr = {r["rule"]: r["matched"] for r in report[SeriesInfo(seed="cli-mr").uid("series")]["rules"]}
    assert mr == {"chest-ct": False, "thin-only": False, "mr": True}

    assert main(["rules", "test", str(tmp_path / "dir"), "--config", str(config)]) == 0
    text = capsys.readouterr().out
    assert "MATCH chest-ct" in text and "Modality='CT' == 'CT'" in text


def test_config_check_summarises_and_rejects(tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`config check` prints a summary for a good file and one line naming the key for a bad one (exit 2)."""
    assert main(["config", "check", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "configuration OK" in out and "3 rule(s)" in out
    bad = tmp_path / "bad.toml"
    bad.write_text("[listener]\nport = 70000\n")
    assert main(["config", "check", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("configuration error:") and "listener.port" in err and "\n" not in err


def test_jobs_on_an_empty_catalog(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`jobs` on a fresh catalog says there are none; `retry` of an unknown job fails with a sentence."""
    assert main(["jobs", "--config", str(config)]) == 0
    assert capsys.readouterr().out.strip() == "no jobs"
    assert main(["retry", "42", "--config", str(config)]) == 1
    assert "unknown job 42" in capsys.readouterr().err
