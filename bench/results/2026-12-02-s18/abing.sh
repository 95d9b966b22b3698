#!/bin/bash
# abing.sh TAG BIN [ENV]: one ingest run (2 rounds, 6 s), prints the ratios
TAG=$1; BIN=$2; ENV=${3:-X=1}
/work/bin/bench17 ingest --server-bin $BIN $(for e in ${ENV//,/ }; do echo --server-env $e; done) --rounds 2 --duration 6s --warmup 2s --json /work/notes/s18/ab-$TAG-$(date +%H%M%S).json > /tmp/abing.out 2>&1
echo "$TAG load $(cut -d' ' -f1 /proc/loadavg): $(python3 -c "
import json,sys,glob
f=sorted(glob.glob('/work/notes/s18/ab-$TAG-*.json'))[-1]
d=json.load(open(f))
r={x['metric']:x for x in d['rows']}
a=r['req/s (--ephemeral)']; b=r['req/s durable vs --ephemeral']; c=r['req/s no-op durable vs no-op HTTP']
print('eph/noop %.2f dur/eph %.2f [%s] noopdur %.2f; dur %s' % (a['ratio'],b['ratio'],' '.join('%.2f'%(x/y) for x,y in zip(b['ours'],b['baseline'])),c['ratio'],[int(x) for x in b['ours']]))
")"
