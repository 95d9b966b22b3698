import sys,re
# usage: us.py FILE WEBHOOKS pats... : inclusive CPU us per webhook of frames matching each pattern (499 Hz samples)
f=sys.argv[1]; n=int(sys.argv[2]); pats=sys.argv[3:]
samples=[];cur=[];comm=None
for line in open(f,errors='replace'):
    if not line.strip():
        if cur: samples.append((comm,cur))
        cur=[];continue
    if line[0] in ' \t':
        parts=line.strip().split(' ',1)
        if len(parts)==2:
            sym=re.sub(r'\+0x[0-9a-f]+ \(.*$','',parts[1]).strip(); sym=re.sub(r' \(.*\)$','',sym)
            cur.append(sym)
    else: comm=line.split()[0]
if cur: samples.append((comm,cur))
per=1e6/499/n
print(f"total {len(samples)*per:.1f} us/webhook")
for c in sorted(set(c for c,_ in samples)): print(f"  thread {c}: {sum(1 for x,_ in samples if x==c)*per:.1f}")
for p in pats:
    k=sum(1 for _,s in samples if any(p in x for x in s))
    print(f"{k*per:6.2f}  {p}")
