#!/bin/bash
# A/B alternation: ab.sh OUTDIR ROUNDS BIN_A BIN_B [extra bench args]
out=$1; rounds=$2; a=$3; b=$4; shift 4
mkdir -p $out
for r in $(seq 1 $rounds); do
  for bin in $a $b; do
    name=$(basename $bin)
    echo "== round $r $name $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)" >> $out/log
    /work/bin/s33/bench-peers fanout --server-bin $bin --no-baseline --rounds 1 --duration 8s "$@" > $out/$r-$name.txt 2>&1
    grep -E "S=1000 \(ours\)|ingest into ours" $out/$r-$name.txt >> $out/log
  done
done
echo done >> $out/log
