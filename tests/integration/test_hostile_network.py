"""Attacks on the receive path of a real ``dicom-node serve`` over real sockets (issue 18).

Each test speaks raw PDUs (``tests/support/rawpdu.py``) to the node's listener, measures the
node process from ``/proc`` (resident memory, open descriptors) and asserts the documented
outcome: the status or abort, bounded memory, slots freed within the deadline, and a DCMTK
sender served afterwards.  The node runs with short deadlines and a small instance limit.
"""

from __future__ import annotations

import http.client
import json
import resource
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import CTImageStorage

from dicom_node.demo import ChestSpec, SeriesInfo, make_chest_phantom, slice_datasets, write_datasets
from tests.conftest import require_tool
from tests.support import procs
from tests.support.node import NodeProcess, node_config, start_node, wait_until
from tests.support.rawpdu import (
    DEFLATED_LE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    VERIFICATION,
    RawAssociation,
    associate_rq,
    c_store_rq,
    open_fds,
    p_data,
    pdu_header,
    rss_bytes,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ACSE_TIMEOUT = 2.0
DIMSE_TIMEOUT = 3.0
NETWORK_TIMEOUT = 3.0
MAX_INSTANCE_MB = 64
MAX_ASSOCIATIONS = 4
MAX_PENDING = 16
MiB = 1 << 20

LISTENER = {
    "acse_timeout": ACSE_TIMEOUT, "dimse_timeout": DIMSE_TIMEOUT, "network_timeout": NETWORK_TIMEOUT,
    "max_instance_mb": MAX_INSTANCE_MB, "max_associations": MAX_ASSOCIATIONS,
    "max_pending_connections": MAX_PENDING,
}
CT_CONTEXTS = [(CTImageStorage, [EXPLICIT_LE]), (CTImageStorage, [IMPLICIT_LE]),
               (CTImageStorage, [DEFLATED_LE]), (VERIFICATION, [EXPLICIT_LE])]
#: Context IDs of CT_CONTEXTS as proposed.
CX_EXPLICIT, CX_IMPLICIT, CX_DEFLATED, CX_ECHO = 1, 3, 5, 7


def _node(workdir: Path, web: bool = False, **listener: object) -> NodeProcess:
    sections: dict[str, dict[str, object]] = {
        "listener": {**LISTENER, **listener}, "worker": {"in_process": "no"},
    }
    if web:
        sections["web"] = {"enabled": True, "host": procs.LOOPBACK, "port": procs.free_port()}
    return start_node(workdir, node_config(workdir, **sections))


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    workdir = tmp_path_factory.mktemp("hostile-net")
    node = _node(workdir)
    try:
        yield node
    finally:
        node.stop()


def _ct(seed: str) -> Dataset:
    phantom = make_chest_phantom(ChestSpec(rows=32, columns=32, slices=1))
    ds = slice_datasets(phantom.hu, phantom.affine, SeriesInfo(seed=seed))[0]
    del ds.file_meta
    return ds


def _encode(ds: Dataset, implicit: bool = False) -> bytes:
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = implicit, True
    write_dataset(fp, ds)
    return fp.getvalue()


def _echoscu_ok(port: int) -> bool:
    require_tool("echoscu")
    res = procs.run_tool(["echoscu", "-aec", "DICOM_NODE", procs.LOOPBACK, str(port)], nodelay=False)
    return res.returncode == 0


def _storescu_ok(port: int, tmp: Path, seed: str) -> bool:
    require_tool("storescu")
    phantom = make_chest_phantom(ChestSpec(rows=32, columns=32, slices=2))
    files = write_datasets(slice_datasets(phantom.hu, phantom.affine, SeriesInfo(seed=seed)), tmp / seed)
    res = procs.run_tool(["storescu", "-aec", "DICOM_NODE", procs.LOOPBACK, str(port), *map(str, files)],
                         nodelay=False)
    return res.returncode == 0 and "Status" not in res.stderr


def _associated(port: int) -> RawAssociation:
    assoc = RawAssociation(port)
    assert assoc.associate(CT_CONTEXTS) == 0x02
    return assoc


def _log_events(node: NodeProcess, event: str) -> list[dict[str, object]]:
    out = []
    for line in node.logs().splitlines():
        if f'"{event}"' in line:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


# -- item 1: decompression bomb ----------------------------------------------------------------
def _deflate_bomb(inflated_gib: int = 1) -> tuple[Dataset, bytes]:
    """A CT data set whose pixel data is ``inflated_gib`` GiB of zeros, deflated to ~1 MB.

    The zeros are compressed once per 4 MiB after a full flush (which resets the history), so
    every 4 MiB block compresses to the same bytes and the bomb is built by repetition.
    """
    ds = _ct("bomb")
    del ds.PixelData
    head = _encode(ds) + b"\xe0\x7f\x10\x00OB\x00\x00" + struct.pack("<I", inflated_gib << 30)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    start = deflate.compress(head) + deflate.flush(zlib.Z_FULL_FLUSH)
    block = deflate.compress(bytes(4 * MiB)) + deflate.flush(zlib.Z_FULL_FLUSH)
    assert deflate.compress(bytes(4 * MiB)) + deflate.flush(zlib.Z_FULL_FLUSH) == block
    final = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS).flush()  # an empty last block
    return ds, start + block * ((inflated_gib << 30) // (4 * MiB)) + final


def test_deflate_bomb_is_refused_without_inflating_it(node: NodeProcess, tmp_path: Path) -> None:
    """1 MB of deflate that inflates to 1 GiB: 0xA700 "refused: too large", the node's memory
    does not move, nothing is spooled, and storescu is served afterwards."""
    ds, bomb = _deflate_bomb(1)
    assert len(bomb) < 2 * MiB
    pid = node.server.proc.pid
    before = rss_bytes(pid)
    with _associated(node.port) as assoc:
        status, comment = assoc.store(CX_DEFLATED, CTImageStorage, ds.SOPInstanceUID, bomb)
        after = rss_bytes(pid)
        assoc.release()
    assert (status, comment) == (0xA700, "refused: too large")
    growth = after - before
    print(f"deflate bomb: RSS {before / MiB:.0f} -> {after / MiB:.0f} MiB")
    assert growth < 32 * MiB, f"the node grew by {growth / MiB:.0f} MiB refusing a deflate bomb"
    assert not list((node.server.workdir / "spool").rglob(f"{ds.SOPInstanceUID}*"))
    assert _storescu_ok(node.port, tmp_path, "after-bomb")


def test_deflated_instance_within_the_limit_is_stored(node: NodeProcess) -> None:
    """The bound refuses only what exceeds it: an ordinary deflated CT gets Success."""
    ds = _ct("deflated-ok")
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = deflate.compress(_encode(ds)) + deflate.flush()
    with _associated(node.port) as assoc:
        assert assoc.store(CX_DEFLATED, CTImageStorage, ds.SOPInstanceUID, body) == (0x0000, "")
        assoc.release()


# -- item 2: memory committed before data arrives ------------------------------------------------
def test_declared_pdu_length_commits_no_memory_and_slots_free_at_the_deadline(
    node: NodeProcess, tmp_path: Path
) -> None:
    """Every association slot holds a P-DATA-TF header declaring 64 MiB and 1 KiB of body:
    the node's memory grows by what arrived (not 4 x 64 MiB), the slots are freed at
    dimse_timeout (A-ABORT), and storescu is served then."""
    pid = node.server.proc.pid
    before = rss_bytes(pid)
    attackers = [_associated(node.port) for _ in range(MAX_ASSOCIATIONS)]
    try:
        started = time.monotonic()
        for assoc in attackers:
            assoc.send(pdu_header(0x04, 64 * MiB - 6) + struct.pack(">IBB", 64 * MiB - 10, 1, 0) + bytes(1024))
        time.sleep(0.5)
        held = rss_bytes(pid)
        print(f"4 x 64 MiB declared: RSS {before / MiB:.0f} -> {held / MiB:.0f} MiB")
        assert held - before < 24 * MiB, f"{(held - before) / MiB:.0f} MiB committed for 4 KiB received"
        with RawAssociation(node.port) as late:  # all slots taken meanwhile
            assert late.associate(CT_CONTEXTS) == 0x03  # A-ASSOCIATE-RJ: local limit exceeded
        outcomes = [a.ended_by_listener(DIMSE_TIMEOUT + 3) for a in attackers]
        elapsed = time.monotonic() - started
    finally:
        for a in attackers:
            a.close()
    assert outcomes == ["abort"] * MAX_ASSOCIATIONS
    assert DIMSE_TIMEOUT - 0.5 < elapsed < DIMSE_TIMEOUT + 3
    assert _storescu_ok(node.port, tmp_path, "after-declared")
    reasons = [e.get("reason") for e in _log_events(node, "association_aborted")]
    assert any("dimse_timeout" in str(r) for r in reasons), reasons


def test_endless_data_set_is_aborted_at_max_instance_mb(node: NodeProcess) -> None:
    """Non-last PDVs forever: aborted once past max_instance_mb, memory bounded by that cap."""
    pid = node.server.proc.pid
    before = rss_bytes(pid)
    peak = before
    chunk = p_data(CX_EXPLICIT, bytes(MiB - 12), command=False, last=False)
    sent = 0
    with _associated(node.port) as assoc:
        assoc.send(p_data(CX_EXPLICIT, c_store_rq(CTImageStorage, "1.2.3.4"), command=True, last=True))
        try:
            while sent < 4 * MAX_INSTANCE_MB * MiB:
                assoc.send(chunk)
                sent += len(chunk)
                if sent % (8 * MiB) < len(chunk):
                    peak = max(peak, rss_bytes(pid))
        except OSError:
            pass  # the node aborted and closed
        outcome = assoc.ended_by_listener(5)
    print(f"endless data set: {sent / MiB:.0f} MiB sent, RSS {before / MiB:.0f} -> peak {peak / MiB:.0f} MiB")
    assert outcome in ("abort", "closed")
    assert sent < 2 * MAX_INSTANCE_MB * MiB + 16 * MiB, "the node kept reading past max_instance_mb"
    assert peak - before < 3 * MAX_INSTANCE_MB * MiB
    wait_until(lambda: any("max_instance_mb" in str(e.get("reason"))
                           for e in _log_events(node, "association_aborted")), 10, what="abort logged")
    assert _echoscu_ok(node.port)


def test_pre_association_connections_are_capped_and_bounded(node: NodeProcess) -> None:
    """300 connections that each declare a 1 MiB A-ASSOCIATE-RQ, and 300 that send nothing:
    an RQ over max_associate_request_kb is aborted at once; at most max_pending_connections
    are held (the oldest shed first); memory stays bounded; echoscu gets in meanwhile."""
    pid = node.server.proc.pid
    rss_before, fds_before = rss_bytes(pid), open_fds(pid)
    big = []
    for _ in range(300):
        conn = RawAssociation(node.port)
        conn.send(pdu_header(0x01, MiB) + associate_rq(CT_CONTEXTS)[6:200])
        big.append(conn)
    aborted = sum(c.ended_by_listener(2) in ("abort", "closed") for c in big[:20])
    idle = [RawAssociation(node.port) for _ in range(300)]
    try:
        time.sleep(0.5)
        rss_held, fds_held = rss_bytes(pid), open_fds(pid)
        print(f"600 pre-association connections: RSS {rss_before / MiB:.0f} -> {rss_held / MiB:.0f} MiB, "
              f"fds {fds_before} -> {fds_held}")
        assert aborted == 20
        assert fds_held - fds_before <= MAX_PENDING + 4
        assert rss_held - rss_before < 32 * MiB
        assert _echoscu_ok(node.port)  # the newest connection is not the one shed
        shed = sum(c.ended_by_listener(0.05) == "closed" for c in idle[:100])
        assert shed > 50
    finally:
        for c in big + idle:
            c.close()
    assert _log_events(node, "connection_shed")


# -- item 3: trickling -------------------------------------------------------------------------
def test_trickled_request_is_dropped_at_the_acse_deadline(node: NodeProcess) -> None:
    """One byte of A-ASSOCIATE-RQ every 0.4 s (each receive well inside acse_timeout): the
    connection is dropped acse_timeout after it was opened."""
    rq = associate_rq(CT_CONTEXTS)
    with RawAssociation(node.port) as conn:
        started = time.monotonic()
        still_sending = conn.trickle(rq, 0.4, until=started + ACSE_TIMEOUT + 3)
        outcome = conn.ended_by_listener(3)
        elapsed = time.monotonic() - started
    assert not still_sending or outcome in ("abort", "closed")
    assert elapsed < ACSE_TIMEOUT + 3.5
    assert any("not complete within acse_timeout" in str(e.get("error"))
               for e in _log_events(node, "connection_failed"))


def test_trickling_senders_lose_their_slots_at_the_dimse_deadline(node: NodeProcess, tmp_path: Path) -> None:
    """Every slot taken: three peers trickle a C-STORE one byte every 0.5 s (a timeout per
    receive would never fire), one stays silent: each is aborted at its deadline (dimse_timeout
    from the message's first byte, network_timeout of silence), and storescu is served then."""
    ds = _ct("trickle")
    message = p_data(CX_EXPLICIT, c_store_rq(CTImageStorage, ds.SOPInstanceUID), command=True, last=True) \
        + p_data(CX_EXPLICIT, _encode(ds), command=False, last=True)
    attackers = [_associated(node.port) for _ in range(MAX_ASSOCIATIONS)]
    results: dict[int, tuple[float, str]] = {}

    def attack(i: int, assoc: RawAssociation) -> None:
        started = time.monotonic()
        if i:
            assoc.trickle(message, 0.5, until=started + 30)
        outcome = assoc.ended_by_listener(NETWORK_TIMEOUT + 2)
        results[i] = (time.monotonic() - started, outcome)

    threads = [threading.Thread(target=attack, args=(i, a)) for i, a in enumerate(attackers)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    with RawAssociation(node.port) as late:
        assert late.associate(CT_CONTEXTS) == 0x03  # the trickling peers hold every slot
    for t in threads:
        t.join(40)
    for a in attackers:
        a.close()
    print("trickling peers ended after", {i: round(r[0], 1) for i, r in results.items()})
    assert len(results) == MAX_ASSOCIATIONS
    assert results[0][1] == "abort" and results[0][0] < NETWORK_TIMEOUT + 2  # silent peer
    for i in range(1, MAX_ASSOCIATIONS):
        assert results[i][1] in ("abort", "closed") and results[i][0] < DIMSE_TIMEOUT + 2, results[i]
    assert _storescu_ok(node.port, tmp_path, "after-trickle")


# -- item 13: the whole data set parses in the negotiated syntax --------------------------------
def test_bad_data_sets_get_no_success(node: NodeProcess, tmp_path: Path) -> None:
    """A UID ending in a newline (0xA900), a 2 GB length after the UIDs and a data set in the
    other VR encoding (0xC210, both ways) are refused; the good one gets Success."""
    newline = _ct("nl")
    nl_body = _encode(newline)  # pydicom strips a newline from a UID: edit the bytes
    i = nl_body.find(b"\x20\x00\x0e\x00UI")  # SeriesInstanceUID
    length = struct.unpack_from("<H", nl_body, i + 6)[0]
    uid = nl_body[i + 8:i + 8 + length].rstrip(b"\x00") + b"\n"
    uid += b"\x00" * (len(uid) % 2)
    nl_body = nl_body[:i + 6] + struct.pack("<H", len(uid)) + uid + nl_body[i + 8 + length:]
    late = _encode(_ct("late-2gb"))
    i = late.find(b"\x20\x00\x13\x00IS")
    late = late[:i] + b"\x20\x00\x13\x00UN\x00\x00" + struct.pack("<I", 0x7FFFFFFE) + late[i + 8:]
    good = _ct("good")
    cases = [
        ("newline", CX_EXPLICIT, newline.SOPInstanceUID, nl_body, 0xA900),
        ("2 GB late", CX_EXPLICIT, _ct("late-2gb").SOPInstanceUID, late, 0xC210),
        ("implicit on explicit", CX_EXPLICIT, _ct("imp").SOPInstanceUID, _encode(_ct("imp"), True), 0xC210),
        ("explicit on implicit", CX_IMPLICIT, _ct("exp").SOPInstanceUID, _encode(_ct("exp")), 0xC210),
        ("good", CX_EXPLICIT, good.SOPInstanceUID, _encode(good), 0x0000),
    ]
    with _associated(node.port) as assoc:
        got = {name: assoc.store(cx, CTImageStorage, uid, data)[0] for name, cx, uid, data, _ in cases}
        assoc.release()
    assert got == {name: status for name, _, _, _, status in cases}
    spool = node.server.workdir / "spool"
    assert not [p for p in spool.rglob("*") if "\n" in p.name]
    assert _storescu_ok(node.port, tmp_path, "after-bad")


# -- item 4: out of file descriptors ---------------------------------------------------------------
FD_LIMIT = 160


def _low_fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


def _readyz(conn: http.client.HTTPConnection) -> tuple[int, dict[str, object]]:
    conn.request("GET", "/readyz")
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def test_listener_survives_running_out_of_descriptors(tmp_path: Path) -> None:
    """``serve`` limited to 160 descriptors, 400 idle connections: accept() fails with EMFILE,
    which is logged, backed off and survived by shedding connections not associated yet;
    /readyz fails (dicom_listener) meanwhile, echoscu gets in, and all is well after."""
    workdir = tmp_path / "node"
    config = node_config(
        workdir, listener={**LISTENER, "acse_timeout": 30.0, "max_pending_connections": 1000},
        worker={"in_process": "no"}, web={"enabled": True, "host": procs.LOOPBACK, "port": procs.free_port()},
    )
    node = start_node(workdir, config, preexec_fn=_low_fd_limit)
    web = http.client.HTTPConnection(procs.LOOPBACK, int(config["web"]["port"]), timeout=10)
    try:
        wait_until(lambda: _readyz(web)[1]["checks"]["dicom_listener"]["ok"], 20, what="listener ready")  # type: ignore[index]
        limits = Path(f"/proc/{node.server.proc.pid}/limits").read_text()
        assert any(line.startswith("Max open files") and f" {FD_LIMIT} " in line for line in limits.splitlines())
        idle = []
        for _ in range(400):
            idle.append(RawAssociation(node.port))
        failing = wait_until(lambda: _log_events(node, "listener_accept_failed"), 15, what="EMFILE logged")
        assert failing[0]["errno"] == "EMFILE" and failing[0]["shed_connections"]
        status, body = _readyz(web)
        print("readyz under attack:", status, body["checks"]["dicom_listener"])  # type: ignore[index]
        assert status == 503 and "dicom_listener" in body["failing"]  # type: ignore[operator]
        assert "EMFILE" in body["checks"]["dicom_listener"]["detail"]  # type: ignore[index]
        assert wait_until(lambda: _echoscu_ok(node.port), 30, interval=0.5, what="echoscu under attack")
        for conn in idle:
            conn.close()
        # (no worker runs, so /readyz as a whole stays 503: the listener's check is the one here)
        wait_until(lambda: _readyz(web)[1]["checks"]["dicom_listener"]["ok"], 30, what="ready again")  # type: ignore[index]
        assert _echoscu_ok(node.port)
        assert node.server.proc.poll() is None
    finally:
        web.close()
        node.stop()


def test_serve_raises_the_soft_descriptor_limit(tmp_path: Path) -> None:
    """A soft limit of 256 under a hard one of 4096 is raised to 4096 at start."""
    workdir = tmp_path / "node"
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"this machine's hard descriptor limit is {hard}")

    def low_soft() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096))

    node = start_node(workdir, node_config(workdir, worker={"in_process": "no"}), preexec_fn=low_soft)
    try:
        limits = Path(f"/proc/{node.server.proc.pid}/limits").read_text()
        line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
        assert line.split()[3:5] == ["4096", "4096"], line
    finally:
        node.stop()
