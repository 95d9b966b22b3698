#!/bin/bash
# Session 58, quiet-box A/B (no builds or tests running), alternating which build runs first.
# base: /work/bin/s57/final (508f8de, session 57's last build; docs only after it).
# new: /work/bin/s58/r1 (03c7229): with only default secrets, a body is not read before its
# signature matches (the signed path: the hash before the read instead of after).
# Unauthenticated bodies: round 35's scripts (/work/adv35: srv_up.py starts the server under
# BIN, session 57's unauth-shapes.py = b1_cost.py, b3_big.py posts 16 MiB bodies one at a time).
B=/work/bin/s53/bench
PY=/work/adv30/venv/bin/python
bin() { case $1 in base) echo /work/bin/s57/final;; new) echo /work/bin/s58/r1;; esac; }
for build in base new; do
  echo "== unauth $build $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
  BIN=$(bin $build) $PY /work/adv35/srv_up.py ab58 --max-body-bytes 16777216 > /dev/null
  $PY ../2026-12-07-s57/unauth-shapes.py ab58 plain-string small-ints idx-keys-desc same-key tiny-reordered-objs expand-1e20 deep127-idx-bottom-1e20 deep127-idx-bottom-tinyobjs
  $PY /work/adv35/b3_big.py ab58 16000000 plain-string small-ints tiny-reordered-objs
  kill "$(python3 -c 'import json;print(json.load(open("/work/adv35/srv_ab58.json"))["pid"])')"
  sleep 1
done
for pair in 1 2 3 4; do
  order="base new"; [ $((pair % 2)) = 0 ] && order="new base"
  for build in $order; do
    echo "== ingest $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B ingest --no-baseline --rounds 1 --duration 5s --server-bin $(bin $build) --json ingest-$build-$pair.json > ingest-$build-$pair.txt 2>&1
    grep -E '^ingest +(ours|ours-durable):|server CPU per req' ingest-$build-$pair.txt
  done
done
echo "== done $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
