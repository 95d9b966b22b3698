#!/bin/bash
# Session 47: memory per idle watch stream (the answer bodies are generic now: one box fewer,
# a larger body), base (53a2824) against new (7c8d306), one round each.
B=/work/bin/s47/bench
for build in base new; do
  case $build in base) bin=/work/bin/s47/head;; new) bin=/work/bin/s47/fix2;; esac
  echo "== scale $build $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
  $B scale --server-bin $bin --rounds 1 --json scale-$build.json > scale-$build.txt 2>&1
  grep -E 'RSS|p99' scale-$build.txt | head -4
done
