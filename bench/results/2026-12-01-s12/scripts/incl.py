import sys,collections
import perf_samples
f=sys.argv[1]; pats=sys.argv[2:]
samples=perf_samples.samples(f)
tot=len(samples)
print("samples",tot)
for p in pats:
    n=sum(1 for s in samples if any(p in x for x in s))
    print(f"{100*n/tot:6.2f}%  {p}")
