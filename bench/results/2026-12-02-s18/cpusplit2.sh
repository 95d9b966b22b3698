#!/bin/bash
# cpusplit2.sh KIND [BIN]: box-wide CPU split during 6 s in the middle of a 14 s ingest window.
# KIND: ours-eph | ours-dur | noop-http | noop-dur. Rate = the load tool's own req/s for its window.
KIND=$1; BIN=${2:-/work/bin/s17-base}
D=$(mktemp -d /work/notes/s18/data.XXXX)
case $KIND in
 ours-*) A="--ephemeral"; [ $KIND = ours-dur ] && A="--data-dir $D"
   $BIN --webhook-secret bench-secret --webhook-listen 127.0.0.1:18080 --grpc-listen 127.0.0.1:18081 --admin-listen 127.0.0.1:18082 $A > /tmp/s18-svc.log 2>&1 &
   sp=$!; W=127.0.0.1:18080; G=127.0.0.1:18081; sleep 0.5;;
 noop-http) /work/bin/bench17 baseline > /tmp/s18-addr 2>/dev/null & sp=$!; gp=$sp;;
 noop-dur) /work/bin/bench17 noop-durable --dir $D > /tmp/s18-addr 2>/dev/null & sp=$!
   /work/bin/bench17 baseline > /tmp/s18-addr2 2>/dev/null & gp=$!;;
esac
if [ -z "$W" ]; then sleep 0.5; W=$(python3 -c "import json;print(json.load(open('/tmp/s18-addr'))['http'])"); G=$(python3 -c "import json;print(json.load(open('/tmp/s18-addr2' if '$KIND'=='noop-dur' else '/tmp/s18-addr'))['grpc'])"); fi
/work/bin/bench17 ingest --webhook $W --grpc $G --rounds 1 --duration 14s --warmup 3s --no-baseline > /tmp/s18-bench.out 2>&1 &
bp=$!
sleep 7   # preload (ours) or warm-up, then well inside the window
bpid=$(pgrep -f "bench17 ingest" | head -1)
snap(){ head -1 /proc/stat; for p in $sp $bpid; do awk '{print "proc",$1,$14,$15}' /proc/$p/stat; done; for t in /proc/$sp/task/*; do echo "thr $(cat $t/comm | tr ' ' _) $(awk '{print $14+$15}' $t/stat)"; done; }
snap > /tmp/s18-a; sleep 6; snap > /tmp/s18-b
wait $bp; RATE=$(grep -oE "ours: +[0-9]+ req/s" /tmp/s18-bench.out | grep -oE "[0-9]+")
kill $sp $gp; wait $sp 2>/dev/null; rm -rf $D
RATE=$RATE KIND=$KIND python3 - <<'PY'
import os
def parse(f):
    d={'thr':{},'ps':[]}
    for l in open(f):
        p=l.split()
        if p[0]=='cpu': d['cpu']=list(map(int,p[1:]))
        elif p[0]=='proc': d['ps'].append((int(p[2]),int(p[3])))
        elif p[0]=='thr': d['thr'][p[1]]=d['thr'].get(p[1],0)+int(p[2])
    return d
a,b=parse('/tmp/s18-a'),parse('/tmp/s18-b')
wh=float(os.environ['RATE'])*6; secs=6.0
c=[y-x for x,y in zip(a['cpu'],b['cpu'])]; tot=sum(c[:8])
us=lambda j: j*1e4/wh
busy=tot-c[3]-c[4]
print(f"{os.environ['KIND']}: {wh/secs:.0f} req/s; box busy {us(busy):.1f} us/req, idle+iowait {100*(c[3]+c[4])/tot:.1f}%; user {us(c[0]):.1f} sys {us(c[2]):.1f} softirq {us(c[6]):.1f}")
for i,n in enumerate(['server','loadtool']):
    u=b['ps'][i][0]-a['ps'][i][0]; s=b['ps'][i][1]-a['ps'][i][1]
    print(f"   {n}: {us(u+s):.1f} us/req (user {us(u):.1f} sys {us(s):.1f})")
print("   threads: "+", ".join(f"{k} {us(b['thr'][k]-a['thr'].get(k,0)):.1f}" for k in b['thr'] if b['thr'][k]-a['thr'].get(k,0)))
PY
