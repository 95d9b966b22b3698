import subprocess, sys, re
def load(f):
    out = subprocess.run(['callgrind_annotate', '--inclusive=no', '--threshold=100', f], capture_output=True, text=True).stdout
    d = {}
    for line in out.splitlines():
        m = re.match(r'\s*([\d,]+)\s+\([^)]*\)\s+(.*)', line)
        if m:
            k = re.sub(r' \[.*\]$', '', m.group(2)); d[k] = d.get(k, 0) + int(m.group(1).replace(',', ''))
    return d
a, b = load(sys.argv[1]), load(sys.argv[2]); n = int(sys.argv[3])
keys = set(a) | set(b)
deltas = sorted(((b.get(k, 0) - a.get(k, 0)) / n, k) for k in keys)
for d, k in deltas[:12] + deltas[-20:]:
    print(f'{d:+9.1f} {k[:150]}')
