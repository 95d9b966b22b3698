#!/bin/bash
# Session 59, quiet-box A/B (no builds or tests running), alternating which build runs first.
# base: /work/bin/s59/base (a607efd, session 58's last commit).
# new: /work/bin/s59/new ("v1", the first try, not kept: spawn_blocking, one at a time behind a
# semaphore, ordinary priority): a signature check over
# a body's compact form runs off the ingest thread, one at a time.
# 1. The signed path, nothing else: bench ingest (--ephemeral and durable), one round each.
# 2. The signed path under a flood: the service started by /work/adv35/srv_up.py (durable,
#    secret test-secret), flood.py posting 64 KiB bodies nested 9 deep of 1e20 with a wrong
#    signature from 4 connections for 30 s, and bench ingest against the service meanwhile.
B=/work/bin/s53/bench
PY=/work/adv30/venv/bin/python
bin() { case $1 in base) echo /work/bin/s59/base;; new) echo /work/bin/s59/new;; esac; }
field() { python3 -c "import json;print(json.load(open('/work/adv35/srv_ab59.json'))['$1'])"; }
cpu() { awk '{print ($14+$15)/100}' /proc/$1/stat; }
for pair in 1 2 3; do
  order="base new"; [ $((pair % 2)) = 0 ] && order="new base"
  for build in $order; do
    echo "== ingest $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B ingest --no-baseline --rounds 1 --duration 5s --server-bin $(bin $build) --json ingest-$build-$pair.json > ingest-$build-$pair.txt 2>&1
    grep -E '^ingest +(ours|ours-durable):' ingest-$build-$pair.txt
  done
  for build in $order; do
    echo "== flooded $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    BIN=$(bin $build) $PY /work/adv35/srv_up.py ab59 > /dev/null
    pid=$(field pid)
    $PY /work/main/bench/results/2026-12-07-s59/flood.py $(field wp) 4 30 deep9-1e20 > flood-$build-$pair.txt &
    flood=$!
    before=$(cpu $pid)
    $B ingest --webhook 127.0.0.1:$(field wp) --grpc 127.0.0.1:$(field gp) --secret test-secret --no-baseline --rounds 1 --duration 5s --json flooded-$build-$pair.json > flooded-$build-$pair.txt 2>&1
    grep -E '^ingest +ours:' flooded-$build-$pair.txt
    wait $flood
    echo "server CPU $(python3 -c "print(round($(cpu $pid) - $before, 1))") s; $(cat flood-$build-$pair.txt)"
    kill $pid; sleep 1
  done
done
echo "== done $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
