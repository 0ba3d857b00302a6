#!/usr/bin/env python
"""Image decode on the CPU: images/s and CPU per image of each decoder, and the loader end to end.

Writes ``--images`` JPEGs (matplotlib's photographs, resized to ImageNet-like sizes, quality 90)
into ``--shards`` tar shards on local disk (the node cache's case), then, ``--repeats`` times in
an order that rotates each repeat:

* decode only, a batch of ``--batch`` images to 224x224 center crops (uint8 NCHW):
  ``fastfeed.vision.Decode`` with its CPU backend (Pillow's decode, torch's resize; 1 thread,
  and one per CPU), with its DALI backend (DALI's CPU pipeline), and, as references without the
  resize, Pillow's decode alone and simplejpeg's (libjpeg-turbo) where it is installed;
* end to end: ``fastfeed.DataLoader(StreamingDataset(dir), batch_size, num_workers=2,
  decode=Decode(size=224, crop="random", flip=True, normalize="imagenet"))`` with each backend,
  and DALI's own reader (``fn.readers.webdataset``) with the same decode, crop, flip and
  normalize in one DALI CPU pipeline: the peer to beat;
  ``--step-ms`` adds a synthetic training step per batch (sleep) to every loader.

Prints images/s (median) and CPU seconds per 1000 images (process and children); ``--json``
writes every repeat.

    python benchmarks/vision/bench_decode.py --images 2048 --repeats 3 --json out.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from PIL import Image

from fastfeed import DataLoader, RaggedBytes, StreamingDataset
from fastfeed.vision import Decode
from fastfeed.vision.dali import dali_available


def _cpu() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def make_shards(root: Path, images: int, shards: int, seed: int = 0) -> tuple[list[str], list[bytes]]:
    data = Path(matplotlib.get_data_path()) / "sample_data"
    photos = []
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png"):
        with Image.open(data / name) as img:
            photos.append(img.convert("RGB"))
    rng = np.random.default_rng(seed)
    encoded = []
    for i in range(images):
        w, h = int(rng.integers(400, 640)), int(rng.integers(300, 480))
        img = photos[i % 2].resize((w, h), Image.Resampling.BILINEAR)
        if i % 4 == 3:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        encoded.append(buf.getvalue())
    paths = []
    per = -(-images // shards)
    for s in range(shards):
        path = root / f"images-{s:04d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(s * per, min(images, (s + 1) * per)):
                for ext, payload in (("jpg", encoded[i]), ("cls", str(i % 1000).encode())):
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        paths.append(str(path))
    return paths, encoded


def ragged(items: list[bytes]) -> RaggedBytes:
    data = torch.from_numpy(np.frombuffer(b"".join(items), dtype=np.uint8).copy())
    offsets = torch.tensor([0, *np.cumsum([len(i) for i in items]).tolist()], dtype=torch.int64)
    return RaggedBytes(data, offsets)


def timed(fn: Callable[[], int]) -> dict[str, float]:
    cpu0, t0 = _cpu(), time.perf_counter()
    n = fn()
    seconds, cpu = time.perf_counter() - t0, _cpu() - cpu0
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds, "cpu_s_per_1000": 1000 * cpu / n}


def decode_only(encoded: list[bytes], batch: int, threads: int) -> dict[str, Callable[[], int]]:
    items = encoded[:batch]
    b = {"__key__": [str(i) for i in range(len(items))], "__url__": ["x"] * len(items), "jpg": ragged(items)}
    runs: dict[str, Callable[[], int]] = {}
    pil1 = Decode(jpg="rgb", size=224, backend="cpu", threads=1)
    pil = Decode(jpg="rgb", size=224, backend="cpu", threads=threads)
    runs["decode+crop: fastfeed CPU backend, 1 thread"] = lambda: len(pil1(b)["jpg"])
    runs[f"decode+crop: fastfeed CPU backend, {threads} threads"] = lambda: len(pil(b)["jpg"])
    if dali_available():
        dali = Decode(jpg="rgb", size=224, backend="dali", threads=threads)
        dali(b)  # builds the pipeline
        runs[f"decode+crop: fastfeed DALI backend (CPU), {threads} threads"] = lambda: len(dali(b)["jpg"])

    def pil_decode_only() -> int:
        for data in items:
            with Image.open(io.BytesIO(data)) as img:
                img.convert("RGB")
        return len(items)

    runs["decode only, no resize: Pillow, 1 thread"] = pil_decode_only
    try:
        import simplejpeg

        def sj() -> int:
            for data in items:
                simplejpeg.decode_jpeg(data, colorspace="RGB")
            return len(items)

        runs["decode only, no resize: simplejpeg, 1 thread"] = sj
    except ImportError:
        pass
    return runs


def loaders(paths: list[str], batch: int, step_s: float, threads: int) -> dict[str, Callable[[], int]]:
    root = str(Path(paths[0]).parent)
    runs: dict[str, Callable[[], int]] = {}

    def fastfeed_run(backend: str) -> Callable[[], int]:
        # One Decode for every epoch, as a training script keeps one (DALI builds its pipeline once).
        dec = Decode(
            jpg="rgb", size=224, crop="random", flip=True, normalize="imagenet", backend=backend, threads=threads
        )  # type: ignore[arg-type]

        def run() -> int:
            loader = DataLoader(StreamingDataset(root), batch_size=batch, num_workers=2, decode=dec)
            n = 0
            for b in loader:
                n += len(b["jpg"])
                time.sleep(step_s)
            return n

        return run

    runs["loader: fastfeed, CPU backend"] = fastfeed_run("cpu")
    if dali_available():
        runs["loader: fastfeed, DALI backend"] = fastfeed_run("dali")
        runs["loader: DALI fn.readers.webdataset"] = dali_reader(paths, batch, step_s, threads)
    return runs


def dali_reader(paths: list[str], batch: int, step_s: float, threads: int) -> Callable[[], int]:
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    index_dir = tempfile.mkdtemp(prefix="dali-index-")
    index = []
    for p in paths:  # DALI's reader wants an index per shard: its own wds2idx tool makes them
        out = Path(index_dir) / (Path(p).stem + ".idx")
        tool = Path(sys.executable).with_name("wds2idx")
        subprocess.run([str(tool), p, str(out)], check=True, capture_output=True)
        index.append(str(out))
    total = 0
    for p in paths:
        with tarfile.open(p) as tar:
            total += sum(1 for m in tar.getmembers() if m.name.endswith(".jpg"))

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=None, exec_dynamic=True)  # type: ignore[misc]
    def pipe() -> Any:
        jpg, cls = fn.readers.webdataset(
            paths=paths, index_paths=index, ext=["jpg", "cls"], missing_component_behavior="error", name="r"
        )
        img = fn.decoders.image(jpg, device="cpu", output_type=types.RGB)
        img = fn.random_resized_crop(img, size=[224, 224])
        return fn.crop_mirror_normalize(
            img,
            mirror=fn.random.coin_flip(),
            mean=[0.485 * 255, 0.456 * 255, 0.406 * 255],
            std=[0.229 * 255, 0.224 * 255, 0.225 * 255],
            dtype=types.FLOAT,
            output_layout="CHW",
        ), cls

    def run() -> int:
        p = pipe()
        p.build()
        n = 0
        while n < total:
            images, _ = p.run()
            n += len(images)
            time.sleep(step_s)
        return min(n, total)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--step-ms", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        paths, encoded = make_shards(Path(tmp), args.images, args.shards)
        runs = {
            **decode_only(encoded, args.batch, args.threads),
            **loaders(paths, args.batch, args.step_ms / 1000, args.threads),
        }
        results: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
        names = list(runs)
        for r in range(args.repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                results[name].append(timed(runs[name]))
    mean_kb = sum(map(len, encoded)) / len(encoded) / 1024
    print(f"{args.images} JPEGs, {mean_kb:.0f} KiB on average; batches of {args.batch}; medians of {args.repeats}")
    print(f"{'run':58s} {'images/s':>9s} {'CPU s/1000 img':>15s}")
    for name, rows in results.items():
        ips = statistics.median(r["images_per_s"] for r in rows)
        cpu = statistics.median(r["cpu_s_per_1000"] for r in rows)
        print(f"{name:58s} {ips:9,.0f} {cpu:15.2f}")
    if args.json:
        machine = {
            "cpus": len(os.sched_getaffinity(0)),
            "python": platform.python_version(),
            "torch": torch.__version__,
        }
        Path(args.json).write_text(json.dumps({"args": vars(args), "machine": machine, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
