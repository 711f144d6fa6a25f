"""Ingest throughput: dicom-node listener vs DCMTK storescp (and Orthanc), DCMTK senders.

Run by hand: ``python -m benchmarks.ingest [--instances 200] [--runs 3] [--orthanc] [--serve]``.

The fair protocol comparison: ``TCP_NODELAY=1`` in the environment of every DCMTK tool (sender
and storescp), see docs/performance.md.  1 and 4 parallel associations (4 storescu processes,
each sending a quarter of the corpus).  dicom-node runs in child processes: one listener, and
``--processes N`` listeners sharing the port with ``SO_REUSEPORT`` (one Python process is held
to one core by the GIL).  Each listener runs as in ``dicom-node serve``: the real catalog
recorder (SQLite) behind it, every instance on disk before success (an unnamed file
fdatasync'd, linked under its name, its folder fsync'd).  storescp does not fsync at all;
Orthanc (its defaults, ``SyncStorageArea`` true) fdatasyncs each file but not its folder, so
the file's name is not yet durable when it answers.  Each row also gives the receiver's own
CPU time per instance (all its processes and threads, senders excluded).  ``--serve`` adds
the whole product as ``make run`` starts it (``dicom-node serve``: web server, embedded worker).

Also used by :mod:`benchmarks.stock_sender` (same corpus, same helpers).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.uid import UID

from tests.support import procs

CORPUS_STUDY = "1.2.826.0.1.3680043.8.498.4242"
CORPUS_SERIES = "1.2.826.0.1.3680043.8.498.4242.1"


def make_corpus(out: Path, n: int = 200, size: int = 512) -> list[Path]:
    """``n`` single-frame CT instances (``size``x``size`` int16, ~0.5 MB), seeded and reused."""
    from dicom_node.demo import (
        ChestSpec,
        SeriesInfo,
        make_chest_phantom,
        slice_datasets,
    )

    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(out.glob("*.dcm"))
    if len(existing) == n:
        return existing
    base = 10
    spec = ChestSpec(rows=size, columns=size, slices=base, pixel_spacing=0.7, slice_spacing=2.0)
    phantom = make_chest_phantom(spec)
    datasets = slice_datasets(
        phantom.hu, phantom.affine, SeriesInfo(study_uid=CORPUS_STUDY, series_uid=CORPUS_SERIES)
    )
    paths = []
    for i in range(n):
        ds = datasets[i % base]
        uid = UID(f"{CORPUS_SERIES}.{i + 1}")
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.InstanceNumber = i + 1
        path = out / f"{i + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


#: The receiver processes behind each port, for their CPU time (:func:`cpu_seconds`).
RECEIVER_PIDS: dict[int, list[int]] = {}


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU of these processes (all their threads) and of their children that
    ended and were waited for (``storescp --fork``'s), from ``/proc/<pid>/stat``; 0 off Linux."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(v) for v in fields[11:15]) / tick  # utime stime cutime cstime
    return total


def _listener_main(
    port: int, root: str, processes: int, ready: Any, stop: Any,
) -> None:
    import structlog

    from dicom_node.catalog import Catalog
    from dicom_node.catalog.recorder import CatalogRecorder
    from dicom_node.ingest.listener import Listener
    from dicom_node.ingest.spool import Spool
    from dicom_node.node import freeze_startup_heap
    from dicom_node.settings import ListenerSettings, StorageSettings

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    # As in ``dicom-node serve``: the real catalog recorder (SQLite) behind the listener.
    catalog = Catalog(f"sqlite:///{Path(root).parent / 'catalog.db'}")
    recorder = CatalogRecorder(catalog)
    recorder.start()
    storage = StorageSettings(root=Path(root), min_free_mb=0)
    listener = Listener(
        ListenerSettings(port=port, max_associations=64),
        Spool(storage.root),
        recorder,
        storage,
        reuse_port=processes > 1,
    )
    freeze_startup_heap()  # as serve does before its listener starts
    listener.start()
    ready.set()
    stop.wait()
    listener.stop()
    recorder.stop()
    catalog.close()


@contextmanager
def dicom_node_listeners(root: Path, processes: int = 1) -> Iterator[int]:
    """Run ``processes`` listener processes on one port (SO_REUSEPORT when > 1); yield the port."""
    ctx = mp.get_context("spawn")
    port = procs.free_port()
    stop = ctx.Event()
    children = []
    for _ in range(processes):
        ready = ctx.Event()
        p = ctx.Process(
            target=_listener_main,
            args=(port, str(root), processes, ready, stop),
        )
        p.start()
        if not ready.wait(150):
            raise RuntimeError("listener process did not start")
        children.append(p)
    RECEIVER_PIDS[port] = [p.pid for p in children if p.pid is not None]
    try:
        yield port
    finally:
        RECEIVER_PIDS.pop(port, None)
        stop.set()
        for p in children:
            p.join(30)
            if p.is_alive():
                p.terminate()


def wait_until_idle(pid: int, timeout: float = 180.0, busy: float = 0.05) -> None:
    """Return once ``pid`` and its descendants used less than ``busy`` of a core for 1 s
    (the embedded worker imports torch and warms its models after ``serve`` listens)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = cpu_seconds(procs.process_tree(pid))
        time.sleep(1.0)
        if cpu_seconds(procs.process_tree(pid)) - before < busy:
            return
    raise RuntimeError(f"serve (pid {pid}) still busy after {timeout:g} s")


@contextmanager
def dicom_node_serve(workdir: Path) -> Iterator[int]:
    """The whole product as ``make run`` starts it: ``dicom-node serve`` with its web server
    and embedded worker (SQLite catalog and broker), no rules; yield its DICOM port once the
    worker is idle.  CPU is counted for the ``serve`` process only."""
    from tests.support.node import node_config, start_node

    workdir.mkdir(parents=True, exist_ok=True)
    config = node_config(
        workdir, idle_seconds=60.0, web={"enabled": True, "port": procs.free_port()},
        worker={"in_process": "yes"},
    )
    node = start_node(workdir, config)
    try:
        pid = node.server.proc.pid
        wait_until_idle(pid)
        RECEIVER_PIDS[node.port] = [pid]
        yield node.port
    finally:
        RECEIVER_PIDS.pop(node.port, None)
        node.stop()


def _pynetdicom_main(port: int, root: str, mode: str, max_pdu: int, ready: Any, stop: Any) -> None:
    """A plain pynetdicom storage SCP (the issue's reference rows): ``mode`` is ``raw`` (write the
    received bytes behind a file meta header), ``nothing`` or ``save_as`` (pydicom writes)."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    out = Path(root)
    out.mkdir(parents=True, exist_ok=True)

    def handle(event: Any) -> int:
        sop = event.request.AffectedSOPInstanceUID
        if mode == "raw":
            (out / f"{sop}.dcm").write_bytes(event.encoded_dataset())
        elif mode == "save_as":
            ds = event.dataset
            ds.file_meta = event.file_meta
            ds.save_as(out / f"{sop}.dcm", enforce_file_format=True)
        return 0x0000

    ae = AE(ae_title="PYNETDICOM")
    ae.supported_contexts = AllStoragePresentationContexts
    ae.maximum_pdu_size = max_pdu
    ae.maximum_associations = 64
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle)])
    assert server is not None  # block=False returns the server
    ready.set()
    stop.wait()
    server.shutdown()


@contextmanager
def plain_pynetdicom(root: Path, mode: str, max_pdu: int) -> Iterator[int]:
    """Run :func:`_pynetdicom_main` in a child process; yield its port."""
    ctx = mp.get_context("spawn")
    port = procs.free_port()
    ready, stop = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_pynetdicom_main, args=(port, str(root), mode, max_pdu, ready, stop))
    child.start()
    try:
        if not ready.wait(60):
            raise RuntimeError("pynetdicom SCP did not start")
        RECEIVER_PIDS[port] = [child.pid] if child.pid is not None else []
        yield port
    finally:
        RECEIVER_PIDS.pop(port, None)
        stop.set()
        child.join(30)
        if child.is_alive():
            child.terminate()


@contextmanager
def stock_storescp(
    workdir: Path, nodelay: bool, *, fork: bool = False, ignore: bool = False
) -> Iterator[int]:
    """DCMTK storescp (no fsync; ``--fork``: a process per association; ``--ignore``: receive
    and store nothing), Nagle on unless ``nodelay``; yield its port."""
    extra = [*(["--fork"] if fork else []), *(["--ignore"] if ignore else [])]
    server = procs.start_storescp(workdir, nodelay=nodelay, extra_args=extra)
    RECEIVER_PIDS[server.port] = [server.proc.pid]
    try:
        yield server.port
    finally:
        RECEIVER_PIDS.pop(server.port, None)
        server.stop()


@contextmanager
def orthanc(workdir: Path, nodelay: bool) -> Iterator[int]:
    """Orthanc with a throw-away storage folder and SQLite index; yield its DICOM port."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = procs.free_port()
    config = {
        "Name": "bench",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "DicomAet": "ORTHANC",
        "DicomPort": port,
        "HttpPort": procs.free_port(),
        "HttpServerEnabled": True,
        "RemoteAccessAllowed": False,
        "DicomCheckCalledAet": False,
        "StorageCompression": False,
        "Plugins": [],
        "DicomAlwaysAllowStore": True,
        "UnknownSopClassAccepted": True,
    }
    cfg = workdir / "config.json"
    cfg.write_text(json.dumps(config))
    log = (workdir / "orthanc.log").open("wb")
    proc = subprocess.Popen(
        ["Orthanc", str(cfg)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=procs.dcmtk_env(nodelay),
        cwd=workdir,
    )
    log.close()
    try:
        procs.wait_for_port(port, proc=proc, timeout=30)
        RECEIVER_PIDS[port] = [proc.pid]
        yield port
    finally:
        RECEIVER_PIDS.pop(port, None)
        procs.stop_process(proc)


def disk_flush_ms(folder: Path, size: int = 512 << 10, n: int = 50) -> float:
    """Median ms of ``pwrite`` + ``fdatasync`` of ``size`` bytes over blocks already on disk (what
    one durable overwrite costs): a floor under one durable C-STORE on one association."""
    path = folder / "flush-probe.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, bytes(size), 0)
        os.fsync(fd)
        data = os.urandom(size)
        times = []
        for _ in range(n):
            start = time.perf_counter()
            os.pwrite(fd, data, 0)
            os.fdatasync(fd)
            times.append(time.perf_counter() - start)
    finally:
        os.close(fd)
        path.unlink()
    return statistics.median(times) * 1000


def send_parallel(
    port: int, ae_title: str, files: Sequence[Path], parallel: int, nodelay: bool
) -> float:
    """Send ``files`` with ``parallel`` concurrent storescu processes; return the wall time."""
    chunks = [list(files[i::parallel]) for i in range(parallel)]
    start = time.perf_counter()
    running = [
        subprocess.Popen(
            ["storescu", "-aec", ae_title, "127.0.0.1", str(port), *map(str, chunk)],
            env=procs.dcmtk_env(nodelay),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for chunk in chunks
    ]
    outputs = [p.communicate()[0] for p in running]
    elapsed = time.perf_counter() - start
    for p, out in zip(running, outputs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed ({p.returncode}): {out.decode(errors='replace')}")
    return elapsed


@dataclass
class Target:
    name: str
    ae_title: str
    start: Callable[[Path], Any]  # (workdir) -> context manager yielding the port
    note: str = ""


def warm_free_memory(folder: Path, nbytes: int) -> None:
    """Write and delete ``nbytes`` of file, so the receiver about to be measured writes into
    memory the guest touched a moment ago.

    This virtual machine hands memory freed for ~2 s back to its host (virtio free page
    reporting); the next write into such a page costs a fault on the host: 1.2 ms per 0.5 MB
    written into the page cache, against 0.09 ms for memory freed just before (measured with
    ``os.writev`` of 0.5 MB to new files).  Without this, the receiver that starts fastest
    (``storescp``, a few ms) writes into the memory freed by the previous run's clean-up, and
    one that needs a second or two to start (a Python process) into memory handed back.  A
    long-running node on any machine writes into page cache it recycles, which is warm.
    """
    path = folder / "warm-up"
    block = bytes(8 << 20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(max(1, nbytes // len(block))):
            os.write(fd, block)
    finally:
        os.close(fd)
        path.unlink()


def measure_interleaved(
    targets: Sequence[Target],
    files: Sequence[Path],
    parallel: int,
    nodelay: bool,
    runs: int,
    scratch: Path,
    warm_up: bool = True,
) -> dict[str, list[float]]:
    """Instances/s per target; runs interleave the targets so ratios share the machine's mood.

    Each run starts a fresh receiver on a fresh folder (no file is ever replaced), after an
    ``os.sync()``: a receiver that does not fsync (storescp) leaves ~100 MB of dirty
    pages, and the kernel writing them back would slow the next receiver's flushes and fsyncs
    (ext4 writes a file's data before the commit that makes its name durable).  Once the
    receiver is up, :func:`warm_free_memory` gives every receiver the same memory to write into.
    """
    rates: dict[str, list[float]] = {t.name: [] for t in targets}
    warm_bytes = 2 * sum(f.stat().st_size for f in files)
    for run in range(runs):
        for target in targets:
            os.sync()
            workdir = scratch / f"{target.name}-{parallel}-{run}".replace(" ", "_")
            with target.start(workdir) as port:
                if warm_up:
                    warm_free_memory(scratch, warm_bytes)
                before = cpu_seconds(RECEIVER_PIDS.get(port, []))
                seconds = send_parallel(port, target.ae_title, files, parallel, nodelay)
                time.sleep(0.3)  # forked children reaped; the receiver done with the burst
                used = cpu_seconds(RECEIVER_PIDS.get(port, [])) - before
            rates[target.name].append(len(files) / seconds)
            CPU_MS[(target.name, parallel)].append(used / len(files) * 1000)
            shutil.rmtree(workdir, ignore_errors=True)
    return rates


#: Receiver CPU ms per instance, per (receiver, associations), one value per run.
CPU_MS: defaultdict[tuple[str, int], list[float]] = defaultdict(list)


def print_table(title: str, rows: list[tuple[str, int, list[float], float | None]]) -> None:
    """Print ``(receiver, parallel, rates, ratio)`` rows with median and spread, and the
    receiver's CPU ms per instance (median of the runs; its own processes, senders excluded)."""
    print(f"\n{title}")
    print(f"{'receiver':<36} {'assoc':>5} {'median/s':>9} {'runs (instances/s)':<28} {'ratio':>6} {'CPU ms':>7}")
    for name, parallel, rates, ratio in rows:
        runs = ", ".join(f"{r:.0f}" for r in rates)
        shown = f"{ratio:.2f}x" if ratio is not None else ""
        cpu = CPU_MS.get((name, parallel))
        cpu_shown = f"{statistics.median(cpu):.2f}" if cpu else ""
        print(f"{name:<36} {parallel:>5} {statistics.median(rates):>9.1f} {runs:<28} {shown:>6} {cpu_shown:>7}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--processes",
        type=int,
        default=2,
        help="listener processes sharing the port in the SO_REUSEPORT variant",
    )
    parser.add_argument("--parallel", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--orthanc", action="store_true", help="also measure Orthanc")
    parser.add_argument(
        "--serve",
        action="store_true",
        help="also measure the whole 'dicom-node serve' (web server, embedded worker)",
    )
    parser.add_argument(
        "--references",
        action="store_true",
        help="also storescp --ignore and plain pynetdicom SCPs (the issue's reference rows)",
    )
    parser.add_argument(
        "--no-warm-up",
        action="store_true",
        help="skip warm_free_memory() before each run (to see what this VM's memory costs)",
    )
    parser.add_argument(
        "--corpus", type=Path, default=Path(tempfile.gettempdir()) / "dn-bench-corpus"
    )
    args = parser.parse_args(argv)

    files = make_corpus(args.corpus, args.instances)
    nodelay = True

    def targets_for(parallel: int) -> list[Target]:
        # With several associations storescp forks a process per association (as in the issue).
        fork = parallel > 1
        targets = [
            Target(
                "storescp" + (" --fork" if fork else "") + " (no fsync)",
                "ARCHIVE",
                lambda w: stock_storescp(w, nodelay, fork=fork),
            ),
            Target(
                "dicom-node (default)",
                "DICOM_NODE",
                lambda w: dicom_node_listeners(w / "spool", 1),
            ),
            Target(
                f"dicom-node, {args.processes} proc",
                "DICOM_NODE",
                lambda w: dicom_node_listeners(w / "spool", args.processes),
            ),
        ]
        if args.serve:
            targets.append(Target("dicom-node serve (web, worker)", "DICOM_NODE", dicom_node_serve))
        if args.orthanc and procs.tool_path("Orthanc"):
            targets.append(Target("Orthanc (file fdatasync)", "ORTHANC", lambda w: orthanc(w, nodelay)))
        if args.references:
            targets += [
                Target(
                    "storescp --ignore (stores nothing)",
                    "ARCHIVE",
                    lambda w: stock_storescp(w, nodelay, fork=fork, ignore=True),
                ),
                Target("pynetdicom, raw bytes", "PYNETDICOM",
                       lambda w: plain_pynetdicom(w, "raw", 16382)),
                Target("pynetdicom, raw bytes, max PDU 0", "PYNETDICOM",
                       lambda w: plain_pynetdicom(w, "raw", 0)),
                Target("pynetdicom, nothing, max PDU 0", "PYNETDICOM",
                       lambda w: plain_pynetdicom(w, "nothing", 0)),
                Target("pynetdicom, dataset.save_as", "PYNETDICOM",
                       lambda w: plain_pynetdicom(w, "save_as", 16382)),
            ]
        return targets

    with tempfile.TemporaryDirectory(prefix="dn-bench-") as tmp:
        scratch = Path(tmp)
        flush_ms = [disk_flush_ms(scratch)]
        rows: list[tuple[str, int, list[float], float | None]] = []
        for parallel in args.parallel:
            targets = targets_for(parallel)
            results = measure_interleaved(
                targets, files, parallel, nodelay, args.runs, scratch, warm_up=not args.no_warm_up
            )
            base = statistics.median(results[targets[0].name])
            for t in targets:
                ratio = None if t is targets[0] else statistics.median(results[t.name]) / base
                rows.append((t.name, parallel, results[t.name], ratio))
            flush_ms.append(disk_flush_ms(scratch))
    print_table(
        f"Ingest, {len(files)} CT instances 512x512, DCMTK with TCP_NODELAY=1, "
        f"median of {args.runs} runs (ratio vs storescp)",
        rows,
    )
    floor = statistics.median(flush_ms)
    print(
        f"\nthis disk: pwrite 0.5 MB + fdatasync (overwrite) {floor:.2f} ms median "
        f"(probes {', '.join(f'{f:.2f}' for f in flush_ms)}), so a receiver that makes each "
        f"instance durable before answering is capped at {1000 / floor:.0f} instances/s on one "
        f"association (its sender waits for each answer); parallel associations share flushes"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
