"""Unmodified DCMTK storescu (Nagle on) -> dicom-node listener vs -> stock storescp.

Run by hand: ``python -m benchmarks.stock_sender [--instances 200] [--runs 3]``.

Hospitals run unmodified senders: storescu without ``TCP_NODELAY`` in its environment writes each
C-STORE message as two small segments and waits for the receiver's delayed ACK (~40 ms per
instance).  dicom-node sets ``TCP_NODELAY`` on every accepted socket and re-arms
``TCP_QUICKACK`` before each recv, so the sender is not stalled.  Both receivers get the same
200 CT instances (512x512 int16) in the same run; dicom-node fsyncs every file, storescp does
not.  Target: dicom-node >= 5x stock storescp.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path

from benchmarks.ingest import (
    Target,
    dicom_node_listeners,
    make_corpus,
    measure_interleaved,
    print_table,
    stock_storescp,
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--corpus", type=Path, default=Path(tempfile.gettempdir()) / "dn-bench-corpus"
    )
    args = parser.parse_args(argv)

    files = make_corpus(args.corpus, args.instances)
    nodelay = False  # the point: nobody tuned the sender (nor storescp)
    targets = [
        Target("stock storescp (no fsync)", "ARCHIVE", lambda w: stock_storescp(w, nodelay)),
        Target(
            "dicom-node, 1 process (durable)",
            "DICOM_NODE",
            lambda w: dicom_node_listeners(w / "spool", 1),
        ),
    ]
    with tempfile.TemporaryDirectory(prefix="dn-bench-") as tmp:
        results = measure_interleaved(targets, files, 1, nodelay, args.runs, Path(tmp))
    base = statistics.median(results[targets[0].name])
    rows = [
        (t.name, 1, results[t.name], None if i == 0 else statistics.median(results[t.name]) / base)
        for i, t in enumerate(targets)
    ]
    print_table(
        f"Unmodified storescu (no TCP_NODELAY), {len(files)} CT instances 512x512, "
        f"median of {args.runs} runs (ratio vs stock storescp)",
        rows,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
