#!/usr/bin/env python
"""Checksum speed of a checkpoint part: fastfeed's native CRC32C (the CPU's CRC32 instruction
where it has one, else the portable table path) vs zlib's CRC32, over the same 32 MiB buffer,
in one process. Prints GB/s (median of ``--repeats``) and the ratio to zlib.

    python benchmarks/checkpoint/bench_checksum.py --repeats 9
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import zlib
from collections.abc import Callable

from fastfeed import _native


def rate(fn: Callable[[bytes], int], data: bytes, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(data)
        times.append(time.perf_counter() - start)
    return len(data) / statistics.median(times) / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=32 << 20)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    data = os.urandom(args.size)
    runs = {
        "zlib.crc32": zlib.crc32,
        "crc32c (native)": _native.crc32c,
        "crc32c (portable)": lambda b: _native.crc32c(b, portable=True),
    }
    rates = {name: rate(fn, data, args.repeats) for name, fn in runs.items()}
    print(f"hardware CRC32 instruction: {_native.CRC32C_HARDWARE}")
    for name, value in rates.items():
        print(f"{name:<18} {value:6.2f} GB/s  {value / rates['zlib.crc32']:5.2f}x zlib")
    return 0


if __name__ == "__main__":
    sys.exit(main())
