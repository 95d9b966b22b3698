#!/bin/bash
# Alternated fanout runs: main with tokio's default workers vs TOKIO_WORKER_THREADS=1 (session 22).
OUT=${OUT:-/tmp/s22/ab1w}; mkdir -p $OUT
for pair in 1 2; do
  for v in default one; do
    env=(); [ $v = one ] && env=(--server-env TOKIO_WORKER_THREADS=1)
    echo "== $v pair $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    /work/bin/s22/bench fanout --subscribers 1000 --rounds 3 --duration 6s --server-bin /work/bin/s22/main "${env[@]}" --json $OUT/$v-$pair.json > $OUT/$v-$pair.out 2>&1
  done
done
echo "== end $(date -u +%T)"
