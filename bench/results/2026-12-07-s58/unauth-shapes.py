"""Area 2: server CPU per request (wrong signature, so the compact form is written before 401) for bodies
shaped against the one-pass writer, vs a plain 64 KiB string body. Usage: b1_cost.py SRVNAME [shape...] [--limit N]"""
import sys, json, time, threading, os, http.client
sys.path.insert(0, "/work/adv35")
args = [a for a in sys.argv[2:] if not a.startswith("--")]
LIMIT = int(next((a.split("=")[1] for a in sys.argv if a.startswith("--limit=")), "65536"))
S = json.load(open(f"/work/adv35/srv_{sys.argv[1]}.json"))
def cpu():
    x = open(f"/proc/{S['pid']}/stat").read().split(); return (int(x[13]) + int(x[14])) / os.sysconf("SC_CLK_TCK")
def rss():
    for l in open(f"/proc/{S['pid']}/status"):
        if l.startswith("VmRSS"): return int(l.split()[1])
import os
HEAD = ('{"event":"customer.profile.updated","client_id":"2155","customer_id":"u","gb_customer_id":1,"created_at":"2024-11-19T17:34:42.297Z","data":{"tier_name":"basic"},"u":' if os.environ.get("IN_DATA") is None else '{"event":"customer.profile.updated","client_id":"2155","customer_id":"u","gb_customer_id":1,"created_at":"2024-11-19T17:34:42.297Z","data":{"x":')
TAIL = "}" if os.environ.get("IN_DATA") is None else "}}"
def fill(make_inner, limit):
    """largest n such that HEAD + make_inner(n) + '}' fits in limit (binary search)"""
    lo, hi = 1, 1
    while len(HEAD) + len(make_inner(hi)) + 2 <= limit: hi *= 2
    while lo < hi - 1:
        mid = (lo + hi) // 2
        if len(HEAD) + len(make_inner(mid)) + 2 <= limit: lo = mid
        else: hi = mid
    return (HEAD + make_inner(lo) + TAIL).encode()
def deep_idx(d, bottom):
    s = bottom
    for _ in range(d): s = '{"1":0,"x":' + s + ',"0":0}'
    return s
def shapes(limit):
    return {
     "plain-string": lambda: fill(lambda n: '"' + "a" * n + '"', limit),
     "small-ints": lambda: fill(lambda n: "[" + ",".join(["1"] * n) + "]", limit),
     "idx-keys-desc": lambda: fill(lambda n: "{" + ",".join(f'"{i}":0' for i in range(n, 0, -1)) + "}", limit),
     "idx-keys-asc-last-0": lambda: fill(lambda n: "{" + ",".join(f'"{i}":0' for i in range(1, n)) + ',"0":0}', limit),
     "same-key": lambda: fill(lambda n: "{" + ",".join(['"a":0'] * n) + "}", limit),
     "distinct-keys": lambda: fill(lambda n: "{" + ",".join(f'"k{i}":0' for i in range(n)) + "}", limit),
     "tiny-reordered-objs": lambda: fill(lambda n: "[" + ",".join(['{"1":0,"0":0}'] * n) + "]", limit),
     "tiny-dup-objs": lambda: fill(lambda n: "[" + ",".join(['{"a":0,"a":0}'] * n) + "]", limit),
     "expand-then-tiny-objs": lambda: fill(lambda n: "[" + ",".join(["1e20"] * (limit // 12)) + "," + ",".join(['{"1":0,"0":0}'] * n) + "]", limit),
     "expand-1e20": lambda: fill(lambda n: "[" + ",".join(["1e20"] * n) + "]", limit),
     "deep127-idx-bottom-string": lambda: fill(lambda n: deep_idx(126, '"' + "a" * n + '"'), limit),
     "deep127-idx-bottom-1e20": lambda: fill(lambda n: deep_idx(125, "[" + ",".join(["1e20"] * n) + "]"), limit),
     "deep127-idx-bottom-tinyobjs": lambda: fill(lambda n: deep_idx(124, "[" + ",".join(['{"1":0,"0":0}'] * n) + "]"), limit),
     "deep127-dup-bottom-1e20": lambda: fill(lambda n: (lambda s: [s := '{"a":0,"x":' + s + ',"a":1}' for _ in range(125)][-1])("[" + ",".join(["1e20"] * n) + "]"), limit),
     "long-keys-8": lambda: fill(lambda n: "{" + ",".join('"' + "k" * n + str(i) + '":0' for i in range(8)) + "}", limit),
     "long-keys-dup-9": lambda: fill(lambda n: "{" + ",".join('"' + "k" * n + str(i % 8) + '":0' for i in range(9)) + "}", limit),
    }
def run(name, b, conns=8, secs=6):
    stop = threading.Event(); n = [0]; sts = {}
    def flood():
        c = http.client.HTTPConnection("127.0.0.1", S["wp"], timeout=60)
        while not stop.is_set():
            try:
                c.request("POST", "/webhooks/gameball", body=b, headers={"Content-Type": "application/json", "X-GB-Signature": "0" * 40})
                r = c.getresponse(); r.read(); n[0] += 1; sts[r.status] = sts.get(r.status, 0) + 1
            except Exception as e:
                sts[str(e)[:40]] = sts.get(str(e)[:40], 0) + 1; c = http.client.HTTPConnection("127.0.0.1", S["wp"], timeout=60)
    r0 = rss(); c0 = cpu(); t0 = time.time(); ths = [threading.Thread(target=flood) for _ in range(conns)]
    for t in ths: t.start()
    time.sleep(secs); stop.set()
    for t in ths: t.join()
    el = time.time() - t0; c1 = cpu()
    ms = (c1 - c0) / max(n[0], 1) * 1000
    print(f"{name:32s} {len(b):9d} B: {n[0]:5d} req in {el:.1f}s {sts} server CPU {ms:7.3f} ms/req; rss {r0}->{rss()} KB", flush=True)
    return ms
sh = shapes(LIMIT)
base = None
for name, mk in sh.items():
    if args and name not in args and name != "plain-string": continue
    b = mk()
    ms = run(name, b, conns=8 if LIMIT <= 65536 else 2, secs=6 if LIMIT <= 65536 else 10)
    if name == "plain-string": base = ms
    else: print(f"{'':32s} ratio to plain: {ms / base:.1f}x", flush=True)
