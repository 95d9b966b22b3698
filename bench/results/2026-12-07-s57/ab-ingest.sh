#!/bin/bash
# Session 57: more ingest pairs (ours only), alternating; same builds as ab.sh.
B=/work/bin/s53/bench
bin() { case $1 in base) echo /work/bin/s56/final;; new) echo /work/bin/s57/r2;; esac; }
for pair in 4 5 6 7; do
  order="base new"; [ $((pair % 2)) = 0 ] && order="new base"
  for build in $order; do
    echo "== ingest $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B ingest --no-baseline --rounds 1 --duration 5s --server-bin $(bin $build) --json ingest-$build-$pair.json > ingest-$build-$pair.txt 2>&1
    grep -E '^ingest +(ours|ours-durable):|server CPU per req' ingest-$build-$pair.txt
  done
done
echo "== done $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
