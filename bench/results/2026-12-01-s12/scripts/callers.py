import sys,re,collections
f,pat=sys.argv[1],sys.argv[2]
samples=[];cur=[]
for line in open(f,errors='replace'):
    if not line.strip():
        if cur: samples.append(cur)
        cur=[];continue
    if line[0] in ' \t':
        parts=line.strip().split(' ',1)
        if len(parts)==2:
            sym=re.sub(r'\+0x[0-9a-f]+ \(.*$','',parts[1]).strip(); sym=re.sub(r' \(.*\)$','',sym)
            cur.append(sym)
if cur: samples.append(cur)
tot=len(samples); c=collections.Counter()
for s in samples:
    idx=[i for i,x in enumerate(s) if pat in x]
    if not idx: continue
    i=idx[-1]
    c[s[i+1] if i+1<len(s) else '-']+=1
for k,v in c.most_common(12): print(f"{100*v/tot:6.2f}% {k[:150]}")
