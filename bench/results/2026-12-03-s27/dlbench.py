#!/usr/bin/env python3
"""dlbench.py N SIZE: a replica on a single nats-server; N signed webhooks of about SIZE bytes
that fail validation (each a dead letter); then times `dead-letters list --json`."""
import sys, os, subprocess, socket, time, hashlib, http.client, json, tempfile, shutil
N, SIZE = int(sys.argv[1]), int(sys.argv[2])
BIN = os.environ.get('BIN', '/work/bin/s27/cdf2b34/profile-state')
NATS = '/work/bin/s25/nats-server/2.15.1/bin/nats-server'
SECRET = 'test-secret'
def free_port():
    s = socket.socket(); s.bind(('127.0.0.1', 0)); p = s.getsockname()[1]; s.close(); return p
work = tempfile.mkdtemp(prefix='dl-', dir='/work/s27/dl')
np = free_port()
nats = subprocess.Popen([NATS, '-js', '-p', str(np), '-sd', f'{work}/js'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
time.sleep(1)
wp, gp, ap = free_port(), free_port(), free_port()
srv = subprocess.Popen([BIN, '--webhook-secret', SECRET, '--nats-url', f'nats://127.0.0.1:{np}', '--nats-replicas', '1',
    '--replica-name', 'r1', '--data-dir', f'{work}/data', '--webhook-listen', f'127.0.0.1:{wp}',
    '--grpc-listen', f'127.0.0.1:{gp}', '--admin-listen', f'127.0.0.1:{ap}'], stdout=open(f'{work}/log', 'w'), stderr=subprocess.STDOUT)
try:
    for _ in range(300):
        try: socket.create_connection(('127.0.0.1', wp), 0.2).close(); break
        except OSError: time.sleep(0.1)
    conn = http.client.HTTPConnection('127.0.0.1', wp)
    codes = {}
    pad = 'x' * SIZE
    t0 = time.time()
    for i in range(N):
        b = json.dumps({"event": "customer.profile.updated", "client_id": "c", "customer_id": f"cust-{i}",
                        "created_at": "not a date", "data": {"note": f"{i}-{pad}"}}).encode()
        sig = hashlib.sha1(b + b':' + SECRET.encode()).hexdigest()
        conn.request('POST', '/webhooks/gameball', b, {'content-type': 'application/json', 'x-gb-signature': sig})
        r = conn.getresponse(); r.read(); codes[r.status] = codes.get(r.status, 0) + 1
    print(f'posted {N} in {time.time()-t0:.1f}s: {codes}')
    ok = {}
    for i in range(5):
        b = ('{"event":"customer.profile.updated","client_id":"bench","customer_id":"good-%d","gb_customer_id":%d,'
             '"created_at":"2025-01-01T00:00:0%dZ","data":{"email":"a%d@example.com","total_points":%d}}' % (i, i, i, i, i)).encode()
        sig = hashlib.sha1(b + b':' + SECRET.encode()).hexdigest()
        conn.request('POST', '/webhooks/gameball', b, {'content-type': 'application/json', 'x-gb-signature': sig})
        r = conn.getresponse(); r.read(); ok[r.status] = ok.get(r.status, 0) + 1
    print('valid webhooks after the burst:', ok)
    if os.environ.get('WAIT'):
        out = subprocess.run([BIN, 'dead-letters', 'list', '--json', '--grpc', f'127.0.0.1:{gp}'], capture_output=True)
        print('list at once: exit', out.returncode, out.stderr[:120])
        time.sleep(int(os.environ['WAIT']))
    t0 = time.time()
    out = subprocess.run([BIN, 'dead-letters', 'list', '--json', '--grpc', f'127.0.0.1:{gp}'], capture_output=True)
    lines = out.stdout.count(b'\n')
    print(f'list: exit {out.returncode}, {lines} lines, {len(out.stdout)} bytes, {time.time()-t0:.1f}s; {out.stderr[:300]!r}')
finally:
    srv.terminate(); srv.wait(); nats.terminate(); nats.wait()
    print("work", work) if os.environ.get("KEEP") else shutil.rmtree(work, ignore_errors=True)
