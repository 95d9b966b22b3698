#!/bin/bash
# Session 46, second version ("new2"): the same count, with fewer atomic operations per
# delivery (a body adds to what it holds instead of taking a new reference to a budget's
# counts each time; no count of bytes ever taken) and the waits' wake-ups in the budget.
# Against the session's start ("base"). Alternated, one round each, ours only.
B=/work/bin/s46/bench
for pair in "$@"; do
  for build in ${ORDER:-base new2}; do
    echo "== fanout100 $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B fanout --subscribers 1000 --streams-per-connection 100 --duration 8s \
      --server-bin /work/bin/s46/$build --no-baseline --rounds 1 \
      --json fanout100-$build-$pair.json > fanout100-$build-$pair.txt 2>&1
    grep -E 'p50 \(|p99 \(' fanout100-$build-$pair.txt | head -3
    echo "== fanout $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B fanout --subscribers 1000 --duration 8s --server-bin /work/bin/s46/$build --no-baseline \
      --rounds 1 --json fanout-$build-$pair.json > fanout-$build-$pair.txt 2>&1
    grep -E 'ingest into|p50 \(|p99 \(' fanout-$build-$pair.txt | head -5
  done
done
