# callers.py STACKS SYMBOL_SUBSTR [DEPTH]: for samples whose leaf matches, the nearest callers
# (STACKS: `perf script -F ip,sym` output)
import sys, collections
path, target = sys.argv[1], sys.argv[2]
depth = int(sys.argv[3]) if len(sys.argv) > 3 else 2
stacks, cur = [], []
for line in open(path):
    line = line.strip()
    if not line:
        if cur: stacks.append(cur)
        cur = []
    else:
        cur.append(line.split(' ', 1)[1] if ' ' in line else line)
if cur: stacks.append(cur)
total = len(stacks)
hits = collections.Counter()
n = 0
for s in stacks:
    if target in s[0]:
        n += 1
        frames = [f for f in s[1:] if 'memmove' not in f and 'mi_' not in f and 'alloc::' not in f and 'core::ptr' not in f][:depth]
        hits[' <- '.join(f[:110] for f in frames)] += 1
print(f"{n} of {total} samples ({100*n/total:.2f}%)")
for k, v in hits.most_common(25):
    print(f"{100*v/total:5.2f}%  {k}")
