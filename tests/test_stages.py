"""WebDataset-style stages on StreamingDataset (decode, to_tuple, map, map_tuple, select), side by
side with WebDataset itself on the same shards, and through fastfeed.DataLoader with exact resume."""

from __future__ import annotations

import gc
import io
import json
import pickle
import tarfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from fastfeed import ConfigError, DataLoader, DecodeError, StreamingDataset

wds = pytest.importorskip("webdataset")
Image = pytest.importorskip("PIL.Image")
matplotlib = pytest.importorskip("matplotlib")

SAMPLES = Path(matplotlib.get_data_path()) / "sample_data"


def _encode(img: Any, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three shards of photographs: jpg or png (one of them per sample), cls, txt, json."""
    root = tmp_path_factory.mktemp("photos")
    with Image.open(SAMPLES / "grace_hopper.jpg") as img:
        hopper = img.convert("RGB")
    with Image.open(SAMPLES / "Minduka_Present_Blue_Pack.png") as img:
        pack = img.convert("RGB")
    n = 0
    for s, count in enumerate([7, 12, 5]):
        with tarfile.open(root / f"photos-{s:03d}.tar", "w") as tar:
            for _ in range(count):
                base = (hopper if n % 2 else pack).resize((40 + n % 7 * 9, 30 + n % 5 * 11))
                image = ("png", _encode(base, "PNG")) if n % 3 == 0 else ("jpg", _encode(base, "JPEG", quality=85))
                fields = [image, ("cls", str(n % 10).encode()), ("txt", f"photo {n}".encode())]
                fields.append(("json", json.dumps({"n": n, "even": n % 2 == 0}).encode()))
                for ext, data in fields:
                    info = tarfile.TarInfo(f"s{n:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                n += 1
    return root


def _urls(root: Path) -> list[str]:
    return [str(p) for p in sorted(root.glob("*.tar"))]


def _plain(value: Any) -> Any:
    """A decoded value as comparable Python data."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if k not in ("__url__", "__local_path__")}
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype), value.tolist())
    if isinstance(value, np.ndarray):
        return ("array", str(value.dtype), value.tolist())
    if hasattr(value, "mode") and hasattr(value, "size"):  # a PIL image
        return ("pil", value.mode, value.size, np.asarray(value).tolist())
    return value


def _webdataset(pipeline: Any) -> list[Any]:
    """Every sample of a WebDataset pipeline. WebDataset leaves each local tar file it opened
    for the garbage collector to close (a ResourceWarning, theirs): read and collected quietly."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        samples = list(pipeline)
        del pipeline
        gc.collect()
    return samples


def _label(x: Any) -> int:
    return int(x) + 100


def _mean(x: Any) -> float:
    return round(float(np.asarray(x, dtype=np.float64).mean()), 6)


@pytest.mark.parametrize(
    "spec", ["pil", "pill", "rgb8", "rgb", "rgba8", "torchrgb8", "torchrgb", "l8", "l", "torchl8", "torchl"]
)
def test_decode_and_to_tuple_match_webdataset(shards: Path, spec: str) -> None:
    urls = _urls(shards)
    theirs = wds.WebDataset(urls, shardshuffle=False).decode(spec).to_tuple("jpg;png", "cls", "txt", "json")
    ours = StreamingDataset(urls).decode(spec).to_tuple("jpg;png", "cls", "txt", "json")
    got, want = [_plain(s) for s in ours], [_plain(s) for s in _webdataset(theirs)]
    assert len(got) == len(want) == 24
    assert got == want


def test_map_map_tuple_and_select_match_webdataset(shards: Path) -> None:
    urls = _urls(shards)

    def keep(sample: Any) -> bool:
        return int(sample[1]) % 3 != 0

    theirs = (
        wds.WebDataset(urls, shardshuffle=False)
        .decode("rgb8")
        .map(lambda s: {**s, "txt": s["txt"].upper()})
        .to_tuple("jpg;png", "cls", "txt")
        .select(keep)
        .map_tuple(_mean, _label)
    )
    ours = (
        StreamingDataset(urls)
        .decode("rgb8")
        .map(lambda s: {**s, "txt": s["txt"].upper()})
        .to_tuple("jpg;png", "cls", "txt")
        .select(keep)
        .map_tuple(_mean, _label)
    )
    got, want = [_plain(s) for s in ours], [_plain(s) for s in _webdataset(theirs)]
    assert got == want and 0 < len(got) < 24
    assert all(t.startswith("PHOTO ") for _, _, t in got)


def test_stages_return_new_datasets_and_keep_the_original(shards: Path) -> None:
    base = StreamingDataset(_urls(shards))
    tupled = base.decode().to_tuple("cls", "txt")
    assert base.stages == () and len(tupled.stages) == 2
    assert isinstance(next(iter(base)), dict)
    assert next(iter(tupled)) == (0, "photo 0")  # cls as int, txt as str: WebDataset's basic handlers
    assert pickle.loads(pickle.dumps(tupled)).stages[1].fields == [["cls"], ["txt"]]


def test_decode_handlers_only_and_bad_input(shards: Path) -> None:
    urls = _urls(shards)

    def upper_txt(key: str, data: bytes) -> Any:
        return data.decode().upper() if key == "txt" else None

    sample = next(iter(StreamingDataset(urls).decode(upper_txt, "torchrgb8", only=["txt", "png"])))
    assert sample["txt"] == "PHOTO 0" and sample["png"].dtype == torch.uint8 and sample["cls"] == b"0"
    with pytest.raises(ConfigError, match="unknown image decoder"):
        StreamingDataset(urls).decode("jpeg-turbo")
    with pytest.raises(KeyError, match="has no field 'seg'"):
        next(iter(StreamingDataset(urls).to_tuple("jpg;png", "seg")))
    assert next(iter(StreamingDataset(urls).to_tuple("cls", "seg", missing_is_error=False)))[1] is None
    with pytest.raises(TypeError, match="call to_tuple first"):
        next(iter(StreamingDataset(urls).map_tuple(int)))


def test_a_corrupt_image_names_its_sample(tmp_path: Path) -> None:
    with tarfile.open(tmp_path / "bad-000.tar", "w") as tar:
        for key, data in (("ok", _encode(Image.new("RGB", (8, 8)), "PNG")), ("broken", b"\xff\xd8not a jpeg")):
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    it = iter(StreamingDataset(str(tmp_path)).decode("pil"))
    assert next(it)["jpg"].size == (8, 8)
    with pytest.raises(DecodeError) as info:
        next(it)
    assert info.value.key == "broken" and "bad-000.tar" in (info.value.url or "")


# ---------------------------------------------------------------------------- through the loader


def _dataset(root: Path) -> StreamingDataset:
    return (
        StreamingDataset(_urls(root), shuffle=True, seed=3)
        .decode("torchrgb8")
        .map(lambda s: {**s, "key": s["__key__"]})
        .select(lambda s: s["json"]["n"] % 4 != 1)
        .to_tuple("key", "cls", "jpg;png")
        .map_tuple(None, None, lambda img: img.float().mean())
    )


def _loader(root: Path, workers: int, **kw: Any) -> DataLoader:
    return DataLoader(_dataset(root), batch_size=5, num_workers=workers, num_streams=3, **kw)


def _keys(batches: list[Any]) -> list[list[str]]:
    return [list(b[0]) for b in batches]


@pytest.mark.parametrize("workers", [0, 2])
def test_the_loader_collates_staged_samples_as_torch_does(shards: Path, workers: int) -> None:
    batches = list(_loader(shards, workers))
    keys = [k for b in _keys(batches) for k in b]
    expected = {f"s{n:04d}" for n in range(24) if n % 4 != 1}
    assert sorted(keys) == sorted(expected)  # every kept sample once, the dropped ones never
    # Each batch is torch's default_collate over the staged samples it holds (as the dataset
    # iterated alone gives them).
    staged = {s[0]: s for s in _dataset(shards)}
    for batch in batches:
        assert 1 <= len(batch[0]) <= 5
        want = default_collate([staged[k] for k in batch[0]])
        assert type(batch) is type(want) and len(batch) == len(want)
        for got_field, want_field in zip(batch, want, strict=True):
            assert type(got_field) is type(want_field)
            if isinstance(want_field, torch.Tensor):
                assert got_field.dtype == want_field.dtype and torch.equal(got_field, want_field)
            else:
                assert got_field == want_field
    # The same batches with or without workers (streams, not workers, decide the order).
    assert _keys(batches) == _keys(list(_loader(shards, 2 - workers)))


def test_resume_with_stages_is_exact(shards: Path) -> None:
    full = _keys(list(_loader(shards, 0)))
    for stop in (1, len(full) - 2):
        loader = _loader(shards, 0)
        it = iter(loader)
        head = [list(next(it)[0]) for _ in range(stop)]
        state = loader.state_dict()
        loader.close()
        assert head == full[:stop]
        fresh = _loader(shards, 2)
        fresh.load_state_dict(json.loads(json.dumps(state)))
        assert _keys(list(fresh)) == full[stop:]


def test_a_batch_whose_samples_are_all_dropped_is_not_delivered(shards: Path) -> None:
    ds = StreamingDataset(_urls(shards)).decode().select(lambda s: s["__key__"] in ("s0003", "s0020"))
    batches = list(DataLoader(ds, batch_size=4, num_workers=0, num_streams=2))
    assert sorted(k for b in batches for k in b["__key__"]) == ["s0003", "s0020"]
    assert all(len(b["__key__"]) >= 1 for b in batches)
