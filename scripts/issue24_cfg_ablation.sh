#!/usr/bin/env bash
# Issue 24's CFG-aware step-distillation ablation on one CPU thread: the shipped KD student distilled from the
# default teacher to STEPS (4 or 8) DDIM steps, with the teacher at 4x as many steps: direct (4 teacher steps per
# student step) at p_cfg 0 (vanilla), 0.1 and 1, and progressive (two halvings) at p_cfg 0.1; the same optimizer
# steps, batch and learning rate for every run. Resumable: rerun it; a finished run's model is kept and skipped.
#   bash scripts/issue24_cfg_ablation.sh STEPS [OPT_STEPS] [MAX_MINUTES]
set -euo pipefail
K=${1:?student steps: 4 or 8}
N=${2:-160}
MIN=${3:-18}
export OMP_NUM_THREADS=1
run() {  # NAME MODE P_CFG
  local out=runs/cfg-$1
  [ -d "$out/model" ] && return 0
  mkdir -p "$out"
  # the latent pool is keyed by the VAE, size and seed only: one pool serves every run
  [ -f runs/pool/latent_pool.json ] && [ ! -f "$out/latent_pool.json" ] && cp runs/pool/latent_pool.* "$out/"
  pocketdiff train step-cfg --teacher shapes-teacher --student shapes-mobile-lite --student-steps "$K" \
    --teacher-steps $((4 * K)) --mode "$2" --p-cfg "$3" --steps "$N" --batch-size 32 --lr 1e-4 --warmup-steps 10 \
    --foreground-weight 4 --pool-size 6000 --keep-best all_correct --monitor-every-s 240 --max-minutes "$MIN" \
    --threads 1 --out-dir "$out"
}
run "d$K-p0" direct 0
run "d$K-p01" direct 0.1
run "d$K-p1" direct 1
run "prog$K-p01" progressive 0.1
