#!/bin/bash
# decomp.sh BIN OUT: one cluster round (ours only); samples each replica's /metrics over 5 s of
# the ingest window and prints the mean time of each stage of a webhook.
BIN=${1:-/work/main/target/release/profile-state}; OUT=${2:-/tmp/decomp}
/work/main/target/release/profile-state-bench cluster --rounds 1 --duration 12s --no-baseline --server-bin $BIN > $OUT.bench 2>&1 &
bp=$!
admin_of(){ for port in $(ss -ltnpH | grep "pid=$1," | awk '{print $4}' | sed 's/.*://'); do
  curl -sf -m 1 127.0.0.1:$port/metrics >/dev/null && { echo $port; return; }; done; }
until pgrep -f "replica-name r2" >/dev/null; do sleep 0.2; done
sleep 1
declare -A ADM
for r in r0 r1 r2; do pid=$(pgrep -f "replica-name $r\$" | head -1); ADM[$r]=$(admin_of $pid); done
echo "admin ports: ${ADM[@]}"
wh(){ curl -s 127.0.0.1:${ADM[r1]}/metrics | awk '/^profile_state_webhooks_total/{s+=$2} END{print s+0}'; }
until [ "$(wh)" -gt 100 ]; do sleep 0.1; done
sleep 4
for r in r0 r1 r2; do curl -s 127.0.0.1:${ADM[$r]}/metrics > $OUT.$r.a; done
sleep 6
for r in r0 r1 r2; do curl -s 127.0.0.1:${ADM[$r]}/metrics > $OUT.$r.b; done
wait $bp
for r in r0 r1 r2; do
  python3 - $OUT.$r.a $OUT.$r.b $r <<'PY'
import sys,re
def load(p):
    d={}
    for l in open(p):
        if l.startswith('#'): continue
        m=re.match(r'(\S+?)(\{[^}]*\})?\s+(\S+)$',l.strip())
        if not m: continue
        name,labels,v=m.groups()
        if name.endswith('_sum') or name.endswith('_count'):
            d[name]=d.get(name,0)+float(v)
    return d
a,b=load(sys.argv[1]),load(sys.argv[2])
out=[]
for base in ['profile_state_webhook_duration_seconds','profile_state_replication_publish_duration_seconds','profile_state_replication_apply_lag_seconds']:
    s=b.get(base+'_sum',0)-a.get(base+'_sum',0); c=b.get(base+'_count',0)-a.get(base+'_count',0)
    out.append(f"{base.replace('profile_state_','')}: n={c:.0f} mean={1000*s/max(c,1):.3f} ms")
print(sys.argv[3], '; '.join(out))
PY
done
grep -E "cluster ingest|breakdown" $OUT.bench
