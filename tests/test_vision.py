"""Image decode in the loader (fastfeed.vision.Decode) on real photographs, against Pillow and
torchvision's definitions of the crops; RaggedBytes' per-sample views.

The photographs are matplotlib's sample data (Grace Hopper's portrait, a photo of a package),
re-encoded here as baseline, progressive, grayscale and CMYK JPEGs and as PNGs, at several sizes.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastfeed
from fastfeed import DataLoader, DecodeError, RaggedBytes, StreamingDataset
from fastfeed.vision import Decode, crop_box
from fastfeed.vision.dali import dali_available

Image = pytest.importorskip("PIL.Image")
matplotlib = pytest.importorskip("matplotlib")

SAMPLES = Path(matplotlib.get_data_path()) / "sample_data"

#: The host backends: Pillow, and DALI's CPU pipeline (the same pipeline code as on a GPU but
#: for the decoder's device) where DALI is installed (x86-64 Linux: the test extra).
NEEDS_DALI = pytest.mark.skipif(not dali_available(), reason="pip install nvidia-dali-cuda120")
BACKENDS = ["cpu", pytest.param("dali", marks=NEEDS_DALI)]


def _photo(name: str) -> Any:
    with Image.open(SAMPLES / name) as img:
        return img.convert("RGB")


def _encode(img: Any, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    hopper = _photo("grace_hopper.jpg")
    pack = _photo("Minduka_Present_Blue_Pack.png")
    return {
        "hopper-q90": _encode(hopper, "JPEG", quality=90),
        "hopper-half": _encode(hopper.resize((hopper.width // 2, hopper.height // 2)), "JPEG", quality=85),
        "hopper-odd": _encode(hopper.resize((97, 113)), "JPEG", quality=75),
        "hopper-progressive": _encode(hopper, "JPEG", quality=90, progressive=True),
        "hopper-444": _encode(hopper, "JPEG", quality=95, subsampling=0),
        "hopper-gray": _encode(hopper.convert("L"), "JPEG", quality=90),
        "hopper-cmyk": _encode(hopper.convert("CMYK"), "JPEG", quality=90),
        "hopper-png": _encode(hopper, "PNG"),
        "pack-png": _encode(pack, "PNG"),
        "pack-rgba": _encode(pack.convert("RGBA"), "PNG"),
        "pack-jpg": _encode(pack, "JPEG", quality=90),
    }


def _ragged(items: list[bytes]) -> RaggedBytes:
    data = torch.from_numpy(np.frombuffer(b"".join(items), dtype=np.uint8).copy())
    offsets = torch.tensor([0, *np.cumsum([len(i) for i in items]).tolist()], dtype=torch.int64)
    return RaggedBytes(data, offsets)


def _batch(photos: dict[str, bytes], names: list[str]) -> dict[str, Any]:
    return {
        "__key__": names,
        "__url__": ["file:///photos.tar"] * len(names),
        "jpg": _ragged([photos[n] for n in names]),
        "cls": torch.arange(len(names)),
    }


def _pillow_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def _reference_center(data: bytes, size: int) -> np.ndarray:
    """torchvision's Resize(size) + CenterCrop(size), written with Pillow from torchvision's
    definitions: the shorter side to ``size`` and the longer to ``int(size * long / short)``
    (bilinear), then the central ``size`` x ``size`` at offsets ``round((side - size) / 2)``."""
    with Image.open(io.BytesIO(data)) as img:
        rgb = img.convert("RGB")
    short, long = sorted((rgb.width, rgb.height))
    other = int(size * long / short)
    w, h = (size, other) if rgb.width <= rgb.height else (other, size)
    resized = rgb.resize((w, h), Image.Resampling.BILINEAR)
    left, top = round((w - size) / 2.0), round((h - size) / 2.0)
    return np.asarray(resized.crop((left, top, left + size, top + size)))


# ---------------------------------------------------------------------------- RaggedBytes


def test_ragged_bytes_items_are_views_not_copies() -> None:
    items = [b"alpha", b"", b"gamma-delta"]
    ragged = _ragged(items)
    views = list(ragged)
    assert views == items and [bytes(v) for v in views] == items and ragged.tolist() == items
    assert all(isinstance(v, memoryview) and v.readonly for v in views)
    assert ragged[-1] == b"gamma-delta"
    ragged.data[0] = ord("A")  # the views see the batch's memory: nothing was copied
    assert ragged[0] == b"Alpha" and views[0] == b"Alpha"
    parts = ragged.split()
    base = ragged.data.data_ptr()
    assert [p.data_ptr() - base for p in parts if len(p)] == [0, 5]
    assert [bytes(p.numpy()) for p in parts] == [b"Alpha", b"", b"gamma-delta"]
    picked = ragged.select([2, 0])
    assert picked.tolist() == [b"gamma-delta", b"Alpha"] and picked.offsets.tolist() == [0, 11, 16]
    with pytest.raises(IndexError):
        ragged[3]
    with pytest.raises(TypeError):
        ragged[1.0]  # type: ignore[index]


def test_ragged_bytes_views_outlive_the_batch() -> None:
    ragged = _ragged([b"one", b"two"])
    views = ragged.views()
    del ragged
    assert views == [b"one", b"two"]


# ---------------------------------------------------------------------------- CPU decode vs Pillow


def test_decode_without_resize_is_pillows_decode_bit_for_bit(photos: dict[str, bytes]) -> None:
    names = ["hopper-q90", "hopper-progressive", "hopper-444", "hopper-gray", "hopper-cmyk", "hopper-png"]
    out = Decode(jpg="rgb", backend="cpu")(_batch(photos, names))
    images = out["jpg"]
    assert images.dtype == torch.uint8 and images.shape == (len(names), 3, 600, 512)
    for i, name in enumerate(names):
        assert np.array_equal(images[i].permute(1, 2, 0).numpy(), _pillow_rgb(photos[name])), name
    assert torch.equal(out["cls"], torch.arange(len(names)))  # other fields as they were
    assert out["__key__"] == names


@pytest.mark.parametrize("backend", BACKENDS)
def test_gray_mode_gives_one_channel(photos: dict[str, bytes], backend: str) -> None:
    out = Decode(jpg="gray", size=32, backend=backend)(_batch(photos, ["hopper-q90", "pack-png"]))
    assert out["jpg"].shape == (2, 1, 32, 32)
    with Image.open(io.BytesIO(photos["pack-png"])) as img:
        gray = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.BILINEAR))
    assert np.abs(out["jpg"][1, 0].numpy().astype(int) - gray.astype(int)).mean() < 3


@pytest.mark.parametrize("size", [224, 64, 31])
@pytest.mark.parametrize("backend", BACKENDS)
def test_center_crop_matches_torchvisions_resize_and_center_crop(
    photos: dict[str, bytes], size: int, backend: str
) -> None:
    names = list(photos)
    out = Decode(jpg="rgb", size=size, crop="center", backend=backend)(_batch(photos, names))["jpg"]
    assert out.shape == (len(names), 3, size, size)
    for i, name in enumerate(names):
        got = out[i].permute(1, 2, 0).numpy().astype(np.int16)
        want = _reference_center(photos[name], size).astype(np.int16)
        # The same filter over the same region: resampling a box of the original is resizing
        # the whole and cropping, but for rounding.
        assert np.abs(got - want).mean() < 1.5, (name, size)


@pytest.mark.parametrize("backend", BACKENDS)
def test_normalize_is_imagenets(photos: dict[str, bytes], backend: str) -> None:
    batch = _batch(photos, ["hopper-q90", "pack-jpg"])
    raw = Decode(jpg="rgb", size=48, backend=backend)(batch)["jpg"]
    norm = Decode(jpg="rgb", size=48, normalize="imagenet", backend=backend)(batch)["jpg"]
    assert norm.dtype == torch.float32
    mean = torch.tensor(fastfeed.vision.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(fastfeed.vision.IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(norm, (raw.float() / 255 - mean) / std)


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_crops_are_drawn_per_sample_and_epoch(photos: dict[str, bytes], backend: str) -> None:
    names = ["hopper-q90", "hopper-progressive", "pack-jpg", "hopper-q90"]
    batch = _batch(photos, names)
    batch["__key__"] = ["a", "b", "c", "d"]
    dec = Decode(jpg="rgb", size=40, crop="random", flip=True, backend=backend)
    one, again, later = dec(batch, epoch=0)["jpg"], dec(batch, epoch=0)["jpg"], dec(batch, epoch=1)["jpg"]
    assert torch.equal(one, again)  # a function of (seed, epoch, shard, key): resumable
    assert not torch.equal(one, later)
    assert not torch.equal(one[0], one[3])  # the same image under two keys: two crops
    other_seed = Decode(jpg="rgb", size=40, crop="random", flip=True, backend=backend, seed=1)(batch)["jpg"]
    assert not torch.equal(one, other_seed)
    # One sample alone gets the crop it gets in a batch: the draws do not depend on neighbours.
    alone = dec({k: (v.select([2]) if isinstance(v, RaggedBytes) else v[2:3]) for k, v in batch.items()})["jpg"]
    assert torch.equal(alone[0], one[2])


@settings(max_examples=200, deadline=None)
@given(
    h=st.integers(1, 4000),
    w=st.integers(1, 4000),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_resized_crop_box_obeys_torchvisions_rules(h: int, w: int, seed: int) -> None:
    box = crop_box(h, w, (224, 224), "random", np.random.default_rng(seed))
    assert box.top >= 0 and box.left >= 0 and box.top + box.height <= h and box.left + box.width <= w
    assert box.height > 0 and box.width > 0
    area, aspect = box.height * box.width / (h * w), box.width / box.height
    fallback = (box.top, box.left) == ((h - box.height) // 2, (w - box.width) // 2)
    if not fallback:  # one of the ten tries: area in scale, aspect in ratio (to rounding)
        assert 0.08 * (1 - 0.1) - 2 / min(h, w) <= area <= 1.0
        assert (3 / 4) * 0.8 - 2 / min(h, w) <= aspect <= (4 / 3) * 1.25 + 2 / min(h, w)


@settings(max_examples=200, deadline=None)
@given(h=st.integers(1, 3000), w=st.integers(1, 3000), oh=st.integers(1, 512), ow=st.integers(1, 512))
def test_center_crop_box_keeps_the_output_aspect_and_the_center(h: int, w: int, oh: int, ow: int) -> None:
    box = crop_box(h, w, (oh, ow), "center", None)
    assert box.top >= 0 and box.left >= 0 and box.top + box.height <= h + 1e-9 and box.left + box.width <= w + 1e-9
    # Whole pixels of the resized image: the aspect and the centring hold to one of them.
    px_y, px_x = box.height / oh, box.width / ow
    assert abs(box.width / box.height - ow / oh) <= (ow / oh) * (1 / oh + 1 / ow) * 2
    assert abs(box.top * 2 + box.height - h) <= 2 * px_y + 1e-9 and abs(box.left * 2 + box.width - w) <= 2 * px_x + 1e-9
    assert box.height >= h - 2 * px_y - 1e-9 or box.width >= w - 2 * px_x - 1e-9  # the shorter side fits whole


@NEEDS_DALI
@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": 224},
        {"size": 56, "crop": "random", "flip": True},
        {"size": 64, "crop": "none"},
        {"size": 33, "normalize": "imagenet"},
    ],
)
def test_dali_agrees_with_pillow(photos: dict[str, bytes], kwargs: dict[str, Any]) -> None:
    # DALI's pipeline (its CPU decoder here; nvJPEG on a GPU, benchmarks/gpu/decode_check.py) is
    # given the crops and flips the host draws, so it must give the Pillow path's images.
    batch = _batch(photos, list(photos))
    want = Decode(jpg="rgb", backend="cpu", **kwargs)(batch, epoch=2)["jpg"]
    got = Decode(jpg="rgb", backend="dali", **kwargs)(batch, epoch=2)["jpg"]
    assert got.shape == want.shape and got.dtype == want.dtype
    diff = (got.float() - want.float()).abs()
    if got.dtype != torch.uint8:
        diff = diff * 0.226 * 255  # back to levels of 255
    assert diff.mean() < 1.0, diff.mean()  # measured: 0.06-0.2 on these photographs


@NEEDS_DALI
def test_dali_batches_stay_valid_while_held(photos: dict[str, bytes]) -> None:
    # The host output is DALI's own buffer, not a copy: later batches must not overwrite it.
    dec = Decode(jpg="rgb", size=24, backend="dali")
    first = dec(_batch(photos, ["hopper-q90", "pack-jpg"]))["jpg"]
    kept = first.clone()
    for names in (["pack-png", "hopper-gray"], ["hopper-cmyk", "pack-rgba"], ["hopper-odd", "hopper-half"]):
        dec(_batch(photos, names))
    assert torch.equal(first, kept)


# ---------------------------------------------------------------------------- the GPU path's tensor ops


@pytest.mark.parametrize("crop", ["center", "random", "none"])
def test_tensor_path_agrees_with_the_pillow_path(photos: dict[str, bytes], crop: str) -> None:
    # The nvjpeg backend decodes on the GPU, then crops, resizes, flips and normalizes with these
    # tensor operations; fed Pillow's decode on the CPU, they must give the CPU backend's images.
    names = ["hopper-q90", "hopper-odd", "hopper-cmyk", "pack-png", "pack-rgba"]
    dec = Decode(jpg="rgb", size=56, crop=crop, flip=True, backend="cpu")  # type: ignore[arg-type]
    batch = _batch(photos, names)
    want = dec(batch, epoch=3)["jpg"]
    decoded = [torch.from_numpy(_pillow_rgb(photos[n]).copy()).permute(2, 0, 1) for n in names]
    ids = list(zip(batch["__key__"], batch["__url__"], strict=True))
    got = dec.transform_tensors(decoded, ids, epoch=3)
    # On the CPU the same crop and resize run: the same images, bit for bit (on a GPU the resize
    # runs in float: benchmarks/gpu/decode_check.py measures that difference).
    assert got.shape == want.shape and got.dtype == want.dtype and torch.equal(got, want)


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_corrupt_image_names_its_sample_and_shard(photos: dict[str, bytes], backend: str) -> None:
    batch = _batch(photos, ["hopper-q90", "hopper-half"])
    batch["jpg"] = _ragged([photos["hopper-q90"], photos["hopper-half"][:300]])
    batch["__key__"] = ["good", "broken"]
    with pytest.raises(DecodeError) as info:
        Decode(jpg="rgb", size=32, backend=backend)(batch)
    err = info.value
    assert "broken" in str(err) and err.url == "file:///photos.tar" and err.key == "broken"
    assert "on_error='skip'" in (err.hint or "")


@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_drops_a_corrupt_sample_from_every_field_and_counts_it(photos: dict[str, bytes], backend: str) -> None:
    batch = _batch(photos, ["hopper-q90", "hopper-q90", "pack-jpg"])
    batch["__key__"] = ["a", "b", "c"]
    batch["jpg"] = _ragged([photos["hopper-q90"], b"not an image", photos["pack-jpg"]])
    batch["txt"] = _ragged([b"x", b"y", b"z"])
    dec = Decode(jpg="rgb", size=32, backend=backend, on_error="skip")
    out = dec(batch)
    assert out["jpg"].shape == (2, 3, 32, 32) and dec.skipped == 1
    assert out["__key__"] == ["a", "c"] and out["cls"].tolist() == [0, 2] and out["txt"].tolist() == [b"x", b"z"]


def test_bad_arguments_are_config_errors() -> None:
    for kwargs in (
        {},
        {"jpg": "cmyk"},
        {"jpg": "rgb", "size": 0},
        {"jpg": "rgb", "size": (3, 4, 5)},
        {"jpg": "rgb", "crop": "middle"},
        {"jpg": "rgb", "crop": "random"},
        {"jpg": "rgb", "normalize": ((0.5,), (0.0,))},
        {"jpg": "rgb", "normalize": "imagenet", "dtype": torch.uint8},
        {"jpg": "rgb", "backend": "opencv"},
        {"jpg": "rgb", "on_error": "ignore"},
    ):
        with pytest.raises(fastfeed.ConfigError):
            Decode(**kwargs)
    with pytest.raises(fastfeed.ConfigError, match="no field 'png'"):
        Decode(png="rgb")({"jpg": _ragged([b"x"])})
    with pytest.raises(fastfeed.ConfigError, match=r"fastfeed\.vision\.Decode"):
        DataLoader([1, 2], decode="jpg")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- in the loader


def _write_shard(path: Path, photos: dict[str, bytes], names: list[str]) -> None:
    with tarfile.open(path, "w") as tar:
        for i, name in enumerate(names):
            for ext, data in (("jpg", photos[name]), ("cls", str(i).encode())):
                info = tarfile.TarInfo(f"{i:04d}-{name}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize(
    "workers,mode,backend",
    [
        (0, "auto", "cpu"),
        (2, "thread", "cpu"),
        (2, "process", "cpu"),
        pytest.param(2, "thread", "dali", marks=NEEDS_DALI),
    ],
)
def test_the_loader_decodes_each_batch(
    tmp_path: Path, photos: dict[str, bytes], workers: int, mode: str, backend: str
) -> None:
    names = list(photos) * 2
    _write_shard(tmp_path / "photos-000.tar", photos, names[:11])
    _write_shard(tmp_path / "photos-001.tar", photos, names[11:])
    ds = StreamingDataset(str(tmp_path))
    dec = Decode(jpg="rgb", size=40, crop="random", flip=True, normalize="imagenet", backend=backend)  # type: ignore[arg-type]
    loader = DataLoader(ds, batch_size=4, num_workers=workers, worker_mode=mode, decode=dec)
    seen: dict[str, torch.Tensor] = {}
    labels: dict[str, int] = {}
    for batch in loader:
        assert batch["jpg"].shape == (len(batch["__key__"]), 3, 40, 40) and batch["jpg"].dtype == torch.float32
        ints = batch["cls"].to_ints() if isinstance(batch["cls"], RaggedBytes) else batch["cls"]
        for key, url, image, label in zip(batch["__key__"], batch["__url__"], batch["jpg"], ints, strict=True):
            seen[f"{url}#{key}"] = image.clone()
            labels[key] = int(label)
    assert len(seen) == len(names) and loader.stats().decode_s > 0
    assert all(int(k[:4]) == v for k, v in labels.items())
    # Each image is what the stage gives that sample alone, in any batch, with any workers.
    for where, image in list(seen.items())[:6]:
        url, key = where.split("#")
        name = key[5:]
        alone = dec({"__key__": [key], "__url__": [url], "jpg": _ragged([photos[name]])}, epoch=0)["jpg"][0]
        torch.testing.assert_close(image, alone)


def test_decode_threads_leave_the_training_threads_torch_settings(photos: dict[str, bytes]) -> None:
    before = torch.get_num_threads()
    dec = Decode(jpg="rgb", size=32, backend="cpu", threads=2)
    dec(_batch(photos, ["hopper-q90", "pack-jpg", "hopper-odd"]))
    dec.close()
    assert torch.get_num_threads() == before
