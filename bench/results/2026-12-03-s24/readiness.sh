#!/bin/bash
# Readiness of three replicas while one takes closed-loop webhooks (64 senders): how often is
# each reported not ready?  usage: readiness.sh BIN
BIN=$1; C=$(dirname "$0");  # readiness-n{1,2,3}.conf beside it
 D=/tmp/s24/rdd; NS=/work/main/target/nats-server/2.15.1/bin/nats-server
rm -rf $D /tmp/s24/rd/nats; mkdir -p /tmp/s24/rd; mkdir -p $D
for n in 1 2 3; do $NS -c $C/readiness-n$n.conf > $D/nats-n$n.log 2>&1 & echo $! > $D/nats-n$n.pid; done
NATS=nats://127.0.0.1:15221,nats://127.0.0.1:15222,nats://127.0.0.1:15223
for n in 1 2 3; do until curl -sf "http://127.0.0.1:1582$n/healthz?js-enabled-only=true" > /dev/null; do sleep 0.2; done; done
for n in 1 2 3; do
  $BIN --webhook-secret bench-secret --nats-url $NATS --replica-name r$n --data-dir $D/r$n \
    --webhook-listen 127.0.0.1:1608$n --grpc-listen 127.0.0.1:1607$n --admin-listen 127.0.0.1:1609$n > $D/r$n.log 2>&1 &
  echo $! > $D/r$n.pid
done
for n in 1 2 3; do for i in $(seq 1 300); do curl -sf http://127.0.0.1:1609$n/readyz > /dev/null && break; sleep 0.2; done; done
echo "all ready $(date -u +%T)"
/work/main/target/release/profile-state-bench --webhook 127.0.0.1:16081 --grpc 127.0.0.1:16071 --no-baseline ingest --rounds 1 --duration 20s --warmup 2s > $D/load.out 2>&1 &
L=$!
sleep 2
for i in $(seq 1 300); do
  for n in 1 2 3; do
    c=$(curl -s -o $D/body -w '%{http_code}' http://127.0.0.1:1609$n/readyz); echo "$n $c $(head -c 150 $D/body)"
  done
  sleep 0.05
done > $D/polls.txt
wait $L
grep "req/s" $D/load.out | head -2
awk '{k=$1" "$2; c[k]++} END {for (k in c) print k, c[k]}' $D/polls.txt | sort
grep -v " 200 " $D/polls.txt | head -5
for n in 1 2 3; do kill $(cat $D/r$n.pid); done; sleep 1
for n in 1 2 3; do kill $(cat $D/nats-n$n.pid); done
