#!/bin/bash
# Ingest impact of 1000 customer-filtered subscribers, ours vs the no-op servers (session 22).
B=/work/main/target/release/profile-state-bench
OUT=${OUT:-/tmp/s22}
for spc in 1 100; do
  echo "== spc $spc $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
  $B fanout --subscribers 1000 --streams-per-connection $spc --rounds 5 --duration 6s --json $OUT/impact-spc$spc.json > $OUT/impact-spc$spc.out 2>&1
  grep -E 'with subscribers|subscribers add|deliveries/s during' $OUT/impact-spc$spc.out
done
echo "== end $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
