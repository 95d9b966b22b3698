#!/bin/bash
# Session 50: this session's change on a measured path (an answer's first message: which
# budget a call to `path` draws on, and whether its connection's client has read, two atomic
# loads) against session 49's end ("base", 61a8874) and main ("new"). Alternated, one round
# each, ours only: GetProfile (one small first message per call), ListProfiles (pages), and
# the 1,000 x 100 fan-out (each chunk handed over gives back two more counts, of zero bytes).
B=/work/bin/s49/bench-ref
bin() { case $1 in base) echo /work/bin/s50/base;; new) echo /work/bin/s50/final;; esac; }
for pair in "$@"; do
  for build in ${ORDER:-base new}; do
    for scenario in get list fanout; do
      echo "== $scenario $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
      args=(); [ $scenario = fanout ] && args=(--subscribers 1000 --streams-per-connection 100)
      $B $scenario "${args[@]}" --duration 8s --server-bin $(bin $build) --no-baseline \
        --rounds 1 --json $scenario-$build-$pair.json > $scenario-$build-$pair.txt 2>&1
      grep -E "^$scenario( S=[0-9]+)? +(GetProfile calls|ListProfiles|server CPU|delivery lat)" \
        $scenario-$build-$pair.txt | grep -vE "floor|alone|sent|max" | head -4
    done
  done
done
