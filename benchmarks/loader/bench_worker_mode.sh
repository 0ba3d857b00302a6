#!/usr/bin/env bash
# fastfeed.DataLoader(worker_mode=...) in the same run: "process" (worker processes, as torch's
# loader) against "auto" (the streams read in this process's threads), with `fastfeed bench
# --demo` (a local SeaweedFS, 16 shards of 100 KiB samples, batch 32, 2 workers): cold epochs
# without a cache at 0 and 20 ms emulated latency, and 3 epochs with the node cache (fresh and
# persistent workers). The modes alternate within each round.
#
#   benchmarks/loader/bench_worker_mode.sh OUT_DIR [ROUNDS] [EXTRA fastfeed bench ARGS...]
#   .venv/bin/python benchmarks/summarize_bench.py OUT_DIR
set -euo pipefail
out=${1:?usage: bench_worker_mode.sh OUT_DIR [ROUNDS] [ARGS...]}
rounds=${2:-3}
shift $(( $# < 2 ? $# : 2 ))
cd "$(dirname "$0")/../.."
mkdir -p "$out"
common=(--demo --compare none --demo-size 400MB --demo-sample-size 100KiB --demo-shard-size 25MB
        --batch-size 32 --workers 2 --checkpoint-size 0 --no-progress "$@")
for r in $(seq 1 "$rounds"); do
  for lat in 0 20; do
    for mode in process auto; do
      .venv/bin/fastfeed bench "${common[@]}" --no-cache --epochs 1 --latency-ms "$lat" --worker-mode "$mode" \
        --json "$out/nocache-$mode-${lat}ms-$r.json" > "$out/nocache-$mode-${lat}ms-$r.txt"
    done
  done
  for mode in process auto; do
    .venv/bin/fastfeed bench "${common[@]}" --epochs 3 --worker-mode "$mode" \
      --json "$out/cache-$mode-$r.json" > "$out/cache-$mode-$r.txt"
    .venv/bin/fastfeed bench "${common[@]}" --epochs 3 --persistent-workers --worker-mode "$mode" \
      --json "$out/cache-persistent-$mode-$r.json" > "$out/cache-persistent-$mode-$r.txt"
  done
done
