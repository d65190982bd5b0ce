#!/usr/bin/env bash
# 2,048-byte rows rate sweep (CPU): same budget as docs/results.md's 2,048-byte table
cd /work/main && . .venv/bin/activate
export OMP_NUM_THREADS=1
common="--device cpu --threads 1 --steps 300 --eval-every 100 --batch 2 --seq-len 2048 --set model.depth=2"
for lr in 2.0e-3 4.0e-3; do
  for s in 0 1 2; do
    python -m bench.health specs/transformer.yaml $common --set model.dim=80 --set levels.outer.rule.lr=$lr \
      --seed $s --out runs/lr2048/transformer-lr$lr-s$s --resume
  done
done
for lr in 2.0e-3 4.0e-3; do
  for s in 0 1; do
    python -m bench.health models/hope.yaml specs/titans-mal.yaml $common --set model.dim=64 --set levels.outer.rule.lr=$lr \
      --seed $s --out runs/lr2048/nested-lr$lr-s$s --resume
  done
done
