source .gpu/setup.sh
timeout 420 python3 -m bench --budget 2 --skip-after 30 --only titans-memory --out $OUT/run8_titans.json 2>&1 | tee $OUT/run8_titans.log | grep -v "^\s*$" | tail -40
timeout 200 python3 -m bench.breakdown --seq 2048 --reps 2 2>&1 | tee $OUT/run8_breakdown_2048.log
