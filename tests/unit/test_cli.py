"""The `dicom-node` command line: config check, rules test, jobs, readable errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


def _rules_config(tmp_path: Path, rules: list[dict[str, object]], destinations: list[dict[str, object]] | None = None
                  ) -> Path:
    return write_config(tmp_path / "rules.toml", {"database": {"url": f"sqlite:///{tmp_path / 'r.db'}"},
                                                  "destinations": destinations or [], "rules": rules})


def test_config_check_catches_unknown_models_and_refused_modalities(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A rule naming an unknown model, or sending only a modality its model refuses, fails the
    check (exit 2) with the rule, the model and what it accepts; a rule that may send other
    modalities is a warning."""
    config = _rules_config(tmp_path, [
        {"name": "mr", "match": {"Modality": "MR"}, "models": ["ct-tissue"]},
        {"name": "typo", "match": {"Modality": "CT"}, "models": ["ct-tisue"]},
        {"name": "any", "models": ["ct-lung-nodules"]},
    ])
    assert main(["config", "check", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "rule 'mr' sends Modality MR to 'ct-tissue', which accepts only CT" in err
    assert "rule 'typo' names unknown model 'ct-tisue'; known models: ct-lung-nodules, ct-tissue, foreground" in err
    assert "warning: rule 'any' may send any modality to 'ct-lung-nodules'" in err
    fine = _rules_config(tmp_path, [{"name": "ct", "match": {"Modality": "CT"}, "models": ["ct-tissue"]}])
    assert main(["config", "check", "--config", str(fine)]) == 0
    assert "configuration OK" in capsys.readouterr().out


def test_config_check_warns_of_a_resampled_seg_without_the_source_seg(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """seg-resampled is made only for tilted stacks: a destination listing it without seg would
    get no SEG at all for most series, which `config check` says (a warning, exit 0)."""
    dest = {"name": "slicer", "ae_title": "SLICER", "host": "127.0.0.1", "port": 11113}
    config = _rules_config(tmp_path, [{"name": "ct", "match": {"Modality": "CT"}, "models": ["ct-tissue"]}],
                           [{**dest, "outputs": ["seg-resampled", "sr"]}])
    assert main(["config", "check", "--config", str(config)]) == 0
    assert "warning: destination 'slicer' lists seg-resampled without seg" in capsys.readouterr().err
    both = _rules_config(tmp_path, [{"name": "ct", "match": {"Modality": "CT"}, "models": ["ct-tissue"]}],
                         [{**dest, "outputs": ["seg", "seg-resampled", "sr"]}])
    assert main(["config", "check", "--config", str(both)]) == 0
    assert "seg-resampled" not in capsys.readouterr().err


def test_config_check_probe_echoes_every_destination(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], storescp_archive: Any
) -> None:
    """``--probe`` C-ECHOes each destination: a real storescp answers; a closed port fails the
    check with exit 1, naming the destination."""
    from tests.support import procs

    up = {"name": "archive", "ae_title": "ARCHIVE", "host": procs.LOOPBACK, "port": storescp_archive.port}
    down = {"name": "gone", "ae_title": "GONE", "host": procs.LOOPBACK, "port": procs.free_port()}
    rules = [{"name": "ct", "match": {"Modality": "CT"}, "models": ["ct-tissue"], "destinations": ["archive"]}]
    assert main(["config", "check", "--probe", "--config", str(_rules_config(tmp_path, rules, [up]))]) == 0
    assert "every destination answers" in capsys.readouterr().out
    assert main(["config", "check", "--probe", "--config", str(_rules_config(tmp_path, rules, [up, down]))]) == 1
    err = capsys.readouterr().err
    assert "destination 'gone' (GONE@" in err and "does not answer C-ECHO" in err and "'archive'" not in err


def test_settings_errors_name_the_variable_and_suggest_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A typo gets the nearest key; an environment override's error names the variable, not the
    file; a validator's message comes without pydantic's "Value error, " prefix."""
    typo = tmp_path / "typo.toml"
    typo.write_text("[completion]\nidel_seconds = 5\n")
    assert main(["config", "check", "--config", str(typo)]) == 2
    assert "completion.idel_seconds: unknown key (did you mean idle_seconds?)" in capsys.readouterr().err
    monkeypatch.setenv("DICOM_NODE_LISTENER__PORT", "99999")
    assert main(["config", "check", "--config", str(typo.with_name("none.toml"))]) == 2
    assert "configuration file not found" in capsys.readouterr().err
    fine = tmp_path / "fine.toml"
    fine.write_text("")
    assert main(["config", "check", "--config", str(fine)]) == 2
    err = capsys.readouterr().err
    assert "DICOM_NODE_LISTENER__PORT (environment, listener.port): Input should be less than or equal to 65535" in err
    assert str(fine) not in err
    monkeypatch.delenv("DICOM_NODE_LISTENER__PORT")
    dup = tmp_path / "dup.toml"
    dup.write_text('[[destinations]]\nname = "a"\nae_title = "A"\nhost = "h"\nport = 1\n' * 2)
    assert main(["config", "check", "--config", str(dup)]) == 2
    err = capsys.readouterr().err
    assert "destination names must be unique" in err and "Value error" not in err


def test_usage_errors_exit_2_and_say_what_exists(tmp_path: Path, config: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown job state, a missing folder and an unknown destination are usage errors (exit 2);
    the last lists the configured destinations."""
    with pytest.raises(SystemExit) as exit_info:
        main(["jobs", "--state", "bogus", "--config", str(config)])
    assert exit_info.value.code == 2
    assert main(["rules", "test", str(tmp_path / "nonexistent"), "--config", str(config)]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    dests = _rules_config(tmp_path, [], [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104},
                                         {"name": "research", "ae_title": "R", "host": "127.0.0.1", "port": 105}])
    assert main(["echo", "NOPE", "--config", str(dests)]) == 2
    assert "no destination named 'NOPE'; configured destinations: pacs, research" in capsys.readouterr().err


def test_help_is_written_for_users(capsys: pytest.CaptureFixture[str]) -> None:
    """``--help`` says what the node is, the exit statuses and where to start; every option of
    serve has a help text."""
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "DICOM-native AI inference node" in text and "Exit status" in text and "first steps" in text
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    assert "--log-format" in text and "log lines as JSON" in text


def test_output_piped_into_head_ends_quietly(tmp_path: Path, config: Path) -> None:
    """``dicom-node jobs | head -1`` ends without a BrokenPipeError traceback."""
    import subprocess
    import sys

    from dicom_node.catalog import Catalog, JobSpec
    from dicom_node.catalog.recorder import instance_from_file

    phantom = make_chest_phantom(ChestSpec(slices=2, rows=16, columns=16, pixel_spacing=20.0))
    paths = write_datasets(slice_datasets(phantom.hu, phantom.affine, SeriesInfo(seed="pipe")), tmp_path / "s")
    catalog = Catalog(f"sqlite:///{tmp_path / 'node.db'}")
    catalog.record_instances([instance_from_file(p) for p in paths])
    uid = SeriesInfo(seed="pipe").uid("series")
    catalog.create_jobs([JobSpec(uid, "r", f"model-{n}", [], "normal") for n in range(3000)])
    out = subprocess.run(
        ["bash", "-o", "pipefail", "-c",
         f"'{sys.executable}' -m dicom_node jobs --limit 3000 --config '{config}' | head -1"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert "ID" in out.stdout and "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr, out.stderr


def test_jobs_shows_study_date_and_next_attempt(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """22.9: `jobs` names each job's study date and, for a delivery waiting to retry, when it is
    tried next (also in --json)."""
    import time

    from dicom_node.catalog import Catalog, JobState
    from tests.support.queues import MemoryQueue
    from tests.unit.test_web_api import ROOT, encode, make_job, receive_series

    catalog = Catalog(f"sqlite:///{tmp_path / 'node.db'}")
    receive_series(catalog, f"{ROOT}.7", f"{ROOT}.7.1", start=time.time() - 30, study_date="20261205")
    job_id = make_job(catalog, f"{ROOT}.7.1", destinations=["archive"])
    encode(catalog, MemoryQueue(), job_id)
    catalog.transition(job_id, JobState.DELIVERING)
    catalog.record_delivery(job_id, "archive", ok=False, error="connection refused")
    catalog.schedule_delivery_retry(job_id, time.time() + 120)
    catalog.close()
    assert main(["jobs", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"{ROOT}.7.1  study 2026-12-05" in out
    assert "archive: failed, next attempt at " in out and "(in 1" in out
    assert main(["jobs", "--json", "--config", str(config)]) == 0
    [job] = json.loads(capsys.readouterr().out)
    assert job["study_date"] == "20261205" and job["deliveries"][0]["next_attempt_at"] > time.time()
