#!/usr/bin/env bash
# The device calls of an evidence session, one mode per call (each fits the 600 s call limit and
# copies what it has to $OUT before it; runs/ survives between calls only on a warm machine):
#   health  Titans-MAG/MAC toward 1,000 steps (resumable in runs/tm); SPECS="a.yaml b.yaml" and
#           OUTDIR=runs/x train others; SEED=1 a second seed; with NIAH=1 the NIAH suite beside
#           them (resumable in runs/suite/niah)
#   kernels the CMS kernels' bench (forward and training step, both backward tilings), the DGD
#           kernel's training step with both backward carries, the generators' kernel against
#           their chunk loop, and the GPU kernel tests (the Titans rows against titans-pytorch: peer)
#   seed1   HOPE seed 1 at the shipped rate, at 2e-3 without the wavefront, and at 2e-3 with max_gain (RUNS)
#   tf32    TF32 dots: the DGD kernel's training step per precision, HOPE 60 steps with / without --tf32
#   newspec a new spec's first run at the GPU's size beside the Transformer (SPECS, STEPS: 200;
#           JOBS=N trains N at once, SEED)
#   speed   HOPE against the same-size GPT at 8 / 32 x 2,048 and 1 x 2K / 16K / 64K (issue 12's rows)
#   rebuilt the CMS kernel's rebuilt start weights: GPU tests, HOPE's rows (memory at 32 x 2K / 64K), triton_cms
#   mixed   speed's graphed rows, the peer HOPE and a fast spec's 1,000-step health run (FAST)
#   long    HOPE with remat at 32 x 2,048 and 1 x 65,536 (graphed and eager)
#   tiles   the CMS kernels' tilings at c1's shape (more programs, more warps), eagerly
#   wave    the wavefront's streams: graphed against eager (fault or numerics?), then HOPE's speed
#   lr      the outer learning rate at full size: HOPE (NESTED) and the Transformer at LR (2e-3),
#           the Transformer at LR2 (4e-3), side by side on the 1,000-step schedule (TRANSFORMERS=0:
#           the nested spec alone)
#   peer    the Titans memory against titans-pytorch at our head size (parallel and per-chunk
#           math) at 8 x 2,048, 4 x 8,192 and 1 x 65,536: the like-for-like rows of issue 12
# usage: bash bench/device_batch.sh MODE [SECONDS]
set -u
mode=${1:?mode: health or kernels}
limit=${2:-540}
mkdir -p runs "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

# HOPE (shipped periods, the kernels as they default) and the same-size GPT from CUDA graphs at
# 8 and 32 x 2,048 and 1 x 2K / 16K / 64K; then the peer HOPE (nested-learning's HOPEModel, no
# online updates). usage: hope_rows SECONDS
hope_rows() {
  timeout "$1" python3 -m bench --device cuda --only hope:nestlearn+graph,gpt:nestlearn+graph \
    --seqs 2048,16384,65536 --budget 4 --skip-after 60 --graph-warmup 1 --out "$OUT/bench_hope_speed.json" \
    > "$OUT/bench_hope_speed.txt" 2>&1; echo "speed (graphs) rc=$?"
  timeout 40 python3 -m bench --device cuda --only hope:kmccleary-hope --budget 3 \
    --out "$OUT/bench_hope_peer.json" > "$OUT/bench_hope_peer.txt" 2>&1; echo "speed (peer) rc=$?"
}
case "$mode" in
health)
  out=${OUTDIR:-runs/tm}
  # always --resume: a run whose outer timeout fired in its final evaluation has a checkpoint
  # but no row in health.json yet, and continues from it (a fresh OUTDIR starts fresh)
  timeout "$limit" python3 -m bench.health ${SPECS:-specs/titans-mag.yaml specs/titans-mac.yaml} --device cuda \
    --cuda-graph --steps 1000 --eval-every 250 --jobs 2 --seconds $((limit - 100)) --seed "${SEED:-0}" \
    --out "$out" --resume \
    >> "$OUT/health_tm.log" 2>&1 &
  h=$!
  s=""
  if [ -n "${NIAH:-}" ]; then
    timeout $((limit - 20)) python3 -m nestlearn suite experiments/niah.yaml --device cuda --format md \
      >> "$OUT/niah.log" 2>&1 &
    s=$!
  fi
  wait $h; echo "health rc=$?"
  if [ -n "$s" ]; then wait "$s"; echo "suite rc=$?"; fi
  cp "$out/health.json" "$OUT/" 2>/dev/null
  (cd runs && find "${out#runs/}" suite/niah \( -name "*.json" -o -name "*.jsonl" -o -name "*.md" -o -name "*.log" \) \
    | grep -v checkpoint | tar cf "$OUT/runs.tar" -T -) 2>/dev/null
  tail -25 "$OUT/health_tm.log"; if [ -n "$s" ]; then tail -25 "$OUT/niah.log"; fi
  ;;
seed1)
  # HOPE's seed 1 at 1e-3 (shipped: runs/s1), at 2e-3 without the wavefront (runs/lr2e-3_s1_nowave:
  # did the step-277 divergence need --wavefront?) and at 2e-3 with max_gain 1 on the CMS levels
  # (runs/lr2e-3_s1_cap), side by side, stats every 50 steps at 2e-3; RUNS picks (default
  # "s1 nowave cap"; on a card under 100 GB the cap run waits for a later call); mac adds
  # Titans-MAC's seed 1; wave / wave1 repeat the diverged run with --wavefront 512 (streams on /
  # one stream: a race between the streams would show in wave alone)
  runs=${RUNS:-s1 nowave cap}
  gb=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
  if [ "${gb:-0}" -lt 100000 ] && [ -z "${RUNS:-}" ]; then runs="s1 nowave"; fi
  cap="--set levels.cms_fast.max_gain=1 --set levels.cms_mid.max_gain=1 --set levels.cms_slow.max_gain=1"
  common="--device cuda --cuda-graph --steps 1000 --seconds $((limit - 100)) --seed 1 --resume"
  for r in $runs; do
    case $r in
      s1) args="models/hope.yaml --eval-every 250 --out runs/s1" ;;
      mac) args="specs/titans-mac.yaml --eval-every 250 --out runs/mac_s1" ;;
      nowave) args="models/hope.yaml --eval-every 50 --set levels.outer.rule.lr=2e-3 --out runs/lr2e-3_s1_nowave" ;;
      cap) args="models/hope.yaml --eval-every 50 --set levels.outer.rule.lr=2e-3 $cap --out runs/lr2e-3_s1_cap" ;;
      wave|wave1) args="models/hope.yaml --eval-every 50 --set levels.outer.rule.lr=2e-3 --wavefront 512 --out runs/lr2e-3_s1_$r" ;;
    esac
    # wave: the fifteenth session's diverged run again (streams on); wave1: the same order on one stream
    streams=1; [ "$r" = wave1 ] && streams=0
    NESTLEARN_WAVEFRONT_STREAMS=$streams timeout "$limit" python3 -m bench.health $args $common >> "$OUT/seed1_$r.log" 2>&1 &
  done
  wait; echo "seed1 ($runs) rc=$?"
  (cd runs && find s1 mac_s1 lr2e-3_s1_* \( -name "*.jsonl" -o -name "health.json" \) \
    | tar cf "$OUT/seed1_runs.tar" -T -) 2>/dev/null
  for r in $runs; do echo "== $r"; grep "^| \|diverg\|non-finite" "$OUT/seed1_$r.log" | tail -4; done
  ;;
tf32)
  # what TF32 dots buy: the DGD kernel's training step at each precision (bench.triton_dgd --train
  # prints the tf32x3 / tf32 rows beside fp32, with their error), then HOPE trained 60 steps
  # with and without --tf32 (same seed, one after the other: tokens/s and the training loss)
  timeout 120 python3 -m bench.triton_dgd --train --no-graph > "$OUT/triton_dgd_tf32.txt" 2>&1; echo "triton_dgd rc=$?"
  for t in "" --tf32; do
    timeout $(((limit - SECONDS - 10) / 2)) python3 -m bench.health models/hope.yaml --device cuda --cuda-graph \
      --steps 60 --out "runs/tf32${t:+_on}" $t >> "$OUT/hope_tf32${t:+_on}.log" 2>&1; echo "hope ${t:-fp32} rc=$?"
  done
  grep -A12 "forward + backward" "$OUT/triton_dgd_tf32.txt"; grep -h "^| hope" "$OUT"/hope_tf32*.log
  ;;
newspec)
  timeout "$limit" python3 -m bench.health specs/transformer.yaml ${SPECS:?SPECS} --device cuda --cuda-graph \
    --steps "${STEPS:-200}" --eval-every 100 --seconds $((limit - 90)) --jobs "${JOBS:-1}" --seed "${SEED:-0}" \
    --out runs/newspec --resume > "$OUT/newspec.log" 2>&1
  echo "newspec rc=$?"; cp runs/newspec/health.json "$OUT/newspec_health.json" 2>/dev/null
  (cd runs && find newspec -name "*.jsonl" | tar cf "$OUT/newspec_runs.tar" -T -) 2>/dev/null
  tail -12 "$OUT/newspec.log"
  ;;
peer)
  only=titans-memory:nestlearn,titans-memory:nestlearn-compiled-step,titans-memory:nestlearn-compiled-step+graph
  only=$only,titans-memory:titans-pytorch-dh128,titans-memory:titans-pytorch-dh128-batch64,titans-memory:titans-pytorch
  timeout "$limit" python3 -m bench --device cuda --only "$only" --budget 5 --skip-after 20 \
    --out "$OUT/bench_titans_peer.json" > "$OUT/bench_titans_peer.txt" 2>&1; echo "peer rc=$?"
  tail -30 "$OUT/bench_titans_peer.txt"
  ;;
speed)
  # hope_rows, then eager HOPE
  hope_rows $((limit - 170))
  timeout 110 python3 -m bench --device cuda --only hope:nestlearn --seqs 2048,65536 --budget 5 --skip-after 60 \
    --out "$OUT/bench_hope_eager.json" > "$OUT/bench_hope_eager.txt" 2>&1; echo "speed (eager) rc=$?"
  for f in bench_hope_speed bench_hope_peer bench_hope_eager; do echo "== $f"; grep "^| " "$OUT/$f.txt" | tail -14; done
  ;;
rebuilt)
  # the CMS level's start weights rebuilt in the backward (loops/triton/sgd_mlp_rev.py): its GPU
  # tests, then HOPE and the GPT from graphs at 8 / 32 x 2,048 and 1 x 65,536 (the peak memory per
  # row, and whether 32 x 2,048 and 64K now fit), then the CMS kernels' bench in what is left
  # (beside a training run the speeds count only as ratios)
  timeout 150 python3 -m pytest -q -x -m gpu tests/test_triton_cms_rev.py tests/test_triton_cms.py -p no:cacheprovider \
    > "$OUT/gpu_tests_rev.txt" 2>&1; echo "gpu tests rc=$?"; tail -3 "$OUT/gpu_tests_rev.txt"
  timeout $((limit - SECONDS - 120)) python3 -m bench --device cuda --only hope:nestlearn+graph,gpt:nestlearn+graph \
    --seqs 65536 --budget 4 --skip-after 200 --graph-warmup 1 --out "$OUT/bench_hope_rebuilt.json" \
    > "$OUT/bench_hope_rebuilt.txt" 2>&1; echo "hope rows rc=$?"
  timeout $((limit - SECONDS - 10)) python3 -m bench.triton_cms > "$OUT/triton_cms.txt" 2>&1; echo "triton_cms rc=$?"
  grep "^| \|^\[" "$OUT/bench_hope_rebuilt.txt" | tail -12; grep -A12 "forward + backward" "$OUT/triton_cms.txt"
  ;;
mixed)
  # one lease's worth when machines are scarce: hope_rows, then the 1,000-step health run of a
  # fast spec (FAST, default Gated DeltaNet) in what is left
  hope_rows 290
  rest=$((limit - SECONDS - 15))
  timeout "$rest" python3 -m bench.health ${FAST:-specs/gated-deltanet.yaml} --device cuda --cuda-graph --steps 1000 \
    --eval-every 250 --seconds $((rest - 30)) --seed "${SEED:-0}" --out runs/fast > "$OUT/health_fast.log" 2>&1
  echo "health rc=$?"; cp runs/fast/health.json "$OUT/health_fast.json" 2>/dev/null
  (cd runs && find fast -name "*.jsonl" | tar cf "$OUT/fast_runs.tar" -T -) 2>/dev/null
  for f in bench_hope_speed bench_hope_peer; do echo "== $f"; grep "^| " "$OUT/$f.txt" | tail -14; done
  tail -8 "$OUT/health_fast.log"
  ;;
lr)
  # the outer learning rate at full size: NESTED (default HOPE: alone it gets the GPU) and the Transformer
  # at LR (2e-3), the Transformer also at LR2 (4e-3), all on the 1,000-step schedule, side by side;
  # a row cut by the call still compares with the 1e-3 runs on the same batches (train column)
  # (TRANSFORMERS=0: the nested spec alone at LR, e.g. to resume it once the Transformers are done;
  # SEED=1 another seed in its own folder; WAVEFRONT=512 trains with --wavefront 512, streams on;
  # EVAL_EVERY=50 records the per-level stats, chunk_gain included, that often: graphed steps take
  # them only at evaluations; SETS="levels.cms_fast.max_gain=1 ..." more overrides for every spec,
  # with TAG=name their own folder; TRANSFORMERS=0 where they name the nested spec's levels)
  lr=${LR:-2e-3}
  sets=""; for o in ${SETS:-}; do sets="$sets --set $o"; done
  if [ "${TRANSFORMERS:-1}" = 0 ]; then rates=$lr; beside=""; else rates="$lr ${LR2:-4e-3}"; beside=specs/transformer.yaml; fi
  for r in $rates; do
    if [ "$r" = "$lr" ]; then specs="${NESTED:-models/hope.yaml} $beside"; else specs=specs/transformer.yaml; fi
    timeout "$limit" python3 -m bench.health $specs --device cuda --cuda-graph --steps 1000 --eval-every "${EVAL_EVERY:-250}" \
      --jobs 3 --seconds $((limit - 90)) --seed "${SEED:-0}" --set levels.outer.rule.lr="$r" $sets \
      --out "runs/lr$r${SEED:+_s$SEED}${TAG:+_$TAG}" --resume ${WAVEFRONT:+--wavefront "$WAVEFRONT"} \
      >> "$OUT/lr$r.log" 2>&1 &
  done
  wait; echo "lr rc=$?"
  (cd runs && find lr* \( -name "*.jsonl" -o -name "health.json" \) | tar cf "$OUT/lr_runs.tar" -T -) 2>/dev/null
  for r in $rates; do echo "== lr $r"; grep "^| " "$OUT/lr$r.log" | tail -5; done
  ;;
long)
  # HOPE where its saved chunk states pass 80 GB without remat: the remat variant (cms_fast /
  # selfmod every 8 chunks, cms_mid every 2) at 32 x 2,048 and 1 x 65,536 from a CUDA graph,
  # and eagerly; one row can take minutes (eager warm-up, then the capture of ~10^5 launches)
  timeout $((limit - 20)) python3 -m bench --device cuda --only hope-remat:nestlearn+graph,hope-remat:nestlearn \
    --seqs 65536 --budget 3 --skip-after 400 --graph-warmup 1 --out "$OUT/bench_hope_long.json" \
    > "$OUT/bench_hope_long.txt" 2>&1; echo "long rc=$?"; grep "^| \|^ *\[" "$OUT/bench_hope_long.txt" | tail -8
  ;;
wave)
  # the stream path against the block loop and the one-stream order (fp32, eager and graphed);
  # then HOPE's wavefront at 8 x 2,048 on one stream and with streams: speed, gradient difference
  # from the loop and from the fp32 loop (2026-12-07: one stream and streams both 0.59 from the
  # bf16 loop, so the streams are on by default since)
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_wavefront_kernels.py > "$OUT/gpu_tests_wave.txt" 2>&1
  echo "wavefront kernel tests rc=$?"; tail -3 "$OUT/gpu_tests_wave.txt"
  timeout 150 python3 -m bench.wavefront_check > "$OUT/wavefront_check.txt" 2>&1; echo "wavefront_check rc=$?"
  # segments of whole chunks, so the DGD and CMS kernels (rebuilt weights) serve every call:
  # the default 8-token segments leave each call a partial chunk, on the closed forms
  timeout 150 python3 -m bench.wavefront_check --segment 64 --tokens 256 > "$OUT/wavefront_check_kernels.txt" 2>&1
  echo "wavefront_check (kernels) rc=$?"
  for st in 0 1; do
    NESTLEARN_WAVEFRONT_STREAMS=$st timeout $(((limit - 180) / 2)) python3 -m bench.wavefront models/hope.yaml \
      --shapes 8x2048 --segments 512 > "$OUT/wavefront_hope_streams$st.txt" 2>&1; echo "wavefront streams=$st rc=$?"
  done
  tail -14 "$OUT/wavefront_check.txt" "$OUT/wavefront_check_kernels.txt"; tail -4 "$OUT/wavefront_hope_streams0.txt" "$OUT/wavefront_hope_streams1.txt"
  ;;
tiles)
  # the CMS kernels' tilings at c1's shape, forward + backward, eager (--no-graph: the tile's own
  # cost); the default first, then more programs (hidden tile 32) and more warps
  for t in "" "--block-h 32 --bwd-block-h 32" "--num-warps 8 --bwd-num-warps 8" "--block-h 32 --bwd-block-h 32 --num-warps 8"; do
    echo "== tiles: ${t:-default}"; timeout 80 python3 -m bench.triton_cms --no-graph $t 2>&1 | grep -v "^$" | tail -9
  done
  ;;
kernels)
  # most decisive first: the CMS kernels' training step (opt-in until timed), the DGD backward's
  # two carry variants (registers, the default, against memory), the generators' kernel, then
  # the GPU tests
  # SHORT=1 (a lease of about 300 s): the generators' kernel, its GPU test and the CMS bench only
  if [ -z "${SHORT:-}" ]; then
    timeout 100 python3 -m bench.triton_cms > "$OUT/triton_cms.txt" 2>&1; echo "triton_cms rc=$?"
    timeout 80 python3 -m bench.triton_cms --bwd-block-d 32 --bwd-num-warps 8 > "$OUT/triton_cms_bd32.txt" 2>&1
    echo "triton_cms bd32 rc=$?"
    timeout 90 python3 -m bench.triton_dgd --train --no-graph > "$OUT/triton_dgd_train.txt" 2>&1
    echo "triton_dgd train rc=$?"
    NESTLEARN_DGD_BWD_CARRY=memory timeout 90 python3 -m bench.triton_dgd --train --no-graph \
      > "$OUT/triton_dgd_train_carry_mem.txt" 2>&1; echo "triton_dgd train carry=memory rc=$?"
  fi
  timeout 90 python3 -m bench.triton_gen > "$OUT/triton_gen.txt" 2>&1; echo "triton_gen rc=$?"
  if [ -n "${SHORT:-}" ]; then
    timeout 60 python3 -m pytest -q -x -m gpu tests/test_triton_gen.py -p no:cacheprovider > "$OUT/gpu_tests.txt" 2>&1
    echo "gpu tests (generators) rc=$?"
    timeout 100 python3 -m bench.triton_cms > "$OUT/triton_cms.txt" 2>&1; echo "triton_cms rc=$?"
    for f in triton_gen gpu_tests triton_cms; do echo "== $f"; tail -12 "$OUT/$f.txt"; done
    exit 0
  fi
  timeout 100 python3 -m pytest -q -x -m gpu tests/test_triton_gen.py tests/test_triton_cms.py tests/test_triton_dgd.py \
    tests/test_wavefront.py -p no:cacheprovider > "$OUT/gpu_tests.txt" 2>&1; echo "gpu tests rc=$?"
  for f in triton_cms triton_cms_bd32 triton_dgd_train triton_dgd_train_carry_mem triton_gen gpu_tests; do
    echo "== $f"; tail -12 "$OUT/$f.txt"; done
  ;;
esac
