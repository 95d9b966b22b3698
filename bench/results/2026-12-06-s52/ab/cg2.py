#!/usr/bin/env python3
"""cg2.py ours|noop BIN N CONC: server under callgrind with instrumentation on only while N signed
webhooks are sent over CONC keep-alive connections; prints Ir per webhook; keeps the out file."""
import sys, os, subprocess, socket, time, hashlib, http.client, tempfile, threading, json, re
KIND, BIN, N, CONC = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
SECRET = 'bench-secret'
def free_port():
    s = socket.socket(); s.bind(('127.0.0.1', 0)); p = s.getsockname()[1]; s.close(); return p
def body(n, seq):
    cid = f"{(n*2654435761)%2**32:08x}-{n%65536:04x}-4abc-a123-{n:012x}"
    at = f"2025-01-01T00:{seq//60000000%60:02d}:{seq//1000000%60:02d}.{seq%1000000:06d}Z"
    return ('{"event":"customer.profile.updated","client_id":"bench","customer_id":"%s","gb_customer_id":%d,'
            '"created_at":"%s","data":{"email":"customer.%08d@example-mail.com","mobile_number":"+201012345678",'
            '"tier_name":"gold","tier_order":3,"referral_code":"ABCDEF12","referral_link":"https://gameball.app/r/ABCDEF12",'
            '"activated_points":%d,"pending_points":%d,"total_points":%d}}') % (cid, n, at, n, seq % 5000, seq % 77, seq % 5000 + seq % 77)
out = f'/work/s52cg/cg-{KIND}-{os.path.basename(BIN)}-{N}-{CONC}.out'
if KIND in ('ours', 'durable'):
    wp, gp, ap = free_port(), free_port(), free_port()
    mode = ['--ephemeral'] if KIND == 'ours' else ['--data-dir', tempfile.mkdtemp(prefix='cgdur-', dir='/tmp')]
    args = [BIN] + mode + ['--webhook-secret', SECRET, '--webhook-listen', f'127.0.0.1:{wp}',
            '--grpc-listen', f'127.0.0.1:{gp}', '--admin-listen', f'127.0.0.1:{ap}']
    srv = subprocess.Popen(['valgrind', '--tool=callgrind', '--instr-atstart=no', f'--callgrind-out-file={out}'] + args,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
else:
    srv = subprocess.Popen(['valgrind', '--tool=callgrind', '--instr-atstart=no', f'--callgrind-out-file={out}', BIN, 'baseline'],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = srv.stdout.readline(); wp = int(json.loads(line)['http'].rsplit(':', 1)[1])
for _ in range(600):
    try: socket.create_connection(('127.0.0.1', wp), 0.2).close(); break
    except OSError: time.sleep(0.1)
def send(k, count, base):
    conn = http.client.HTTPConnection('127.0.0.1', wp)
    for i in range(count):
        seq = base + i
        b = body((k * 1000 + i) % 5000, 10_000_000 + seq).encode()
        sig = hashlib.sha1(b + b':' + SECRET.encode()).hexdigest()
        conn.request('POST', '/webhooks/gameball', b, {'content-type': 'application/json', 'x-gb-signature': sig})
        r = conn.getresponse(); r.read()
        if r.status != 200: print('status', r.status, file=sys.stderr)
    conn.close()
# warm up
send(0, 50, 0)
subprocess.run(['callgrind_control', '-i', 'on', str(srv.pid)], stdout=subprocess.DEVNULL)
ts = [threading.Thread(target=send, args=(k, N // CONC, 1_000_000 * (k + 1))) for k in range(CONC)]
[t.start() for t in ts]; [t.join() for t in ts]
subprocess.run(['callgrind_control', '-i', 'off', str(srv.pid)], stdout=subprocess.DEVNULL)
srv.terminate(); srv.wait()
total = 0
for line in open(out):
    if line.startswith('summary:') or line.startswith('totals:'):
        total = int(line.split()[1])
print(f'{KIND} {os.path.basename(BIN)}: {N} webhooks x{CONC}: {total} Ir, per webhook {total / N:.0f}; {out}')
