#!/usr/bin/env bash
# Like gpu_check.sh (same wheels in .whl/), but runs benchmarks/gpu/overlap_probe.py only.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu_check_out}
mkdir -p "$out"
site=/tmp/ff-site
rm -rf "$site"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl || exit 1
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target "$site" . >"$out/gpu_build.log" 2>&1 \
  || { tail -40 "$out/gpu_build.log"; exit 1; }
timeout 200 python3 benchmarks/gpu/overlap_probe.py "$out/overlap_probe.json"
