#!/bin/bash
# Session 46: "new5" (ec9793d, a connection weighed by its share of the server's budget: one
# more count on a unary answer's take and on each write that gives back a first message's
# bytes) against "new4" (3a8c2c5). Alternated, one round each, ours only.
B=/work/bin/s46/bench
for pair in "$@"; do
  for build in ${ORDER:-new4 new5}; do
    echo "== get $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B get --duration 8s --server-bin /work/bin/s46/$build --no-baseline --rounds 1 \
      --json get-$build-$pair.json > get-$build-$pair.txt 2>&1
    grep -E 'calls/s  |CPU' get-$build-$pair.txt | head -2
    echo "== fanout100 $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B fanout --subscribers 1000 --streams-per-connection 100 --duration 8s \
      --server-bin /work/bin/s46/$build --no-baseline --rounds 1 \
      --json fanout100-$build-$pair.json > fanout100-$build-$pair.txt 2>&1
    grep -E 'p50 \(|p99 \(' fanout100-$build-$pair.txt | head -2
  done
done
