"""Decoding WebDataset samples into tensors: :func:`decode_value` and :class:`Decoder`.

Each field of a WebDataset sample is decoded by its extension (case-insensitive; for a field
named ``"seg.png"`` the last dot-part, ``"png"``, decides):

* ``jpg jpeg png webp bmp ppm pgm gif tif tiff``: a ``torch.uint8`` tensor, CHW, RGB (Pillow,
  any image mode converted to RGB);
* ``npy``: ``np.load(allow_pickle=False)``, as a tensor when the array is numeric (bool, int,
  float, complex);
* ``cls cls2 index idx``: ``int``;
* ``txt text``: ``str`` (UTF-8);
* ``json``: ``json.loads``;
* anything else: ``bytes``, unchanged.

Bytes that do not decode raise :class:`~fastfeed.errors.DecodeError` naming the sample's key,
its shard URL and the extension. Pillow is optional: it is imported on the first image, and a
missing Pillow raises :class:`~fastfeed.errors.ConfigError` saying how to install it.

:class:`Decoder` is a picklable ``collate_fn`` for :class:`fastfeed.DataLoader` (it runs in the
worker processes)::

    loader = fastfeed.DataLoader(ds, batch_size=64, num_workers=8, collate_fn=Decoder(image_size=(224, 224)))
    for batch in loader:
        images, labels = batch["jpg"], batch["cls"]  # uint8 [64, 3, 224, 224], int64 [64]
"""

from __future__ import annotations

import io
import json
import logging
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fastfeed.errors import ConfigError, DecodeError

__all__ = [
    "IMAGE_EXTENSIONS",
    "INT_EXTENSIONS",
    "JSON_EXTENSIONS",
    "NBYTES_KEY",
    "NPY_EXTENSIONS",
    "TEXT_EXTENSIONS",
    "DecodeError",
    "Decoder",
    "decode_sample",
    "decode_value",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "gif", "tif", "tiff"})
NPY_EXTENSIONS = frozenset({"npy"})
INT_EXTENSIONS = frozenset({"cls", "cls2", "index", "idx"})
TEXT_EXTENSIONS = frozenset({"txt", "text"})
JSON_EXTENSIONS = frozenset({"json"})

#: Key of the encoded payload size (bytes before decoding, a Python ``int``) in a :class:`Decoder` batch.
NBYTES_KEY = "__nbytes__"

_BYTES_LIKE = (bytes, bytearray, memoryview)


def _kind(ext: str) -> str:
    """The last dot-part of a field name, lower-cased: ``"seg.PNG"`` -> ``"png"``."""
    return ext.rsplit(".", 1)[-1].lower()


def _nbytes(value: Any) -> int:
    if isinstance(value, memoryview):
        return value.nbytes
    if isinstance(value, bytes | bytearray):
        return len(value)
    return 0


def _pil_image() -> Any:
    try:
        from PIL import Image
    except ImportError as err:
        raise ConfigError(
            "decoding images needs Pillow, which is not installed",
            hint="pip install pillow (or fastfeed[bench])",
        ) from err
    return Image


def _check_image_size(image_size: Sequence[int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    size = tuple(image_size)
    if len(size) != 2 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in size):
        raise ConfigError(f"image_size must be (height, width) of positive ints, got {image_size!r}")
    return (int(size[0]), int(size[1]))


def _decode_image(data: Any, image_size: tuple[int, int] | None) -> torch.Tensor:
    image_mod = _pil_image()  # a missing Pillow is a ConfigError, which decode_value lets through
    with image_mod.open(io.BytesIO(data)) as img:
        rgb = img.convert("RGB")  # loads (and so fully decodes) the image
    if image_size is not None and rgb.size != (image_size[1], image_size[0]):
        bilinear = getattr(image_mod, "Resampling", image_mod).BILINEAR
        rgb = rgb.resize((image_size[1], image_size[0]), bilinear)  # PIL sizes are (width, height)
    hwc = np.array(rgb, dtype=np.uint8)  # a writable copy: torch.from_numpy warns on read-only arrays
    return torch.from_numpy(hwc).permute(2, 0, 1).contiguous()


def _decode_npy(data: Any) -> Any:
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biufc":
        return array
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if not array.flags.writeable:
        array = array.copy()
    try:
        return torch.from_numpy(array)
    except TypeError:  # a numeric dtype torch has no tensor type for
        log.debug("npy of dtype %s kept as a numpy array (no torch dtype)", array.dtype)
        return array


def decode_value(
    ext: str,
    data: bytes | bytearray | memoryview,
    *,
    key: str | None = None,
    url: str | None = None,
    image_size: tuple[int, int] | None = None,
) -> Any:
    """Decode one field of a WebDataset sample by its extension (see the module docstring).

    Args:
        ext: the field name, e.g. ``"jpg"`` or ``"seg.png"`` (its last dot-part decides).
        data: the member's bytes.
        key: the sample's ``__key__``, for the error message.
        url: the sample's ``__url__`` (shard), for the error message.
        image_size: ``(height, width)`` to resize images to (bilinear); ``None`` keeps their size.

    Raises:
        DecodeError: ``data`` is not a valid value of its type (names ``key``, ``url``, ``ext``).
        ConfigError: an image and no Pillow installed.
    """
    kind = _kind(ext)
    try:
        if kind in IMAGE_EXTENSIONS:
            return _decode_image(data, image_size)
        if kind in NPY_EXTENSIONS:
            return _decode_npy(data)
        if kind in INT_EXTENSIONS:
            return int(bytes(data).decode("ascii").strip())
        if kind in TEXT_EXTENSIONS:
            return bytes(data).decode("utf-8")
        if kind in JSON_EXTENSIONS:
            return json.loads(bytes(data))
    except ConfigError:
        raise
    except Exception as err:  # every codec's own errors (PIL, numpy, json, int, utf-8)
        raise DecodeError(
            f"cannot decode field {ext!r} of sample {key!r}: {type(err).__name__}: {err}",
            url=url,
            hint=f"the member {key}.{ext} is corrupt or is not what its extension says",
            key=key,
            ext=ext,
        ) from err
    return data if isinstance(data, bytes) else bytes(data)


def decode_sample(sample: Mapping[str, Any], *, image_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """Every field of ``sample`` decoded with :func:`decode_value`; ``__`` fields (``__key__``,
    ``__url__``, ...) and values that are not bytes-like are kept as they are."""
    key = sample.get("__key__")
    url = sample.get("__url__")
    out: dict[str, Any] = {}
    for name, value in sample.items():
        if name.startswith("__") or not isinstance(value, _BYTES_LIKE):
            out[name] = value
        else:
            out[name] = decode_value(
                name,
                value,
                key=None if key is None else str(key),
                url=None if url is None else str(url),
                image_size=image_size,
            )
    return out


def _collate(values: list[Any]) -> Any:
    first = values[0]
    if isinstance(first, torch.Tensor):
        if all(isinstance(v, torch.Tensor) and v.shape == first.shape and v.dtype == first.dtype for v in values[1:]):
            return torch.stack(values)
        return values
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return torch.tensor(values, dtype=torch.long)
    return values


class Decoder:
    """A ``collate_fn`` that decodes every field of every sample, then collates the batch.

    Fields (see the module docstring for the decoding): tensors of one shape and dtype are
    stacked, ints become one ``torch.long`` tensor, everything else (and a field some samples
    lack, with ``None`` for those) stays a list. ``__key__`` and ``__url__`` stay lists.
    ``batch["__nbytes__"]`` (a Python ``int``) is the encoded payload of the batch: the sum of
    the byte lengths of its fields before decoding (``__`` fields excluded).

    Args:
        image_size: ``(height, width)``: images are resized to it (Pillow, bilinear) so that
            images of different sizes stack; ``None`` keeps each image's size.

    Picklable, so it runs in :class:`fastfeed.DataLoader`'s worker processes.
    """

    def __init__(self, image_size: tuple[int, int] | None = None) -> None:
        self.image_size = _check_image_size(image_size)

    def __repr__(self) -> str:
        return f"Decoder(image_size={self.image_size!r})"

    def decode_sample(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        """One sample decoded (:func:`decode_sample`), not collated."""
        return decode_sample(sample, image_size=self.image_size)

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        nbytes = 0
        names: dict[str, None] = {}  # fields in order of first appearance
        for sample in samples:
            for name, value in sample.items():
                names.setdefault(name)
                if not name.startswith("__"):
                    nbytes += _nbytes(value)
        decoded = [self.decode_sample(s) for s in samples]
        batch: dict[str, Any] = {}
        for name in names:
            values = [d.get(name) for d in decoded]
            if name.startswith("__") or any(name not in d for d in decoded):
                batch[name] = values
            else:
                batch[name] = _collate(values)
        batch[NBYTES_KEY] = nbytes
        return batch
