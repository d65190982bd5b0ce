#!/usr/bin/env bash
cd /work/main && . .venv/bin/activate
export OMP_NUM_THREADS=1
while pgrep -f "runs/lr2048/go.sh" >/dev/null; do sleep 30; done
common="--device cpu --threads 1 --steps 300 --eval-every 100 --batch 2 --seq-len 2048 --set model.depth=2"
for s in 0 1 2; do
  python -m bench.health specs/transformer.yaml $common --set model.dim=80 --set levels.outer.rule.lr=8.0e-3 \
    --seed $s --out runs/lr2048/transformer-lr8.0e-3-s$s --resume
done
