#!/bin/bash
# fanout --subscribers 1000 (a connection each), alternated single-round pairs, main's release build vs s54-stall's.
for i in 1 2 3 4; do
  for tag in main f4; do
    ./bench-main-old fanout --subscribers 1000 --no-baseline --rounds 1 --duration 5s \
      --server-bin /tmp/f4/profile-state-$tag --json /tmp/f4/fanout-$tag-$i.json > /tmp/f4/fanout-$tag-$i.out 2>&1
    echo "$tag $i $(grep -E 'delivery latency p(50|99) \(answer|server CPU per delivery  |ingest req/s with' /tmp/f4/fanout-$tag-$i.out | awk '{print $(NF-5)}' | tr '\n' ' ') $(grep 'load average' /tmp/f4/fanout-$tag-$i.out | sed 's/.*before: //')"
  done
done
