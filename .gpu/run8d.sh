source .gpu/setup.sh
timeout 560 python3 -m bench --budget 3 --skip-after 1000 --graph-warmup 1 --seqs 65536 --only hope:nestlearn-compiled-step+graph --out $OUT/run8_hope64k_b.json 2>&1 | tee $OUT/run8_hope64k_b.log | grep -v "^\s*$" | tail -8
