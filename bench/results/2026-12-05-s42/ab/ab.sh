#!/bin/bash
# Session 42: routed feeds' wakes deferred while they come closer than 0.5 ms ("wakes")
# against the session's start ("base", ee3dcec; nothing else changed on these paths).
# Alternated, one round each, ours only. Arguments: the pairs' numbers. ORDER="wakes base"
# runs each pair the other way round. SCEN selects: each1 (1,000 subscribers, a connection
# each: ingest with and without them, and latency) or x100 (1,000 subscribers, 100 streams
# per connection: latency).
B=/work/bin/s42/profile-state-bench
for pair in "$@"; do
  for build in ${ORDER:-base wakes}; do
    for scenario in ${SCEN:-each1 x100}; do
      extra=""
      [[ $scenario == x100 ]] && extra="--streams-per-connection 100"
      echo "== $scenario $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
      $B fanout --subscribers 1000 $extra --server-bin /work/bin/s42/$build --no-baseline \
        --rounds 1 --duration 12s --json $scenario-$build-$pair.json > $scenario-$build-$pair.txt 2>&1
      grep -E 'ours|p50|p99|ingest' $scenario-$build-$pair.txt | head -8
    done
  done
done
