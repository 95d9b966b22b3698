#!/bin/bash
# More pairs of ingest alone (durable's CPU per webhook came out higher for "new" in
# ab.sh's four pairs). Same builds and arguments as ab.sh. BUILDS="new nostat": "new" against
# "nostat", built from new with the stat before each journal append taken out.
B=/work/bin/s45ab/profile-state-bench
for pair in "$@"; do
  for build in ${ORDER:-${BUILDS:-base new}}; do
    echo "== ingest $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B ingest --duration 8s --server-bin /work/bin/s45ab/$build --no-baseline --rounds 1 \
      --json ingest-$build-$pair.json > ingest-$build-$pair.txt 2>&1
    grep -E 'ours|CPU' ingest-$build-$pair.txt | head -6
  done
done
