#!/bin/bash
# Session 33: ours beside etcd and NATS KV, same tool, same rounds (issue 12 section 2).
set -x
B=/work/bin/s33/bench-peers; S=/work/bin/s33/start
uptime
$B fanout --server-bin $S --subscribers 100,1000 --streams-per-connection 100 --rounds 3 \
    --peers etcd,nats-kv --json peers-100x.json > peers-100x.txt 2>&1
uptime
$B fanout --server-bin $S --subscribers 1000 --rounds 3 \
    --peers etcd,nats-kv --json peers-each.json > peers-each.txt 2>&1
uptime
