#!/bin/bash
# CPU time (task-clock) per call on the gRPC workers (the `tokio-rt-worker` threads, which
# serve the reads; webhooks, the preload's, run on the `ingest` thread), base and new: each
# build started --ephemeral and read by the bench tool (`--webhook/--grpc`: it starts nothing),
# `perf stat --per-thread` over the whole run. Calls = the measured rate x (3 s warm-up + 8 s).
# (This VM has no hardware counters: instructions read <not supported>.)
B=/work/bin/s41/bench
for round in 1 2; do
  for build in base new; do
    for scenario in batch-get get; do
      log=$(mktemp)
      /work/bin/s41/$build --ephemeral --webhook-secret bench-secret --webhook-listen 127.0.0.1:18080 \
        --grpc-listen 127.0.0.1:15051 --admin-listen 127.0.0.1:19090 >"$log" 2>&1 &
      pid=$!
      until grep -q 'listening' "$log"; do sleep 0.1; done
      perf stat -e task-clock --per-thread -x, -p $pid -o instr-$scenario-$build-$round.perf &
      perf=$!
      $B $scenario --webhook 127.0.0.1:18080 --grpc 127.0.0.1:15051 --no-baseline --rounds 1 \
        --duration 8s --warmup 3s > instr-$scenario-$build-$round.txt 2>&1
      kill -INT $perf; wait $perf
      kill $pid; wait $pid 2>/dev/null
      calls=$(grep -oE 'ours: +[0-9]+ calls/s' instr-$scenario-$build-$round.txt | grep -oE '[0-9]+')
      workers=$(grep tokio-rt-worker instr-$scenario-$build-$round.perf | cut -d, -f2 | paste -sd+ | bc)
      echo "$scenario $build $round calls/s $calls worker ms $workers per call µs $(echo "scale=2; $workers * 1000 / ($calls * 11)" | bc)"
      rm -f "$log"
    done
  done
done
