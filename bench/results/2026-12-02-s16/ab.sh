#!/bin/bash
# ab.sh SCENARIO PAIRS BIN_A BIN_B [extra bench args]: alternates A and B, JSON per run.
set -u
sc=$1; pairs=$2; a=$3; b=$4; shift 4
out=/work/notes/ab/$sc-$(date +%H%M)
mkdir -p $out
for i in $(seq 1 $pairs); do
  for side in A B; do
    bin=$a; [ $side = B ] && bin=$b
    echo "$(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg) $sc $side$i" >> $out/log
    /work/bin/bench --server-bin $bin --rounds 1 --json $out/$side$i.json "$@" $sc > $out/$side$i.txt 2>&1
  done
done
echo done >> $out/log
echo $out
