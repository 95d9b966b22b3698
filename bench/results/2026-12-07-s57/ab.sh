#!/bin/bash
# Session 57, quiet-box A/B (no builds or tests running), alternating which build runs first.
# base: /work/bin/s56/final (d128d15, session 56's last build; docs and tests only after it).
# new: /work/bin/s57/r2 (78476c5's code): the read sides of gRPC and webhook connections
# look at frame headers (ignored frames), the compact form written in one pass (off the
# measured paths: only for bodies whose raw bytes match no secret).

B=/work/bin/s53/bench
bin() { case $1 in base) echo /work/bin/s56/final;; new) echo /work/bin/s57/r2;; esac; }
run() { # run KIND PAIR ARGS...
  kind=$1 pair=$2; shift 2
  order="base new"; [ $((pair % 2)) = 0 ] && order="new base"
  for build in $order; do
    echo "== $kind $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B "$@" --server-bin $(bin $build) --json $kind-$build-$pair.json > $kind-$build-$pair.txt 2>&1
    grep -E 'delivery latency p(50|99) \(answer|server CPU per delivery  |CPU µs per webhook|webhooks/s|calls/s|vs ' $kind-$build-$pair.txt | head -12
  done
}
for pair in 1 2 3; do run ingest $pair ingest --rounds 1 --duration 5s; done
for pair in 1 2 3; do run get $pair get --rounds 1 --duration 5s; done
for pair in 1 2; do run fanout $pair fanout --subscribers 1000 --no-baseline --rounds 1 --duration 5s; done
for pair in 1 2; do run fanout100 $pair fanout --subscribers 1000 --streams-per-connection 100 --no-baseline --rounds 1 --duration 5s; done
echo "== done $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
