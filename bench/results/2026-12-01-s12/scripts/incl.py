import sys,re,collections
f=sys.argv[1]; pats=sys.argv[2:]
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
tot=len(samples)
print("samples",tot)
for p in pats:
    n=sum(1 for s in samples if any(p in x for x in s))
    print(f"{100*n/tot:6.2f}%  {p}")
