#!/bin/bash
# Session 57, the last build (508f8de: every control frame counted, DATA frames sent counted on
# the write side) against the build ab.sh measured (r2), fan-out 1,000 x 100 per connection.
B=/work/bin/s53/bench
bin() { case $1 in r2) echo /work/bin/s57/r2;; final) echo /work/bin/s57/final;; esac; }
for pair in 1 2; do
  order="r2 final"; [ $((pair % 2)) = 0 ] && order="final r2"
  for build in $order; do
    echo "== fanout100 $build $pair $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
    $B fanout --subscribers 1000 --streams-per-connection 100 --no-baseline --rounds 1 --duration 5s --server-bin $(bin $build) --json final-fanout100-$build-$pair.json > final-fanout100-$build-$pair.txt 2>&1
    grep -E 'delivery latency p(50|99) \(answer|server CPU per delivery  ' final-fanout100-$build-$pair.txt
  done
done
echo "== done $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
