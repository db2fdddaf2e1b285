#!/usr/bin/env bash
# Issue 28's measurement on one CPU thread: the same student and KD budget trained on a dirty Shapes set, on it
# with each curation step added in turn, on the curated set plus teacher pairs, and on the clean stream; then one
# comparison run with a paired (McNemar) test against the dirty set's student.
#   bash scripts/issue28_data.sh [N_PAIRS] [KD_MINUTES] [KD_STEPS] [MAX_SYNTH] [SYNTH_STEPS]
set -euo pipefail
N=${1:-20000}
MIN=${2:-15}
STEPS=${3:-800}
MAX_SYNTH=${4:-1024}  # teacher pairs: as many as the curation dropped, at most this many (1 thread: ~0.8 s each)
SYNTH_STEPS=${5:-10}
export OMP_NUM_THREADS=1
D=runs/data28
mkdir -p $D
[ -d $D/dirty ] || pocketdiff data shapes --dirty --n "$N" --out $D/dirty --seed 28
# (b) each step added in turn; (c) all of them. --min-score 0.93: on a 200-pair dirty set the domain CLIP gave clean
# pairs 0.96-0.99 (5th-95th percentile) and wrong-word, miscounted and off-centre pairs mostly under 0.95
[ -d $D/dedup ] || pocketdiff data curate $D/dirty $D/dedup --no-progress
[ -d $D/size ] || pocketdiff data curate $D/dirty $D/size --min-size 32 --resolution 64 --no-progress
[ -d $D/recaption ] || pocketdiff data curate $D/dirty $D/recaption --min-size 32 --resolution 64 \
  --captioner shapes --caption-mode replace --no-progress
[ -d $D/curated ] || pocketdiff data curate $D/dirty $D/curated --min-size 32 --resolution 64 \
  --captioner shapes --caption-mode replace --scorer shapes --min-score 0.93 --no-progress
# (d) the curated set plus teacher pairs for as many fresh training-split prompts as the curation dropped (capped)
if [ ! -d $D/curated+synth ]; then
  python -c "
import json, sys
from pocketdiff.data.datasets import open_dataset
kept = sum(1 for _ in open('$D/curated/metadata.jsonl'))
caps = open_dataset('shapes').captions(min(max($N - kept, 1), $MAX_SYNTH), seed=2828)
open('$D/prompts.txt', 'w').write('\n'.join(caps) + '\n')"
  [ -d $D/synth ] || pocketdiff data synth $D/synth --teacher shapes-teacher --prompts $D/prompts.txt \
    --steps $SYNTH_STEPS --batch 32 --no-progress
  python -c "
import json, shutil
from pathlib import Path
out = Path('$D/curated+synth'); tmp = Path(str(out) + '.tmp'); shutil.rmtree(tmp, ignore_errors=True); tmp.mkdir()
lines = []
for src in ('curated', 'synth'):
    for line in open(f'$D/{src}/metadata.jsonl'):
        r = json.loads(line); name = f'{src}-' + Path(r['file_name']).name
        shutil.copy(f'$D/{src}/' + r['file_name'], tmp / name); lines.append(json.dumps({'file_name': name, 'text': r['text']}))
(tmp / 'metadata.jsonl').write_text('\n'.join(lines) + '\n'); tmp.rename(out)"
fi
for v in dirty dedup size recaption curated curated+synth shapes; do
  data=$D/$v; [ "$v" = shapes ] && data=shapes
  [ -d "$D/kd-$v/model" ] || pocketdiff train kd --teacher shapes-teacher --student mobile-lite --data "$data" \
    --pool-size "$N" --steps "$STEPS" --batch-size 32 --feature-weight 0.1 --foreground-weight 4 --monitor-every-s 0 \
    --max-minutes "$MIN" --threads 1 --out-dir "$D/kd-$v"
done
runs=()
for v in dirty dedup size recaption curated curated+synth shapes; do runs+=(--run "$v=$D/kd-$v/model:dpmpp_2m:25:3"); done
python benchmarks/shapes_compare.py --name data-curation "${runs[@]}" --n 500 --paired dirty
