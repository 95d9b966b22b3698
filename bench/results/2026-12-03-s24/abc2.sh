#!/bin/bash
# abc2.sh TAG: one cluster pair, main (A) first then HEAD (B)
A=/work/bin/s24/profile-state; B=/work/bin/s24/new/profile-state
for pair in "$A main" "$B new"; do
  set -- $pair
  echo "== $2 $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
  timeout 900 /work/bin/s24/new/profile-state-bench --server-bin $1 cluster --rounds 1 --duration 8s --json /tmp/s24/r/cluster2-$2.json 2>&1 | grep -E "req/s|lag|CPU per|webhooks per"
done
