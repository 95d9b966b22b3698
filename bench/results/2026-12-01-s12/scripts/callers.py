import sys,collections
import perf_samples
f,pat=sys.argv[1],sys.argv[2]
samples=perf_samples.samples(f)
tot=len(samples); c=collections.Counter()
for s in samples:
    idx=[i for i,x in enumerate(s) if pat in x]
    if not idx: continue
    i=idx[-1]
    c[s[i+1] if i+1<len(s) else '-']+=1
for k,v in c.most_common(12): print(f"{100*v/tot:6.2f}% {k[:150]}")
