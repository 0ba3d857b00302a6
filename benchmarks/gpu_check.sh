#!/usr/bin/env bash
# GPU check of the device path, for a lent CUDA machine (see /work/.library/device): it has
# python3 with a CUDA torch, nanobind, scikit-build-core and cmake, but no network, so the
# other dependencies travel as wheels in .whl/ (prepare them here with
# `benchmarks/gpu_prepare_wheels.sh`, then run this script with `.whl` carried).
#   run: bash benchmarks/gpu_check.sh   (writes $OUT/gpu_check.json when $OUT is set)
set -euo pipefail
cd "$(dirname "$0")/.."
site=/tmp/ff-site
rm -rf "$site"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target "$site" .
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python3 benchmarks/gpu/gpu_check.py | tee "${OUT:-/tmp}/gpu_check.json"
python3 -m pytest -q -p no:cacheprovider tests/test_loader.py -k "cuda or device" || true
