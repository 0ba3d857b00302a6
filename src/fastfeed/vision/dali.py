"""The ``"dali"`` backend of :class:`fastfeed.vision.Decode`: one NVIDIA DALI pipeline per decoded
field, fed each batch's encoded images by ``external_source``.

::

    encoded bytes ──► decoders.image (device="mixed": nvJPEG and the GPU's hardware JPEG decoder;
                      "cpu" without a device) ──► resize (the crop's region, bilinear, antialiased)
                  ──► crop_mirror_normalize (flip, mean/std, dtype, CHW) ──► torch via DLPack

The crops and flips are not drawn by DALI: the host reads each image's size from its header and
computes the same region and flip as the other backends (``crop_box`` and the per-sample draws
of ``(seed, epoch, shard, key)``), passed to DALI as per-sample ``roi_start``/``roi_end`` and
``mirror``. So every backend crops a sample the same way, and a resumed run crops as the first.

On the host the batch is DALI's output buffer itself (the dynamic executor does not reuse an
output while it is referenced); on the GPU it is copied out of DALI's buffers (a device-to-device
copy, tens of microseconds for a batch of 224x224 crops).
"""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np
import torch

from fastfeed.errors import ConfigError

__all__ = ["DaliPipeline", "dali_available"]

log = logging.getLogger(__name__)


def dali_available() -> bool:
    """Whether NVIDIA DALI can be imported."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def _dali() -> Any:
    try:
        import nvidia.dali
        import nvidia.dali.fn
        import nvidia.dali.types
    except ImportError as err:
        raise ConfigError(
            "Decode(backend='dali') needs NVIDIA DALI, which is not installed",
            hint="pip install 'fastfeed[dali]' (nvidia-dali-cuda120; nvidia-dali-cuda130 for CUDA 13)",
        ) from err
    return nvidia.dali


class DaliPipeline:
    """A built DALI pipeline for one field of a :class:`~fastfeed.vision.Decode`: ``run(items,
    rois, mirrors)`` -> an NCHW tensor (on ``device``, or the host without one)."""

    def __init__(
        self,
        *,
        gray: bool,
        size: tuple[int, int] | None,
        normalize: tuple[tuple[float, ...], tuple[float, ...]] | None,
        dtype: torch.dtype,
        device: torch.device | None,
        batch_size: int,
        threads: int,
    ) -> None:
        dali = _dali()
        fn, types = dali.fn, dali.types
        self.device = device
        self.batch_size = batch_size
        self.size = size
        self.dtype = dtype
        gpu = device is not None and device.type == "cuda"
        channels = 1 if gray else 3
        if normalize is not None:
            mean = [255.0 * m for m in (normalize[0] * channels)[:channels]]
            std = [255.0 * s for s in (normalize[1] * channels)[:channels]]
        else:
            mean, std = [0.0] * channels, [1.0 if dtype == torch.uint8 else 255.0] * channels
        out_type = types.UINT8 if dtype == torch.uint8 else (types.FLOAT16 if dtype == torch.float16 else types.FLOAT)

        @dali.pipeline_def(  # type: ignore[untyped-decorator]
            batch_size=batch_size,
            num_threads=max(1, threads),
            device_id=(device.index or 0) if gpu and device is not None else None,
            exec_dynamic=True,
            prefetch_queue_depth=1,
        )
        def pipe() -> Any:
            enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1)
            mirror = fn.external_source(name="mirror", dtype=types.INT32, ndim=0)
            images = fn.decoders.image(
                enc, device="mixed" if gpu else "cpu", output_type=types.GRAY if gray else types.RGB
            )
            if size is not None:
                start = fn.external_source(name="start", dtype=types.FLOAT, ndim=1)
                end = fn.external_source(name="end", dtype=types.FLOAT, ndim=1)
                images = fn.resize(
                    images,
                    size=list(size),
                    roi_start=start,
                    roi_end=end,
                    roi_relative=False,
                    antialias=True,
                    interp_type=types.INTERP_LINEAR,
                )
            return fn.crop_mirror_normalize(
                images, mirror=mirror, mean=mean, std=std, dtype=out_type, output_layout="CHW"
            )

        self._pipe = pipe()
        self._pipe.build()

    def run(
        self, items: list[np.ndarray], rois: list[tuple[float, float, float, float]], mirrors: list[int]
    ) -> torch.Tensor:
        """Decode ``items`` (encoded images as uint8 arrays), each region ``(top, left, bottom,
        right)`` resized to the output size and flipped where ``mirrors`` says; raises what DALI
        raises for an image it cannot decode."""
        n = len(items)
        if n > self.batch_size:
            raise ValueError(f"a batch of {n} images for a pipeline built for {self.batch_size}")
        self._pipe.feed_input("enc", items)
        self._pipe.feed_input("mirror", [np.array(m, dtype=np.int32) for m in mirrors])
        if self.size is not None:
            self._pipe.feed_input("start", [np.array(r[:2], dtype=np.float32) for r in rois])
            self._pipe.feed_input("end", [np.array(r[2:], dtype=np.float32) for r in rois])
        (out,) = self._pipe.run()
        if not out.is_dense_tensor():
            raise ValueError("the images of the batch have different sizes; give Decode(size=...)")
        if self.device is not None and self.device.type == "cuda":
            from torch.utils.dlpack import from_dlpack

            result = from_dlpack(out.as_tensor()).clone()  # out of DALI's reused buffers
        else:
            # Its own buffer, which DALI's dynamic executor does not reuse while it is referenced
            # (tests/test_vision.py holds batches across runs): a view, no copy.
            result = torch.from_numpy(np.asarray(out.as_tensor()))
        return result if result.dtype == self.dtype else result.to(self.dtype)


def image_size(data: Any) -> tuple[int, int]:
    """``(height, width)`` of an encoded image from its header (Pillow; nothing is decoded)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        width, height = img.size
    return height, width
