#!/bin/bash
# Session 41 before/after on the read paths: the session's first build ("base", b880a12) against
# its end ("new"), whose ListProfiles and BatchGetProfiles read the store revision first and
# check each profile read against it (Store::as_of), and whose GetProfile reads the revision
# first. Alternated, one round each, ours only, nothing else on the box. Arguments: the pairs'
# numbers. ORDER="new base" runs each pair the other way round.
B=/work/bin/s41/bench
for pair in "$@"; do
  for build in ${ORDER:-base new}; do
    for scenario in get batch-get list; do
      extra=""
      [[ $scenario == list ]] && extra="--customers 100000"
      echo "== $scenario $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
      $B $scenario --server-bin /work/bin/s41/$build --no-baseline --rounds 1 --duration 8s $extra \
        --json $scenario-$build-$pair.json > $scenario-$build-$pair.txt 2>&1
      grep -E 'ours' $scenario-$build-$pair.txt | head -3
    done
  done
done
echo "== done $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
