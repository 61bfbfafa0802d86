#!/usr/bin/env bash
# Build .devkit/: what a bare GPU machine lacks to run the whole worker, fetched here.
#
# The GPU machines lent to this project hold Python 3.12 with torch, numpy, OpenCV, Pillow,
# pyarrow, rich, click, psutil and prometheus-client, but no PostgreSQL, no AWS or
# PostgreSQL client libraries, no moto and no libturbojpeg, and they reach no network. This
# script runs on a machine that reaches PyPI and fills .devkit/ (git-ignored, ~45 MB) with
#   wheels/  cp312 manylinux wheels of the missing packages, the versions tested here;
#            pgserver's wheel carries a relocatable PostgreSQL (initdb, pg_ctl, postgres);
#   lib/     Debian's libturbojpeg.so.0 (needs only libc), found by PyTurboJPEG through
#            LD_LIBRARY_PATH.
# benchmarks/device_check.sh installs it there and runs the GPU benchmark (issue 6, item 8).
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=.devkit
PYVER=${DEVKIT_PYTHON_VERSION:-3.12}
mkdir -p "$KIT/wheels" "$KIT/lib"

# Pure-Python and abi3 wheels, and the cp312 builds of the binary ones.
PACKAGES=(
  boto3==1.44.8 botocore==1.44.8 s3transfer==0.19.3 jmespath==1.1.0
  psycopg==3.3.9 psycopg-binary==3.3.9 psycopg-pool==3.3.3 python-dotenv==1.2.4
  moto==5.2.5 flask==3.1.3 flask-cors==6.0.5 blinker==1.9.0 itsdangerous==2.2.0
  responses==0.26.3 xmltodict==1.0.4 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12
  pgserver==0.1.4
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$KIT/wheels" "${PACKAGES[@]}"
# PyTurboJPEG 1.x (DESIGN §9) is published as an sdist only: build its (pure-Python) wheel.
python3 -m pip wheel -q --no-deps --no-build-isolation -w "$KIT/wheels" PyTurboJPEG==1.8.3

turbo=$(ls /usr/lib/x86_64-linux-gnu/libturbojpeg.so.0.* 2>/dev/null | head -1 || true)
if [ -n "$turbo" ]; then
  cp "$turbo" "$KIT/lib/libturbojpeg.so.0"
else
  echo "device-kit: WARNING: no libturbojpeg0 here (apt-get install libturbojpeg0); JPEG will decode with Pillow there"
fi
du -sh "$KIT"
echo "device-kit: ready; carry \"$KIT\" to the device and run: bash benchmarks/device_check.sh"
