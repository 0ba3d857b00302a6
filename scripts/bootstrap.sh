#!/usr/bin/env bash
# Create ./.venv (if needed) and install fastfeed into it with the given extras.
#   scripts/bootstrap.sh test,dev
# Torch: a CPU-only build is enough for everything here. FASTFEED_TORCH (default torch==2.13.0)
# is installed first, so fastfeed's own `torch>=2.4` requirement is already met and pip never
# pulls a multi-GB CUDA build. On a GPU machine, install the torch you want first (or set
# FASTFEED_TORCH), e.g. FASTFEED_TORCH="torch==2.13.0" with your CUDA index.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$py" -c 'import sys; assert sys.version_info >= (3, 10), "fastfeed needs Python >= 3.10"'
  "$py" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  echo "bootstrap: installing ${FASTFEED_TORCH:-torch==2.13.0}" >&2
  "${pip[@]}" install "${FASTFEED_TORCH:-torch==2.13.0}"
fi
spec="."
[ -n "$extras" ] && spec=".[${extras}]"
echo "bootstrap: installing fastfeed${extras:+[$extras]} (compiles csrc/)" >&2
"${pip[@]}" install "$spec"
