#!/bin/bash
# Session 43: the feeds' wake spacing at 2 ms ("w2ms") against 0.5 ms ("base", 167f2f3).
# Alternated, one round each, ours only. Arguments: the pairs' numbers; ORDER="w2ms base"
# runs a pair the other way round. 1,000 subscribers, a connection each.
B=/work/bin/s43/profile-state-bench
for pair in "$@"; do
  for build in ${ORDER:-base w2ms}; do
    echo "== $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B fanout --subscribers 1000 --server-bin /work/bin/s43/$build --no-baseline \
      --rounds 1 --duration 12s --json each1-$build-$pair.json > each1-$build-$pair.txt 2>&1
    grep -E 'p50 \(|p99 \(|ingest req|subscribers add' each1-$build-$pair.txt | awk '{$1=$1};1' | cut -c1-120
  done
done
