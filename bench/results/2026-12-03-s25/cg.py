#!/usr/bin/env python3
"""cg.py BIN N [N2]: the service (--ephemeral) under callgrind; sends N then (in a second run) N2
signed webhooks one at a time over one keep-alive connection, and prints the instructions per
webhook from the difference of the two runs' totals (startup and shutdown cancel out).
Instructions, not time: repeatable whatever else the box does."""
import sys, os, subprocess, socket, time, hashlib, http.client, re, tempfile, random
BIN = sys.argv[1]; N1 = int(sys.argv[2]); N2 = int(sys.argv[3]) if len(sys.argv) > 3 else 2 * N1
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
def run(n):
    wp, gp, ap = free_port(), free_port(), free_port()
    out = tempfile.mktemp(prefix='cg-', dir='/tmp')
    srv = subprocess.Popen(['valgrind', '--tool=callgrind', f'--callgrind-out-file={out}', BIN, '--ephemeral',
        '--webhook-secret', SECRET, '--webhook-listen', f'127.0.0.1:{wp}', '--grpc-listen', f'127.0.0.1:{gp}',
        '--admin-listen', f'127.0.0.1:{ap}'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try: socket.create_connection(('127.0.0.1', wp), 0.2).close(); break
        except OSError: time.sleep(0.1)
    conn = http.client.HTTPConnection('127.0.0.1', wp)
    codes = {}
    for i in range(n):
        b = body(i % 1000, 10_000_000 + i).encode()
        sig = hashlib.sha1(b + b':' + SECRET.encode()).hexdigest()
        conn.request('POST', '/webhooks/gameball', b, {'content-type': 'application/json', 'x-gb-signature': sig})
        r = conn.getresponse(); data = r.read(); codes[r.status] = codes.get(r.status, 0) + 1
        if r.status != 200 and codes[r.status] == 1: print('status', r.status, data[:200], file=sys.stderr)
    conn.close(); srv.terminate(); srv.wait()
    total = 0
    for line in open(out):
        if line.startswith('summary:') or line.startswith('totals:'):
            total = int(line.split()[1])
    if os.environ.get('KEEP'): print('kept', out, file=sys.stderr)
    else: os.unlink(out)
    return total, codes
t1, c1 = run(N1); t2, c2 = run(N2)
print(f'{os.path.basename(BIN)}: {N1}: {t1} Ir {c1}; {N2}: {t2} Ir {c2}; per webhook {(t2 - t1) / (N2 - N1):.0f} Ir')
