"""Two writers on one checkpoint prefix: exactly one commit per step, nothing of the other's
ever deleted or replaced, and conditional writes decided by a probe or an error code, never by
the text of an error (issue 13, part 2).

Real servers (SeaweedFS and moto), real directories, real threads and processes. Faults come from
the FaultProxy in front of SeaweedFS; one test patches ``os.link`` (said there) because a file
system without hard links cannot be made here otherwise.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ckpt_targets import Target, make_target
from fastfeed.checkpoint.checkpointer import Checkpointer
from fastfeed.errors import CheckpointError

STEP_DIR = "step-{:012d}/"
DATA = re.compile(r"data-[0-9a-f]{32}\.bin")


@pytest.fixture(params=["seaweed", "moto", "local"])
def target(request: Any, tmp_path: Path) -> Target:
    return make_target(request.param, request, tmp_path)


def race(ckpts: list[Checkpointer], step: int, states: list[dict[str, Any]]) -> list[Any]:
    """Every Checkpointer saves ``states[i]`` as ``step`` at once; each one's info or error."""
    barrier = threading.Barrier(len(ckpts))
    out: list[Any] = [None] * len(ckpts)

    def one(i: int) -> None:
        barrier.wait(timeout=30)
        try:
            out[i] = ckpts[i].save(states[i], step=step).result(timeout=120)
        except BaseException as exc:
            out[i] = exc

    threads = [threading.Thread(target=one, args=(i,), name=f"writer-{i}") for i in range(len(ckpts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not any(t.is_alive() for t in threads), "a save did not end within 3 minutes"
    return out


def check_losers(results: list[Any], prefix: str) -> int:
    """Exactly one save committed; the others raised a CheckpointError naming the prefix. The
    winner's index."""
    won = [i for i, r in enumerate(results) if not isinstance(r, BaseException)]
    assert len(won) == 1, f"exactly one commit expected: {results}"
    for i, r in enumerate(results):
        if i != won[0]:
            assert isinstance(r, CheckpointError), repr(r)
            text = str(r)
            assert "already committed" in text or ("committed" in text and "another writer" in text), text
            assert prefix in text, "the error names the checkpoint"
    return won[0]


def check_committed(target: Target, prefix: str, step: int, state: dict[str, Any]) -> None:
    """The step holds one manifest and one data object (the loser's data is gone), no upload
    is left, and it loads as ``state``."""
    step_dir = prefix + STEP_DIR.format(step)
    keys = target.keys(step_dir)
    assert len(keys) == 2 and keys[0] == step_dir + "MANIFEST.json" and DATA.fullmatch(keys[1][len(step_dir) :]), keys
    assert target.uploads(prefix) == []
    with Checkpointer(target.url(prefix), s3=target.s3()) as reader:
        loaded = reader.load(step=step)
    assert torch.equal(loaded["w"], state["w"]), "the committed data is the winner's"


# Step numbers of the issue (501, 1501, 5010: "501" in the key or the URL), and any others.
STEPS = st.one_of(st.sampled_from([501, 1501, 5010, 501501, 0]), st.integers(0, 10**12 - 1))
PREFIXES = st.sampled_from(["runs/exp501/", "runs/501/", "r501-x/", "runs/a/"])


def test_two_threads_saving_the_same_step_commit_exactly_once(target: Target) -> None:
    seen: list[int] = []

    @settings(
        max_examples=12 if target.kind != "local" else 25,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(step=STEPS, prefix=PREFIXES)
    @example(step=501, prefix="runs/exp501/")
    @example(step=1501, prefix="runs/501/")
    @example(step=5010, prefix="r501-x/")
    def run(step: int, prefix: str) -> None:
        prefix = f"{prefix}{len(seen)}/"  # a fresh prefix per example
        seen.append(step)
        states = [{"w": torch.full((200_000,), float(i + 1)), "i": i} for i in range(2)]
        with (
            Checkpointer(target.url(prefix), s3=target.s3()) as a,
            Checkpointer(target.url(prefix), s3=target.s3()) as b,
        ):
            assert a.conditional_writes and b.conditional_writes
            results = race([a, b], step, states)
            for ckpt, result in zip((a, b), results, strict=True):
                if isinstance(result, BaseException):  # the error is also raised by wait(), once
                    with pytest.raises(CheckpointError):
                        ckpt.wait()
        winner = check_losers(results, prefix)
        check_committed(target, prefix, step, states[winner])

    run()
    assert {501, 1501, 5010} <= set(seen), "the issue's step numbers are always among the examples"


def test_the_loser_of_the_commit_itself_raises_and_deletes_only_its_own_data(
    bucket: Any, fault_proxy: Any, caplog: Any
) -> None:
    """Both writers pass the "already committed" check; B's commit comes after A's, so only the
    conditional manifest write can refuse it (step 501 under a URL containing "501")."""
    target = Target("seaweed", f"s3://{bucket.name}/", bucket.server, bucket.client)
    prefix, step = "runs/exp501/", 501
    states = [{"w": torch.full((100_000,), 1.0)}, {"w": torch.full((100_000,), 2.0)}]
    with (
        Checkpointer(target.url(prefix), s3=target.s3()) as a,
        Checkpointer(target.url(prefix), s3=target.s3(fault_proxy.endpoint_url)) as b,
    ):
        # B's data goes up at once but B hears back only after 3 s: by then A has committed.
        fault_proxy.inject_stall(3.0, count=1, method="PUT", path_regex=r"step-000000000501/data-")
        handle_b = b.save(states[1], step=step)
        deadline = time.monotonic() + 30
        while fault_proxy.count("PUT", r"step-000000000501/data-") == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        info_a = a.save(states[0], step=step).result(timeout=60)
        assert info_a is not None and info_a.step == step
        with pytest.raises(
            CheckpointError, match=r"committed .* by another writer while this save was uploading"
        ) as lost:
            handle_b.result(timeout=60)
        assert prefix in str(lost.value)
        with pytest.raises(CheckpointError, match="an earlier checkpoint save failed"):
            b.wait()
    check_committed(target, prefix, step, states[0])


_RACER = """
import json, sys, time, torch
from fastfeed.checkpoint.checkpointer import Checkpointer
from fastfeed.config import S3Config
url, endpoint, key, secret, step, value, start = sys.argv[1:8]
s3 = S3Config(endpoint_url=endpoint, access_key_id=key, secret_access_key=secret) if endpoint != "-" else None
with Checkpointer(url, s3=s3) as ckpt:
    time.sleep(max(0.0, float(start) - time.time()))  # both processes save at the same moment
    try:
        ckpt.save({"w": torch.full((300_000,), float(value))}, step=int(step)).result(timeout=120)
        print(json.dumps({"ok": True}), flush=True)
    except Exception as exc:
        print(json.dumps({"ok": False, "type": type(exc).__name__, "msg": str(exc)}), flush=True)
        try:
            ckpt.wait()
        except Exception:
            pass
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["seaweed", "local"])
def test_two_processes_saving_the_same_step_commit_exactly_once(kind: str, request: Any, tmp_path: Path) -> None:
    target = make_target(kind, request, tmp_path)
    for round_, step in enumerate([501, 1501, 5010]):
        prefix = f"runs/p501-{round_}/"
        s3 = target.s3()
        creds = [s3.endpoint_url or "-", s3.access_key_id or "", s3.secret_access_key or ""] if s3 else ["-", "", ""]
        start = time.time() + 8.0  # after both have imported torch and constructed their Checkpointer
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _RACER, target.url(prefix), *creds, str(step), str(v), str(start)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for v in (1, 2)
        ]
        outs = []
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err[-2000:]
            outs.append(json.loads(out.strip().splitlines()[-1]))
        assert sorted(o["ok"] for o in outs) == [False, True], outs
        (lost,) = [o for o in outs if not o["ok"]]
        assert lost["type"] == "CheckpointError" and "committed" in lost["msg"], lost
        winner = check_losers([None if o["ok"] else CheckpointError(o["msg"]) for o in outs], prefix)
        check_committed(target, prefix, step, {"w": torch.full((300_000,), float(winner + 1))})


def test_retention_of_two_writers_never_deletes_the_others_data(target: Target) -> None:
    """Writers A (even steps) and B (odd steps) share a prefix, each with keep_last=2, saving at
    once. Every save either fails loudly or commits; every checkpoint that is listed loads; the
    newest two commits are there."""
    prefix = "runs/shared501/"
    committed: dict[int, float] = {}
    errors: list[BaseException] = []

    def writer(parity: int) -> None:
        with Checkpointer(target.url(prefix), s3=target.s3(), keep_last=2) as ckpt:
            for step in range(parity, 16, 2):
                try:
                    info = ckpt.save({"w": torch.full((50_000,), float(step))}, step=step).result(timeout=120)
                    assert info is not None
                    committed[step] = time.monotonic()
                except CheckpointError as exc:  # a loud failure is allowed, a silent loss is not
                    errors.append(exc)
                    with pytest.raises(CheckpointError):
                        ckpt.wait()

    threads = [threading.Thread(target=writer, args=(p,), name=f"writer-{p}") for p in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors  # distinct steps: nothing to lose a race over
    with Checkpointer(target.url(prefix), s3=target.s3()) as reader:
        infos = reader.list()
        for info in infos:  # a listed checkpoint always has its data
            assert torch.equal(reader.load(step=info.step)["w"], torch.full((50_000,), float(info.step)))
    steps = [i.step for i in infos]
    assert steps[-2:] == [14, 15], steps
    assert set(steps) <= set(committed)
    assert target.uploads(prefix) == []


def test_retention_never_deletes_another_writers_data_in_flight(bucket: Any, fault_proxy: Any) -> None:
    """B's data is uploaded, but its commit is 3 s away; meanwhile A commits newer steps with
    keep_last=1 and runs retention three times. B's save reports success and loads."""
    target = Target("seaweed", f"s3://{bucket.name}/", bucket.server, bucket.client)
    prefix = "runs/inflight/"
    with (
        Checkpointer(target.url(prefix), s3=target.s3(), keep_last=1) as a,
        Checkpointer(target.url(prefix), s3=target.s3(fault_proxy.endpoint_url)) as b,
    ):
        fault_proxy.inject_stall(3.0, count=1, method="PUT", path_regex=r"step-000000000005/data-")
        handle = b.save({"w": torch.full((100_000,), 5.0)}, step=5)
        deadline = time.monotonic() + 30
        while fault_proxy.count("PUT", r"step-000000000005/data-") == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.3)  # B's data object exists now, with no manifest
        assert [k for k in target.keys(prefix + "step-000000000005/") if DATA.search(k)]
        for step in (10, 11, 12):
            a.save({"w": torch.full((100_000,), float(step))}, step=step).result(timeout=60)
        assert [k for k in target.keys(prefix + "step-000000000005/") if DATA.search(k)], "in-flight data kept"
        info = handle.result(timeout=60)
        assert info is not None and info.step == 5
        assert torch.equal(a.load(step=5)["w"], torch.full((100_000,), 5.0)), "B's reported save is loadable"
        assert torch.equal(a.load(step=12)["w"], torch.full((100_000,), 12.0))


# ---------------------------------------------------------------------------------------------
# Conditional writes: probed, or decided by the error code


def test_both_servers_and_local_directories_enforce_conditional_writes(target: Target) -> None:
    with Checkpointer(target.url("probe501/"), s3=target.s3()) as ckpt:
        assert ckpt.conditional_writes
    assert target.keys("probe501/") == [], "the probe leaves nothing behind"


def test_a_store_that_answers_501_gets_check_write_verify_with_one_warning(
    bucket: Any, fault_proxy: Any, caplog: Any
) -> None:
    """The proxy answers 501 NotImplemented to every request with If-None-Match (as stores without
    conditional writes do): decided by that code, the store is used without them, once logged."""
    target = Target("seaweed", f"s3://{bucket.name}/", bucket.server, bucket.client)
    fault_proxy.inject(status=501, code="NotImplemented", count=None, method="PUT", header="If-None-Match")
    prefix = "runs/no-cond-501/"
    proxied = target.s3(fault_proxy.endpoint_url)
    with (
        caplog.at_level(logging.WARNING, logger="fastfeed"),
        Checkpointer(target.url(prefix), s3=proxied) as a,
        Checkpointer(target.url(prefix), s3=proxied) as b,
    ):
        assert not a.conditional_writes and not b.conditional_writes
        a.save({"w": torch.ones(10)}, step=501).result(timeout=60)
        with pytest.raises(CheckpointError, match="already committed"):
            b.save({"w": torch.zeros(10)}, step=501).result(timeout=60)
        with pytest.raises(CheckpointError):
            b.wait()
        # B passes the "already committed" check, then A commits first: B's verify catches it.
        fault_proxy.inject_stall(3.0, count=1, method="PUT", path_regex=r"step-000000001501/data-")
        handle = b.save({"w": torch.zeros(10)}, step=1501)
        while fault_proxy.count("PUT", r"step-000000001501/data-") == 0:
            time.sleep(0.02)
        a.save({"w": torch.ones(10)}, step=1501).result(timeout=60)
        with pytest.raises(CheckpointError, match="by another writer"):
            handle.result(timeout=60)
        with pytest.raises(CheckpointError):
            b.wait()
        assert torch.equal(a.load(step=1501)["w"], torch.ones(10)), "A's commit was not replaced"
    warnings = [r for r in caplog.records if "does not support conditional writes" in r.getMessage()]
    assert len(warnings) == 1, "logged once per store"
    assert [r for r in fault_proxy.requests() if r.fault == "error"], "the store did answer 501"


def test_a_store_that_ignores_if_none_match_is_found_out_by_the_probe(
    bucket: Any, fault_proxy: Any, caplog: Any
) -> None:
    """Both conditional PUTs of the probe succeed (the proxy answers 200 without asking the
    store, as a store that ignores the header would): the probe concludes there are none."""
    target = Target("seaweed", f"s3://{bucket.name}/", bucket.server, bucket.client)
    fault_proxy.inject(
        status=200, code="OK", count=2, method="PUT", path_regex=r"fastfeed-probe-", header="If-None-Match"
    )
    from fastfeed.store import upload_s3 as ckpt_store

    ckpt_store._conditional.pop((fault_proxy.endpoint_url, bucket.name), None)
    with (
        caplog.at_level(logging.WARNING, logger="fastfeed"),
        Checkpointer(target.url("ignored/"), s3=target.s3(fault_proxy.endpoint_url)) as ckpt,
    ):
        assert not ckpt.conditional_writes
        ckpt.save({"w": torch.ones(3)}, step=1).result(timeout=60)
        assert torch.equal(ckpt.load()["w"], torch.ones(3))
    assert "does not support conditional writes" in caplog.text


def test_a_file_system_without_hard_links_gets_check_write_verify(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    # Patched (the one patch in this module): os.link fails as on a file system without hard
    # links, which this machine cannot provide.
    def no_links(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    with caplog.at_level(logging.WARNING, logger="fastfeed"), Checkpointer(tmp_path / "c") as ckpt:
        assert not ckpt.conditional_writes
        ckpt.save({"w": torch.ones(3)}, step=1).result(timeout=30)
        with pytest.raises(CheckpointError, match="already committed"):
            ckpt.save({"w": torch.zeros(3)}, step=1).result(timeout=30)
        with pytest.raises(CheckpointError):
            ckpt.wait()
        assert torch.equal(ckpt.load()["w"], torch.ones(3))
    assert "does not support conditional writes" in caplog.text


def test_a_commit_whose_answer_was_lost_is_recognised_as_its_own(bucket: Any, fault_proxy: Any) -> None:
    """The manifest PUT lands but its answer never comes (held past the read timeout); the retry's
    conditional PUT meets the manifest and is refused: the writer reads it back, sees its own
    bytes and reports the commit, with the data it names intact."""
    from fastfeed.config import S3Config

    target = Target("seaweed", f"s3://{bucket.name}/", bucket.server, bucket.client)
    s3 = S3Config(
        endpoint_url=fault_proxy.endpoint_url,
        access_key_id=bucket.server.access_key,
        secret_access_key=bucket.server.secret_key,
        read_timeout=1.5,
    )
    prefix = "runs/lost501/"
    with Checkpointer(target.url(prefix), s3=s3) as ckpt:
        fault_proxy.inject_stall(4.0, count=1, method="PUT", path_regex=r"step-000000000501/MANIFEST")
        info = ckpt.save({"w": torch.full((1000,), 5.0)}, step=501).result(timeout=60)
        assert info is not None and info.step == 501
        assert fault_proxy.count("PUT", r"step-000000000501/MANIFEST") == 2, "the PUT was retried"
    check_committed(target, prefix, 501, {"w": torch.full((1000,), 5.0)})
