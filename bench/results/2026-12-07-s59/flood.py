"""Posts 64 KiB bodies with a wrong signature from N connections until killed (or for SECONDS);
prints how many were answered and with which status. Usage: flood.py PORT N SECONDS SHAPE"""
import sys, threading, time, http.client, collections
port, n, seconds, shape = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
LIMIT = 65536
head = '{"event":"customer.profile.updated","client_id":"2155","customer_id":"u","gb_customer_id":1,"created_at":"2024-11-19T17:34:42.297Z","data":{"tier_name":"basic"},"u":'
if shape == "deep9-1e20":
    open_, close = "[" * 9, "]" * 9
    inner = []
    size = len(head) + 18 + 2
    while size + 5 < LIMIT:
        inner.append("1e20"); size += 5
    body = head + open_ + ",".join(inner) + close + "}"
elif shape == "one-pass-1e20":
    inner = []
    size = len(head) + 4
    while size + 5 < LIMIT:
        inner.append("1e20"); size += 5
    body = head + "[" + ",".join(inner) + "]}"
body = body.encode()
assert len(body) <= LIMIT, len(body)
counts = collections.Counter()
end = time.time() + seconds
def run():
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    while time.time() < end:
        try:
            c.request("POST", "/webhooks/gameball", body=body, headers={"Content-Type": "application/json", "X-GB-Signature": "0" * 40})
            r = c.getresponse(); r.read(); counts[r.status] += 1
        except Exception as e:
            counts[type(e).__name__] += 1
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
threads = [threading.Thread(target=run) for _ in range(n)]
t0 = time.time()
for t in threads: t.start()
for t in threads: t.join()
el = time.time() - t0
print(f"flood {shape} {len(body)} B x{n}: " + " ".join(f"{k}={v}" for k, v in sorted(counts.items(), key=str)) + f" in {el:.1f}s ({sum(counts.values())/el:.0f}/s)", flush=True)
