"""Medians over repeated ``fastfeed bench --json`` runs, grouped by file name.

    python benchmarks/summarize_bench.py DIR

Files are named ``<group>-<round>.json`` (as ``benchmarks/loader/bench_worker_mode.sh`` writes
them). For every fastfeed run of each group: the median over rounds of its throughput as a
fraction of the ceiling measured in the same run (raw GET for cold epochs, raw read of the cache
for warm ones), its MB/s, its client CPU s/GiB and that as a multiple of the ceiling's, the
time to its first batch and its peak RSS; then the ceilings' medians. Peers are listed the same
way, against the same ceilings.
"""

from __future__ import annotations

import collections
import glob
import json
import statistics
import sys
from typing import Any


def _rate(m: dict[str, Any]) -> tuple[float, float]:
    """(MB/s, CPU s per GiB) of one measurement."""
    return m["bytes"] / 1e6 / m["seconds"], m["cpu_s"] / (m["bytes"] / 2**30)


def main(directory: str) -> None:
    rows: dict[tuple[str, str], list[tuple[float, ...]]] = collections.defaultdict(list)
    ceilings: dict[tuple[str, str], list[tuple[float, float]]] = collections.defaultdict(list)
    for path in sorted(glob.glob(f"{directory}/*.json")):
        group = path.rsplit("/", 1)[-1].rsplit("-", 1)[0]
        with open(path) as f:
            report = json.load(f)
        for name, ceiling in report["ceilings"].items():
            ceilings[(group, name)].append(_rate(ceiling))
        for run in report["runs"]:
            phase = run.get("extra", {}).get("phase")
            ceiling = report["ceilings"].get("raw read" if phase == "warm" else "raw GET")
            if ceiling is None:
                continue
            (mb, cpu), (top, top_cpu) = _rate(run), _rate(ceiling)
            rss = run.get("peak_rss_bytes", 0) / 2**20
            rows[(group, run["name"])].append((mb / top, mb, cpu, cpu / top_cpu, run["first_sample_s"], rss))
    head = ["x ceil", "MB/s", "CPU/GiB", "x ceil", "1st s", "RSS MiB"]
    print(f"{'group':26s} {'run':34s}  n " + " ".join(f"{h:>7s}" for h in head))
    for (group, name), values in sorted(rows.items()):
        x, mb, cpu, cpu_x, first, rss = (statistics.median(v) for v in zip(*values, strict=True))
        figures = f"{x:7.2f} {mb:7.0f} {cpu:7.2f} {cpu_x:7.2f} {first:7.3f} {rss:7.0f}"
        print(f"{group:26s} {name:34s} {len(values):2d} {figures}")
    print()
    for (group, name), values in sorted(ceilings.items()):
        mb, cpu = (statistics.median(v) for v in zip(*values, strict=True))
        print(f"{group:26s} ceiling {name:26s} {len(values):2d} {mb:6.0f} MB/s {cpu:5.2f} CPU s/GiB")


if __name__ == "__main__":
    main(sys.argv[1])
