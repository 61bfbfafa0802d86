#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment, idempotently.
#
# Why a script and not just `pip install -e .`: torch must come from the pinned CPU wheel
# (a plain `torch` requirement downloads a multi-GB CUDA build), pillow-simd compiles
# against Debian's libjpeg/libtiff headers, and PyTurboJPEG needs Debian's libturbojpeg0.
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${BEC_TORCH_VERSION:-2.13.0}

need_debs=()
dpkg -s libturbojpeg0 >/dev/null 2>&1 || need_debs+=(libturbojpeg0)
dpkg -s libtiff-dev >/dev/null 2>&1 || need_debs+=(libtiff-dev)
dpkg -s libjpeg62-turbo-dev >/dev/null 2>&1 || need_debs+=(libjpeg62-turbo-dev)
dpkg -s zlib1g-dev >/dev/null 2>&1 || need_debs+=(zlib1g-dev)
dpkg -s prometheus >/dev/null 2>&1 || need_debs+=(prometheus)
# The page generator's Tibetan fonts and word list; tesseract's Tibetan model for OCR.
for deb in fonts-tibetan-machine fonts-ddc-uchen fonts-monlam fonts-sambhota-tsugring \
           fonts-sambhota-yigchung hunspell-bo tesseract-ocr-bod; do
  dpkg -s "$deb" >/dev/null 2>&1 || need_debs+=("$deb")
done
if [ ${#need_debs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "bootstrap: installing Debian packages: ${need_debs[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_debs[@]}" >/dev/null \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_debs[@]}" >/dev/null; } \
      || echo "bootstrap: WARNING: could not install ${need_debs[*]}; JPEG falls back to Pillow, TIFF may not decode, pages cannot be generated"
  else
    echo "bootstrap: WARNING: missing Debian packages ${need_debs[*]} (run as root: apt-get install ${need_debs[*]})"
  fi
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$VENV/bin/python -c "import torch" 2>/dev/null || $PIP install "torch==$TORCH_VERSION"
$PIP install -e ".[ldv1,ocr,dev,synth]"
# pillow-simd built before libtiff-dev was present lacks TIFF support; pip's wheel cache
# would hand the same build back, so rebuild it without the cache.
if ! $VENV/bin/python -c "from PIL import features; assert features.check('libtiff')" 2>/dev/null; then
  echo "bootstrap: rebuilding pillow-simd with libtiff"
  $PIP install --no-cache-dir --force-reinstall --no-deps pillow-simd
fi
$VENV/bin/python -m bec.doctor || true
