"""N senders post refused bodies (BODY file) back to back, each waiting for its answer, for
SECONDS while one client posts, every 20 ms, a delivery signed over its compact form and sent
pretty-printed (its bytes match no secret): that delivery's answers (how many 200, how many 503)
and the 200s' latencies. Usage: stall3.py SRVNAME N SECONDS BODY"""
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
time.sleep(0.5)  # the flood under way first
c = http.client.HTTPConnection("127.0.0.1", S["wp"], timeout=300)
lat, statuses, i = [], [], 0
while time.time() < end:
    i += 1
    update = {"event": "customer.profile.updated", "client_id": "2155", "customer_id": f"c{i}", "gb_customer_id": 1, "created_at": "2024-11-19T17:34:42.297Z", "data": {"total_points": i}}
    compact = json.dumps(update, separators=(",", ":")).encode()
    pretty = json.dumps(update, indent=2).encode()
    sig = hashlib.sha1(compact + b":test-secret").hexdigest()
    t = time.time()
    c.request("POST", "/webhooks/gameball", body=pretty, headers={"Content-Type": "application/json", "X-GB-Signature": sig})
    r = c.getresponse(); r.read(); statuses.append(r.status)
    if r.status == 200:
        lat.append((time.time() - t) * 1000)
    time.sleep(0.02)
for t in threads: t.join()
lat.sort()
q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")
counts = ", ".join(f"{s}={statuses.count(s)}" for s in sorted(set(statuses)))
print(f"compact-signed: {counts}; 200s p50 {q(0.5):.1f} ms, p99 {q(0.99):.1f} ms, max {lat[-1] if lat else float('nan'):.1f} ms; refused: {len(refused)} ({', '.join(f'{s}={refused.count(s)}' for s in sorted(set(refused)))})")
