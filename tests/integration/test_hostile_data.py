"""Hostile data and careless operators against a real node (issue 18, items 5, 6, 9-12, 14).

Every test starts a real ``dicom-node serve`` (with its in-process worker on the embedded
broker unless said otherwise), sends over a real socket with DCMTK ``storescu`` or pynetdicom,
and checks files, the catalog, the API, the CLI and the logs.
"""

from __future__ import annotations

import grp
import os
import stat
import time
from pathlib import Path

import pytest

from tests.integration.test_faults import (
    catalog_of,
    child_pids,
    destination,
    rule,
    series_files,
    sigkill,
    start_archive,
    storescu,
    wait_job,
)
from tests.support import procs
from tests.support.node import node_config, start_node, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (children, their children, ...)."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in child_pids(todo.pop()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


def _other_group() -> grp.struct_group:
    """A group that is not the test process's own (the node is told to use it)."""
    candidates = [g for g in grp.getgrall() if g.gr_gid != os.getgid()]
    if os.geteuid() != 0:
        candidates = [g for g in candidates if g.gr_gid in os.getgroups()]
    if not candidates:
        pytest.skip("no second group to give files to (not root, no supplementary group)")
    return next((g for g in candidates if g.gr_name in ("adm", "daemon", "users")), candidates[0])


# -- item 6: file modes -----------------------------------------------------------------------


def test_spool_and_outbox_are_not_world_readable(tmp_path: Path) -> None:
    """Received instances and encoded results are 0640 in 0750 folders, in ``[storage] group``:
    another local user can read no patient data."""
    group = _other_group()
    archive = start_archive(tmp_path / "archive")
    workdir = tmp_path / "node"
    config = node_config(workdir, destinations=[destination(archive.port)],
                         rules=[rule("ct", "ct-tissue", ["archive"])], storage={"group": group.gr_name})
    node = start_node(workdir, config)
    try:
        files = series_files(tmp_path, "modes")
        storescu(node.port, files)
        catalog = catalog_of(node)
        from dicom_node.demo import SeriesInfo

        wait_job(node, catalog, SeriesInfo(seed="modes").uid("series"), ("done",))
        catalog.close()
    finally:
        node.stop()
        archive.stop()
    spool, outbox = workdir / "spool", workdir / "outbox"
    written = [p for root in (spool, outbox) for p in root.rglob("*")]
    instances = [p for p in written if p.is_file() and p.is_relative_to(spool)]
    results = [p for p in written if p.is_file() and p.is_relative_to(outbox)]
    folders = [spool, outbox, *(p for p in written if p.is_dir())]
    assert len(instances) == len(files) and len(results) == 2, (instances, results)
    modes = {str(p.relative_to(workdir)): (stat.S_IMODE(p.stat().st_mode), p.stat().st_gid)
             for p in [*instances, *results, *folders]}
    wrong = {p: (oct(m), gid) for p, (m, gid) in modes.items()
             if gid != group.gr_gid or m != (0o750 if (workdir / p).is_dir() else 0o640)}
    assert wrong == {}, wrong


# -- item 12: the in-process worker dies with the node ------------------------------------------


def test_in_process_worker_dies_with_a_killed_node(tmp_path: Path) -> None:
    """SIGKILL of ``serve`` takes its in-process worker (and the worker's pool) with it within
    seconds: no orphan keeps consuming jobs."""
    workdir = tmp_path / "node"
    node = start_node(workdir, node_config(workdir))
    try:
        pid = node.server.proc.pid
        workers = wait_until(lambda: {p for p in descendants(pid) if alive(p)} if len(descendants(pid)) >= 2 else None,
                             60, what="the worker and its pool child")
        t0 = time.monotonic()
        sigkill(pid)
        node.server.proc.wait(10)
        try:
            wait_until(lambda: not any(alive(p) for p in workers), 10, interval=0.05, what="orphans gone")
        finally:
            for p in workers:
                sigkill(p)
        gone_after = time.monotonic() - t0
        print(f"{len(workers)} worker processes gone {gone_after:.2f} s after the node's SIGKILL")
    finally:
        node.stop()
