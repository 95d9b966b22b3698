#!/usr/bin/env python3
"""thrcpu.py SERVER_BIN [bench args...]: starts an --ephemeral service, runs
`bench21 fanout --webhook --grpc ...` against it, samples every thread of the service and the
load tool from /proc each 0.25 s, and prints CPU per webhook by thread for each ingest window
(the last `duration` seconds before each "ingest with N subscribers" line)."""
import os, sys, subprocess, threading, time, re, socket
TCK = os.sysconf('SC_CLK_TCK')
def free_port():
    s = socket.socket(); s.bind(('127.0.0.1', 0)); p = s.getsockname()[1]; s.close(); return p
wp, gp, ap = free_port(), free_port(), free_port()
srv = subprocess.Popen([sys.argv[1], '--ephemeral', '--webhook-secret', 'bench-secret',
    '--webhook-listen', f'127.0.0.1:{wp}', '--grpc-listen', f'127.0.0.1:{gp}',
    '--admin-listen', f'127.0.0.1:{ap}', '--log-format', 'json'],
    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    env=dict(os.environ, **dict(kv.split('=',1) for kv in os.environ.get('SRV_ENV','').split() if kv)))
time.sleep(1.5)
dur = 8
args = ['/work/bin/bench21', 'fanout', '--webhook', f'127.0.0.1:{wp}', '--grpc', f'127.0.0.1:{gp}',
        '--no-baseline', '--duration', f'{dur}s'] + sys.argv[2:]
bench = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
samples = []  # (t, {(proc, tname): ticks})
def threads(pid, tag):
    out = {}
    try:
        for tid in os.listdir(f'/proc/{pid}/task'):
            try:
                st = open(f'/proc/{pid}/task/{tid}/stat').read()
                name = st[st.index('(')+1:st.rindex(')')]
                f = st[st.rindex(')')+2:].split()
                name = re.sub(r'\d+$', '#', name)
                out[(tag, name)] = out.get((tag, name), 0) + int(f[11]) + int(f[12])
            except (FileNotFoundError, ValueError, ProcessLookupError):
                pass
    except FileNotFoundError:
        pass
    return out
stop = False
def sampler():
    while not stop:
        d = threads(srv.pid, 'srv'); d.update(threads(bench.pid, 'tool'))
        samples.append((time.time(), d)); time.sleep(0.25)
th = threading.Thread(target=sampler); th.start()
windows = []
for line in bench.stdout:
    m = re.search(r'ingest with (\d+) subscribers: (\d+) req/s', line)
    if m:
        windows.append((time.time(), int(m.group(1)), int(m.group(2))))
    if 'ingest req/s' in line or 'ingest with' in line: print(line.rstrip())
bench.wait(); stop = True; th.join(); srv.terminate()
def at(t):
    return min(samples, key=lambda s: abs(s[0] - t))
for end, subs, rate in windows:
    a, b = at(end - dur + 0.3), at(end - 0.3)
    span = b[0] - a[0]; hooks = rate * span
    keys = sorted(set(a[1]) | set(b[1]))
    parts = []
    tot = {'srv': 0, 'tool': 0}
    for k in keys:
        us = (b[1].get(k, 0) - a[1].get(k, 0)) / TCK * 1e6 / hooks
        tot[k[0]] += us
        if us >= 0.3: parts.append(f'{k[0]}:{k[1]} {us:.1f}')
    print(f'subs {subs:5d} {rate:6d}/s  srv {tot["srv"]:.1f} tool {tot["tool"]:.1f} µs/webhook | ' + ', '.join(parts))
