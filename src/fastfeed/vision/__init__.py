"""Decode images in the loader: :class:`Decode`, a stage of :class:`fastfeed.DataLoader`.

::

    loader = fastfeed.DataLoader(
        ds, batch_size=256, num_workers=8, device="cuda",
        decode=fastfeed.vision.Decode(jpg="rgb", size=224, crop="random", flip=True, normalize="imagenet"),
    )
    for batch in loader:
        images = batch["jpg"]    # float32 [256, 3, 224, 224] on the device, NCHW
        labels = batch["cls"]    # as without decode

The stage replaces each named field of a batch (a :class:`~fastfeed.RaggedBytes` of encoded
images, or a list of bytes-like values from a ``collate_fn``) by one NCHW tensor: decoded, cropped,
resized to ``size``, optionally flipped and normalized. Other fields are left as they are.

Backends (``backend=``):

* ``"cpu"``: Pillow decodes and torch resizes (its antialiased uint8 kernel, as torchvision's
  ``Resize``), in a pool of threads of the loader's process (both release the GIL), each image
  written into one preallocated batch tensor in the output dtype. Every format Pillow reads; any
  mode (grayscale, CMYK, palette, alpha) converted to RGB or L.
* ``"nvjpeg"``: torchvision's ``decode_jpeg(device="cuda")`` (NVIDIA's nvJPEG) on the loader's
  device, then crop, resize, flip and normalize as tensor operations on the GPU; images that are
  not JPEG are decoded by Pillow and uploaded.
* ``"dali"``: an NVIDIA DALI pipeline (``fastfeed[dali]``): ``decoders.image(device="mixed")``
  (nvJPEG and the GPU's hardware JPEG decoder), resize and ``crop_mirror_normalize`` on the
  loader's device, or DALI's CPU pipeline without one (:mod:`fastfeed.vision.dali`).
* ``"auto"`` (default): with a CUDA device, ``"dali"`` if DALI is installed, else ``"nvjpeg"`` if
  torchvision is, else ``"cpu"``; without one, ``"cpu"``.

Geometry, as torchvision's transforms define it: ``crop="center"`` resizes the shorter side to
the output's and cuts the center (``Resize`` + ``CenterCrop``); ``crop="random"`` is
``RandomResizedCrop(size, scale, ratio)``; ``crop="none"`` resizes the whole image to ``size``.
Random crops and flips are drawn per sample from ``(seed, epoch, shard, key)``: the same sample
gets the same crop in the same epoch, whichever worker, rank or resumed run reads it.

Outputs of the backends agree within a tolerance (JPEG decoders differ in their inverse DCT and
chroma upsampling, resamplers in their rounding): DALI's and the CPU backend's differ by 0.2
levels of 255 on average (``tests/test_vision.py`` measures it on photographs).

A sample that does not decode raises :class:`~fastfeed.errors.DecodeError` naming its key and
shard; with ``on_error="skip"`` it is dropped from its batch (from every field) and counted in
:attr:`Decode.skipped`.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
import threading
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch

from fastfeed.batch.assemble import RaggedBytes
from fastfeed.errors import ConfigError, DecodeError
from fastfeed.vision.geometry import Crop, crop_box, flip_draw, resized_crop

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Crop", "Decode", "crop_box"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_MODES = {"rgb": ("RGB", 3), "gray": ("L", 1)}
_CROPS = ("center", "random", "none")
_BACKENDS = ("auto", "cpu", "nvjpeg", "dali")
_DTYPES = {torch.uint8, torch.float32, torch.float16, torch.bfloat16}


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError as err:
        raise ConfigError("decoding images needs Pillow, which is not installed", hint="pip install pillow") from err
    return Image


class Decode:
    """The loader's image decode stage (see the module docstring).

    Args:
        fields: ``{field: mode}`` for fields whose names are not Python identifiers
            (``{"seg.png": "gray"}``); ``mode`` is ``"rgb"`` (3 channels) or ``"gray"`` (1).
        size: output ``(height, width)``, or one int for a square; ``None`` keeps each image's
            size (then the images of a batch must share one).
        crop: ``"center"``, ``"random"`` (RandomResizedCrop) or ``"none"`` (whole image resized).
        scale, ratio: RandomResizedCrop's area fraction and aspect-ratio ranges.
        flip: flip each image horizontally with probability 1/2 (drawn per sample).
        normalize: ``(mean, std)`` per channel in units of the 0..1 range, or ``"imagenet"``;
            the output is then ``(x / 255 - mean) / std`` in ``dtype`` (float32 by default).
        dtype: output dtype: ``torch.uint8`` (default without ``normalize``) or a float type
            (``x / 255``, normalized if asked).
        backend: ``"auto"``, ``"cpu"``, ``"nvjpeg"`` or ``"dali"``.
        on_error: ``"raise"`` (default) or ``"skip"`` a sample whose image does not decode.
        seed: base of the per-sample random draws.
        threads: decode threads of the ``"cpu"`` backend (default: the CPUs of this process).
        **modes: ``field=mode``, e.g. ``jpg="rgb"``.
    """

    def __init__(
        self,
        fields: Mapping[str, str] | None = None,
        *,
        size: int | tuple[int, int] | None = None,
        crop: Literal["center", "random", "none"] = "center",
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = False,
        normalize: tuple[Sequence[float], Sequence[float]] | Literal["imagenet"] | None = None,
        dtype: torch.dtype | None = None,
        backend: Literal["auto", "cpu", "nvjpeg", "dali"] = "auto",
        on_error: Literal["raise", "skip"] = "raise",
        seed: int = 0,
        threads: int | None = None,
        **modes: str,
    ) -> None:
        self.fields = {**(fields or {}), **modes}
        if not self.fields:
            raise ConfigError("Decode needs at least one field, e.g. Decode(jpg='rgb')")
        for name, mode in self.fields.items():
            if mode not in _MODES:
                raise ConfigError(f"Decode: field {name!r} has mode {mode!r}; use 'rgb' or 'gray'")
        pair: Any = (size, size) if isinstance(size, int) and not isinstance(size, bool) else size
        if pair is not None and (
            not isinstance(pair, tuple | list)
            or len(pair) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair)
        ):
            raise ConfigError(f"Decode: size must be a positive int or (height, width), got {size!r}")
        self.size: tuple[int, int] | None = None if pair is None else (int(pair[0]), int(pair[1]))
        if crop not in _CROPS:
            raise ConfigError(f"Decode: crop must be one of {', '.join(_CROPS)}, got {crop!r}")
        if crop != "none" and self.size is None and crop == "random":
            raise ConfigError("Decode: crop='random' needs size=")
        self.crop = crop if self.size is not None else "none"
        if not (0 < scale[0] <= scale[1] <= 1) or not (0 < ratio[0] <= ratio[1]):
            raise ConfigError(f"Decode: scale must be 0 < lo <= hi <= 1 and ratio 0 < lo <= hi, got {scale}, {ratio}")
        self.scale, self.ratio, self.flip = (float(scale[0]), float(scale[1])), (float(ratio[0]), float(ratio[1])), flip
        if normalize == "imagenet":
            normalize = (IMAGENET_MEAN, IMAGENET_STD)
        self.normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None
        if normalize is not None:
            mean, std = (tuple(float(v) for v in normalize[0]), tuple(float(v) for v in normalize[1]))
            if len(mean) != len(std) or any(s <= 0 for s in std):
                raise ConfigError(f"Decode: normalize needs equal-length mean and std, std > 0, got {normalize!r}")
            self.normalize = (mean, std)
        self.dtype = dtype if dtype is not None else (torch.float32 if self.normalize is not None else torch.uint8)
        if self.dtype not in _DTYPES:
            raise ConfigError(f"Decode: dtype must be uint8 or a float type, got {self.dtype}")
        if self.normalize is not None and self.dtype == torch.uint8:
            raise ConfigError("Decode: normalize gives floats; leave dtype unset or give a float dtype")
        if backend not in _BACKENDS:
            raise ConfigError(f"Decode: backend must be one of {', '.join(_BACKENDS)}, got {backend!r}")
        self.backend = backend
        if on_error not in ("raise", "skip"):
            raise ConfigError(f"Decode: on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error = on_error
        self.seed = int(seed)
        self.threads = threads if threads is not None else max(1, len(os.sched_getaffinity(0)))
        #: Samples dropped because their image did not decode (``on_error="skip"``).
        self.skipped = 0
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        #: Built DALI pipelines, by (field, device): made on first use, never pickled.
        self._dali: dict[tuple[str, str], Any] = {}

    def __repr__(self) -> str:
        return (
            f"Decode({self.fields!r}, size={self.size}, crop={self.crop!r}, flip={self.flip}, "
            f"normalize={self.normalize}, dtype={self.dtype}, backend={self.backend!r})"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_pool"] = None
        state["_dali"] = {}
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def close(self) -> None:
        """Stop the decode threads (started again on the next batch)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    # ------------------------------------------------------------------------------ per batch

    def resolve_backend(self, device: torch.device | None) -> str:
        """The backend this stage uses with a loader on ``device``."""
        if self.backend != "auto":
            return self.backend
        if device is not None and device.type == "cuda":
            from fastfeed.vision.dali import dali_available

            if dali_available():
                return "dali"
            try:
                import torchvision.io  # noqa: F401
            except ImportError:
                return "cpu"
            return "nvjpeg"
        return "cpu"

    def draws(self, key: str, url: str, epoch: int) -> np.random.Generator | None:
        """The random generator of one sample's crop and flip (None when nothing is random)."""
        if self.crop != "random" and not self.flip:
            return None
        words = [self.seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF, zlib.crc32(url.encode()), zlib.crc32(key.encode())]
        return np.random.default_rng(np.random.SeedSequence(words))

    def __call__(self, batch: Any, *, epoch: int = 0, device: torch.device | None = None) -> Any:
        """``batch`` with each decoded field replaced by its NCHW tensor (on ``device`` with the
        ``"nvjpeg"`` backend, on the host otherwise)."""
        if not isinstance(batch, dict):
            raise ConfigError(
                f"Decode needs batches that are dicts of fields, got {type(batch).__name__}",
                hint="use a StreamingDataset (or a collate_fn that returns a dict)",
            )
        missing = [f for f in self.fields if f not in batch]
        if missing:
            raise ConfigError(
                f"Decode: the batch has no field {missing[0]!r} (it has {', '.join(map(repr, batch))})",
                hint="name the field that holds the encoded images, e.g. Decode(jpg='rgb')",
            )
        keys = [str(k) for k in batch.get("__key__", [])]
        urls = [str(u) for u in batch.get("__url__", [])]
        backend = self.resolve_backend(device)
        decoded: dict[str, tuple[torch.Tensor, list[int]]] = {}
        bad: set[int] = set()
        n = 0
        for name, mode in self.fields.items():
            items = _items(batch[name])
            n = len(items)
            ids = [(keys[i] if i < len(keys) else str(i), urls[i] if i < len(urls) else "") for i in range(n)]
            if backend == "nvjpeg":
                assert device is not None
                value = batch[name]
                tensors = value.split() if isinstance(value, RaggedBytes) else [_as_uint8_tensor(v) for v in items]
                images, failed = self._decode_nvjpeg(items, tensors, ids, name, mode, epoch, device)
            elif backend == "dali":
                images, failed = self._decode_dali(items, ids, name, mode, epoch, device)
            else:
                images, failed = self._decode_cpu(items, ids, name, mode, epoch)
            decoded[name] = (images, failed)
            bad.update(failed)
        if not bad:
            return {**batch, **{name: images for name, (images, _) in decoded.items()}}
        with self._lock:
            self.skipped += len(bad)
        keep = [i for i in range(n) if i not in bad]
        result = _select(dict(batch), keep)
        for name, (images, failed) in decoded.items():
            dropped = set(failed)
            rows = [i for i in range(n) if i not in dropped]  # the samples ``images`` holds
            at = {i: r for r, i in enumerate(rows)}
            result[name] = images[[at[i] for i in keep]] if keep else images[:0]
        return result

    def _fail(self, err: BaseException, key: str, url: str, name: str) -> None:
        if self.on_error == "raise":
            raise DecodeError(
                f"cannot decode field {name!r} of sample {key!r}: {type(err).__name__}: {err}",
                url=url or None,
                hint=f"the member {key}.{name} is corrupt or not an image; Decode(on_error='skip') drops such samples",
                key=key,
                ext=name,
            ) from err

    # ------------------------------------------------------------------------------ CPU (Pillow)

    def _decode_cpu(
        self,
        items: list[Any],
        ids: list[tuple[str, str]],
        name: str,
        mode: str,
        epoch: int,
    ) -> tuple[torch.Tensor, list[int]]:
        pil_mode, channels = _MODES[mode]
        image_mod = _pil()
        n = len(items)
        # With an output size, each thread writes its image into the batch tensor itself, in the
        # output dtype (normalized as x * scale + bias): the conversion runs in the threads too.
        out = torch.empty((n, channels, *self.size), dtype=self.dtype) if self.size is not None else None
        scale, bias = self._affine(channels)

        def one(i: int) -> np.ndarray | BaseException | None:
            try:
                with image_mod.open(io.BytesIO(items[i])) as img:
                    img = img.convert(pil_mode)  # loads, so decodes, the whole image
                hwc = np.array(img, dtype=np.uint8)  # writable: torch warns on read-only arrays
                x = torch.from_numpy(hwc.reshape(hwc.shape[0], hwc.shape[1], channels)).permute(2, 0, 1)
                rng = self.draws(*ids[i], epoch)  # the crop's draws, then the flip's
                if self.size is not None:
                    x = resized_crop(x, self.size, self.crop, rng, self.scale, self.ratio)
                if self.flip and flip_draw(rng):
                    x = x.flip(-1)
                if out is None:
                    return x.permute(1, 2, 0).numpy()
                chw = x
                if scale is None:
                    out[i].copy_(chw)
                else:
                    torch.mul(chw, scale, out=out[i]).add_(bias)  # type: ignore[arg-type]
                return None
            except Exception as err:  # every codec's own errors
                return err

        results = list(self._threads().map(one, range(n))) if n > 1 and self.threads > 1 else [one(i) for i in range(n)]
        failed: list[int] = []
        for i, r in enumerate(results):
            if isinstance(r, BaseException):
                self._fail(r, ids[i][0], ids[i][1], name)
                failed.append(i)
        if out is not None:
            dropped = set(failed)
            return (out[[i for i in range(n) if i not in dropped]] if failed else out), failed
        good = [r for r in results if isinstance(r, np.ndarray)]
        if not good:
            return torch.empty((0, channels, 0, 0), dtype=self.dtype), failed
        shapes = {g.shape for g in good}
        if len(shapes) > 1:
            raise DecodeError(
                f"field {name!r}: the images of a batch have different sizes ({sorted(shapes)[:3]}...)",
                hint="give Decode(size=...) so that every image is resized to one size",
                ext=name,
            )
        hwc = torch.from_numpy(np.stack(good))  # [N, H, W, C] uint8
        return self._finish(hwc.permute(0, 3, 1, 2)), failed

    def _affine(self, channels: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(scale, bias)`` per channel, ``[C, 1, 1]``, such that the output is ``x * scale +
        bias`` for uint8 ``x``; ``(None, None)`` for uint8 output."""
        if self.dtype == torch.uint8:
            return None, None
        mean, std = self.normalize if self.normalize is not None else ((0.0,), (1.0,))
        mean = (mean * channels)[:channels] if len(mean) < channels else mean[:channels]
        std = (std * channels)[:channels] if len(std) < channels else std[:channels]
        scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32).view(-1, 1, 1)
        bias = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)], dtype=torch.float32).view(-1, 1, 1)
        return scale.to(self.dtype), bias.to(self.dtype)

    def _threads(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    self.threads, thread_name_prefix="fastfeed-decode", initializer=_one_torch_thread
                )
            return self._pool

    def _finish(self, nchw: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW -> the output dtype, normalized if asked (contiguous)."""
        if self.dtype == torch.uint8:
            return nchw.contiguous()
        x = nchw.to(self.dtype).div_(255.0)
        if self.normalize is not None:
            mean, std = self.normalize
            c = x.shape[1]
            m = torch.tensor(mean[:c] if len(mean) >= c else mean * c, dtype=self.dtype, device=x.device)
            s = torch.tensor(std[:c] if len(std) >= c else std * c, dtype=self.dtype, device=x.device)
            x = x.sub_(m.view(1, -1, 1, 1)).div_(s.view(1, -1, 1, 1))
        return x.contiguous()

    # ------------------------------------------------------------------------------ DALI

    def _dali_pipeline(self, name: str, mode: str, device: torch.device | None, n: int) -> Any:
        from fastfeed.vision.dali import DaliPipeline

        key = (name, str(device))
        pipe = self._dali.get(key)
        if pipe is None or pipe.batch_size < n:
            size = max(n, 2 * pipe.batch_size if pipe is not None else n)
            pipe = DaliPipeline(
                gray=mode == "gray",
                size=self.size,
                normalize=self.normalize,
                dtype=self.dtype,
                device=device,
                batch_size=size,
                threads=self.threads,
            )
            self._dali[key] = pipe
        return pipe

    def _decode_dali(
        self,
        items: list[Any],
        ids: list[tuple[str, str]],
        name: str,
        mode: str,
        epoch: int,
        device: torch.device | None,
    ) -> tuple[torch.Tensor, list[int]]:
        from fastfeed.vision.dali import image_size

        n = len(items)
        rois: dict[int, tuple[float, float, float, float]] = {}
        mirrors: dict[int, int] = {}
        failed: list[int] = []
        for i in range(n):
            try:
                height, width = image_size(items[i])
            except Exception as err:  # not an image any decoder would take
                self._fail(err, ids[i][0], ids[i][1], name)
                failed.append(i)
                continue
            rng = self.draws(*ids[i], epoch)
            box = crop_box(height, width, self.size, self.crop, rng, self.scale, self.ratio) if self.size else None
            rois[i] = (
                (0.0, 0.0, height, width)
                if box is None
                else (box.top, box.left, box.top + box.height, box.left + box.width)
            )
            mirrors[i] = int(self.flip and flip_draw(rng))
        arrays = [np.frombuffer(v, dtype=np.uint8) for v in items]
        ok = [i for i in range(n) if i not in failed]
        if not ok:
            h, w = self.size or (0, 0)
            return torch.empty((0, _MODES[mode][1], h, w), dtype=self.dtype), failed

        def run(rows: list[int]) -> torch.Tensor:
            with self._lock:
                pipe = self._dali_pipeline(name, mode, device, len(rows))
                return pipe.run([arrays[i] for i in rows], [rois[i] for i in rows], [mirrors[i] for i in rows])  # type: ignore[no-any-return]

        try:
            return run(ok), failed
        except Exception as err:
            # DALI fails the whole batch for one bad image: find it with Pillow, drop the
            # pipeline (its state after an error is DALI's business) and decode the rest.
            with self._lock:
                self._dali.pop((name, str(device)), None)
            bad = [i for i in ok if not _pillow_decodes(items[i])]
            if not bad:
                self._fail(err, ids[ok[0]][0], ids[ok[0]][1], name)
                return torch.empty((0, _MODES[mode][1], *(self.size or (0, 0))), dtype=self.dtype), failed + ok
            for i in bad:
                self._fail(err, ids[i][0], ids[i][1], name)
            failed.extend(bad)
            rest = [i for i in ok if i not in bad]
            if not rest:
                return torch.empty((0, _MODES[mode][1], *(self.size or (0, 0))), dtype=self.dtype), failed
            return run(rest), failed

    # ------------------------------------------------------------------------------ tensors (GPU)

    def transform_tensors(self, images: list[torch.Tensor], ids: list[tuple[str, str]], epoch: int) -> torch.Tensor:
        """Decoded CHW uint8 images (on any device) -> the output batch: crop, resize (bilinear,
        antialiased), flip, normalize, as tensor operations on the images' device (the same
        crop and resize as the CPU backend's)."""
        outs = []
        for img, (key, url) in zip(images, ids, strict=True):
            rng = self.draws(key, url, epoch)
            x = img
            if self.size is not None:
                x = resized_crop(x, self.size, self.crop, rng, self.scale, self.ratio)
            if self.flip and flip_draw(rng):
                x = x.flip(-1)
            outs.append(x)
        if not outs:
            raise DecodeError("no image in the batch decoded")
        return self._finish(torch.stack(outs))

    def _decode_nvjpeg(
        self,
        items: list[Any],
        tensors: list[torch.Tensor],
        ids: list[tuple[str, str]],
        name: str,
        mode: str,
        epoch: int,
        device: torch.device,
    ) -> tuple[torch.Tensor, list[int]]:
        from torchvision.io import ImageReadMode, decode_jpeg

        read_mode = ImageReadMode.RGB if mode == "rgb" else ImageReadMode.GRAY
        jpeg = [i for i, t in enumerate(tensors) if len(t) >= 2 and int(t[0]) == 0xFF and int(t[1]) == 0xD8]
        images: list[torch.Tensor | None] = [None] * len(items)
        failed: list[int] = []
        if jpeg:
            try:
                decoded = decode_jpeg([tensors[i] for i in jpeg], mode=read_mode, device=device)
                for i, img in zip(jpeg, decoded, strict=True):
                    images[i] = img
            except RuntimeError:  # one bad image fails the batch call: decode them one by one
                for i in jpeg:
                    try:
                        images[i] = decode_jpeg(tensors[i], mode=read_mode, device=device)
                    except RuntimeError as err:
                        self._fail(err, ids[i][0], ids[i][1], name)
                        failed.append(i)
        image_mod = _pil()
        pil_mode, _ = _MODES[mode]
        for i in range(len(items)):
            if images[i] is None and i not in failed:
                try:
                    with image_mod.open(io.BytesIO(items[i])) as img:
                        arr = np.asarray(img.convert(pil_mode), dtype=np.uint8)
                    arr = arr.reshape(arr.shape[0], arr.shape[1], -1)
                    images[i] = torch.from_numpy(arr).permute(2, 0, 1).to(device, non_blocking=False)
                except Exception as err:
                    self._fail(err, ids[i][0], ids[i][1], name)
                    failed.append(i)
        ok = [i for i in range(len(items)) if i not in failed]
        return self.transform_tensors([images[i] for i in ok], [ids[i] for i in ok], epoch), failed  # type: ignore[misc]


def _one_torch_thread() -> None:
    """[decode thread] This thread's torch operations run in it alone: the pool is the
    parallelism, and an OpenMP team of its own in each thread would fight over the same cores
    (measured: 1.1x the loader's images/s, 8 % less CPU; benchmarks/RESULTS.md). Only where torch
    parallelizes with OpenMP, whose setting belongs to the calling thread: elsewhere it is
    process-wide, and the training loop's would change too."""
    if "OpenMP" in torch.__config__.parallel_info():
        torch.set_num_threads(1)


def _pillow_decodes(data: Any) -> bool:
    """Whether Pillow decodes ``data`` whole (to find the image that failed a DALI batch)."""
    try:
        with _pil().open(io.BytesIO(data)) as img:
            img.load()
    except Exception:
        return False
    return True


def _as_uint8_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.reshape(-1).to(torch.uint8) if value.dtype != torch.uint8 else value.reshape(-1)
    return torch.frombuffer(bytearray(value), dtype=torch.uint8)  # a collate_fn's bytes: copied


def _items(value: Any) -> list[Any]:
    """The encoded images of a field: views of a RaggedBytes, or a list's items."""
    if isinstance(value, RaggedBytes):
        return value.views()
    if isinstance(value, list | tuple):
        return list(value)
    raise ConfigError(
        f"Decode: expected encoded images (RaggedBytes or a list of bytes), got {type(value).__name__}",
        hint="decode fields that hold the raw image bytes",
    )


def _select(batch: dict[str, Any], keep: list[int]) -> dict[str, Any]:
    """Every field of ``batch`` restricted to the samples ``keep``."""
    index = torch.tensor(keep, dtype=torch.long)
    out: dict[str, Any] = {}
    for name, value in batch.items():
        if isinstance(value, RaggedBytes):
            out[name] = value.select(keep)
        elif isinstance(value, torch.Tensor) and value.dim() > 0:
            out[name] = value.index_select(0, index.to(value.device))
        elif isinstance(value, list | tuple):
            out[name] = [value[i] for i in keep]
        else:
            out[name] = value
    return out
