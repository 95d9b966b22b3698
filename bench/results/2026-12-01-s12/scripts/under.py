import sys,collections
import perf_samples
# usage: under.py perf.txt PATTERN [depth]: leaf (or child-of-pattern) breakdown of samples whose stack contains PATTERN
f,pat=sys.argv[1],sys.argv[2]
mode=sys.argv[3] if len(sys.argv)>3 else 'leaf'
samples=perf_samples.samples(f)
tot=len(samples);c=collections.Counter();n=0
for s in samples:
    idx=[i for i,x in enumerate(s) if pat in x]
    if not idx: continue
    n+=1
    i=max(idx)  # outermost occurrence (stack is leaf-first)
    if mode=='leaf': key=s[0]
    else: key=s[i-1] if i>0 else '(self)'
    c[key]+=1
print(f"total {tot} samples; under {pat}: {n} ({100*n/tot:.1f}%)")
for k,v in c.most_common(40): print(f"{100*v/tot:6.2f}%  {k[:150]}")
