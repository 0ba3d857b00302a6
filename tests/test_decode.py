"""``fastfeed.decode`` (decode_value, Decoder) on real encoded data, as a ``collate_fn`` of a real
``fastfeed.DataLoader`` over real tar shards, and ``fastfeed bench --decode`` end to end."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import fastfeed
from fastfeed.bench.demo import demo
from fastfeed.bench.measure import Measurement
from fastfeed.bench.report import DECODE_CEILING, Report
from fastfeed.bench.run import BenchConfig, make_decoder, measure_decode
from fastfeed.decode import Decoder, decode_value
from fastfeed.errors import ConfigError, DecodeError, FastfeedError
from fastfeed.testing.shards import sample_key, write_synthetic_shards
from fastfeed.vision import Decode
from tar_members import tar_members

RNG = np.random.default_rng(1234)


def encode(array: np.ndarray, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format=fmt, **options)
    return out.getvalue()


def rgb(height: int, width: int) -> np.ndarray:
    return RNG.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def chw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def members(paths: list[Path]) -> dict[str, bytes]:
    """Every member of the shards as tarfile reads it, keyed by member name alone."""
    return {key.split("#", 1)[1]: data for key, data in tar_members(paths).items()}


# ---------------------------------------------------------------------- decode_value


@pytest.mark.parametrize(
    ("ext", "fmt", "options"),
    [
        ("png", "PNG", {}),
        ("bmp", "BMP", {}),
        ("ppm", "PPM", {}),
        ("tif", "TIFF", {}),
        ("tiff", "TIFF", {}),
        ("webp", "WEBP", {"lossless": True}),
        ("PNG", "PNG", {}),  # extensions are case-insensitive
        ("seg.png", "PNG", {}),  # the last dot-part decides
    ],
)
def test_lossless_images_decode_to_the_same_pixels_chw(ext: str, fmt: str, options: dict[str, Any]) -> None:
    array = rgb(7, 11)
    got = decode_value(ext, encode(array, fmt, **options))
    assert got.dtype == torch.uint8 and got.shape == (3, 7, 11)
    assert torch.equal(got, chw(array))


def test_jpeg_decodes_close_to_the_original() -> None:
    # A smooth image: JPEG at quality 95 keeps it within a few levels.
    y, x = np.mgrid[0:32, 0:48]
    array = np.stack([x * 5, y * 7, (x + y) * 3], axis=-1).astype(np.uint8)
    data = encode(array, "JPEG", quality=95)
    for ext in ("jpg", "jpeg", "JPG"):
        got = decode_value(ext, memoryview(data))
        assert got.dtype == torch.uint8 and got.shape == (3, 32, 48)
        assert (got.int() - chw(array).int()).abs().float().mean() < 3


def test_other_image_modes_are_converted_to_rgb() -> None:
    gray = RNG.integers(0, 256, size=(5, 6), dtype=np.uint8)
    got = decode_value("pgm", encode(gray, "PPM"))  # Pillow writes a mode-L image as PGM (P5)
    assert got.shape == (3, 5, 6) and all(torch.equal(got[c], torch.from_numpy(gray)) for c in range(3))
    rgba = np.concatenate([rgb(4, 4), np.full((4, 4, 1), 7, np.uint8)], axis=-1)
    got = decode_value("png", encode(rgba, "PNG"))
    assert got.shape == (3, 4, 4) and torch.equal(got, chw(rgba[..., :3]))
    # A palette image (GIF) of four colours comes back exactly.
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [9, 9, 9]], np.uint8)
    array = palette[RNG.integers(0, 4, size=(6, 9))]
    assert torch.equal(decode_value("gif", encode(array, "GIF")), chw(array))


def test_image_size_resizes_bilinear_to_height_width() -> None:
    array = np.full((10, 30, 3), (200, 100, 50), np.uint8)
    got = decode_value("png", encode(array, "PNG"), image_size=(4, 6))
    assert got.shape == (3, 4, 6)
    assert torch.equal(got, torch.tensor([200, 100, 50], dtype=torch.uint8).view(3, 1, 1).expand(3, 4, 6))


def npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


def test_npy_numeric_arrays_become_tensors_others_stay_arrays() -> None:
    floats = RNG.standard_normal((3, 4)).astype(np.float32)
    got = decode_value("npy", npy(floats))
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32 and torch.equal(got, torch.from_numpy(floats))
    big_endian = np.arange(6, dtype=">i4").reshape(2, 3)
    got = decode_value("npy", npy(big_endian))
    assert isinstance(got, torch.Tensor) and got.dtype == torch.int32 and got.tolist() == big_endian.tolist()
    flags = decode_value("NPY", npy(np.array([True, False])))
    assert flags.dtype == torch.bool and flags.tolist() == [True, False]
    words = decode_value("npy", npy(np.array(["ab", "cde"])))
    assert isinstance(words, np.ndarray) and words.tolist() == ["ab", "cde"]
    with pytest.raises(DecodeError, match="npy"):  # an object array needs pickle, which is refused
        decode_value("npy", npy(np.array([{"a": 1}], dtype=object)), key="k")


def test_labels_text_json_and_other_bytes() -> None:
    for ext in ("cls", "cls2", "index", "idx", "CLS"):
        assert decode_value(ext, b" 7\n") == 7
    assert decode_value("cls", memoryview(b"-3")) == -3
    assert decode_value("txt", "héllo ✓".encode()) == "héllo ✓"
    assert decode_value("text", bytearray(b"plain")) == "plain"
    assert decode_value("json", b'{"a": [1, 2.5, "x"], "b": null}') == {"a": [1, 2.5, "x"], "b": None}
    raw = bytes(range(256))
    assert decode_value("bin", raw) is raw
    got = decode_value("seg.mask", memoryview(raw))
    assert type(got) is bytes and got == raw


def test_corrupt_data_raises_decode_error_naming_the_key_url_and_extension() -> None:
    good = encode(rgb(16, 16), "JPEG")
    with pytest.raises(DecodeError) as info:
        decode_value("jpg", good[: len(good) // 2], key="dir/sample-17", url="s3://b/train/shard-3.tar")
    err = info.value
    assert isinstance(err, FastfeedError) and err.key == "dir/sample-17" and err.ext == "jpg"
    assert "dir/sample-17" in str(err) and "'jpg'" in str(err) and "s3://b/train/shard-3.tar" in str(err)
    assert isinstance(err.__cause__, OSError)
    again = pickle.loads(pickle.dumps(err))  # errors cross DataLoader worker processes
    assert type(again) is DecodeError and again.key == "dir/sample-17" and str(again) == str(err)
    for ext, data in (("png", b"not a png"), ("cls", b"seven"), ("txt", b"\xff\xfe\xfa"), ("json", b"{oops")):
        with pytest.raises(DecodeError, match=f"'{ext}' of sample 'k1'"):
            decode_value(ext, data, key="k1")


def test_a_missing_pillow_is_a_config_error_saying_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "PIL", None)  # `from PIL import Image` now raises ImportError
    with pytest.raises(ConfigError, match="pip install pillow"):
        decode_value("jpg", b"\xff\xd8 whatever", key="k")
    assert decode_value("cls", b"1") == 1  # everything else still decodes


# ---------------------------------------------------------------------- Decoder


def sample(key: str, **fields: bytes) -> dict[str, Any]:
    return {"__key__": key, "__url__": "file:///d/s.tar", **fields}


def test_decoder_stacks_equal_shapes_and_counts_the_encoded_bytes() -> None:
    images = [rgb(6, 8) for _ in range(3)]
    samples = [
        sample(f"k{i}", png=encode(a, "PNG"), cls=str(i).encode(), json=json.dumps({"i": i}).encode())
        for i, a in enumerate(images)
    ]
    batch = Decoder()(samples)
    assert batch["__key__"] == ["k0", "k1", "k2"] and batch["__url__"] == ["file:///d/s.tar"] * 3
    assert batch["png"].shape == (3, 3, 6, 8) and torch.equal(batch["png"], torch.stack([chw(a) for a in images]))
    assert batch["cls"].dtype == torch.long and batch["cls"].tolist() == [0, 1, 2]
    assert batch["json"] == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert batch["__nbytes__"] == sum(len(v) for s in samples for k, v in s.items() if not k.startswith("__"))
    assert type(batch["__nbytes__"]) is int


def test_decoder_resizes_images_of_different_sizes_so_they_stack() -> None:
    sizes = [(10, 20), (33, 17), (8, 8)]
    samples = [sample(f"k{i}", jpg=encode(rgb(h, w), "JPEG")) for i, (h, w) in enumerate(sizes)]
    unsized = Decoder()(samples)["jpg"]
    assert isinstance(unsized, list) and [tuple(t.shape) for t in unsized] == [(3, h, w) for h, w in sizes]
    decoder = pickle.loads(pickle.dumps(Decoder(image_size=(12, 16))))  # it travels to worker processes
    assert decoder.image_size == (12, 16)
    batch = decoder(samples)
    assert batch["jpg"].shape == (3, 3, 12, 16) and batch["jpg"].dtype == torch.uint8
    for i in range(len(sizes)):
        assert torch.equal(batch["jpg"][i], decode_value("jpg", samples[i]["jpg"], image_size=(12, 16)))


def test_decoder_keeps_lists_for_fields_some_samples_lack() -> None:
    batch = Decoder()([sample("a", cls=b"1", txt=b"x"), sample("b", cls=b"2")])
    assert batch["cls"].tolist() == [1, 2] and batch["txt"] == ["x", None]
    assert batch["__nbytes__"] == 3


def test_decoder_rejects_a_bad_image_size() -> None:
    for bad in ((0, 4), (4,), (4, 4, 4), (2.5, 4)):
        with pytest.raises(ConfigError, match="image_size"):
            Decoder(image_size=bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- synthetic JPEG shards


def test_synthetic_jpeg_samples_are_near_the_size_deterministic_and_described(tmp_path: Path) -> None:
    kw: dict[str, Any] = {"num_shards": 2, "samples_per_shard": 3, "sample_bytes": 20_000, "seed": 5}
    a = write_synthetic_shards(tmp_path / "a", extensions=("jpg", "cls", "json"), **kw)
    b = write_synthetic_shards(tmp_path / "b", extensions=("jpg", "cls", "json"), **kw)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    got = members(a)
    jpgs = {name: data for name, data in got.items() if name.endswith(".jpg")}
    assert len(jpgs) == 6 and len(set(jpgs.values())) == 6
    for name, data in jpgs.items():
        assert 0.9 * 20_000 <= len(data) <= 1.1 * 20_000
        with Image.open(io.BytesIO(data)) as img:
            assert img.format == "JPEG" and img.mode == "RGB"
        meta = json.loads(got[name[: -len("jpg")] + "json"])
        assert meta["jpg_bytes"] == len(data) and meta["jpg_crc32"] == zlib.crc32(data)
    # Without .jpg the members are what they always were.
    plain = members(write_synthetic_shards(tmp_path / "c", **kw))
    assert set(json.loads(plain[f"{sample_key(0, 0)}.json"])) == {
        "key", "shard", "index", "label", "bin_bytes", "bin_crc32",
    }  # fmt: skip


# ---------------------------------------------------------------------- DataLoader


@pytest.fixture
def jpg_shards(tmp_path: Path) -> tuple[Path, list[Path]]:
    out = tmp_path / "shards"
    paths = write_synthetic_shards(
        out, num_shards=3, samples_per_shard=10, sample_bytes=3000, extensions=("jpg", "cls")
    )
    return out, paths


@pytest.mark.parametrize("workers", [0, 2])
def test_decoder_as_collate_fn_of_fastfeed_dataloader(jpg_shards: tuple[Path, list[Path]], workers: int) -> None:
    root, paths = jpg_shards
    stored = members(paths)
    loader = fastfeed.DataLoader(
        fastfeed.StreamingDataset(str(root)), batch_size=4, num_workers=workers, collate_fn=Decoder(image_size=(16, 16))
    )
    seen: dict[str, int] = {}
    nbytes = 0
    with loader:
        for batch in loader:
            n = len(batch["__key__"])
            assert batch["jpg"].shape == (n, 3, 16, 16) and batch["jpg"].dtype == torch.uint8
            assert batch["cls"].dtype == torch.long and batch["cls"].shape == (n,)
            nbytes += batch["__nbytes__"]
            for i, key in enumerate(batch["__key__"]):
                seen[key] = int(batch["cls"][i])
                expected = decode_value("jpg", stored[f"{key}.jpg"], image_size=(16, 16))
                assert torch.equal(batch["jpg"][i], expected)
    keys = {sample_key(s, i) for s in range(3) for i in range(10)}
    assert set(seen) == keys and len(seen) == 30
    assert all(label == (int(k[:6]) * 10 + int(k[7:])) % 10 for k, label in seen.items())
    assert nbytes == sum(len(v) for v in stored.values())


@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupt_jpeg_in_a_shard_fails_the_loader_naming_key_and_ext(tmp_path: Path, workers: int) -> None:
    good = encode(rgb(8, 8), "JPEG")
    write_tar(tmp_path / "bad.tar", [("s0.jpg", good), ("s1.jpg", good[:50]), ("s2.jpg", good)])
    loader = fastfeed.DataLoader(
        fastfeed.StreamingDataset(str(tmp_path)), batch_size=3, num_workers=workers, collate_fn=Decoder()
    )
    with loader, pytest.raises(DecodeError) as info:
        list(loader)
    assert "'s1'" in str(info.value) and "jpg" in str(info.value) and "bad.tar" in str(info.value)
    if workers == 0:  # from a worker, torch re-raises the type with the worker's traceback as text
        assert info.value.key == "s1" and info.value.ext == "jpg"
        assert info.value.url is not None and info.value.url.endswith("bad.tar")


# ---------------------------------------------------------------------- fastfeed bench --decode


def test_report_says_whether_decoding_or_io_bounds_a_decoding_run() -> None:
    def m(name: str, samples: int, mb: float, **extra: object) -> Measurement:
        return Measurement(name, samples, int(mb * 1e6), 1.0, 0.1, 0.5, extra=dict(extra))

    report = Report("s3://b/d/", {"decode": True})
    report.ceilings = {
        "raw GET": m("raw GET ceiling", 0, 100),
        DECODE_CEILING: m("decode ceiling (2 workers)", 400, 40),
    }
    run = m("fastfeed epoch 0 (cold, decode)", 300, 30, phase="cold", decode=True)
    report.runs = [run]
    # 100 KB per sample: raw GET is 1,000 samples/s, decoding 400: decoding bounds the run.
    assert report.ceiling_of(run) is report.ceilings[DECODE_CEILING]
    table = report.table()
    assert "decode ceiling (2 workers)" in table and "decode ceiling (2 workers) ceiling" not in table
    row = next(line for line in table.splitlines() if line.startswith(run.name))
    assert row[len(run.name) :].split()[:3] == ["300", "30", "0.75"]  # x ceil: 300 / 400 samples/s
    assert "bound by decoding" in table and "1,000 samples/s" in table
    assert report.targets() == []  # the epoch targets are for undecoded feeding
    report.ceilings[DECODE_CEILING] = m("decode ceiling (2 workers)", 4000, 400)
    assert report.ceiling_of(run) is report.ceilings["raw GET"] and "bound by I/O" in report.table()


def test_measure_decode_times_one_thread_times_the_decode_threads() -> None:
    samples = [sample(f"k{i}", png=encode(rgb(8, 8), "PNG"), cls=b"1") for i in range(10)]
    one = measure_decode(samples, Decode(png="rgb", backend="cpu", threads=1), batch_size=4)
    assert one.samples == 10 and one.bytes == sum(len(s["png"]) + 1 for s in samples)
    assert one.extra["per_core_samples_per_s"] == pytest.approx(one.samples_per_s) and one.samples_per_s > 0
    assert one.name == "decode ceiling (cpu, 1 thread)" and len(one.extra["passes_s"]) == 3
    two = measure_decode(samples, Decode(png="rgb", backend="cpu", threads=2), batch_size=4)
    assert two.samples == 10 * min(2, len(os.sched_getaffinity(0))) and two.extra["backend"] == "cpu"
    with pytest.raises(DecodeError):
        measure_decode([sample("x", png=b"junk")], Decode(png="rgb", backend="cpu"), batch_size=4)


def test_bench_decode_refuses_a_dataset_without_images() -> None:
    cfg = BenchConfig(decode=True)
    with pytest.raises(fastfeed.ConfigError, match="no image fields") as info:
        make_decoder(cfg, [sample("a", cls=b"1", txt=b"x")])
    assert "cls, txt" in str(info.value)
    dec = make_decoder(cfg, [sample("a", jpg=b"", cls=b"1"), sample("b", png=b"", cls=b"2")])
    assert dec is not None and dec.fields == {"jpg": "rgb", "png": "rgb"}


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastfeed.cli", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_bench_decode_on_local_shards(jpg_shards: tuple[Path, list[Path]], tmp_path: Path) -> None:
    root, paths = jpg_shards
    out = tmp_path / "out.json"
    proc = run_cli(
        "bench", str(root), "--decode", "--image-size", "16x24", "--epochs", "1", "--batch-size", "8",
        "--compare", "torch", "--no-progress", "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "fastfeed epoch 0 (warm, decode)" in proc.stdout and "decode ceiling (" in proc.stdout
    report = json.loads(out.read_text())
    assert report["config"]["decode"] is True and report["config"]["image_size"] == [16, 24]
    (run,) = report["runs"]
    assert run["name"] == "fastfeed epoch 0 (warm, decode)" and run["extra"]["decode"] is True
    assert run["samples"] == 30 and run["bytes"] == sum(len(v) for v in members(paths).values())
    assert list(report["ceilings"]) == [DECODE_CEILING]  # local files: no I/O ceilings
    ceiling = report["ceilings"][DECODE_CEILING]
    assert ceiling["extra"]["decoded_samples"] == 30 and ceiling["samples_per_s"] > 0
    assert ceiling["samples"] == 30 * ceiling["extra"]["processes"]
    assert set(report["skipped"]) == {"torch"}
    assert "--decode" in report["skipped"]["torch"] and "without --decode" in report["skipped"]["torch"]


def test_bench_image_size_needs_decode_and_a_size() -> None:
    proc = run_cli("bench", "/nowhere", "--image-size", "16x16")
    assert proc.returncode == 2 and "--decode" in proc.stderr
    proc = run_cli("bench", "/nowhere", "--decode", "--image-size", "big")
    assert proc.returncode == 2 and "HxW" in proc.stderr


def test_demo_decode_writes_jpegs_and_runs_no_peers() -> None:
    cfg = BenchConfig(batch_size=16, workers=0, epochs=1, progress=False, decode=True, compare=("torch",))
    report = demo(cfg, size=1 << 20, sample_size=8 << 10, shard_size=512 << 10)
    assert report.setup["extensions"] == ["jpg", "cls", "json"]
    total = report.setup["num_shards"] * report.setup["samples_per_shard"]
    (run,) = report.runs
    assert run.name == "fastfeed epoch 0 (cold, decode)" and run.samples == total
    assert run.bytes >= 0.9 * total * (8 << 10)  # the JPEGs, about sample_size each, plus labels and JSON
    assert set(report.ceilings) == {"raw GET", DECODE_CEILING} and report.ceilings[DECODE_CEILING].samples_per_s > 0
    assert "torch" in report.skipped and "(cold, decode): bound by" in report.table()
