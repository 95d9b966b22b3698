#!/bin/bash
# Session 47: the session's end ("new", 7c8d306: answer bodies generic over the inner body,
# the answer budgets' 10 s cut and chunk sizing, 16 KiB backup pieces) against its start
# ("base", 53a2824). Alternated, one round each, ours only.
B=/work/bin/s47/bench
bin() { case $1 in base) echo /work/bin/s47/head;; new) echo /work/bin/s47/fix2;; esac; }
for pair in "$@"; do
  for build in ${ORDER:-base new}; do
    echo "== fanout100 $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B fanout --subscribers 1000 --streams-per-connection 100 --duration 8s \
      --server-bin $(bin $build) --no-baseline --rounds 1 \
      --json fanout100-$build-$pair.json > fanout100-$build-$pair.txt 2>&1
    grep -E 'p50 \(answer|p99 \(answer|server CPU per delivery  ' fanout100-$build-$pair.txt | head -3
    echo "== fanout $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B fanout --subscribers 1000 --duration 8s --server-bin $(bin $build) --no-baseline \
      --rounds 1 --json fanout-$build-$pair.json > fanout-$build-$pair.txt 2>&1
    grep -E 'ingest req/s with|p50 \(answer|p99 \(answer' fanout-$build-$pair.txt | head -5
    echo "== get $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B get --duration 8s --server-bin $(bin $build) --no-baseline --rounds 1 \
      --json get-$build-$pair.json > get-$build-$pair.txt 2>&1
    grep -E 'calls|CPU' get-$build-$pair.txt | head -4
  done
done
