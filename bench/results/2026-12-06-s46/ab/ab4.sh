#!/bin/bash
# Session 46, the kept version ("new4", 3a8c2c5): a stream's later messages draw on their
# connection's budget only, with a credit of 4 KiB ahead while it is half free. Against the
# session's start ("base"). Alternated, one round each, ours only.
B=/work/bin/s46/bench
for pair in "$@"; do
  for build in ${ORDER:-base new4}; do
    echo "== fanout100 $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B fanout --subscribers 1000 --streams-per-connection 100 --duration 8s \
      --server-bin /work/bin/s46/$build --no-baseline --rounds 1 \
      --json fanout100-$build-$pair.json > fanout100-$build-$pair.txt 2>&1
    grep -E 'p50 \(|p99 \(' fanout100-$build-$pair.txt | head -3
    echo "== fanout $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B fanout --subscribers 1000 --duration 8s --server-bin /work/bin/s46/$build --no-baseline \
      --rounds 1 --json fanout-$build-$pair.json > fanout-$build-$pair.txt 2>&1
    grep -E 'ingest into|p50 \(|p99 \(' fanout-$build-$pair.txt | head -5
    echo "== get $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B get --duration 8s --server-bin /work/bin/s46/$build --no-baseline --rounds 1 \
      --json get-$build-$pair.json > get-$build-$pair.txt 2>&1
    grep -E 'calls|CPU' get-$build-$pair.txt | head -4
  done
done
