source .gpu/setup.sh
timeout 575 python3 -m bench --budget 3 --skip-after 1000 --graph-warmup 1 --seqs 65536 --only hope:nestlearn-compiled-step+graph,hope-c64:nestlearn-compiled-step+graph,gpt:nestlearn,gpt:nestlearn+graph,sdpa:torch --out $OUT/run8_hope64k.json 2>&1 | tee $OUT/run8_hope64k.log | grep -v "^\s*$" | tail -22
