"""WebDataset-style sample stages of a :class:`~fastfeed.StreamingDataset`: ``decode``,
``to_tuple``, ``map``, ``map_tuple``, ``select`` (the names and meanings of WebDataset's own).

::

    # WebDataset                                         # fastfeed
    ds = (wds.WebDataset(urls, shardshuffle=True)       ds = (fastfeed.StreamingDataset(urls, shuffle=True)
          .shuffle(1000)                                      .decode("pil")
          .decode("pil")                                      .to_tuple("jpg;png", "cls")
          .to_tuple("jpg;png", "cls")                         .map_tuple(transform, int))
          .map_tuple(transform, int))

Stages run on each sample after it is read and shuffled, in the order they were added, in the
process that reads the stream (a worker process with ``num_workers > 0``). They do not change
which samples a stream reads or in what order, so resume stays exact: a stream resumes at the
first sample after the last batch delivered, whatever the stages did to the samples before.
``select`` drops samples from the batch they were read into, so a batch can be smaller than
``batch_size`` (WebDataset filters before batching); a batch whose samples are all dropped is not
delivered.

Each stage is a small picklable object: the functions given to ``map``, ``map_tuple`` and
``select`` must be picklable too when workers are started with ``spawn``.
"""

from __future__ import annotations

import abc
import io
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from fastfeed.decode import IMAGE_EXTENSIONS, decode_value
from fastfeed.errors import ConfigError, DecodeError

__all__ = [
    "IMAGE_SPECS",
    "DecodeStage",
    "MapStage",
    "MapTupleStage",
    "SelectStage",
    "Stage",
    "Staged",
    "ToTupleStage",
    "apply_stages",
]

#: WebDataset's image decoder names: (Pillow mode, output), output one of "pil", "numpy"
#: (uint8 HWC), "float" (float32 HWC in [0, 1]), "torch" (uint8 CHW), "torchfloat" (float32 CHW).
IMAGE_SPECS: dict[str, tuple[str, str]] = {
    "pil": ("RGB", "pil"),
    "pilrgb": ("RGB", "pil"),
    "pill": ("L", "pil"),
    "pilrgba": ("RGBA", "pil"),
    "rgb8": ("RGB", "numpy"),
    "rgb": ("RGB", "float"),
    "rgba8": ("RGBA", "numpy"),
    "rgba": ("RGBA", "float"),
    "l8": ("L", "numpy"),
    "l": ("L", "float"),
    "torchrgb8": ("RGB", "torch"),
    "torchrgb": ("RGB", "torchfloat"),
    "torchrgba8": ("RGBA", "torch"),
    "torchrgba": ("RGBA", "torchfloat"),
    "torchl8": ("L", "torch"),
    "torchl": ("L", "torchfloat"),
}


class Stage(abc.ABC):
    """One stage: ``__call__(sample) -> sample``, or ``None`` to drop it."""

    @abc.abstractmethod
    def __call__(self, sample: Any) -> Any:
        """The sample transformed, or ``None`` to drop it."""


def _image(data: Any, mode: str, output: str) -> Any:
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img = img.convert(mode)
    if output == "pil":
        return img
    arr = np.array(img)  # a writable copy (torch warns on read-only arrays)
    if output == "numpy":
        return arr
    if output == "float":
        return arr.astype(np.float32) / 255.0
    # CHW; a one-channel image stays HW, as WebDataset gives it.
    chw = torch.from_numpy(arr) if arr.ndim == 2 else torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    return chw if output == "torch" else chw.float().div_(255.0)


class DecodeStage(Stage):
    """``decode(*handlers, only=None)``: each field of a sample decoded by its extension.

    ``handlers``: WebDataset image names (``"pil"``, ``"rgb8"``, ``"torchrgb"``... see
    :data:`IMAGE_SPECS`) for image fields, or functions ``f(key, data) -> value`` tried first, in
    order (``key`` is the field name; return ``None`` to pass). Fields no handler takes are
    decoded as :func:`fastfeed.decode.decode_value` does (``cls`` -> int, ``txt`` -> str,
    ``json``, ``npy``; images stay bytes without an image handler; others stay bytes).
    ``only``: decode only these fields.
    """

    def __init__(self, *handlers: str | Callable[[str, bytes], Any], only: Sequence[str] | None = None) -> None:
        self.image: tuple[str, str] | None = None
        self.functions: list[Callable[[str, bytes], Any]] = []
        for h in handlers:
            if isinstance(h, str):
                if h not in IMAGE_SPECS:
                    raise ConfigError(
                        f"decode: unknown image decoder {h!r}",
                        hint=f"use one of {', '.join(sorted(IMAGE_SPECS))}, or a function f(key, data)",
                    )
                self.image = IMAGE_SPECS[h]
            elif callable(h):
                self.functions.append(h)
            else:
                raise ConfigError(f"decode: a handler must be a name or a function, got {type(h).__name__}")
        self.only = set(only) if only is not None else None

    def __call__(self, sample: Any) -> Any:
        key, url = sample.get("__key__"), sample.get("__url__")
        out = {}
        for name, value in sample.items():
            if name.startswith("__") or not isinstance(value, bytes | bytearray | memoryview):
                out[name] = value
                continue
            if self.only is not None and name not in self.only:
                out[name] = value
                continue
            out[name] = self._one(name, value, key, url)
        return out

    def _one(self, name: str, value: Any, key: Any, url: Any) -> Any:
        try:
            for f in self.functions:
                got = f(name, bytes(value))
                if got is not None:
                    return got
            kind = name.rsplit(".", 1)[-1].lower()
            if self.image is not None and kind in IMAGE_EXTENSIONS:
                return _image(value, *self.image)
        except ConfigError:
            raise
        except Exception as err:
            raise DecodeError(
                f"cannot decode field {name!r} of sample {key!r}: {type(err).__name__}: {err}",
                url=None if url is None else str(url),
                hint=f"the member {key}.{name} is corrupt or is not what its extension says",
                key=None if key is None else str(key),
                ext=name,
            ) from err
        if name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS:
            return bytes(value)  # no image handler: the bytes, as WebDataset leaves them
        return decode_value(name, value, key=None if key is None else str(key), url=None if url is None else str(url))


class ToTupleStage(Stage):
    """``to_tuple("jpg;png", "cls")``: a tuple of fields; ``;`` separates alternatives (the
    first present is taken). A sample missing a field raises ``KeyError`` naming the sample."""

    def __init__(self, *fields: str, missing_is_error: bool = True) -> None:
        if not fields:
            raise ConfigError("to_tuple needs at least one field name")
        self.fields = [f.split(";") for f in fields]
        self.missing_is_error = missing_is_error

    def __call__(self, sample: Any) -> Any:
        out = []
        for names in self.fields:
            for name in names:
                if name in sample:
                    out.append(sample[name])
                    break
            else:
                if self.missing_is_error:
                    raise KeyError(
                        f"sample {sample.get('__key__')!r} of {sample.get('__url__')!r} has no field "
                        f"{';'.join(names)!r} (it has {', '.join(k for k in sample if not k.startswith('__'))})"
                    )
                out.append(None)
        return tuple(out)


class MapStage(Stage):
    """``map(f)``: ``f(sample)``; returning ``None`` drops the sample."""

    def __init__(self, f: Callable[[Any], Any]) -> None:
        if not callable(f):
            raise ConfigError(f"map needs a function, got {type(f).__name__}")
        self.f = f

    def __call__(self, sample: Any) -> Any:
        return self.f(sample)


class MapTupleStage(Stage):
    """``map_tuple(f1, f2, ...)``: ``fi`` applied to element ``i`` of a tuple sample (``None``
    leaves it as it is); fewer functions than elements leave the rest unchanged, more are
    ignored (as WebDataset's)."""

    def __init__(self, *fs: Callable[[Any], Any] | None) -> None:
        if any(f is not None and not callable(f) for f in fs):
            raise ConfigError("map_tuple needs functions (or None)")
        self.fs = fs

    def __call__(self, sample: Any) -> Any:
        if not isinstance(sample, tuple | list):
            raise TypeError(f"map_tuple needs tuple samples (call to_tuple first), got {type(sample).__name__}")
        out = list(sample)
        for i, f in enumerate(self.fs[: len(out)]):  # as WebDataset: extra functions are ignored
            if f is not None:
                out[i] = f(out[i])
        return tuple(out)


class SelectStage(Stage):
    """``select(predicate)``: keep the samples for which ``predicate(sample)`` is true."""

    def __init__(self, predicate: Callable[[Any], bool]) -> None:
        if not callable(predicate):
            raise ConfigError(f"select needs a function, got {type(predicate).__name__}")
        self.predicate = predicate

    def __call__(self, sample: Any) -> Any:
        return sample if self.predicate(sample) else None


def apply_stages(samples: Iterable[Any], stages: Sequence[Stage]) -> Iterator[Any]:
    """``samples`` through ``stages`` in order, dropping those a stage turns into ``None``."""
    for sample in samples:
        for stage in stages:
            sample = stage(sample)
            if sample is None:
                break
        else:
            yield sample


class Staged:
    """The stage methods of :class:`~fastfeed.StreamingDataset`. Each returns a new dataset (a
    shallow copy sharing the listing, caches and counters) with the stage added; the dataset it
    was called on is unchanged."""

    #: The stages, in order (empty: samples are the sample dicts as read).
    stages: tuple[Stage, ...] = ()

    def _with_stage(self, stage: Stage) -> Any:
        import copy

        new = copy.copy(self)
        new.stages = (*self.stages, stage)
        return new

    def decode(self, *handlers: str | Callable[[str, bytes], Any], only: Sequence[str] | None = None) -> Any:
        """Decode each sample's fields (see :class:`DecodeStage`): e.g. ``decode("pil")``."""
        return self._with_stage(DecodeStage(*handlers, only=only))

    def to_tuple(self, *fields: str, missing_is_error: bool = True) -> Any:
        """Turn each sample into a tuple of its fields (``"jpg;png"``: the first present)."""
        return self._with_stage(ToTupleStage(*fields, missing_is_error=missing_is_error))

    def map(self, f: Callable[[Any], Any]) -> Any:
        """Replace each sample by ``f(sample)`` (``None`` drops it)."""
        return self._with_stage(MapStage(f))

    def map_tuple(self, *fs: Callable[[Any], Any] | None) -> Any:
        """Apply ``fs[i]`` to element ``i`` of each tuple sample."""
        return self._with_stage(MapTupleStage(*fs))

    def select(self, predicate: Callable[[Any], bool]) -> Any:
        """Keep the samples for which ``predicate(sample)`` is true."""
        return self._with_stage(SelectStage(predicate))
