#!/bin/bash
# Session 56, quiet-box A/B (no builds or tests running), alternating which build runs first.
# base: /work/bin/s55/head (0be18bc, session 55 end; docs only after it).
# new: /work/bin/s56/final (d128d15): the frame turn (watch streams, a connection budget cap), the session end.

B=/work/bin/s53/bench
bin() { case $1 in base) echo /work/bin/s55/head;; new) echo /work/bin/s56/final;; esac; }
run() { # run KIND PAIR ARGS...
  kind=$1 pair=$2; shift 2
  order="base new"; [ $((pair % 2)) = 0 ] && order="new base"
  for build in $order; do
    echo "== $kind $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B "$@" --server-bin $(bin $build) --json $kind-$build-$pair.json > $kind-$build-$pair.txt 2>&1
    grep -E 'delivery latency p(50|99) \(answer|server CPU per delivery  |^cluster +ingest req/s|replication lag p99|CPU µs per webhook' $kind-$build-$pair.txt
  done
}
for pair in 1 2; do run fanout $pair fanout --subscribers 1000 --no-baseline --rounds 1 --duration 5s; done
for pair in 1 2; do run fanout100 $pair fanout --subscribers 1000 --streams-per-connection 100 --no-baseline --rounds 1 --duration 5s; done
echo "== done $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
