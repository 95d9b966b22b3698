#!/bin/bash
# Signed deliveries at a fixed rate (open loop, 2,000/s) while h2load (HTTP/1.1, C, as fast as
# the server answers) posts refused 64 KiB bodies nested 9 deep of 1e20 from N connections.
B=/work/bin/s53/bench
PY=/work/adv30/venv/bin/python
N=${N:-64}
bin() { case $1 in base) echo /work/bin/s59/base;; new) echo /work/bin/s59/new;; v2) echo /work/bin/s59/v2;; v3) echo /work/bin/s59/v3;; v4) echo /work/bin/s59/v4;; esac; }
field() { python3 -c "import json;print(json.load(open('/work/adv35/srv_ab59.json'))['$1'])"; }
cpu() { awk '{print ($14+$15)/100}' /proc/$1/stat; }
for pair in ${PAIRS:-1 2}; do
  order="${ORDER:-base v2}"; [ $((pair % 2)) = 0 ] && order="$(echo $order | tr ' ' '\n' | tac | tr '\n' ' ')"
  for build in $order; do
    echo "== h2load $build $pair N=$N $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    BIN=$(bin $build) $PY /work/adv35/srv_up.py ab59 $SERVER_ARGS > /dev/null
    pid=$(field pid)
    h2load --h1 -c $N -D 25 -d ${BODY:-/work/s59/deep9-1e20.json} -H 'content-type: application/json' -H "x-gb-signature: $(printf '0%.0s' {1..40})" http://127.0.0.1:$(field wp)/webhooks/gameball > h2load-$build-$pair-$N.txt 2>&1 &
    flood=$!
    before=$(cpu $pid)
    $B ingest --webhook 127.0.0.1:$(field wp) --grpc 127.0.0.1:$(field gp) --secret test-secret --no-baseline --rounds 1 --duration 5s --rate 2000 --json h2open-$build-$pair-$N.json > h2open-$build-$pair-$N.txt 2>&1
    grep -E '^ingest +ours:|latency (p99|max)' h2open-$build-$pair-$N.txt | grep -v 'latency p99'
    wait $flood
    echo "server CPU $(python3 -c "print(round($(cpu $pid) - $before, 1))") s; flood: $(grep -E '^finished|^status codes' h2load-$build-$pair-$N.txt | tr '\n' ' ')"
    kill $pid; sleep 1
  done
done
echo "== done $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
