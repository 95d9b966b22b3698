"""One refused 16 MiB body of 1e20 (compact form ~0.7 s), and signed deliveries every 20 ms
meanwhile: their latencies. Usage: BIN=... stall.py"""
import sys, json, time, threading, http.client, hashlib, subprocess
sys.path.insert(0, "/work/adv35")
S = json.load(open("/work/adv35/srv_st59.json"))
heavy = ('{"client_id":"2155","customer_id":"u","x":[' + ",".join(["1e20"] * ((16 << 20) // 5 - 20)) + "]}").encode()
done = {}
def post_heavy():
    c = http.client.HTTPConnection("127.0.0.1", S["wp"], timeout=120)
    t = time.time()
    c.request("POST", "/webhooks/gameball", body=heavy, headers={"Content-Type": "application/json", "X-GB-Signature": "0" * 40})
    r = c.getresponse(); r.read(); done["heavy"] = (r.status, time.time() - t, time.time())
th = threading.Thread(target=post_heavy); th.start()
c = http.client.HTTPConnection("127.0.0.1", S["wp"], timeout=120)
lat = []
t0 = time.time()
i = 0
while th.is_alive() or i < 5:
    i += 1
    body = json.dumps({"event": "customer.profile.updated", "client_id": "2155", "customer_id": f"c{i}", "gb_customer_id": 1, "created_at": "2024-11-19T17:34:42.297Z", "data": {"total_points": i}}).encode()
    sig = hashlib.sha1(body + b":test-secret").hexdigest()
    t = time.time()
    c.request("POST", "/webhooks/gameball", body=body, headers={"Content-Type": "application/json", "X-GB-Signature": sig})
    r = c.getresponse(); r.read(); lat.append((round(t - t0, 3), r.status, round((time.time() - t) * 1000, 1)))
    time.sleep(0.02)
th.join()
print("heavy", done["heavy"][0], "%.2fs" % done["heavy"][1])
print("signed (start s, status, ms):", lat)
