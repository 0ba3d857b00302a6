#!/usr/bin/env python
"""The resize of one image to a 224x224 crop: Pillow's antialiased bilinear resize against torch's
uint8 kernel (``interpolate(mode="bilinear", antialias=True)`` on a channels-last image), one
thread, milliseconds per image (medians of 5 runs of 300), and their mean difference.

    python benchmarks/vision/bench_resize.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib
import numpy as np
import torch
from PIL import Image


def per_call_ms(f: Callable[[], object], n: int = 300) -> float:
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        runs.append((time.perf_counter() - t0) / n * 1e3)
    return statistics.median(runs)


def main() -> None:
    torch.set_num_threads(1)
    with Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg") as img:
        arr = np.array(img.convert("RGB").resize((500, 375)))
    box = (62, 0, 437, 375)  # the central 375x375 square

    def pillow() -> np.ndarray:
        return np.asarray(Image.fromarray(arr).resize((224, 224), Image.Resampling.BILINEAR, box=box))

    def torch_uint8() -> torch.Tensor:
        x = torch.from_numpy(arr).permute(2, 0, 1)[None][:, :, :, box[0] : box[2]]
        x = x.contiguous(memory_format=torch.channels_last)
        out = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
        return out[0].permute(1, 2, 0)

    diff = np.abs(pillow().astype(int) - torch_uint8().numpy().astype(int))
    print(f"Pillow resize:     {per_call_ms(pillow):.3f} ms per image")
    print(f"torch uint8 resize: {per_call_ms(torch_uint8):.3f} ms per image")
    print(f"mean difference {diff.mean():.4f} levels of 255 (max {diff.max()})")


if __name__ == "__main__":
    main()
