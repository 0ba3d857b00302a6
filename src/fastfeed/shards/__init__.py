"""Write WebDataset tar shards: from a Python iterable of samples or a directory of files.

:class:`ShardWriter` packs sample dicts into tar shards of a target size, locally (a directory,
a plain path or ``file://``) or straight into a bucket (``s3://bucket/prefix/``), and records a
:class:`DatasetManifest` (every shard's URL, size, ETag and sample count) that a training run
can store next to its checkpoints to pin exactly which data it read::

    from fastfeed.shards import write_from_directory, write_shards

    manifest = write_from_directory("photos/", "s3://bucket/train/", shard_size="256MiB")
    manifest = write_shards(({"__key__": f"{i:08d}", "txt": f"sample {i}", "cls": i % 10}
                             for i in range(1000)), "out/")

Conventions (WebDataset's, and exactly what :mod:`fastfeed.read.reader` reads back):

* a sample is a dict with a ``"__key__"`` (a string) and one value per extension; each value
  becomes the member ``<key>.<ext>``. Other ``__dunder__`` keys (``__url__`` ...) are skipped,
  so samples read from a :class:`~fastfeed.StreamingDataset` can be written again as they are.
* values: bytes-like objects as they are; ``str`` as UTF-8; ``int`` and ``float`` as ASCII
  (``"3"``, ``"0.5"``); ``dict`` / ``list`` as JSON (keys sorted); numpy arrays in ``.npy``
  format. Anything else (including ``bool`` and ``None``) is a :class:`ConfigError`.
* a key may contain ``/`` but no ``.`` in its last component (readers split a member's name at
  the first dot of its base name), and two consecutive samples may not share a key (readers
  would merge them).
* From a directory, files are grouped the same way: ``dir/abc.seg.jpg`` is extension
  ``seg.jpg`` of the sample ``dir/abc`` (its path relative to the source directory, up to the
  first dot of the file name). Samples are written in sorted key order, extensions in sorted
  order. Files without an extension, hidden files and hidden directories are skipped (readers
  would skip the first two; the last are ``.git/`` and the like).

The archives are byte-for-byte reproducible (member order as above, mtime 0, uid/gid 0, mode
0644, no user or group names, POSIX pax headers only for long or non-ASCII names), so the same
input gives the same shards and, uploaded with the same ``part_size``, the same ETags.

Each shard holds whole samples and at most ``shard_size`` bytes; a single sample larger than
that gets a shard of its own (with a warning). Local shards are written to a temporary name,
fsynced and renamed, so a shard either exists complete or not at all. To a bucket, each
finished shard is uploaded from a temporary file (one ``PutObject``, or a multipart upload with
``max_concurrency`` parts in flight once it exceeds ``part_size``) while the next shard is
written, so at most two shards are on local temporary disk and at most ``max_concurrency``
parts in memory. The manifest is written last, only when every shard is complete: a dataset
with a ``manifest.json`` is whole. Uploads go through the checkpoint store's one upload path
(:mod:`fastfeed.store.upload`): without ``overwrite`` every shard and the manifest are created with
a conditional write (``If-None-Match: *``), so a second writer racing on the same prefix fails
instead of mixing its shards into the first one's; a failed or aborted upload is aborted (again
at close if that failed), and incomplete uploads of ``*.tar`` keys left by a killed writer are
aborted by the next writer of the prefix once older than ``orphan_age``.

Index: fastfeed's reader needs no per-shard index file (it indexes tar members as the bytes
arrive), so none is written. What fastfeed can reuse is its sample-count cache
(``StreamingDataset(index_cache=...)``, keyed by URL, ETag and size): with ``index=True`` the
count of every shard uploaded to a bucket is recorded there, so a dataset built on this machine
(several ranks, ``len()``) does not scan the new shards' headers. Local shards need no entry:
their headers are counted through ``mmap``.

ETags: as fastfeed's stores report them, so manifests are comparable with
:func:`dataset_manifest` and ``StreamingDataset(...).shards``: the S3 ETag (quotes stripped)
for objects in a bucket, ``None`` for local files (:class:`~fastfeed.store.local.LocalStore` reports
none).
"""

from fastfeed.shards.manifest import MANIFEST_FORMAT as MANIFEST_FORMAT
from fastfeed.shards.manifest import MANIFEST_NAME as MANIFEST_NAME
from fastfeed.shards.manifest import DatasetManifest, ShardInfo
from fastfeed.shards.manifest_io import dataset_manifest, load_manifest, save_manifest
from fastfeed.shards.writer import DEFAULT_INDEX_CACHE as DEFAULT_INDEX_CACHE
from fastfeed.shards.writer import ShardWriter, WriteProgress, write_from_directory, write_shards

__all__ = [
    "DatasetManifest",
    "ShardInfo",
    "ShardWriter",
    "WriteProgress",
    "dataset_manifest",
    "load_manifest",
    "save_manifest",
    "write_from_directory",
    "write_shards",
]
