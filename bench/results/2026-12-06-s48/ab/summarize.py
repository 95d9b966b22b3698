import json,statistics as st
import sys
NEW=sys.argv[1] if len(sys.argv)>1 else 'g3'
DIR=sys.argv[2] if len(sys.argv)>2 else '.'
def rows(f):
    d=json.load(open(DIR+'/'+f)); return {r['metric']:r['ours'][0] for r in d['rows'] if r['ours']}
for scen,keys in [('fanout100',['delivery latency p50 (answer -> receipt)','delivery latency p99 (answer -> receipt)','server CPU per delivery']),('get',['GetProfile calls/s','server CPU per call'])]:
    for k in keys:
        v={b:[rows(f'{scen}-{b}-{i}.json')[k] for i in range(1,5)] for b in ['base',NEW]}
        lower=sum(1 for a,b in zip(v['base'],v[NEW]) if b<a)
        print(f"{scen:10} {k:45} base {v['base']} med {st.median(v['base']):.2f} | {NEW} {v[NEW]} med {st.median(v[NEW]):.2f} | {NEW} lower in {lower}/4")
