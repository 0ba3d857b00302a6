#!/usr/bin/env python
"""CPU to make an S3 client and send one request, with and without loading the CA bundle.

fastfeed makes clients for plain-http endpoints with ``verify=False`` (no TLS there, so nothing
to verify); ``--rounds`` rounds alternate that with botocore's default (the CA bundle loaded
into an SSL context), ``--clients`` clients each, against SeaweedFS on 127.0.0.1.

    python benchmarks/streaming/bench_client.py --rounds 3 --clients 5
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import fastfeed.store.s3 as s3_module
from fastfeed import _loop
from fastfeed.config import S3Config
from fastfeed.store.s3 import S3Store, client_settings
from fastfeed.testing.servers import SeaweedServer


def _verifying(config: S3Config, pool_size: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    options, kwargs = client_settings(config, pool_size)
    kwargs.pop("verify", None)
    return options, kwargs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=5)
    args = ap.parse_args()
    with SeaweedServer() as server:
        config = S3Config(
            endpoint_url=server.endpoint_url, access_key_id=server.access_key, secret_access_key=server.secret_key
        )

        async def one() -> None:
            store = await S3Store.create(config)
            try:
                await store.client.list_buckets()
            finally:
                await store.aclose()

        io = _loop.acquire()
        try:
            io.run(one())  # imports and the service model, once per process
            modes = (("fastfeed (verify=False on http)", client_settings), ("CA bundle loaded", _verifying))
            for _ in range(args.rounds):
                for name, settings in modes:
                    s3_module.client_settings = settings  # type: ignore[assignment]
                    start = time.process_time()
                    for _ in range(args.clients):
                        io.run(one())
                    per = (time.process_time() - start) / args.clients * 1000
                    print(f"{name:32s} {per:5.1f} ms CPU per client and request")
        finally:
            s3_module.client_settings = client_settings
            io.release()


if __name__ == "__main__":
    main()
