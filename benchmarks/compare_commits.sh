#!/usr/bin/env bash
# Run the loader, streaming and warm-cache benchmarks for two checkouts, alternating, each with
# its own benchmark scripts (they import internal module paths, which can differ between
# commits) and its own Python (a venv with that checkout installed).
#
#   benchmarks/compare_commits.sh BEFORE_DIR BEFORE_PYTHON AFTER_DIR AFTER_PYTHON OUT_DIR [ROUNDS]
#
# e.g. git worktree add --detach /tmp/before <commit>, a venv with it installed, then
#   benchmarks/compare_commits.sh /tmp/before /tmp/before-venv/bin/python . .venv/bin/python /tmp/cmp 2
# Writes OUT_DIR/{loader,stream,warm}-{before,after}-ROUND.{json,log}.
set -u
before_dir=$1 before_py=$2 after_dir=$3 after_py=$4 out=$5 rounds=${6:-2}
mkdir -p "$out"
out=$(cd "$out" && pwd)
for round in $(seq 1 "$rounds"); do
  for side in before after; do
    if [ "$side" = before ]; then d=$before_dir py=$before_py; else d=$after_dir py=$after_py; fi
    (
      cd "$d" || exit 1
      timeout 900 "$py" benchmarks/loader/bench_loader.py --workers 0,2 --repeats 1 \
        --json "$out/loader-$side-$round.json" > "$out/loader-$side-$round.log" 2>&1
      timeout 900 "$py" benchmarks/streaming/bench_stream.py --size 128MiB --rss-sizes 64MiB,128MiB --repeats 1 \
        --no-webdataset --json "$out/stream-$side-$round.json" > "$out/stream-$side-$round.log" 2>&1
      timeout 900 "$py" benchmarks/cache/bench_warm.py --quick --repeats 1 --peers "" \
        --json "$out/warm-$side-$round.json" > "$out/warm-$side-$round.log" 2>&1
    )
    echo "$side round $round done $(date +%T)"
  done
done
