#!/bin/bash
# Session 62, quiet-box A/B (no builds or tests running), alternating which build runs first.
# base: /work/bin/s62/head (8096997, session 61's end).
# new: /work/bin/s62/new (the session's fixes: an outbox tells what it holds past its bound;
# make_room on a full disk; records since the newest snapshot; start-up past a journal's end).
B=/work/bin/s62/bench
bin() { case $1 in base) echo /work/bin/s62/head;; new) echo /work/bin/s62/new;; esac; }
run() { # run KIND PAIR ARGS...
  kind=$1 pair=$2; shift 2
  order="base new"; [ $((pair % 2)) = 0 ] && order="new base"
  for build in $order; do
    echo "== $kind $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B "$@" --server-bin $(bin $build) --json $kind-$build-$pair.json > $kind-$build-$pair.txt 2>&1
    grep -E 'delivery latency p(50|99) \(answer|server CPU per delivery  |req/s \(--ephemeral\)|req/s durable vs|server CPU per req' $kind-$build-$pair.txt
  done
}
for pair in 1 2; do run fanout100 $pair fanout --subscribers 100,1000 --streams-per-connection 100 --no-baseline --rounds 1 --duration 5s; done
for pair in 1 2; do run ingest $pair ingest --no-baseline --rounds 1 --duration 5s; done
echo "== done $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
