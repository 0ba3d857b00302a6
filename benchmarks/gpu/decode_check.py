#!/usr/bin/env python
"""GPU decode check for a CUDA machine: fastfeed.vision.Decode's "nvjpeg" backend (torchvision's
decode_jpeg on the device) against its "cpu" backend (Pillow) on the same JPEGs, then the loader end
to end with ``device="cuda"``.

The images are made here (the device machine has Pillow but no sample photographs): smooth
gradients with noise and edges, JPEG-encoded at several sizes and qualities, baseline and
progressive. Prints and writes (``argv[1]``, JSON): the mean absolute difference between the two
backends' uint8 outputs (224x224 center crops), and images/s of each backend (medians of 5 batches
of 256, the GPU synchronized).

    python benchmarks/gpu/decode_check.py out.json
"""

from __future__ import annotations

import io
import json
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastfeed import DataLoader, RaggedBytes, StreamingDataset
from fastfeed.vision import Decode


def make_images(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = int(rng.integers(200, 640)), int(rng.integers(200, 640))
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * 255 // w), (yy * 255 // h), ((xx + yy) * 127 // (h + w))], axis=-1)
        noise = rng.normal(0, 12, size=(h, w, 3))
        edge = ((xx // 37 + yy // 53) % 2)[..., None] * 40
        img = np.clip(base + noise + edge, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=int(rng.integers(70, 96)), progressive=bool(i % 3 == 0))
        out.append(buf.getvalue())
    return out


def ragged(items: list[bytes]) -> RaggedBytes:
    data = torch.from_numpy(np.frombuffer(b"".join(items), dtype=np.uint8).copy())
    offsets = torch.tensor([0, *np.cumsum([len(i) for i in items]).tolist()], dtype=torch.int64)
    return RaggedBytes(data, offsets)


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    images = make_images(256)
    keys = [f"{i:05d}" for i in range(len(images))]
    batch = {"__key__": keys, "__url__": ["mem://gen"] * len(keys), "jpg": ragged(images)}
    cpu = Decode(jpg="rgb", size=224, backend="cpu")
    gpu = Decode(jpg="rgb", size=224, backend="nvjpeg")
    want = cpu(batch)["jpg"]
    got = gpu(batch, device=device)["jpg"]
    torch.cuda.synchronize()
    diff = (got.cpu().int() - want.int()).abs().float()
    result: dict[str, object] = {
        "device": torch.cuda.get_device_name(0),
        "images": len(images),
        "mean_abs_diff": float(diff.mean()),
        "p99_abs_diff": float(diff.flatten().kthvalue(int(diff.numel() * 0.99)).values),
    }
    for name, dec, dev in (("cpu", cpu, None), ("nvjpeg", gpu, device)):
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            dec(batch, device=dev)
            if dev is not None:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        result[f"{name}_images_per_s"] = len(images) / statistics.median(times)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gen-000.tar"
        with tarfile.open(path, "w") as tar:
            for key, data in zip(keys, images, strict=True):
                for ext, payload in (("jpg", data), ("cls", key.encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        loader = DataLoader(
            StreamingDataset(tmp),
            batch_size=64,
            num_workers=2,
            device="cuda",
            decode=Decode(jpg="rgb", size=224, crop="random", flip=True, normalize="imagenet"),
        )
        t0 = time.perf_counter()
        n = 0
        for b in loader:
            assert b["jpg"].device.type == "cuda" and b["jpg"].shape[1:] == (3, 224, 224)
            n += b["jpg"].shape[0]
        torch.cuda.synchronize()
        result["loader_images"] = n
        result["loader_images_per_s"] = n / (time.perf_counter() - t0)
    print(json.dumps(result, indent=2))
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(json.dumps(result, indent=2))
    return 0 if n == len(images) and result["mean_abs_diff"] < 4 else 1  # type: ignore[operator]


if __name__ == "__main__":
    sys.exit(main())
