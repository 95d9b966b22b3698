#!/bin/bash
# Session 60's changes, base (session 59's end, /work/bin/s59/final2, code of 50bc16e) against
# final (/work/bin/s60/final): alternated pairs, nothing else on the box.
# 1. stall3.py: a delivery signed over its compact form (sent pretty-printed) every 20 ms while
#    N senders post refused 64 KiB bodies nested 9 deep, each waiting for its answer, for 15 s,
#    at --max-in-flight-webhooks 16 (a queue of 8 such checks).
# 2. stall2.py: a delivery signed over its bytes every 20 ms under the same flood at default limits.
# 3. The signed path alone: bench ingest (--ephemeral and durable), one round of 8 s each.
PY=/work/adv30/venv/bin/python
bin() { case $1 in base) echo /work/bin/s59/final2;; final) echo /work/bin/s60/final;; esac; }
field() { python3 -c "import json;print(json.load(open('/work/adv35/srv_ab60.json'))['$1'])"; }
for pair in 1 2; do
  order="base final"; [ $pair = 2 ] && order="final base"
  for build in $order; do
    BIN=$(bin $build) $PY /work/adv35/srv_up.py ab60 --max-in-flight-webhooks 16 > /dev/null
    echo "== stall3 $build $pair N=16 deep9 64 KiB $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg): $($PY stall3.py ab60 16 15 /work/s59/deep9-1e20.json)"
    kill $(field pid); sleep 1
  done
  for build in $order; do
    BIN=$(bin $build) $PY /work/adv35/srv_up.py ab60 > /dev/null
    echo "== stall2 $build $pair N=16 deep9 64 KiB $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg): $($PY ../2026-12-07-s59/stall2.py ab60 16 15 /work/s59/deep9-1e20.json)"
    kill $(field pid); sleep 1
  done
done
B=/work/bin/s60/bench
for pair in 1 2 3 4; do
  order="base final"; [ $((pair % 2)) = 0 ] && order="final base"
  for build in $order; do
    echo "== ingest $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B ingest --no-baseline --rounds 1 --duration 8s --server-bin $(bin $build) --json ingest-$build-$pair.json > ingest-$build-$pair.txt 2>&1
    grep -E '^ingest +(ours|ours-durable):' ingest-$build-$pair.txt
  done
done
echo "== done $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
