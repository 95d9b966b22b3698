#!/bin/bash
# quiet.sh BIN: the ingest thread's CPU (ticks of 10 ms) over 5 s of one webhook at a time at 200/s, durable
BIN=$1; D=$(mktemp -d /work/notes/s18/data.XXXX)
$BIN --webhook-secret bench-secret --webhook-listen 127.0.0.1:18080 --grpc-listen 127.0.0.1:18081 --admin-listen 127.0.0.1:18082 --data-dir $D > /tmp/s18-q.log 2>&1 &
sp=$!; sleep 0.5
/work/bin/bench17 ingest --webhook 127.0.0.1:18080 --grpc 127.0.0.1:18081 --rounds 1 --duration 12s --warmup 1s --rate 200 --concurrency 1 --customers 1000 --no-baseline > /tmp/s18-q.out 2>&1 &
bp=$!; sleep 5
tid=$(grep -l '^ingest$' /proc/$sp/task/*/comm | head -1 | cut -d/ -f5)
a=$(awk '{print $14+$15}' /proc/$sp/task/$tid/stat); sleep 5; b=$(awk '{print $14+$15}' /proc/$sp/task/$tid/stat)
wait $bp; echo "$(basename $BIN): ingest thread $((b-a)) ticks in 5 s; $(grep -oE 'ours: +[0-9]+ req/s' /tmp/s18-q.out)"
kill $sp; wait $sp 2>/dev/null; rm -rf $D
