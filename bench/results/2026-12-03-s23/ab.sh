#!/bin/bash
# ab.sh N args...: N alternated pairs spread(2) vs default, same binary
N=$1; shift
for i in $(seq 1 $N); do
  if [ $((i % 2)) = 1 ]; then order="2 0"; else order="0 2"; fi
  for t in $order; do
    echo "== threads=$t pair $i $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    timeout 900 /work/bin/s23/profile-state-bench --server-bin /work/bin/s23/spread/profile-state --server-env PROFILE_STATE_GRPC_THREADS=$t "$@" --json /tmp/s23/ab-$t-$i-$(date +%s).json 2>&1 | grep -vE "^note|^fanout +(ours|baseline)" 
  done
done
