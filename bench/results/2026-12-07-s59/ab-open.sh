#!/bin/bash
# Signed deliveries at a fixed rate (open loop, 2,000/s) while flood.py posts refused 64 KiB
# bodies nested 9 deep of 1e20 from N connections; base vs new, alternating.
B=/work/bin/s53/bench
PY=/work/adv30/venv/bin/python
N=${N:-64}
bin() { case $1 in base) echo /work/bin/s59/base;; new) echo /work/bin/s59/new;; v2) echo /work/bin/s59/v2;; v3) echo /work/bin/s59/v3;; esac; }
field() { python3 -c "import json;print(json.load(open('/work/adv35/srv_ab59.json'))['$1'])"; }
cpu() { awk '{print ($14+$15)/100}' /proc/$1/stat; }
for pair in ${PAIRS:-1 2}; do
  order="${ORDER:-base new}"; [ $((pair % 2)) = 0 ] && order="$(echo $order | tr ' ' '\n' | tac | tr '\n' ' ')"
  for build in $order; do
    echo "== open $build $pair N=$N $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    BIN=$(bin $build) $PY /work/adv35/srv_up.py ab59 > /dev/null
    pid=$(field pid)
    $PY /work/main/bench/results/2026-12-07-s59/flood.py $(field wp) $N 25 deep9-1e20 > open-flood-$build-$pair-$N.txt &
    flood=$!
    before=$(cpu $pid)
    $B ingest --webhook 127.0.0.1:$(field wp) --grpc 127.0.0.1:$(field gp) --secret test-secret --no-baseline --rounds 1 --duration 5s --rate 2000 --json open-$build-$pair-$N.json > open-$build-$pair-$N.txt 2>&1
    grep -E '^ingest +ours:|latency (p99|max)' open-$build-$pair-$N.txt
    wait $flood
    echo "server CPU $(python3 -c "print(round($(cpu $pid) - $before, 1))") s; $(cat open-flood-$build-$pair-$N.txt)"
    kill $pid; sleep 1
  done
done
echo "== done $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
