source .gpu/setup.sh
timeout 570 python3 -m bench --budget 3 --skip-after 400 --graph-warmup 1 --seqs 2048,16384 --only hope:nestlearn+graph,hope:nestlearn-compiled-step+graph,hope-c64:nestlearn+graph,hope-c64:nestlearn-compiled-step+graph,gpt:nestlearn,gpt:nestlearn+graph,hope:kmccleary-hope-3cms --out $OUT/run8_hope.json 2>&1 | tee $OUT/run8_hope.log | grep -v "^\s*$" | tail -30
