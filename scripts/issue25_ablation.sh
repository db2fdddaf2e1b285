#!/usr/bin/env bash
# Issue 25's ablation on one CPU thread: MobileDiffusion's block operations on shapes-mobile-lite, each alone and
# all together, each fine-tuned by the same short KD budget from the teacher, then compared in one run.
#   bash scripts/issue25_ablation.sh [KD_MINUTES] [KD_STEPS]
set -euo pipefail
MIN=${1:-15}
STEPS=${2:-800}
export OMP_NUM_THREADS=1
mkdir -p runs/ops
variants=(separable shared_kv swish_ff relu_attention trim_ff cross_only all none)
for v in "${variants[@]}"; do
  src=runs/ops/$v-init
  if [ ! -d "$src" ]; then
    case $v in
      all) pocketdiff surgery shapes-mobile-lite "$src" --op separable --op shared_kv --op swish_ff \
             --op relu_attention --op trim_ff --op cross_only --blocks down_blocks.1,up_blocks.1 ;;
      none) cp -r "$(python -c 'from pocketdiff.models.registry import resolve_model; print(resolve_model("shapes-mobile-lite"))')" "$src" ;;
      cross_only) pocketdiff surgery shapes-mobile-lite "$src" --op cross_only --blocks down_blocks.1,up_blocks.1 ;;
      *) pocketdiff surgery shapes-mobile-lite "$src" --op "$v" ;;
    esac
  fi
  if [ ! -d "runs/ops/$v/model" ]; then
    pocketdiff train kd --teacher shapes-teacher --student "$src" --steps "$STEPS" --batch-size 32 --lr 2e-4 \
      --warmup-steps 50 --feature-weight 0.1 --foreground-weight 4 --monitor-every-s 0 --max-minutes "$MIN" \
      --threads 1 --out-dir "runs/ops/$v"
  fi
done
runs=()
for v in "${variants[@]}"; do runs+=(--run "$v=runs/ops/$v/model:dpmpp_2m:25:3"); done
python benchmarks/shapes_compare.py --name block-ops "${runs[@]}" --n 500
