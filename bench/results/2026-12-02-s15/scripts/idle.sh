#!/bin/bash
# usage: idle.sh BIN MODE(eph|dur) [env...]: webhooks/s and box CPU split over 5 s after the preload
BIN=$1; MODE=$2; shift 2
d=$(mktemp -d /tmp/idle.XXXX)
if [ $MODE = eph ]; then a=--ephemeral; else a="--data-dir $d"; fi
env "$@" $BIN --webhook-secret bench-secret $a --webhook-listen 127.0.0.1:18080 --grpc-listen 127.0.0.1:18081 --admin-listen 127.0.0.1:18082 > /dev/null 2>&1 &
sp=$!; sleep 0.5
/work/bin/s11-bench ingest --webhook 127.0.0.1:18080 --grpc 127.0.0.1:18081 --rounds 1 --duration 10s --warmup 3s --no-baseline > /dev/null 2>&1 &
bp=$!
count(){ curl -s 127.0.0.1:18082/metrics | awk '/^profile_state_webhooks_total/{s+=$2} END{print s+0}'; }
while [ $(count) -lt 120000 ]; do sleep 0.2; done
n0=$(count); s0=($(head -1 /proc/stat)); t0=$(awk '{print $14+$15}' /proc/$sp/stat)
sleep 5
n1=$(count); s1=($(head -1 /proc/stat)); t1=$(awk '{print $14+$15}' /proc/$sp/stat)
wait $bp; kill $sp; wait $sp 2>/dev/null; rm -rf $d
python3 - "${s0[*]}" "${s1[*]}" $((n1-n0)) $((t1-t0)) $MODE "$*" <<'PY'
import sys
a=list(map(int,sys.argv[1].split()[1:])); b=list(map(int,sys.argv[2].split()[1:])); n=int(sys.argv[3]); srv=int(sys.argv[4])
d=[y-x for x,y in zip(a,b)]; tot=sum(d[:8])
print(f"{sys.argv[5]} {sys.argv[6]:20s} {n/5:8.0f}/s  idle {100*(d[3]+d[4])/tot:4.1f}%  user {100*d[0]/tot:4.1f}% sys {100*d[2]/tot:4.1f}% softirq {100*d[6]/tot:4.1f}%  server {srv*1e4/n:5.1f} us/req  box {2*tot/ (tot) * 5e6*(1-(d[3]+d[4])/tot)/n:5.1f} us/req")
PY
