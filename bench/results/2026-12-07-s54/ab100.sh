#!/bin/bash
# fanout --subscribers 1000 --streams-per-connection 100, alternated single-round pairs, main's release build vs s54-stall's.
for i in 1 2 3; do
  for tag in main f4; do
    ./bench-main-old fanout --subscribers 1000 --streams-per-connection 100 --no-baseline --rounds 1 --duration 5s \
      --server-bin /tmp/f4/profile-state-$tag --json /tmp/f4/fanout100-$tag-$i.json > /tmp/f4/fanout100-$tag-$i.out 2>&1
    f=/tmp/f4/fanout100-$tag-$i.out
    echo "$tag $i p50 $(grep 'delivery latency p50 (answer' $f | awk '{print $10}') p99 $(grep 'delivery latency p99 (answer' $f | awk '{print $10}') cpu/delivery $(grep 'server CPU per delivery  ' $f | awk '{print $8}') | $(grep 'load average' $f | sed 's/note: //')"
  done
done
