#!/usr/bin/env bash
# Issue 24 on one CPU thread, as a chain that ends with saved models: robust fine-tuning of the default teacher
# (stochastic block skipping), the architecture search of it to a latency target, then KD of the searched student.
# Each stage is resumable (rerun the script: a finished stage's output is kept and skipped).
#   bash scripts/issue24_chain.sh [ROBUST_MINUTES] [KD_MINUTES] [TARGET_RATIO]
set -euo pipefail
ROBUST_MIN=${1:-35}
KD_MIN=${2:-40}
RATIO=${3:-0.39}
export OMP_NUM_THREADS=1
if [ ! -d runs/teacher-robust/model ]; then
  pocketdiff train teacher --init-from shapes-teacher --skip-prob 0.1 --steps 1300 --batch-size 32 --lr 1e-4 \
    --warmup-steps 50 --foreground-weight 4 --pool-size 20000 --keep-best "" --monitor-every-s 900 \
    --max-minutes "$ROBUST_MIN" --threads 1 --out-dir runs/teacher-robust
fi
if [ ! -d runs/search-v2 ]; then
  pocketdiff search runs/teacher-robust/model --out runs/search-v2 --target-ratio "$RATIO" --keep-attention 2 --threads 1
fi
pocketdiff train kd --teacher shapes-teacher --student runs/search-v2/model --steps 4000 --batch-size 32 \
  --feature-weight 0.1 --foreground-weight 4 --keep-best all_correct --monitor-every-s 1200 \
  --max-minutes "$KD_MIN" --threads 1 --out-dir runs/kd-v2-searched
