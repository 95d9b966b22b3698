#!/bin/bash
# GetProfile alone, more alternated pairs (ab.sh had one pair far apart).
B=/work/bin/s41/bench
for pair in "$@"; do
  for build in ${ORDER:-base new}; do
    echo "== get $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B get --server-bin /work/bin/s41/$build --no-baseline --rounds 1 --duration 8s \
      --json get-$build-$pair.json > get-$build-$pair.txt 2>&1
    grep -E 'ours:' get-$build-$pair.txt
  done
done
