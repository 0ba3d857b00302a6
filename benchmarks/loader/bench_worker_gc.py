"""What a full garbage collection costs a forked worker, with and without ``gc.freeze()``.

A forked worker shares its parent's pages until it writes one; a full collection writes to every
tracked object it walks (its GC header), so the first one in a worker copies the pages of every
object the parent had (torch's, the model's) and each one walks them all again. fastfeed's
workers freeze what they inherit (:class:`fastfeed.loader.worker.WorkerStart`).

Part 1, the mechanism: fork a child of this process (torch and fastfeed imported), optionally
``gc.freeze()``, then time a full collection and measure the child's private memory (USS)
before and after it. Part 2, the loader: ``fastfeed.DataLoader`` with persistent process
workers over a map-style dataset whose first item in each worker runs a full collection (what
happens sooner or later in a long run), and the summed PSS of the process tree after an epoch.
Run it with an older fastfeed on ``PYTHONPATH`` for the baseline::

    python benchmarks/loader/bench_worker_gc.py --repeats 5
    PYTHONPATH=/path/to/old/site python benchmarks/loader/bench_worker_gc.py --repeats 5
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
import warnings
from typing import Any

import torch

import fastfeed
from fastfeed.bench.measure import tree_pss_bytes


def _private_mib(pid: int) -> float:
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    return total / 1024


def fork_once(freeze: bool) -> tuple[float, float]:
    """(private MiB a full collection added to a fresh child, seconds it took)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: measure, report, exit without running the parent's cleanup
        try:
            if freeze:
                gc.freeze()
            before = _private_mib(os.getpid())
            t = time.perf_counter()
            gc.collect()
            took = time.perf_counter() - t
            os.write(w, json.dumps([_private_mib(os.getpid()) - before, took]).encode())
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        added, took = json.loads(f.read())
    return added, took


class Collects(torch.utils.data.Dataset[Any]):
    """Sample i: a small tensor; the first item a worker loads runs a full collection."""

    def __init__(self) -> None:
        self.done = False

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> torch.Tensor:
        if not self.done:
            self.done = True
            gc.collect()
        return torch.full((16,), i)


def loader_tree_pss(workers: int) -> float:
    """Summed PSS (MiB) of this process and its persistent workers after one epoch."""
    loader = fastfeed.DataLoader(Collects(), batch_size=4, num_workers=workers, persistent_workers=True)
    try:
        for _ in loader:
            pass
        time.sleep(0.2)
        return tree_pss_bytes() / 2**20
    finally:
        loader.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # more workers than cores: on purpose
    gc.collect()
    out: dict[str, Any] = {"fastfeed": fastfeed.__file__, "tracked_objects": len(gc.get_objects())}
    for freeze in (False, True):
        runs = [fork_once(freeze) for _ in range(args.repeats)]
        key = "frozen" if freeze else "not_frozen"
        out[key] = {
            "private_mib_added": statistics.median(a for a, _ in runs),
            "collection_s": statistics.median(t for _, t in runs),
        }
    base = tree_pss_bytes() / 2**20
    trees = [loader_tree_pss(args.workers) for _ in range(args.repeats)]
    out["loader"] = {"workers": args.workers, "process_pss_mib": base, "tree_pss_mib": statistics.median(trees),
                     "tree_pss_runs": trees}  # fmt: skip
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
