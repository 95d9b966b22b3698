#!/bin/bash
# Alternated fanout runs of two service binaries (session 22): impact rows and latency rows.
OUT=${OUT:-/tmp/s22/ab}; mkdir -p $OUT
ARGS=${ARGS:---subscribers 1000 --rounds 3 --duration 6s}
for pair in 1 2; do
  for b in main dispatch; do
    echo "== $b pair $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    /work/bin/s22/bench fanout $ARGS --server-bin /work/bin/s22/$b --json $OUT/$b-$pair.json > $OUT/$b-$pair.out 2>&1
    grep -E 'with subscribers \(|subscribers add|p99.*ms|p50.*ms' $OUT/$b-$pair.out | grep -v '^note' | cut -c1-150
  done
done
echo "== end $(date -u +%T)"
