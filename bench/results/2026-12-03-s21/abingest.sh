#!/bin/bash
# abingest.sh A B N: N alternated pairs of `ingest --rounds 1 --duration 8s`, A then B then B then A...
A=$1; B=$2; N=${3:-3}; OUT=${OUT:-/work/notes/s21/ab}; mkdir -p $OUT
for i in $(seq 1 $N); do
  if [ $((i % 2)) = 1 ]; then order="$A $B"; else order="$B $A"; fi
  for bin in $order; do
    t=$(basename $bin)
    echo "== $t $i $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    /work/bin/bench21b ingest --rounds 1 --duration 8s --server-bin $bin --json $OUT/$t-$i.json 2>&1 | grep -E "^ingest +(req/s|server CPU per req)" 
  done
done
