#!/bin/bash
# ab.sh N label args...: N alternated pairs of main at the session's start (A) vs this session's HEAD (B)
N=$1; L=$2; shift 2
A=/work/bin/s24/profile-state; B=/work/bin/s24/new/profile-state
for i in $(seq 1 $N); do
  if [ $((i % 2)) = 1 ]; then order="$B $A"; else order="$A $B"; fi
  for bin in $order; do
    t=$( [ $bin = $A ] && echo main || echo new )
    echo "== $t pair $i $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    timeout 900 /work/bin/s24/new/profile-state-bench --server-bin $bin "$@" --json /tmp/s24/r/$L-$t-$i.json 2>&1 | grep -E "req/s|CPU per"
  done
done
