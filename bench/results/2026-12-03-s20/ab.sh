#!/bin/bash
# ab.sh N: alternate base / linger cluster rounds with the new bench binary
for i in $(seq 1 ${1:-2}); do
  for t in base linger; do
    echo "== $t $i $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    /work/bin/bench20 cluster --rounds 1 --duration 8s --server-bin /work/bin/s20-$t --json ab-$t-$i.json 2>&1 | grep -E "cluster ingest|breakdown|lag"
  done
done
echo "done $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
