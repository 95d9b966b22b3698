#!/bin/bash
# perf of the three replicas during the cluster phase of round 0 (profile-state-bench cluster).
O=$1
/work/bin/s27/profile-state-bench cluster --rounds 1 --duration 20s > $O.out 2> $O.err &
B=$!
until grep -q "cluster ingest single" $O.err 2>/dev/null; do sleep 0.2; done
sleep 4
PIDS=$(pgrep -f -- "--replica-name r" | paste -sd,)
echo "pids $PIDS" >> $O.err
perf record -e cpu-clock -F 999 -g -p $PIDS -o $O.data -- sleep 12 > /dev/null 2>&1
wait $B
