#!/bin/bash
# abf.sh N label args...: N alternated pairs, main (f287179) vs the feed run in the stream (feed)
N=$1; L=$2; shift 2
A=/work/bin/s25/new/profile-state; B=/work/bin/s25/feed/profile-state
for i in $(seq 1 $N); do
  if [ $((i % 2)) = 1 ]; then order="$B $A"; else order="$A $B"; fi
  for bin in $order; do
    t=$( [ $bin = $A ] && echo main || echo feed )
    echo "== $t pair $i $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    timeout 900 /work/bin/s25/profile-state-bench --server-bin $bin "$@" --json /work/s25/r/$L-$t-$i.json > /work/s25/r/$L-$t-$i.out 2>&1
    grep -E 'latency p50 \(|latency p99 \(|CPU per delivery|ingest req/s with subscribers \(|subscribers add' /work/s25/r/$L-$t-$i.out | cut -c1-140
  done
done
echo "== end $(date -u +%T)"
