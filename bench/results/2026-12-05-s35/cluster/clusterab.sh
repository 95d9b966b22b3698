#!/bin/bash
# Cluster A/B: session start (3852753) against the session's end, alternated, one round each.
B=/work/bin/s35/bench3
cd /work/notes/s35 && mkdir -p cluster
for pair in 1 2; do
  for build in head after; do
    echo "== $build pair $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)" >> cluster/times.txt
    $B cluster --server-bin /work/bin/s35/$build --rounds 1 --duration 8s --json cluster/$build-$pair.json > cluster/$build-$pair.txt 2>&1
  done
done
echo "done $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)" >> cluster/times.txt
