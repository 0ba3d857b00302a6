"""``fastfeed bench --demo``: a local S3 server (SeaweedFS) on 127.0.0.1 with a synthetic
WebDataset (:func:`demo_dataset`), and :func:`demo`, which runs :func:`fastfeed.bench.run.run`
against it. The server is stopped and every file removed on exit, also on errors; the
benchmarks in ``benchmarks/`` use :func:`demo_dataset` for their datasets too.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from fastfeed.bench.measure import peak_rss_bytes, service_process
from fastfeed.bench.report import Report
from fastfeed.bench.run import BenchConfig, Progress, check_decode, check_device, run, scenario
from fastfeed.config import S3Config, format_size

__all__ = ["DEMO_DECODE_EXTENSIONS", "DEMO_EXTENSIONS", "demo", "demo_dataset"]

#: The members of each synthetic sample: random bytes, or (``--decode``) a noise JPEG.
DEMO_EXTENSIONS = ("bin", "cls", "json")
DEMO_DECODE_EXTENSIONS = ("jpg", "cls", "json")


@contextlib.contextmanager
def demo_dataset(
    size: int,
    sample_size: int,
    shard_size: int,
    *,
    extensions: Sequence[str] = DEMO_EXTENSIONS,
    say: Callable[[str], None] = lambda _: None,
) -> Iterator[tuple[str, S3Config, dict[str, Any]]]:
    """A local SeaweedFS on 127.0.0.1 with a synthetic dataset; yields ``(url, s3, setup)`` and
    stops the server (by PID) and removes everything on exit, also on errors.

    ``extensions``: the members of each sample (:func:`fastfeed.testing.shards.write_synthetic_shards`);
    with ``"jpg"``, each sample has a noise JPEG of about ``sample_size`` bytes."""
    from fastfeed.testing.servers import SeaweedServer
    from fastfeed.testing.shards import upload_dir, write_synthetic_shards

    per_shard = max(1, shard_size // sample_size)
    num_shards = max(1, size // (per_shard * sample_size))
    with (
        tempfile.TemporaryDirectory(prefix="fastfeed-demo-") as tmp,
        # Its data is thrown away: no point in waiting long for a clean stop (SeaweedFS
        # sometimes takes over 10 s to act on SIGTERM; then it is killed).
        SeaweedServer(Path(tmp) / "store", stop_timeout=3.0) as server,
        service_process(server.pid),
    ):
        say(f"local S3 endpoint (SeaweedFS): {server.endpoint_url}  [started in {server.start_seconds or 0:.1f}s]")
        t0 = time.perf_counter()
        paths = write_synthetic_shards(
            Path(tmp) / "shards",
            num_shards=num_shards,
            samples_per_shard=per_shard,
            sample_bytes=sample_size,
            extensions=tuple(extensions),
        )
        written = time.perf_counter() - t0
        client = server.client()
        client.create_bucket(Bucket="demo")
        t0 = time.perf_counter()
        upload_dir(client, "demo", Path(tmp) / "shards", prefix="train/")
        uploaded = time.perf_counter() - t0
        total = sum(p.stat().st_size for p in paths)
        members = "" if tuple(extensions) == DEMO_EXTENSIONS else f" ({', '.join(extensions)})"
        say(
            f"synthetic dataset: {num_shards} shards x {per_shard} samples x {format_size(sample_size)}{members}"
            f" = {format_size(total)} (written in {written:.1f}s, uploaded in {uploaded:.1f}s)"
        )
        for path in paths:
            path.unlink()
        client.close()  # an idle keep-alive connection makes the store's shutdown wait
        s3 = S3Config(
            endpoint_url=server.endpoint_url,
            access_key_id=server.access_key,
            secret_access_key=server.secret_key,
            region="us-east-1",
        )
        setup = {
            "store": "SeaweedFS (weed mini) on 127.0.0.1",
            "num_shards": num_shards,
            "samples_per_shard": per_shard,
            "sample_bytes": sample_size,
            "dataset_bytes": total,
            "extensions": list(extensions),
        }
        yield "s3://demo/train/", s3, setup


def demo(
    cfg: BenchConfig,
    *,
    size: int,
    sample_size: int,
    shard_size: int,
    progress: Progress | None = None,
    say: Callable[[str], None] = lambda _: None,
) -> Report:
    """:func:`run` on a synthetic dataset in a local S3 server started (and stopped) here."""
    check_device(cfg.device)  # before anything is started
    check_decode(cfg)  # --image-size without --decode fails here too
    extensions = DEMO_DECODE_EXTENSIONS if cfg.decode else DEMO_EXTENSIONS
    with demo_dataset(size, sample_size, shard_size, extensions=extensions, say=say) as (url, s3, setup):
        say(scenario(cfg))
        report = run(url, s3, cfg, progress=progress, setup=setup)
    report.setup["peak_rss_bytes"] = peak_rss_bytes()
    return report
