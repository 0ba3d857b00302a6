#!/usr/bin/env bash
# GPU check of the device path, for a lent CUDA machine (see /work/.library/device). That machine
# has python3 with a CUDA torch, cmake and ninja but no network, so fastfeed's other dependencies
# (and the build backend, pinned to this repo's versions) travel as wheels in .whl/: prepare them
# here with `benchmarks/gpu_prepare_wheels.sh`, then run this script with `.whl` carried.
#   run: bash benchmarks/gpu_check.sh         (results in $OUT/gpu_check.json, $OUT/bench_demo_cuda.json,
#                                              $OUT/gpu_pytest.log)
#        bash benchmarks/gpu_check.sh probe   (the overlap probe only: $OUT/overlap_probe.json)
#        bash benchmarks/gpu_check.sh demo    (only `fastfeed bench --demo --device cuda`)
# Steps: build + install fastfeed, benchmarks/gpu/gpu_check.py (bandwidth, overlap, bit-identity),
# `fastfeed bench --demo --device cuda` (SeaweedFS from its wheel -> pinned ring -> GPU, next to the
# raw GET and pinned-copy ceilings; then with a 10 ms synthetic step for the data wait), then the loader/resume/gather
# tests with CUDA present (pinned arenas, the CUDA-only tests); benchmarks/gpu/decode_check.py (nvJPEG
# decode against Pillow's, images/s of each, the loader with decode= on the GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu_check_out}
mkdir -p "$out"
site=/tmp/ff-site
rm -rf "$site"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl || exit 1
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PATH="$site/bin:$PATH"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
start=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target "$site" . >"$out/gpu_build.log" 2>&1 \
  || { tail -40 "$out/gpu_build.log"; exit 1; }
echo "build: $(($(date +%s) - start)) s"
if [ "${1:-}" = "probe" ]; then  # only benchmarks/gpu/overlap_probe.py (where a step's data wait goes)
  exec timeout 200 python3 benchmarks/gpu/overlap_probe.py "$out/overlap_probe.json"
fi
demo() {  # object store -> pinned ring -> GPU on this many-core node: throughput, then data wait
  timeout 200 python3 -m fastfeed.cli bench --demo --device cuda --workers 4 --epochs 3 --demo-size 1GiB \
    --compare torch --json "$out/bench_demo_cuda.json" --no-progress 2>&1 | tail -24
  timeout 120 python3 -m fastfeed.cli bench --demo --device cuda --workers 4 --epochs 2 --step-ms 10 \
    --persistent-workers --checkpoint-size 1GiB --json "$out/bench_demo_cuda_step10ms.json" --no-progress 2>&1 | tail -16
}
if [ "${1:-}" = "demo" ]; then
  demo
  exit $?
fi
rc=0
timeout 240 python3 benchmarks/gpu/gpu_check.py "$out/gpu_check.json" || rc=$?
echo "gpu_check.py: rc=$rc"
demo || echo "bench demo: rc=$?"
# Image decode on the GPU (torchvision's nvJPEG) against the CPU backend, and the loader end to end.
timeout 200 python3 benchmarks/gpu/decode_check.py "$out/decode_check.json" 2>&1 | tail -14 || echo "decode_check: failed"
timeout 200 python3 -m fastfeed.cli bench --demo --decode --device cuda --workers 4 --epochs 2 --demo-size 512MiB \
  --compare none --checkpoint-size 0 --json "$out/bench_demo_decode_cuda.json" --no-progress 2>&1 | tail -12
timeout 200 python3 -m pytest -q -p no:cacheprovider -x --timeout 120 \
  tests/test_loader.py tests/test_resume.py tests/test_reshard.py tests/test_gather.py tests/test_columnar.py \
  tests/test_sample_runs.py \
  -k "not streaming_stats_report" 2>&1 | tee "$out/gpu_pytest.log" | tail -25
exit $rc
