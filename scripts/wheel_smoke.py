"""Smoke test of an installed fastfeed wheel (scripts/wheel_check.sh runs it in a fresh venv)."""

import io
import os
import tarfile
import tempfile

import fastfeed
from fastfeed import DataLoader, StreamingDataset, _native

assert _native.crc32c(b"123456789") == 0xE3069283, "CRC32C check value"
assert _native.CRC32C_HARDWARE, "the CPU's CRC32C instruction is not used"
root = tempfile.mkdtemp()
with tarfile.open(os.path.join(root, "s-000.tar"), "w") as tar:
    for i in range(50):
        for ext, data in (("bin", os.urandom(1000)), ("cls", str(i).encode())):
            info = tarfile.TarInfo(f"{i:04d}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
n = sum(len(b["__key__"]) for b in DataLoader(StreamingDataset(root), batch_size=8, num_workers=2))
assert n == 50, n
print(f"smoke ok: fastfeed {fastfeed.__version__}, {n} samples, hardware CRC32C")  # noqa: T201
