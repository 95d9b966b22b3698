#!/bin/bash
# perf record the no-op HTTP baseline process during its first measured window
/work/main/target/release/profile-state-bench ingest --rounds 1 --duration 12s --server-bin /work/bin/s55/head > noop-bench.out 2>&1 &
for i in $(seq 200); do P=$(pgrep -f "client-id bench baseline" | head -1); [ -n "$P" ] && break; sleep 0.05; done
echo baseline pid $P
# wait for the baseline's measured window: watch its CPU
for i in $(seq 600); do T=$(awk '{print $14+$15}' /proc/$P/stat); sleep 0.5; T2=$(awk '{print $14+$15}' /proc/$P/stat); [ $((T2-T)) -gt 30 ] && break; done
sleep 4
perf record -F 499 --call-graph dwarf,32768 -p $P -o perf-noop.data -- sleep 6 > /dev/null 2>&1
wait
grep -E "^ingest +(ours|baseline|no-op)" noop-bench.out
