#!/bin/bash
# ab.sh's ingest part again (pairs 5-8), to tell the durable row's spread from a difference.
bin() { case $1 in base) echo /work/bin/s59/final2;; final) echo /work/bin/s60/final;; esac; }
B=/work/bin/s60/bench
for pair in 5 6 7 8; do
  order="base final"; [ $((pair % 2)) = 0 ] && order="final base"
  for build in $order; do
    echo "== ingest $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B ingest --no-baseline --rounds 1 --duration 8s --server-bin $(bin $build) --json ingest-$build-$pair.json > ingest-$build-$pair.txt 2>&1
    grep -E '^ingest +(ours|ours-durable):' ingest-$build-$pair.txt
  done
done
echo "== done $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
