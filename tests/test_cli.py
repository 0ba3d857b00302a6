"""The ``fastfeed`` command line: ``fastfeed bench`` end to end (the embedded demo, peers,
emulated latency, JSON, plot), its target checks, and its error paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from fastfeed.bench.measure import Measurement
from fastfeed.bench.report import Report

SMALL_DEMO = ("--demo-size", "8MiB", "--demo-shard-size", "2MiB", "--demo-sample-size", "16KiB", "--batch-size", "16")


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastfeed.cli", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_bench_demo_runs_end_to_end(tmp_path: Path) -> None:
    out, plot = tmp_path / "report.json", tmp_path / "plot.png"
    proc = run_cli(
        "bench", "--demo", *SMALL_DEMO, "--workers", "1", "--epochs", "2", "--checkpoint-size", "8MiB",
        "--compare", "torch,webdataset,litdata", "--json", str(out), "--plot", str(plot),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "raw GET ceiling" in proc.stdout and "fastfeed epoch 1 (warm)" in proc.stdout
    assert "targets (fastfeed vs the ceilings and the best peer):" in proc.stdout and "issue" not in proc.stdout.lower()
    # The run says what it does before it does it: the scenario, with the same settings for all.
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("scenario:")]
    assert "batches of 16 with 1 worker," in line and "epoch 0 cold" in line and "then 1 warm" in line
    assert "the peers (torch, webdataset, litdata) read the same shards" in line
    assert proc.stdout.index("scenario:") < proc.stdout.index("raw GET ceiling")
    report = json.loads(out.read_text())
    total = report["setup"]["num_shards"] * report["setup"]["samples_per_shard"]
    assert set(report["ceilings"]) == {"raw GET", "raw read"}
    assert all(c["bytes"] >= report["setup"]["dataset_bytes"] for c in report["ceilings"].values())
    runs = {r["name"]: r for r in report["runs"]}
    cold, warm = runs["fastfeed epoch 0 (cold)"], runs["fastfeed epoch 1 (warm)"]
    for run in (cold, warm):
        assert run["samples"] == total and run["bytes"] >= total * 16 * 1024
        assert run["mb_per_s"] > 0 and 0 < run["wait_fraction"] <= 1.0 and run["first_sample_s"] > 0
        assert run["batch_p99_ms"] >= run["batch_p50_ms"] > 0
        assert len(run["timeline"]) >= 2 and run["timeline"][-1][1] == run["bytes"]
    assert cold["cache_hit_rate"] == 0.0 and warm["cache_hit_rate"] == 1.0
    # Each epoch says what bounded its loop (no training step here: a loader stage).
    assert {cold["extra"]["bound_by"], warm["extra"]["bound_by"]} <= {"fetch", "parse", "collate", "copy", "decode"}
    assert "what bounds fastfeed's loop: fastfeed epoch 0 (cold): " in proc.stdout
    for peer in ("torch (cold)", "webdataset (cold)"):
        assert runs[peer]["samples"] == total and runs[peer]["extra"]["peer"] in peer
        # timed as fastfeed's runs are: batch latencies, wait fraction, timeline
        assert runs[peer]["batch_p99_ms"] >= runs[peer]["batch_p50_ms"] > 0 and runs[peer]["wait_fraction"] > 0
        assert runs[peer]["timeline"][-1][1] == runs[peer]["bytes"]
    # litdata is not installed in the test environment: skipped with what to do, not a failure.
    assert "litdata" in report["skipped"] and "pip install" in report["skipped"]["litdata"]
    ckpt = report["checkpoint"]
    assert ckpt["bytes"] >= 8 * 2**20 - 64 and 0 < ckpt["stall_s"] < ckpt["commit_s"] and ckpt["clone_s"] > 0
    names = {t["name"] for t in report["targets"]}
    assert {"cold epoch / raw GET ceiling", "warm epoch / raw read ceiling", "cold epoch / best peer"} <= names
    assert all(t["met"] in (True, False) for t in report["targets"])
    assert report["machine"]["cpus"] and report["config"]["compare"] == ["torch", "webdataset", "litdata"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_emulated_latency_delays_every_first_byte(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    proc = run_cli(
        "bench", "--demo", *SMALL_DEMO, "--workers", "0", "--epochs", "1", "--latency-ms", "150", "--compare", "none",
        "--json", str(out), "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["config"]["latency_ms"] == 150
    assert report["ceilings"]["raw GET"]["first_sample_s"] >= 0.15
    assert report["runs"][0]["first_sample_s"] >= 0.15


def test_bench_without_cuda_refuses_device_cuda_before_starting_anything() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    start = time.monotonic()
    proc = run_cli("bench", "--demo", "--device", "cuda")
    assert proc.returncode == 2 and "no usable CUDA device" in proc.stderr
    assert "local S3 endpoint" not in proc.stdout and time.monotonic() - start < 30


def test_bench_rejects_an_unknown_peer() -> None:
    proc = run_cli("bench", "--demo", "--compare", "torch,nosuch")
    assert proc.returncode == 2
    assert "nosuch" in proc.stderr and "webdataset" in proc.stderr


def test_bench_reports_a_clear_error_for_a_missing_dataset(tmp_path: Path) -> None:
    proc = run_cli("bench", str(tmp_path / "nowhere"))
    assert proc.returncode == 2
    assert "fastfeed: error:" in proc.stderr and "nowhere" in proc.stderr


def test_bench_needs_a_url_or_demo() -> None:
    proc = run_cli("bench")
    assert proc.returncode == 2
    assert "--demo" in proc.stderr


def _m(name: str, mb: float, cpu_s: float = 0.5, **extra: object) -> Measurement:
    return Measurement(name, 1000, int(mb * 1e6), 1.0, 0.1, cpu_s, extra=dict(extra))


def test_targets_compare_the_runs_of_the_same_phase() -> None:
    report = Report("s3://b/d/", {"latency_ms": 20})
    report.ceilings = {"raw GET": _m("raw GET", 1000), "raw read": _m("raw read", 8000)}
    report.runs = [
        _m("fastfeed epoch 0 (cold)", 950, cpu_s=0.76, phase="cold"),
        _m("fastfeed epoch 1 (warm)", 5000, phase="warm"),
        _m("fastfeed epoch 2 (warm)", 7000, phase="warm"),
        _m("torch (cold)", 300, phase="cold", peer="torch"),
        _m("litdata (cold)", 700, phase="cold", peer="litdata"),
        _m("litdata (warm)", 5000, phase="warm", peer="litdata"),
    ]
    report.checkpoint = {"bytes": 1e8, "clone_s": 0.04, "stall_s": 0.07, "commit_s": 1.0}
    got = {t.name: t for t in report.targets()}
    assert abs(got["cold epoch / raw GET ceiling"].value - 0.95) < 1e-9 and got["cold epoch / raw GET ceiling"].met
    assert abs(got["cold epoch / best peer"].value - 950 / 700) < 1e-9 and got["cold epoch / best peer"].met is False
    # CPU per GiB: 0.76 s for 950 MB against the raw GETs' 0.5 s for 1000 MB
    cpu = got["cold epoch CPU per GiB / raw GET's"]
    assert abs(cpu.value - (0.76 / 950) / (0.5 / 1000)) < 1e-9 and cpu.value > 1.5 and not cpu.met
    assert "litdata" in got["cold epoch / best peer"].detail and "20 ms" in got["cold epoch / best peer"].detail
    # the best warm fastfeed epoch counts: 7000 / 8000 and 7000 / 5000
    assert abs(got["warm epoch / raw read ceiling"].value - 0.875) < 1e-9 and got["warm epoch / raw read ceiling"].met
    assert abs(got["warm epoch / best peer"].value - 1.4) < 1e-9 and not got["warm epoch / best peer"].met
    assert got["checkpoint save() stall / clone()"].met is False
    table = report.table()
    assert "MISSED" in table and "met" in table and "litdata (warm)" in table


def test_bench_calls_an_epoch_from_a_cache_already_warm_warm(tmp_path: Path) -> None:
    from fastfeed.bench.demo import demo
    from fastfeed.bench.run import BenchConfig

    cfg = BenchConfig(batch_size=16, workers=0, epochs=1, cache_dir=str(tmp_path / "cache"), progress=False)
    size = {"size": 4 << 20, "sample_size": 16 << 10, "shard_size": 1 << 20}
    first = demo(cfg, **size)
    assert [r.name for r in first.runs] == ["fastfeed epoch 0 (cold)"] and first.runs[0].cache_hit_rate == 0.0
    again = demo(cfg, **size)  # a new store with the same synthetic bytes: same ETags, same cache keys
    assert [r.name for r in again.runs] == ["fastfeed epoch 0 (warm)"] and again.runs[0].cache_hit_rate == 1.0


def test_bench_persistent_workers_read_every_epoch_whole(tmp_path: Path) -> None:
    from fastfeed.testing.shards import write_synthetic_shards

    write_synthetic_shards(tmp_path / "shards", num_shards=4, samples_per_shard=20, sample_bytes=4096)
    out = tmp_path / "report.json"
    proc = run_cli(
        "bench", str(tmp_path / "shards"), "--workers", "2", "--persistent-workers", "--epochs", "3",
        "--batch-size", "8", "--no-progress", "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["config"]["persistent_workers"] is True
    assert [r["samples"] for r in report["runs"]] == [80, 80, 80], "each epoch, read by the kept workers, is whole"


def test_bench_without_a_cache_streams_every_epoch_from_the_store(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    proc = run_cli(
        "bench", "--demo", *SMALL_DEMO, "--workers", "1", "--epochs", "2", "--no-cache", "--compare", "none",
        "--checkpoint-size", "0", "--no-progress", "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert [r["name"] for r in report["runs"]] == ["fastfeed epoch 0 (cold)", "fastfeed epoch 1 (cold)"]
    assert all(r["cache_hit_rate"] is None for r in report["runs"])
    assert set(report["ceilings"]) == {"raw GET"}, "no cache, so no raw read of it"
    both = run_cli("bench", "--demo", *SMALL_DEMO, "--no-cache", "--cache-dir", str(tmp_path / "c"), "--no-progress")
    assert both.returncode == 2 and "--no-cache" in both.stderr and "SeaweedFS" not in both.stdout


def test_bench_cache_io_direct_fills_a_cache_the_warm_epoch_reads(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    proc = run_cli(
        "bench", "--demo", *SMALL_DEMO, "--workers", "1", "--epochs", "2", "--cache-io", "direct",
        "--compare", "none", "--checkpoint-size", "0", "--no-progress", "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["config"]["cache_io"] == "direct"
    cold, warm = report["runs"]
    assert cold["cache_hit_rate"] == 0.0 and warm["cache_hit_rate"] == 1.0
    # Each epoch says what bounded its loop (no training step here: a loader stage).
    assert {cold["extra"]["bound_by"], warm["extra"]["bound_by"]} <= {"fetch", "parse", "collate", "copy", "decode"}
    assert "what bounds fastfeed's loop: fastfeed epoch 0 (cold): " in proc.stdout
    assert cold["samples"] == warm["samples"] == report["setup"]["num_shards"] * report["setup"]["samples_per_shard"]


def _burn_then_wait(seconds: float, done: object) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
    done.wait(30)  # type: ignore[attr-defined]


def test_bench_counts_the_cpu_of_live_forked_workers_not_of_servers() -> None:
    import multiprocessing

    from fastfeed.bench.measure import live_forked_children_cpu

    ctx = multiprocessing.get_context("fork")
    done = ctx.Event()
    worker = ctx.Process(target=_burn_then_wait, args=(0.5, done))  # as a persistent DataLoader worker
    other = subprocess.Popen(  # a server or proxy: a child running another program, also busy
        [sys.executable, "-c", "import time\nt = time.process_time() + 0.5\nwhile time.process_time() < t: pass\n"
         "time.sleep(30)"]
    )  # fmt: skip
    worker.start()
    try:
        deadline = time.monotonic() + 20
        while live_forked_children_cpu() < 0.45 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # the other child has burnt its 0.5 s by now too
        counted = live_forked_children_cpu()
        assert 0.45 <= counted < 0.9, "the forked worker's CPU, and not the other program's"
    finally:
        done.set()
        worker.join(10)
        other.kill()
        other.wait(10)
    assert live_forked_children_cpu() == 0.0, "reaped children are counted by getrusage instead"


def test_bench_never_writes_the_secret_key(s3_shards: Any, seaweed: Any, tmp_path: Path) -> None:
    """A real run against SeaweedFS with credentials from the environment, logging at INFO and
    writing JSON and a plot: the secret key is nowhere in stdout, stderr, the JSON or the PNG.
    A wrong secret (an error path, which prints the config's context) must not show either."""
    bucket, prefix, _ = s3_shards
    out, plot = tmp_path / "report.json", tmp_path / "plot.png"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": seaweed.access_key, "AWS_SECRET_ACCESS_KEY": seaweed.secret_key}
    args = [
        sys.executable, "-m", "fastfeed.cli", "bench", f"s3://{bucket}/{prefix}", "--endpoint-url",
        seaweed.endpoint_url, "--workers", "1", "--epochs", "1", "--batch-size", "4", "--compare", "torch",
        "--checkpoint-size", "1MiB", "--no-progress", "-v", "--json", str(out), "--plot", str(plot),
    ]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr
    secret = seaweed.secret_key
    assert len(secret) >= 16 and json.loads(out.read_text())["runs"], "a real run, with a real secret"
    for where, text in (("stdout", proc.stdout), ("stderr", proc.stderr), ("JSON", out.read_text())):
        assert secret not in text, f"the secret key is in the {where}"
    assert secret.encode() not in plot.read_bytes()

    wrong = "W" * 24 + secret[24:]
    env["AWS_SECRET_ACCESS_KEY"] = wrong
    failed = subprocess.run(args, capture_output=True, text=True, env=env, timeout=240, check=False)
    assert failed.returncode != 0 and "fastfeed: error:" in failed.stderr
    assert wrong not in failed.stdout + failed.stderr and secret not in failed.stdout + failed.stderr


def test_every_timed_pass_starts_after_a_full_garbage_collection() -> None:
    """The set-up's garbage is collected before the clock starts, for every contender: a full
    collection it triggered would otherwise land in whichever pass ran next."""
    import gc

    from fastfeed.bench.measure import measure_batches

    events: list[str] = []

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and info["generation"] == 2:
            events.append("full collection")

    def make() -> list[tuple[int, int]]:
        events.append("pass starts")
        return [(1, 10), (2, 20)]

    gc.callbacks.append(on_gc)
    try:
        m = measure_batches("x", make, size_of=lambda b: b[1], count_of=lambda b: b[0])
    finally:
        gc.callbacks.remove(on_gc)
    assert (m.samples, m.bytes) == (3, 30)
    assert events[:2] == ["full collection", "pass starts"], events


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="needs Linux's /proc/PID/smaps_rollup")
def test_the_memory_of_a_loaders_workers_counts_in_its_peak_pss() -> None:
    """``fastfeed bench``'s peak PSS is the process tree's: a child holding 96 MiB of its own
    pages adds about that much (measured here, the pages really resident in the child)."""
    from fastfeed.bench.measure import PeakTreePss, tree_pss_bytes

    before = tree_pss_bytes()
    assert before > 10 << 20, before  # this interpreter itself
    code = (
        "import sys; b = bytearray(96 << 20); b[::4096] = b'x' * (len(b) // 4096); "
        "print('ready', flush=True); sys.stdin.read()"
    )
    argv = [sys.executable, "-c", code]
    with (
        PeakTreePss(interval=0.02) as peak,
        subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE) as child,
    ):
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == b"ready"
            during = tree_pss_bytes()
            deadline = time.monotonic() + 10
            while peak.peak < during - (8 << 20) and time.monotonic() < deadline:
                time.sleep(0.02)  # the sampler's next reading sees the child
        finally:
            assert child.stdin is not None
            child.stdin.close()
            child.wait(timeout=30)
    assert during - before > 80 << 20, (before, during)
    assert peak.peak >= during - (8 << 20), (peak.peak, during)
    assert tree_pss_bytes() - before < 40 << 20, "the child's pages are gone with it"


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="needs Linux's /proc/PID/smaps_rollup")
def test_the_benchmarks_own_servers_are_left_out_of_the_loaders_memory() -> None:
    """The demo's S3 server and the latency proxy are children of the bench process but not
    the loader's (a peer, run in its own process, never has them): their pages are not counted."""
    from fastfeed.bench.measure import service_process, tree_pss_bytes

    code = (
        "import sys; b = bytearray(96 << 20); b[::4096] = b'x' * (len(b) // 4096); "
        "print('ready', flush=True); sys.stdin.read()"
    )
    with subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE) as server:
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == b"ready"
            counted = tree_pss_bytes()
            with service_process(server.pid):
                left_out = tree_pss_bytes()
            again = tree_pss_bytes()
        finally:
            assert server.stdin is not None
            server.stdin.close()
            server.wait(timeout=30)
    assert counted - left_out > 80 << 20, (counted, left_out)
    assert again - left_out > 80 << 20, "only inside the block"


def test_version_comes_from_one_place() -> None:
    import importlib.metadata

    import fastfeed

    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"fastfeed {fastfeed.__version__}"
    assert importlib.metadata.version("fastfeed") == fastfeed.__version__  # the wheel's, read from __init__
