#!/usr/bin/env bash
# Continue the v2 teacher on a lent GPU for MINUTES (default 9), from the shipped v2 teacher, and bring the model
# back under $OUT as tar parts of at most 15 MiB (the device tool returns <= 8 files of <= 16 MiB).
#
#   device run (carry .whl): bash scripts/gpu_teacher.sh 9
#   here, after:  cat OUT/teacher.tar.part-* | tar x -C runs/   (gives runs/teacher-gpu/model)
#
# .whl holds the pure-Python wheels the device image lacks: run scripts/fetch_gpu_wheels.sh here first.
# Tested on the CPU at tiny settings: TINY=1 THREADS=1 INIT=shapes-teacher bash scripts/gpu_teacher.sh 0.5
set -euo pipefail
MINUTES=${1:-9}
OUT=${OUT:-/tmp/gpu-teacher-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ! python3 -c "import diffusers, webdataset" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import torch; print('device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
RUN=/tmp/gpu-teacher/teacher-gpu
if [ "${TINY:-0}" = 1 ]; then  # the same path at CPU scale: a few steps, a small pool and check
  SIZE=(--batch-size 4 --pool-size 64 --monitor-n 4 --monitor-steps 2 --monitor-every-s 20)
else  # the H200: batch 512 in bf16, a fresh 200k-image pool, a check every 3 minutes
  SIZE=(--batch-size 512 --pool-size 200000 --mixed-precision bf16 --monitor-every-s 180)
fi
python3 -m pocketdiff train teacher --init-from "${INIT:-shapes-teacher}" --lr 1e-3 --warmup-steps 100 \
  --steps 100000 --max-minutes "$MINUTES" --checkpoint-every 500 --threads "${THREADS:-8}" "${SIZE[@]}" --out-dir "$RUN" \
  2>&1 | tr '\r' '\n' | tee "$OUT/train.log" | tail -40
python3 - "$RUN/model" <<'PY'
import sys
from pocketdiff.folder import store_half
store_half(sys.argv[1], ("unet", "text_encoder"))  # float16 on disk: half the bytes to bring back
PY
cp "$RUN/log.jsonl" "$OUT/log.jsonl"
tar cf - -C "$(dirname "$RUN")" "$(basename "$RUN")/model" | split -b 15M - "$OUT/teacher.tar.part-"
ls -la "$OUT"
