#!/bin/bash
# sum.sh DIR: p50, p99, server CPU per delivery, ingest ratio per run
for f in $1/*.txt; do
  printf "%-28s p50 %s p99 %s cpu %s ratio %s\n" $(basename $f) \
   "$(grep -o 'latency p50 (answer -> receipt) *ms *[0-9.]*' $f | awk '{print $NF}')" \
   "$(grep -o 'latency p99 (answer -> receipt) *ms *[0-9.]*' $f | awk '{print $NF}')" \
   "$(grep -o 'server CPU per delivery  *µs *[0-9.]*' $f | awk '{print $NF}')" \
   "$(grep 'ingest req/s with subscribers' $f | awk '{for(i=1;i<=NF;i++) if ($i ~ /^0\.[0-9]+$/ || $i ~ /^1\.[0-9]+$/) print $i}' | head -1)"
done
