"""N senders post refused bodies (BODY file) back to back for SECONDS while one client posts a
signed delivery every 20 ms: the signed deliveries' latencies (p50, p99, max) and the refused
bodies answered. Usage: stall2.py SRVNAME N SECONDS BODY"""
import sys, json, time, threading, http.client, hashlib
S = json.load(open(f"/work/adv35/srv_{sys.argv[1]}.json"))
n, seconds, heavy = int(sys.argv[2]), float(sys.argv[3]), open(sys.argv[4], "rb").read()
end = time.time() + seconds
refused = []
def flood():
    c = http.client.HTTPConnection("127.0.0.1", S["wp"], timeout=300)
    while time.time() < end:
        c.request("POST", "/webhooks/gameball", body=heavy, headers={"Content-Type": "application/json", "X-GB-Signature": "0" * 40})
        r = c.getresponse(); r.read(); refused.append(r.status)
threads = [threading.Thread(target=flood) for _ in range(n)]
for t in threads: t.start()
c = http.client.HTTPConnection("127.0.0.1", S["wp"], timeout=300)
lat, i = [], 0
while time.time() < end:
    i += 1
    body = json.dumps({"event": "customer.profile.updated", "client_id": "2155", "customer_id": f"c{i}", "gb_customer_id": 1, "created_at": "2024-11-19T17:34:42.297Z", "data": {"total_points": i}}).encode()
    sig = hashlib.sha1(body + b":test-secret").hexdigest()
    t = time.time()
    c.request("POST", "/webhooks/gameball", body=body, headers={"Content-Type": "application/json", "X-GB-Signature": sig})
    r = c.getresponse(); r.read(); assert r.status == 200, r.status
    lat.append((time.time() - t) * 1000)
    time.sleep(0.02)
for t in threads: t.join()
lat.sort()
q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))]
print(f"signed: {len(lat)} answered, p50 {q(0.5):.1f} ms, p99 {q(0.99):.1f} ms, max {lat[-1]:.1f} ms; refused: {len(refused)} ({', '.join(f'{s}={refused.count(s)}' for s in sorted(set(refused)))})")
