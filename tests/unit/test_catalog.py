"""Catalog and completion: counting, re-sends, late instances, completion hints, job states."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dicom_node.catalog import Catalog, CatalogError, JobSpec, JobState, expected_instances
from dicom_node.catalog.recorder import CatalogRecorder
from dicom_node.ingest.events import AssociationSummary, StoredInstance
from dicom_node.scheduling.completion import CompletionLoop
from dicom_node.scheduling.jobs import reconcile_jobs
from dicom_node.settings import load_settings
from tests.support.queues import MemoryQueue

STUDY, SERIES = "1.2.3", "1.2.3.4"


def inst(n: int, t: float, series: str = SERIES, **attrs: object) -> StoredInstance:
    base: dict[str, str | int | float] = {"Modality": "CT", "ImagesInAcquisition": 3}
    base.update(attrs)  # type: ignore[arg-type]
    return StoredInstance(STUDY, series, f"{series}.{n}", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                          Path(f"/spool/{n}.dcm"), 100, "CT1", "a1", t, base)


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    return Catalog(f"sqlite:///{tmp_path / 'c.db'}")


def settings(tmp_path: Path, idle: float = 5.0, late: str = "reprocess"):  # type: ignore[no-untyped-def]
    cfg = tmp_path / "n.toml"
    cfg.write_text(f"""
[completion]
idle_seconds = {idle}
late_instances = "{late}"
# The series here announce 3 instances and often send fewer: process them at idle (with a note).
incomplete_grace_seconds = 0
[[destinations]]
name = "archive"
ae_title = "ARCHIVE"
host = "127.0.0.1"
port = 4242
[[rules]]
name = "ct"
match = {{ Modality = "CT" }}
models = ["ct-tissue", "foreground"]
destinations = ["archive"]
priority = "urgent"
""")
    return load_settings(cfg)


def test_resent_instance_is_counted_once(catalog: Catalog) -> None:
    """Receiving the same SOP Instance UID twice keeps one instance row."""
    catalog.record_instances([inst(1, 10.0), inst(1, 11.0), inst(2, 12.0)])
    row = catalog.get_series(SERIES)
    assert row is not None and row.instance_count == 2 and row.last_received_at == 12.0


def test_idle_and_association_completion(catalog: Catalog) -> None:
    """A series completes after the idle time, or at release once the expected count is reached."""
    catalog.record_instances([inst(1, 100.0), inst(2, 100.0)])
    assert catalog.due_series(104.0, 5.0) == []
    catalog.record_association(AssociationSummary("a1", "CT1", True, frozenset({SERIES}), 100.5))
    assert catalog.due_series(101.0, 5.0) == []  # 2 of 3 expected
    assert [s.series_instance_uid for s in catalog.due_series(105.0, 5.0)] == [SERIES]
    catalog.record_instances([inst(3, 101.0)])
    catalog.record_association(AssociationSummary("a2", "CT1", True, frozenset({SERIES}), 101.2))
    assert [s.series_instance_uid for s in catalog.due_series(101.3, 5.0)] == [SERIES]


@pytest.mark.parametrize(
    ("attrs", "expected"),
    [
        ({"ImagesInAcquisition": 3}, 3),
        ({"ImagesInAcquisition": 10, "NumberOfTemporalPositions": 3}, 30),  # dynamic: 10 per phase
        ({"ImagesInAcquisition": 10, "NumberOfTemporalPositions": 1}, 10),
        ({"NumberOfFrames": 200, "ImagesInAcquisition": 200}, 1),  # enhanced multi-frame
        ({"NumberOfTemporalPositions": 3}, None),  # positions without a count: no hint
        ({"ImagesInAcquisition": "garbage"}, None),
    ],
)
def test_expected_count_from_the_series_own_hints(attrs: dict[str, object], expected: int | None) -> None:
    assert expected_instances(attrs) == expected


def test_dynamic_series_does_not_complete_after_its_first_phase(catalog: Catalog) -> None:
    """10 slices x 3 temporal positions: a release after the first 10 does not complete it."""
    phase = {"ImagesInAcquisition": 10, "NumberOfTemporalPositions": 3}
    catalog.record_instances([inst(n, 100.0, **phase) for n in range(10)])
    catalog.record_association(AssociationSummary("a1", "MR1", True, frozenset({SERIES}), 100.5))
    assert catalog.due_series(101.0, 5.0) == []
    catalog.record_instances([inst(n, 102.0, **phase) for n in range(10, 30)])
    catalog.record_association(AssociationSummary("a2", "MR1", True, frozenset({SERIES}), 102.5))
    assert [s.series_instance_uid for s in catalog.due_series(103.0, 5.0)] == [SERIES]


def test_rule_expected_instances_completes_a_series_without_hints_at_release(tmp_path: Path, catalog: Catalog) -> None:
    """A sender announcing no count: the matching rule's ``expected_instances`` lets release
    complete the series; one instance short, only the idle timer does."""
    cfg = tmp_path / "r.toml"
    cfg.write_text("""
[completion]
idle_seconds = 60
[[rules]]
name = "ldct"
match = { Modality = "CT" }
models = ["ct-tissue"]
expected_instances = 4
""")
    loop = CompletionLoop(load_settings(cfg), catalog, MemoryQueue())
    catalog.record_instances([inst(n, 100.0, ImagesInAcquisition="") for n in range(3)])
    catalog.record_association(AssociationSummary("a1", "CT1", True, frozenset({SERIES}), 100.5))
    assert loop.tick(now=101.0) == []  # 3 of 4
    catalog.record_instances([inst(3, 101.0, ImagesInAcquisition="")])
    catalog.record_association(AssociationSummary("a2", "CT1", True, frozenset({SERIES}), 101.5))
    assert len(loop.tick(now=102.0)) == 1
    row = catalog.get_series(SERIES)
    assert row is not None and row.completion_reason == "association"


def test_completion_creates_one_job_per_model_and_queues_it(tmp_path: Path, catalog: Catalog) -> None:
    """A complete CT series gets one queued job per model of the matching rule, with its priority."""
    queue = MemoryQueue()
    loop = CompletionLoop(settings(tmp_path), catalog, queue)
    catalog.record_instances([inst(1, 100.0)])
    assert loop.tick(now=106.0) != []
    assert sorted(j.model for j in catalog.list_jobs()) == ["ct-tissue", "foreground"]
    assert all(j.state == "queued" and j.queued_at for j in catalog.list_jobs())
    assert [p for _, p in queue.inference] == ["urgent", "urgent"]
    assert loop.tick(now=200.0) == []  # completed once


def test_unrouted_series_is_noted(tmp_path: Path, catalog: Catalog) -> None:
    """A series no rule matches completes with a note and no job."""
    loop = CompletionLoop(settings(tmp_path), catalog, MemoryQueue())
    catalog.record_instances([inst(1, 100.0, Modality="MR")])
    assert loop.tick(now=106.0) == []
    row = catalog.get_series(SERIES)
    assert row is not None and row.state == "complete" and row.note == "no routing rule matched"


@pytest.mark.parametrize(("policy", "jobs_after"), [("reprocess", 4), ("ignore", 2)])
def test_late_instance_policy(tmp_path: Path, catalog: Catalog, policy: str, jobs_after: int) -> None:
    """An instance arriving after processing re-opens the series as a new generation (or is ignored)."""
    s = settings(tmp_path, late=policy)
    queue = MemoryQueue()
    loop = CompletionLoop(s, catalog, queue)
    recorder = CatalogRecorder(catalog, late_policy=policy)
    recorder.start()
    recorder.instance_stored(inst(1, 100.0))
    recorder.association_ended(AssociationSummary("a1", "CT1", True, frozenset({SERIES}), 100.5))
    assert recorder.flush()
    loop.tick(now=106.0)
    recorder.instance_stored(inst(2, 107.0))
    recorder.instance_stored(inst(2, 107.5))  # re-sent late instance: still one new generation
    recorder.association_ended(AssociationSummary("a1", "CT1", True, frozenset({SERIES}), 108.0))
    assert recorder.flush()
    loop.tick(now=120.0)
    recorder.stop()
    assert len(catalog.list_jobs()) == jobs_after
    if policy == "reprocess":
        assert {j.generation for j in catalog.list_jobs()} == {1, 2}


def test_transitions_are_guarded_and_timestamped(catalog: Catalog) -> None:
    """Illegal transitions raise; every transition leaves a timestamped event."""
    catalog.record_instances([inst(1, 1.0)])
    [job_id] = catalog.create_jobs([JobSpec(SERIES, "r", "ct-tissue", ["archive"])])
    with pytest.raises(CatalogError, match="cannot go from received to done"):
        catalog.transition(job_id, JobState.DONE)
    for state in (JobState.QUEUED, JobState.RUNNING, JobState.ENCODED, JobState.DELIVERING, JobState.DONE):
        catalog.transition(job_id, state)
    job = catalog.get_job(job_id)
    assert job is not None and job.done_at and job.running_at and job.done_at >= job.running_at
    assert [e.state for e in catalog.job_events(job_id)] == [
        "received", "queued", "running", "encoded", "delivering", "done"]
    with pytest.raises(CatalogError, match="expected queued"):
        catalog.transition(job_id, JobState.RUNNING, expect=(JobState.QUEUED,))


def test_reconcile_requeues_unfinished_jobs(catalog: Catalog) -> None:
    """Jobs left queued/running/encoded by a crash are sent again at start-up."""
    catalog.record_instances([inst(1, 1.0), inst(1, 1.0, series="1.2.3.5"), inst(2, 1.0, series="1.2.3.6")])
    a, b, c = (catalog.create_jobs([JobSpec(s, "r", "m", [])])[0] for s in (SERIES, "1.2.3.5", "1.2.3.6"))
    catalog.transition(a, JobState.QUEUED)
    catalog.transition(b, JobState.QUEUED)
    catalog.transition(b, JobState.RUNNING)
    for st in (JobState.QUEUED, JobState.RUNNING, JobState.ENCODED):
        catalog.transition(c, st)
    queue = MemoryQueue()
    assert reconcile_jobs(catalog, queue) == 3
    assert sorted(j for j, _ in queue.inference) == [a, b] and queue.dispatch == [c]
    assert time.time() - (catalog.get_job(b).queued_at or 0) < 60  # type: ignore[union-attr]


def test_recorder_retries_a_write_the_database_refused(catalog: Catalog, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch the database refuses ("database is locked") is written again, not dropped."""
    import sqlite3

    from sqlalchemy.exc import OperationalError

    import dicom_node.catalog.recorder as recorder_module

    monkeypatch.setattr(recorder_module, "RETRY_DELAYS_S", (0.01, 0.01, 0.01))
    real = catalog.record_instances
    calls: list[int] = []

    def refused_twice(instances: list[StoredInstance], **kwargs: str) -> list[str]:
        calls.append(len(instances))
        if len(calls) <= 2:
            raise OperationalError("INSERT INTO series", {}, sqlite3.OperationalError("database is locked"))
        return real(instances, **kwargs)

    monkeypatch.setattr(catalog, "record_instances", refused_twice)
    recorder = CatalogRecorder(catalog, linger_s=0.5)
    recorder.start()
    for n in range(5):
        recorder.instance_stored(inst(n, 1.0 + n))
    assert recorder.flush()
    recorder.stop()
    assert calls == [5, 5, 5]
    series = catalog.get_series(SERIES)
    assert series is not None and series.instance_count == 5


def test_two_recorders_on_one_database_record_every_instance(tmp_path: Path) -> None:
    """Two listener processes (here: two catalogs on one SQLite file) receiving the same new
    series at once race to insert its row; the loser retries, nothing is left out."""
    url = f"sqlite:///{tmp_path / 'c.db'}"
    recorders = [CatalogRecorder(Catalog(url), linger_s=0.0) for _ in range(2)]
    for r in recorders:
        r.start()
    series = [f"{SERIES}.{k}" for k in range(20)]
    for uid in series:
        for n, r in enumerate(recorders):
            r.instance_stored(inst(n, 1.0, series=uid))
    for r in recorders:
        assert r.flush(60)
        r.stop()
    check = Catalog(url)
    counts = {uid: getattr(check.get_series(uid), "instance_count", 0) for uid in series}
    assert counts == dict.fromkeys(series, 2)


def test_the_recorder_writes_what_arrives_while_it_lingers_in_one_batch(
    catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Instances handed over within the linger go to the catalog in one transaction, larger
    hand-overs in batches of max_batch, and stop() writes what is still waiting."""
    real = catalog.record_instances
    calls: list[int] = []

    def counted(instances: list[StoredInstance], **kwargs: str) -> list[str]:
        calls.append(len(instances))
        return real(instances, **kwargs)

    monkeypatch.setattr(catalog, "record_instances", counted)
    recorder = CatalogRecorder(catalog, linger_s=0.3, max_batch=4)
    recorder.start()
    for n in range(10):
        recorder.instance_stored(inst(n, 1.0 + n))
    assert recorder.flush()
    assert calls == [4, 4, 2]
    recorder.instance_stored(inst(10, 11.0))
    recorder.stop()  # long before the linger is over
    assert calls == [4, 4, 2, 1]
    series = catalog.get_series(SERIES)
    assert series is not None and series.instance_count == 11


def test_an_instance_uid_of_another_series_never_repoints_the_row(catalog: Catalog) -> None:
    """A stored SOP Instance UID arriving in another series (a file found by reconciliation, say)
    leaves the first series' row, path and count alone; the recorder's claim refuses it."""
    from dataclasses import replace

    first = inst(1, 1.0)
    catalog.record_instances([first])
    intruder = replace(first, series_instance_uid="1.2.3.999", path=Path("/spool/other.dcm"))
    catalog.record_instances([intruder])
    assert catalog.owner_of_instance(first.sop_instance_uid) == (STUDY, SERIES)
    assert catalog.series_paths(SERIES) == [Path("/spool/1.dcm")]
    assert catalog.series_paths("1.2.3.999") == []
    recorder = CatalogRecorder(catalog)
    assert recorder.claim(STUDY, "1.2.3.999", first.sop_instance_uid) == (STUDY, SERIES)
    assert recorder.claim(STUDY, SERIES, first.sop_instance_uid) is None  # a re-send: fine
    assert recorder.claim(STUDY, "1.2.3.7", "1.2.3.7.1") is None
    assert recorder.claim(STUDY, "1.2.3.8", "1.2.3.7.1") == (STUDY, "1.2.3.7")  # claimed, not yet written


def test_associations_racing_for_one_instance_uid_agree_on_one_owner(
    catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The catalog is asked outside the claims lock: 8 threads claiming one new UID for 8
    different series, all past the catalog query before any decides, leave exactly one owner;
    the other seven are told that owner."""
    import threading

    recorder = CatalogRecorder(catalog)
    asked = threading.Barrier(8)
    real = catalog.owner_of_instance

    def slow_owner(uid: str) -> tuple[str, str] | None:
        answer = real(uid)
        asked.wait(timeout=10)  # every thread has its (empty) answer before any decides
        return answer

    monkeypatch.setattr(catalog, "owner_of_instance", slow_owner)
    assert_one_owner_of_a_raced_uid(recorder, "1.2.3.50")


def assert_one_owner_of_a_raced_uid(recorder: CatalogRecorder, prefix: str) -> None:
    """8 threads, started together, claim ``prefix.99`` for 8 series ``prefix.N``: exactly one
    gets it, and the other seven are told that one is the owner."""
    import threading

    answers: dict[int, tuple[str, str] | None] = {}
    start = threading.Barrier(8)

    def claim(n: int) -> None:
        start.wait(timeout=10)
        answers[n] = recorder.claim(STUDY, f"{prefix}.{n}", f"{prefix}.99")

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    winners = [n for n, owner in answers.items() if owner is None]
    assert len(answers) == 8 and len(winners) == 1
    assert {owner for owner in answers.values() if owner is not None} == {(STUDY, f"{prefix}.{winners[0]}")}


def test_a_started_recorder_asks_the_catalog_only_for_uids_it_may_hold(
    catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once started, the recorder answers a claim of a never-stored UID from its in-memory
    index (no catalog query: each one cost the association threads interpreter-lock hand-overs);
    a UID stored before it started, or recorded since, is still refused for another series."""

    before = inst(1, 1.0)
    catalog.record_instances([before])  # stored by an earlier run of the node
    recorder = CatalogRecorder(catalog, linger_s=0.0)
    asked: list[str] = []
    real = catalog.owner_of_instance

    def counting(uid: str) -> tuple[str, str] | None:
        asked.append(uid)
        return real(uid)

    monkeypatch.setattr(catalog, "owner_of_instance", counting)
    recorder.start()
    try:
        news = [f"1.2.3.60.{n}" for n in range(2000)]
        assert all(recorder.claim(STUDY, "1.2.3.60", uid) is None for uid in news)
        # A Bloom filter at 1 % false positives, sized for a million: a handful at most.
        assert len(asked) <= 20, len(asked)
        assert recorder.claim(STUDY, "1.2.3.999", before.sop_instance_uid) == (STUDY, SERIES)
        assert before.sop_instance_uid in asked  # "maybe stored": the catalog decided

        # Recorded through the recorder without a claim (e.g. recovered), then forgotten by the
        # claims: still known, still refused for another series.
        late = replace_uid(inst(2, 2.0), "1.2.3.61.1")
        recorder.instance_stored(late)
        recorder.flush(timeout=10)
        recorder._claims.clear()
        assert recorder.claim(STUDY, "1.2.3.998", "1.2.3.61.1") == (STUDY, SERIES)

        # Threads racing for one new UID (no catalog query at all) still agree on one owner.
        assert_one_owner_of_a_raced_uid(recorder, "1.2.3.70")
    finally:
        recorder.stop()


def test_a_uid_claimed_before_the_recorder_started_is_still_refused_later(catalog: Catalog) -> None:
    """A claim made before :meth:`CatalogRecorder.start` (not in the catalog yet, so not in the
    filter built from it) is put in the filter by ``start``: recorded afterwards and forgotten by
    the claims, it is still refused for another series."""
    recorder = CatalogRecorder(catalog, linger_s=0.0)
    assert recorder.claim(STUDY, SERIES, "1.2.3.80.1") is None
    recorder.start()
    try:
        recorder.instance_stored(replace_uid(inst(1, 1.0), "1.2.3.80.1"))
        recorder.flush(timeout=10)
        recorder._claims.clear()
        assert recorder.claim(STUDY, "1.2.3.997", "1.2.3.80.1") == (STUDY, SERIES)
    finally:
        recorder.stop()


def replace_uid(instance: StoredInstance, uid: str) -> StoredInstance:
    from dataclasses import replace

    return replace(instance, sop_instance_uid=uid, path=Path(f"/spool/{uid}.dcm"))
