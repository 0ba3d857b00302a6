"""The ``fastfeed`` command line: the embedded demo end to end, and its error path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastfeed.cli", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_bench_demo_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    proc = run_cli(
        "bench", "--demo", "--demo-size", "8MiB", "--demo-shard-size", "2MiB", "--demo-sample-size", "16KiB",
        "--batch-size", "16", "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "raw GET ceiling" in proc.stdout and "batches, epoch 0" in proc.stdout
    report = json.loads(out.read_text())
    names = [r["name"] for r in report["results"]]
    assert names == ["raw GET ceiling", "samples, epoch 0", "batches, epoch 0"]
    total = report["setup"]["num_shards"] * report["setup"]["samples_per_shard"]
    samples, batches = report["results"][1], report["results"][2]
    assert samples["samples"] == batches["samples"] == total
    assert samples["bytes"] >= total * 16 * 1024
    assert all(r["mib_per_s"] > 0 for r in report["results"])


def test_bench_reports_a_clear_error_for_a_missing_dataset(tmp_path: Path) -> None:
    proc = run_cli("bench", str(tmp_path / "nowhere"))
    assert proc.returncode == 2
    assert "fastfeed: error:" in proc.stderr and "nowhere" in proc.stderr


def test_bench_needs_a_url_or_demo() -> None:
    proc = run_cli("bench")
    assert proc.returncode == 2
    assert "--demo" in proc.stderr
