"""The listener's header reader against pydicom's: ``python -m benchmarks.header``.

Every C-STORE data set is walked to its last byte and its UIDs and catalog attributes read
(:func:`dicom_node.ingest.header.parse_header`).  Little endian data sets take the hand-written
scanner; big endian ones and elements out of order take pydicom's reader
(:func:`~dicom_node.ingest.header.values_by_pydicom`, stopping before the pixel data), which gives
the same values (``tests/unit/test_header.py``).  This times both, in the same run, on whole
CT data sets as they arrive (512 x 512 pixels, no file meta): the demo phantom's slice and a
vendor-like one (sequences of undefined length, private groups, Latin-1), explicit and
implicit VR; it prints microseconds per data set (median and minimum of ``--repeat`` rounds).
For pydicom the walk is not counted, only its read of the header: the scanner is charged more
work than its rival.  Run by hand, not in the test suite.
"""

from __future__ import annotations

import argparse
import timeit
from collections.abc import Callable

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_node.ingest.header import parse_header, values_by_pydicom
from tests.support.headers import encode_dataset, plain_ct, vendor_ct


def per_call_us(call: Callable[[], object], number: int, repeat: int) -> list[float]:
    rounds = timeit.repeat(call, number=number, repeat=repeat)
    return sorted(r / number * 1e6 for r in rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=500, help="calls per round")
    parser.add_argument("--repeat", type=int, default=7, help="rounds")
    parser.add_argument("--size", type=int, default=512, help="rows and columns of the slice")
    args = parser.parse_args()
    print(f"{'data set':<26} {'scanner us':>11} {'pydicom us':>11} {'pydicom / scanner':>18}")
    for name, make in (("demo CT", plain_ct), ("vendor-like CT", vendor_ct)):
        for implicit in (False, True):
            syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
            body = encode_dataset(make(args.size), implicit=implicit)
            if parse_header(body, syntax) != values_by_pydicom(body, syntax):
                raise SystemExit(f"{name}: the scanner and pydicom disagree")
            fast = per_call_us(lambda b=body, s=syntax: parse_header(b, s), args.number, args.repeat)  # type: ignore[misc]
            slow = per_call_us(lambda b=body, s=syntax: values_by_pydicom(b, s), args.number, args.repeat)  # type: ignore[misc]
            label = f"{name}, {'implicit' if implicit else 'explicit'}"
            fast_median, slow_median = fast[len(fast) // 2], slow[len(slow) // 2]
            print(f"{label:<26} {fast_median:>11.1f} {slow_median:>11.1f} {slow_median / fast_median:>17.1f}x"
                  f"   (min {fast[0]:.1f} / {slow[0]:.1f})")


if __name__ == "__main__":
    main()
