#!/usr/bin/env bash
# the blocked read at full depth: HOPE depth 4, seed 0, the twelfth session's setting (3.411 before it)
cd /work/main && . .venv/bin/activate
export OMP_NUM_THREADS=1
while pgrep -f "runs/lr2048/opt.sh" >/dev/null; do sleep 30; done
python -m bench.health models/hope.yaml --device cpu --threads 1 --steps 300 --eval-every 100 --batch 2 --seq-len 2048 \
  --set model.dim=64 --set model.depth=4 --seed 0 --out runs/depth4_blocked --resume
