#!/usr/bin/env bash
cd /work/main && . .venv/bin/activate
export OMP_NUM_THREADS=1
while pgrep -f "runs/lr2048/go3.sh" >/dev/null; do sleep 30; done
common="--device cpu --threads 1 --steps 300 --eval-every 100 --batch 2 --seq-len 2048 --set model.depth=2"
for s in 0 1; do
  python -m bench.health models/hope.yaml specs/titans-mal.yaml $common --set model.dim=64 --set levels.outer.rule.lr=1.6e-2 \
    --seed $s --out runs/lr2048/nested-lr1.6e-2-s$s --resume
done
