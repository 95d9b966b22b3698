#!/bin/bash
# syscalls and context switches of ours: the no-subscriber window, then the 1000-subscriber one
BIN=$1; O=$2
/work/bin/s39/bench --server-bin $BIN fanout --subscribers 1000 --rounds 1 --no-baseline --duration 12s > $O.out 2>&1 &
B=$!
until grep -q "ingest into ours with 1000 subscribers\|S=1000 (ours)" $O.out 2>/dev/null; do sleep 0.5; done
P=$(pgrep -f "^$BIN" | head -1)
# the no-subscriber window starts after the latency part; wait for it
until [ "$(grep -c 'ingest into ours' $O.out)" -ge 0 ] && grep -q "S=1000 (ours)" $O.out; do sleep 0.5; done
sleep 6
perf stat -e 'context-switches,syscalls:sys_enter_futex,syscalls:sys_enter_write,syscalls:sys_enter_writev,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_recvfrom,syscalls:sys_enter_sched_yield' -p $P -o $O.nosubs -- sleep 4 > /dev/null 2>&1
until grep -q "ingest into ours with 0 subscribers" $O.out 2>/dev/null; do sleep 0.5; done
sleep 9
perf stat -e 'context-switches,syscalls:sys_enter_futex,syscalls:sys_enter_write,syscalls:sys_enter_writev,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_recvfrom,syscalls:sys_enter_sched_yield' -p $P -o $O.subs -- sleep 4 > /dev/null 2>&1
wait $B
grep -E "ingest into|deliveries/s during" $O.out
grep -E "^ +[0-9]" $O.nosubs; echo; grep -E "^ +[0-9]" $O.subs
