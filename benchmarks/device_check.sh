#!/usr/bin/env bash
# The GPU check of issue 6 (item 8), as one prepared command for a lent GPU machine.
#
# Runs the production architecture (ldv1, random weights) in fp16 on CUDA: the model alone
# (full batches of device-resident tiles: the yardstick), inference alone (tiles/s, pages/s),
# the host→device copy per page (pageable and pinned), and the whole worker at several
# fetch/decode process counts (pages/s, tiles/s ÷ the model alone, efficiency, the
# accelerator's busy ratio from CUDA events). The machine is bare and offline: build .devkit/ first, here,
# with scripts/device-kit.sh, and carry it:
#
#   run(command="bash benchmarks/device_check.sh", carry=[".devkit"], timeout_s=540)
#
# Results land in $OUT (gpu.json, gpu.log, gpu.txt) when the device tool sets it, else in
# bench-out/device. PROCS, PAGES, VOLUMES and INFER_PROCS (inference processes sharing the
# GPU) override the defaults below.
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${OUT:-bench-out/device}
KIT=$PWD/.devkit
SITE=/tmp/bec-site
mkdir -p "$RESULTS"
[ -d "$KIT/wheels" ] || { echo "device_check: no .devkit here: run scripts/device-kit.sh where PyPI answers, then carry .devkit" >&2; exit 2; }

# What the bare machine lacks, from the kit; torch, numpy, OpenCV, Pillow, pyarrow are its own.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$KIT"/wheels/*.whl
chmod -R a+rX "$SITE"
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export LD_LIBRARY_PATH="$KIT/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PATH="$SITE/pgserver/pginstall/bin:$PATH"   # initdb, pg_ctl: the benchmark starts its own server
export PYTHONUNBUFFERED=1
# initdb refuses root; as root the local stack runs PostgreSQL as the user "postgres".
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
  useradd --system --no-create-home --shell /usr/sbin/nologin postgres 2>/dev/null \
    || adduser --system --no-create-home postgres >/dev/null
fi

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  python3 -c "import torch, cv2, PIL; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0)); print('opencv', cv2.__version__, 'pillow', PIL.__version__)"
  python3 -c "from bec.edges import imaging; print('turbojpeg', 'yes' if imaging._TURBO else 'NO (Pillow decodes JPEG)')"
  echo "cores $(nproc)"
} 2>&1 | tee "$RESULTS/gpu.txt"

python3 -m benchmarks.ldv1 --model ldv1 --device cuda --precision fp16 --skip-baselines --source folder \
  --procs "${PROCS:-4,8,12}" --pages "${PAGES:-2400}" --volumes "${VOLUMES:-24}" \
  ${INFER_PROCS:+--infer-procs "$INFER_PROCS"} --json "$RESULTS/gpu.json" --out /tmp/bench-out 2>&1 | tee "$RESULTS/gpu.log"
