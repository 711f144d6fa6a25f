"""CPU an idle worker costs: a real ``dicom-node serve`` with its embedded worker, no traffic.

Run by hand: ``python -m benchmarks.idle_cpu [--seconds 30]``.

Starts a node (embedded SQLite broker, in-process worker), waits until the worker's heartbeat is
in the catalog (started, models warmed), then reads ``utime + stime`` of every process of the
``dicom-node worker`` tree (Celery main process and its pool children) and of ``serve`` from
``/proc/<pid>/stat`` at the start and the end of the window, and prints the share of one core.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from dicom_node.catalog import Catalog
from dicom_node.catalog.heartbeats import worker_statuses
from tests.support import procs
from tests.support.node import node_config, start_node, wait_until

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()


def measure(seconds: float) -> dict[str, float]:
    """Share of one core (percent) of serve, the worker main process and its pool children."""
    with tempfile.TemporaryDirectory(prefix="dn-idle-") as tmp:
        workdir = Path(tmp)
        config = node_config(workdir, rules=[{"name": "ct", "match": {"Modality": "CT"}, "models": ["ct-tissue"]}])
        node = start_node(workdir, config)
        try:
            catalog = Catalog(config["database"]["url"], create=False)
            wait_until(lambda: [w for w in worker_statuses(catalog) if w.alive], 120, what="worker heartbeat")
            catalog.close()
            time.sleep(5.0)  # let start-up work (imports, warm-up) finish
            serve = node.server.proc.pid
            worker = next(p for p in procs.child_processes(serve) if " worker" in cmdline(p))
            groups = {"serve": [serve], "worker main": [worker], "worker pool children": procs.process_tree(worker)[1:]}
            before = {name: sum(cpu_seconds(p) for p in pids) for name, pids in groups.items()}
            t0 = time.monotonic()
            time.sleep(seconds)
            elapsed = time.monotonic() - t0
            after = {name: sum(cpu_seconds(p) for p in pids) for name, pids in groups.items()}
            return {name: 100.0 * (after[name] - before[name]) / elapsed for name in groups}
        finally:
            node.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args(argv)
    shares = measure(args.seconds)
    print(f"idle CPU over {args.seconds:g} s, % of one core:")
    for name, pct in shares.items():
        print(f"  {name:<22} {pct:6.2f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
