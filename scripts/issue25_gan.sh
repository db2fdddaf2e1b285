#!/usr/bin/env bash
# Issue 25's UFOGen ablation on one CPU thread: the discriminator trained vs frozen (heads only), with and without
# the reconstruction term, each the same short budget from shapes-mobile-lite, then one same-run comparison with
# the teacher's 50-step CFG generation, the long run (POOL's model, also through the pruned VAE), the KD student
# at 1 step and shapes-lcm at 1 step. Resumable: rerun it.
#   bash scripts/issue25_gan.sh [STEPS] [MINUTES] [POOL_FROM]
set -euo pipefail
STEPS=${1:-200}
MIN=${2:-14}
POOL=${3:-runs/gan-trained}  # a run folder whose latent pool (same VAE, size and seed) every run reuses
export OMP_NUM_THREADS=1
declare -A flags=(
  [trained-rec]="--train-disc-backbone true --rec-weight 1"
  [frozen-rec]="--train-disc-backbone false --rec-weight 1"
  [trained-norec]="--train-disc-backbone true --rec-weight 0"
  [rec-only]="--adv-weight 0 --rec-weight 1"
)
for v in trained-rec frozen-rec trained-norec rec-only; do
  out=runs/gan-ablation/$v
  [ -d "$out/model" ] && continue
  mkdir -p "$out"
  [ -f "$out/latent_pool.json" ] || cp "$POOL"/latent_pool.* "$out"/ 2>/dev/null || true
  # shellcheck disable=SC2086
  pocketdiff train gan --teacher shapes-teacher --student shapes-mobile-lite ${flags[$v]} --steps "$STEPS" \
    --batch-size 24 --lr 5e-5 --disc-lr-scale 10 --warmup-steps 25 --foreground-weight 4 --pool-size 8000 --monitor-every-s 0 \
    --checkpoint-every 50 --max-minutes "$MIN" --threads 1 --out-dir "$out"
done
runs=(--run teacher-50=shapes-teacher:ddim:50:3 --run "gan-1=$POOL/model:ddim:1:1"
      --run "gan-1-pruned=$POOL/model+shapes-vae-pruned:ddim:1:1" --run kd-1=shapes-mobile-lite:ddim:1:1
      --run kd-1-g3=shapes-mobile-lite:ddim:1:3 --run lcm-1=shapes-lcm:lcm:1:3)
for v in trained-rec frozen-rec trained-norec rec-only; do runs+=(--run "$v=runs/gan-ablation/$v/model:ddim:1:1"); done
python benchmarks/shapes_compare.py --name gan-ablation "${runs[@]}" --n 500 --paired teacher-50
