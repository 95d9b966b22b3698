#!/bin/bash
# usage: run.sh BIN N PERIOD_MS DUR_S [STAGGER_MS]
BIN=$1; shift
D=/tmp/adv18/data-$$; rm -rf $D; mkdir -p $D
/work/bin/$BIN --webhook-secret bench-secret --webhook-listen 127.0.0.1:19080 --grpc-listen 127.0.0.1:19081 --admin-listen 127.0.0.1:19082 --data-dir $D >/tmp/adv18/srv-$BIN.log 2>&1 &
P=$!
for i in $(seq 50); do curl -s -o /dev/null 127.0.0.1:19082/metrics && break; sleep 0.1; done
TID=$(for t in /proc/$P/task/*; do [ "$(cat $t/comm)" = ingest ] && basename $t; done)
cpu(){ awk '{print $1}' /proc/$P/task/$TID/schedstat; }
python3 /tmp/adv18/load.py 19080 $1 $2 2 $5 >/dev/null  # warmup
sleep 0.5
c0=$(cpu); t0=$(date +%s.%N)
R=$(python3 /tmp/adv18/load.py 19080 $1 $2 $3 $5)
c1=$(cpu); t1=$(date +%s.%N)
sleep 1; c2=$(cpu); sleep 5; c3=$(cpu)
FS=$(curl -s 127.0.0.1:19082/metrics | grep -E "^profile_state_journal_fsync_duration_seconds_(count|sum)" | cut -d" " -f2 | tr "\n" "/")
kill $P; wait $P 2>/dev/null
sent=$(echo $R | python3 -c 'import json,sys;print(json.load(sys.stdin)["sent"])')
python3 - <<PY
c0,c1,c2,c3=$c0,$c1,$c2,$c3; t=$t1-$t0; sent=$sent
R='''$R'''
print(f"$BIN n=$1 per=$2ms: {R} cpu%={100*(c1-c0)/1e9/t:.2f} us/webhook={(c1-c0)/1e3/sent:.1f} idle5s_ms={(c3-c2)/1e6:.2f} fsyncs=$FS load=$(cut -d' ' -f1 /proc/loadavg)")
PY
rm -rf $D
