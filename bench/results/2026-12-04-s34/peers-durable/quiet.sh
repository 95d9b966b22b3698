#!/bin/bash
cd /work/notes/s34
./getab.sh /work/notes/s34/get2 4 /work/bin/s34/sched /work/bin/s34/head
mkdir -p peersd
echo "start $(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)" > peersd/log
/work/bin/s34/bench fanout --server-bin /work/bin/s34/head --durable --peers etcd,nats-kv --subscribers 1000 --streams-per-connection 100 --rounds 2 --duration 8s --json peersd/peers-durable.json > peersd/peers-durable.txt 2>&1
echo "end $(date -u +%T) rc=$? load $(cut -d' ' -f1-3 /proc/loadavg)" >> peersd/log
