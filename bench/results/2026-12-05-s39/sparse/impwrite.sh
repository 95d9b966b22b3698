#!/bin/bash
BIN=$1; O=$2
/work/bin/s39/bench --server-bin $BIN fanout --subscribers 1000 --rounds 1 --no-baseline --duration 12s > $O.out 2>&1 &
B=$!
until grep -q "ingest into ours with 0 subscribers" $O.out 2>/dev/null; do sleep 0.5; done
P=$(pgrep -f "^$BIN" | head -1)
sleep 9
perf record -e syscalls:sys_enter_write,syscalls:sys_enter_futex,syscalls:sys_enter_epoll_wait --call-graph dwarf,8192 -p $P -o $O.data -- sleep 2 > /dev/null 2>&1
wait $B
grep -E "ingest into" $O.out
