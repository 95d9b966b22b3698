#!/bin/bash
# GetProfile A/B: getab.sh OUTDIR ROUNDS BIN_A BIN_B
out=$1; rounds=$2; a=$3; b=$4
mkdir -p $out
for r in $(seq 1 $rounds); do
  for bin in $a $b; do
    name=$(basename $bin)
    echo "== round $r $name $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)" >> $out/log
    /work/bin/s34/bench get --server-bin $bin --rounds 1 --duration 6s --customers 20000 > $out/$r-$name.txt 2>&1
    grep -E "^get " $out/$r-$name.txt | head -4 >> $out/log
  done
done
echo done >> $out/log
