"""Peak memory of ``dicom-node serve`` while N DCMTK storescu processes send at once.

Run by hand: ``python -m benchmarks.parallel_senders [--senders 8] [--instances 200] [--size 512]``.

Starts a real node (embedded broker, no routing rules, so only the listener, the catalog
recorder and the completion loop run in the measured process; the in-process worker is a child
and is not counted), sends ``--senders`` series of ``--instances`` CT slices in parallel, and
reports the listener's peak resident memory (``VmHWM`` from ``/proc``, which the kernel keeps as
a high-water mark, so no sampling is missed), its resident memory before the load, the wall
time and the throughput.  Every instance must be acknowledged and spooled.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from dicom_node.demo import ChestSpec, SeriesInfo, make_chest_phantom, slice_datasets, write_datasets
from tests.support import procs
from tests.support.node import node_config, start_node


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--instances", type=int, default=200, help="instances per sender")
    parser.add_argument("--size", type=int, default=512, help="rows = columns of each slice")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="dn-parallel-") as tmp:
        root = Path(tmp)
        batches = []
        for i in range(args.senders):
            phantom = make_chest_phantom(ChestSpec(rows=args.size, columns=args.size, slices=args.instances,
                                                   pixel_spacing=350.0 / args.size, noise_hu=0.0))
            batches.append(write_datasets(slice_datasets(phantom.hu, phantom.affine, SeriesInfo(seed=f"par-{i}")),
                                          root / f"s{i}"))
        nbytes = sum(p.stat().st_size for b in batches for p in b)
        config = node_config(root / "node", idle_seconds=30.0)
        config["listener"]["max_associations"] = max(16, args.senders)
        node = start_node(root / "node", config)
        try:
            pid = node.server.proc.pid
            before = _status_kb(pid, "VmRSS")
            t0 = time.perf_counter()
            senders = [subprocess.Popen(["storescu", "-aet", f"MOD{i}", "-aec", "DICOM_NODE", procs.LOOPBACK,
                                         str(node.port), *map(str, files)], stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, env=procs.dcmtk_env(False))
                       for i, files in enumerate(batches)]
            outputs = [s.communicate(timeout=900)[0] for s in senders]
            wall = time.perf_counter() - t0
            peak = _status_kb(pid, "VmHWM")
            failed = [o for s, o in zip(senders, outputs, strict=True) if s.returncode != 0 or "Store Failed" in o]
            spool = root / "node" / "spool"
            stored = sum(1 for _ in spool.rglob("*.dcm"))
        finally:
            node.stop()
    total = args.senders * args.instances
    print(f"senders                 {args.senders} x {args.instances} instances ({args.size}x{args.size} int16)")
    print(f"data                    {nbytes / 1e6:.0f} MB")
    print(f"stored                  {stored} / {total}{'  FAILED senders: ' + str(len(failed)) if failed else ''}")
    print(f"wall time               {wall:.1f} s  ({total / wall:.0f} instances/s, {nbytes / 1e6 / wall:.0f} MB/s)")
    print(f"listener RSS before     {before / 1024:.0f} MiB")
    print(f"listener peak RSS       {peak / 1024:.0f} MiB (VmHWM)")
    return 0 if stored == total and not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
