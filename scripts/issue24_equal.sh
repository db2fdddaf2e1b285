#!/usr/bin/env bash
# Issue 24's equal-latency comparison on one CPU thread: the searched student's KD continued to the shipped
# students' 4000-step budget (feature KD off: stages whose blocks are all removed cannot match the teacher's
# features), and the hand-made cut at the same latency on v2 (bk-tiny, 0.40x) KD-trained with that budget.
# Resumable: rerun it; a finished stage's model is kept and skipped.
#   bash scripts/issue24_equal.sh [SEARCHED_STEPS_LEFT] [KD_MINUTES]
set -euo pipefail
LEFT=${1:-390}
MIN=${2:-75}
export OMP_NUM_THREADS=1
if [ ! -d runs/kd-v2-searched-4000/model ]; then
  pocketdiff train kd --teacher shapes-teacher --student checkpoints/kd-v2-searched --steps "$LEFT" --batch-size 32 \
    --lr 2e-4 --warmup-steps 20 --feature-weight 0 --foreground-weight 4 --keep-best "" \
    --monitor-every-s 0 --pool-size 8000 --max-minutes 20 --threads 1 --out-dir runs/kd-v2-searched-4000
fi
if [ ! -d runs/kd-v2-bk-tiny/model ]; then
  pocketdiff train kd --teacher shapes-teacher --student bk-tiny --steps 4000 --batch-size 32 --lr 5e-4 \
    --feature-weight 0.1 --foreground-weight 4 --keep-best all_correct --monitor-every-s 1200 \
    --max-minutes "$MIN" --threads 1 --out-dir runs/kd-v2-bk-tiny
fi
