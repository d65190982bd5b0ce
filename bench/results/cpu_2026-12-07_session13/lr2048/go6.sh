#!/usr/bin/env bash
cd /work/main && . .venv/bin/activate
export OMP_NUM_THREADS=1
common="--device cpu --threads 1 --steps 300 --eval-every 100 --batch 2 --seq-len 2048 --set model.depth=2"
python -m bench.health specs/deltanet.yaml $common --set model.dim=80 --set levels.outer.rule.lr=8.0e-3 --seed 0 \
  --out runs/lr2048/deltanet-lr8.0e-3-s0 --resume &
python -m bench.health specs/hope-delta.yaml $common --set model.dim=64 --set levels.outer.rule.lr=8.0e-3 --seed 0 \
  --out runs/lr2048/hopedelta-lr8.0e-3-s0 --resume
wait
python -m bench.health specs/deltanet.yaml $common --set model.dim=80 --set levels.outer.rule.lr=8.0e-3 --seed 1 \
  --out runs/lr2048/deltanet-lr8.0e-3-s1 --resume &
python -m bench.health specs/hope-delta.yaml $common --set model.dim=64 --set levels.outer.rule.lr=4.0e-3 --seed 0 \
  --out runs/lr2048/hopedelta-lr4.0e-3-s0 --resume
wait
