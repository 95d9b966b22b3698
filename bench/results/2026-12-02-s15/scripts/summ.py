import json,sys,glob
for f in sorted(glob.glob(sys.argv[1]+'/*.json')):
    d=json.load(open(f)); r={}
    for row in d['rows']:
        m=row['metric']
        if m=='req/s (--ephemeral)': r['eph']=(row['ours'],row['ratio'])
        if m=='req/s durable vs --ephemeral': r['dur']=(row['ours'],row['ratio'])
        if m.startswith('server CPU per req (--eph'): r['cpue']=row['ours']
        if m.startswith('server CPU per req durable'): r['cpud']=row['ours']
        if 'mean journal append' in m: r['app']=row['ours']
    print(f.split('/')[-1], 'eph', [round(x) for x in r['eph'][0]], round(r['eph'][1],2), 'dur', [round(x) for x in r['dur'][0]], round(r['dur'][1],2), 'cpu', [round(x,1) for x in r.get('cpue',[])], [round(x,1) for x in r.get('cpud',[])], 'append', [round(x,2) for x in r.get('app',[])])
