#!/bin/bash
# BatchGetProfiles alone, more alternated pairs (ab.sh's four had new below base in each).
B=/work/bin/s41/bench
for pair in "$@"; do
  for build in ${ORDER:-base new}; do
    echo "== batch-get $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B batch-get --server-bin /work/bin/s41/$build --no-baseline --rounds 1 --duration 8s \
      --json batch-get-$build-$pair.json > batch-get-$build-$pair.txt 2>&1
    grep -E 'ours:' batch-get-$build-$pair.txt
  done
done
