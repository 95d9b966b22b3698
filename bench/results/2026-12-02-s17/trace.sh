#!/bin/bash
# trace.sh BIN OUT [service args]: per-event trace of the journal's syscalls and the block layer for 3 s of durable ingest after the preload
BIN=$1; OUT=$2; shift 2
$BIN --webhook-secret bench-secret --webhook-listen 127.0.0.1:18080 --grpc-listen 127.0.0.1:18081 --admin-listen 127.0.0.1:18082 "$@" > /tmp/p2-svc.log 2>&1 &
sp=$!; sleep 0.5
profile-state-bench ingest --webhook 127.0.0.1:18080 --grpc 127.0.0.1:18081 --rounds 1 --duration 12s --warmup 2s --no-baseline > /tmp/p2-bench.out 2>&1 &
bp=$!
count(){ curl -s 127.0.0.1:18082/metrics | awk '/^profile_state_webhooks_total/{s+=$2} END{print s+0}'; }
while [ $(count) -lt 120000 ]; do sleep 0.2; done
perf record -e syscalls:sys_enter_fdatasync,syscalls:sys_exit_fdatasync,syscalls:sys_enter_pwrite64,syscalls:sys_exit_pwrite64,block:block_rq_issue,block:block_rq_complete,sched:sched_wakeup,sched:sched_switch -a -o $OUT -- sleep 3 2>/dev/null >/dev/null
wait $bp; grep "ours:" /tmp/p2-bench.out
kill $sp; wait $sp 2>/dev/null
