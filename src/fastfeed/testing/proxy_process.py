"""Run a :class:`~fastfeed.testing.proxy.FaultProxy` in a process of its own (so its Python
work does not share a GIL with the process being measured): ``python -m
fastfeed.testing.proxy_process UPSTREAM [--latency-ms N] [--bandwidth BYTES_PER_S]``.
"""

from __future__ import annotations

import threading

from fastfeed.testing.proxy import FaultProxy

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """``python -m fastfeed.testing.proxy_process UPSTREAM [--latency-ms N] [--bandwidth BYTES_PER_S]``:
    run a proxy in its own process (so its Python work does not share a GIL with the process
    being measured). Prints its endpoint URL on the first line of stdout, then serves until
    stdin is closed or the process is terminated."""
    import argparse
    import signal
    import sys

    parser = argparse.ArgumentParser(prog="python -m fastfeed.testing.proxy_process", description=main.__doc__)
    parser.add_argument("upstream", help="http://host:port of the S3 endpoint")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--bandwidth", type=float, default=None, help="bytes per second, all connections")
    parser.add_argument("--connection-bandwidth", type=float, default=None, help="bytes per second, per connection")
    args = parser.parse_args(argv)
    proxy = FaultProxy(args.upstream).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def until_stdin_closes() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=until_stdin_closes, daemon=True).start()
    try:
        proxy.set_latency(args.latency_ms)
        proxy.set_bandwidth(args.bandwidth)
        proxy.set_connection_bandwidth(args.connection_bandwidth)
        print(proxy.endpoint_url, flush=True)  # noqa: T201 - the parent reads this line
        stop.wait()
    finally:
        proxy.stop()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
