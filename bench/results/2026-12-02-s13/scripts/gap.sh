#!/bin/bash
# usage: gap.sh BIN [env...]: durable service + external ingest load; prints the service's XSTATS
BIN=$1; shift
d=$(mktemp -d ./dd.XXXX)
env "$@" $BIN --webhook-secret bench-secret --data-dir $d --webhook-listen 127.0.0.1:18080 --grpc-listen 127.0.0.1:18081 --admin-listen 127.0.0.1:18082 > /tmp/gap-svc.log 2>&1 &
sp=$!; sleep 0.5
profile-state-bench ingest --webhook 127.0.0.1:18080 --grpc 127.0.0.1:18081 --rounds 1 --duration 8s --warmup 2s --no-baseline 2>&1 | grep -E "ours:"
kill $sp; wait $sp 2>/dev/null; rm -rf $d
grep XSTATS /tmp/gap-svc.log
