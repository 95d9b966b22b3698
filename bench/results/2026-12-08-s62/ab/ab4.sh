#!/bin/bash
# Session 62, fourth A/B (new = 42b5436, the session's last build): fan-out 100 x 100, four pairs of 10 s, alternating.
B=/work/bin/s62/bench
bin() { case $1 in base) echo /work/bin/s62/head;; new) echo /work/bin/s62/last;; esac; }
run() { # run KIND PAIR ARGS...
  kind=$1 pair=$2; shift 2
  order="base new"; [ $((pair % 2)) = 0 ] && order="new base"
  for build in $order; do
    echo "== $kind $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B "$@" --server-bin $(bin $build) --json $kind-$build-$pair.json > $kind-$build-$pair.txt 2>&1
    grep -E 'delivery latency p(50|99) \(answer|server CPU per delivery  |req/s \(--ephemeral\)|server CPU per req \(--' $kind-$build-$pair.txt
  done
}
for pair in 10 11 12 13; do run fanout100 $pair fanout --subscribers 100 --streams-per-connection 100 --no-baseline --rounds 1 --duration 10s; done
echo "== done $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
