import sys, re, collections
# aggregate samples: for frames matching PARENT, count the immediate callee (inclusive)
parent = sys.argv[2]
samples=[]; cur=[]
for line in open(sys.argv[1]):
    if not line.strip():
        if cur: samples.append(cur); cur=[]
        continue
    if line[0] not in ' \t':
        if cur: samples.append(cur)
        cur=[]; continue
    parts=line.strip().split(' ',1)
    cur.append(parts[1] if len(parts)>1 else '?')
if cur: samples.append(cur)
tot=len(samples); c=collections.Counter(); under=0
for s in samples:
    # s[0] is leaf
    for i,f in enumerate(s):
        if parent in f:
            under+=1
            c[s[i-1] if i>0 else '<self>']+=1
            break
print(f"total {tot}, under {parent}: {under} ({100*under/tot:.1f}%)")
for k,v in c.most_common(int(sys.argv[3]) if len(sys.argv)>3 else 25):
    print(f"{100*v/tot:6.2f}%  {k[:150]}")
