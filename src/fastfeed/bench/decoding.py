"""``fastfeed bench --decode``: the loader's decode stage over the dataset's image fields, and the
decode ceiling measured with the same backend."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
from collections.abc import Sequence
from typing import Any, Protocol

from fastfeed.bench.measure import Measurement
from fastfeed.errors import ConfigError
from fastfeed.vision import Decode


class DecodeOptions(Protocol):
    """What the decode stage reads of :class:`fastfeed.bench.run.BenchConfig`."""

    decode: bool
    image_size: tuple[int, int] | None


__all__ = [
    "DECODE_CEILING_BYTES",
    "DECODE_CEILING_SAMPLES",
    "DECODE_SIZE",
    "BenchDecode",
    "DecodeOptions",
    "check_decode",
    "first_samples",
    "make_decoder",
    "measure_decode",
]

log = logging.getLogger(__name__)

#: The crops ``--decode`` makes without ``--image-size``: a training-shaped 224x224.
DECODE_SIZE = (224, 224)

#: The decode ceiling decodes at most this many samples (and at most this many stored bytes).
DECODE_CEILING_SAMPLES = 256
DECODE_CEILING_BYTES = 256 << 20


def check_decode(cfg: DecodeOptions) -> None:
    """Refuse ``--image-size`` without ``--decode`` (before anything is started)."""
    if not cfg.decode and cfg.image_size is not None:
        raise ConfigError("--image-size applies to decoded images", hint="add --decode")


class BenchDecode(Decode):
    """The loader's decode stage for ``fastfeed bench --decode``: :class:`fastfeed.vision.Decode`
    over the dataset's image fields; each batch also carries the stored bytes it held before
    decoding (``batch["__nbytes__"]``, every bytes field), which the bench counts as read."""

    def __call__(self, batch: Any, *, epoch: int = 0, device: Any = None) -> Any:
        from fastfeed.batch.assemble import RaggedBytes
        from fastfeed.decode import NBYTES_KEY

        nbytes = sum(int(v.data.numel()) for v in batch.values() if isinstance(v, RaggedBytes))
        out = super().__call__(batch, epoch=epoch, device=device)
        out[NBYTES_KEY] = nbytes
        return out


def make_decoder(cfg: DecodeOptions, samples: Sequence[dict[str, Any]]) -> BenchDecode | None:
    """The loader's decode stage for ``cfg.decode`` (``None`` without): the image fields of
    ``samples`` (the dataset's first), to RGB center crops of ``--image-size`` (default
    :data:`DECODE_SIZE`)."""
    from fastfeed.decode import IMAGE_EXTENSIONS

    check_decode(cfg)
    if not cfg.decode:
        return None
    names = sorted({k for s in samples for k in s if not k.startswith("__")})
    fields = [k for k in names if k.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS]
    if not fields:
        raise ConfigError(
            f"--decode found no image fields in the dataset's first samples (fields: {', '.join(names) or 'none'})",
            hint=f"--decode decodes images ({', '.join(sorted(IMAGE_EXTENSIONS))})",
        )
    return BenchDecode({f: "rgb" for f in fields}, size=cfg.image_size or DECODE_SIZE, crop="center")


def _usable_cores() -> int:
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def first_samples(
    dataset: Any,
    *,
    batch_size: int = 64,
    max_samples: int = DECODE_CEILING_SAMPLES,
    max_bytes: int = DECODE_CEILING_BYTES,
) -> list[dict[str, Any]]:
    """The first ``max_samples`` samples of ``dataset`` (a :class:`~fastfeed.StreamingDataset`;
    fewer if they reach ``max_bytes`` stored bytes first), with ``bytes`` values.

    The dataset is iterated in one :class:`fastfeed.DataLoader` worker process, so the reads
    still in flight when it stops end with that process (a read stopped early in this process
    made the demo's SeaweedFS wait for them at shutdown)."""
    from fastfeed.loader.dataloader import DataLoader

    samples: list[dict[str, Any]] = []
    nbytes = 0
    loader: DataLoader[Any]
    with DataLoader(dataset, batch_size=max(1, min(batch_size, max_samples)), num_workers=1, collate_fn=list) as loader:
        for batch in loader:
            for sample in batch:
                samples.append(sample)
                nbytes += sum(len(v) for k, v in sample.items() if not k.startswith("__") and isinstance(v, bytes))
                if len(samples) >= max_samples or nbytes >= max_bytes:
                    return samples
    return samples


def _decode_batches(samples: Sequence[dict[str, Any]], fields: Sequence[str], batch_size: int) -> list[dict[str, Any]]:
    """``samples`` as the loader's batches: key and URL lists, a RaggedBytes per bytes field."""
    import numpy as np
    import torch

    from fastfeed.batch.assemble import RaggedBytes

    out = []
    for start in range(0, len(samples), max(1, batch_size)):
        chunk = samples[start : start + max(1, batch_size)]
        batch: dict[str, Any] = {
            "__key__": [s["__key__"] for s in chunk],
            "__url__": [s.get("__url__", "") for s in chunk],
        }
        names = {k for s in chunk for k, v in s.items() if not k.startswith("__") and isinstance(v, bytes | bytearray)}
        for name in sorted(names | set(fields)):
            items = [bytes(s.get(name, b"")) for s in chunk]
            data = torch.from_numpy(np.frombuffer(b"".join(items), dtype=np.uint8).copy())
            offsets = torch.tensor([0, *np.cumsum([len(i) for i in items]).tolist()], dtype=torch.int64)
            batch[name] = RaggedBytes(data, offsets)
        out.append(batch)
    return out


def measure_decode(
    samples: Sequence[dict[str, Any]],
    decoder: Decode,
    *,
    batch_size: int,
    device: str = "cpu",
    repeats: int = 3,
) -> Measurement:
    """The decode ceiling: ``samples`` (already read, e.g. by :func:`first_samples`) decoded by
    ``decoder``'s backend in batches of ``batch_size`` in this process, timed: the fastest of
    ``repeats`` passes, after one untimed batch (imports, codec set-up, a DALI pipeline).

    On the CPU the backend runs in one thread and the figure is that rate times the decode
    threads the loader runs (``decoder.threads``, at most the cores this process may use); on a
    GPU it is the rate measured on the device. ``extra`` keeps the single-thread figures.
    """

    import torch

    if not samples:
        raise ConfigError("the decode ceiling found no samples in the dataset")
    nbytes = sum(
        len(v) for s in samples for k, v in s.items() if not k.startswith("__") and isinstance(v, bytes | bytearray)
    )
    dev = None if device == "cpu" else torch.device(device)
    backend = decoder.resolve_backend(dev)
    one = copy.copy(decoder)
    one.backend, one.threads = backend, 1  # type: ignore[assignment]
    one.__setstate__(one.__getstate__())  # no pool or pipelines shared with the loader's
    batches = _decode_batches(samples, list(decoder.fields), batch_size)

    def run(batch: dict[str, Any]) -> None:
        out = one(batch, device=dev)
        if dev is not None and dev.type == "cuda":
            torch.cuda.synchronize(dev)
        del out

    run(batches[0])  # warm-up
    passes: list[tuple[float, float]] = []
    for _ in range(max(1, repeats)):
        cpu0 = time.thread_time()
        t0 = time.perf_counter()
        for batch in batches:
            run(batch)
        passes.append((time.perf_counter() - t0, time.thread_time() - cpu0))
    one.close()
    seconds, cpu_s = min(passes)  # a ceiling: the pass least disturbed by the rest of the machine
    cores = _usable_cores()
    parallel = 1 if dev is not None else max(1, min(decoder.threads, cores))
    who = f"{backend}, {parallel} thread{'s' if parallel != 1 else ''}" if dev is None else f"{backend} on {device}"
    per_core = len(samples) / seconds if seconds > 0 else 0.0
    log.info("decode ceiling: %d samples in %.3f s in one thread (%.0f samples/s)", len(samples), seconds, per_core)
    return Measurement(
        f"decode ceiling ({who})",
        len(samples) * parallel,
        nbytes * parallel,
        seconds,
        0.0,
        cpu_s * parallel,
        extra={
            "decoded_samples": len(samples),
            "decoded_bytes": nbytes,
            "passes_s": [p[0] for p in passes],
            "per_core_samples_per_s": per_core,
            "processes": parallel,
            "backend": backend,
            "cores": cores,
        },
    )
