"""Area 2: peak memory (VmHWM growth) and server CPU of ONE refused (wrong-signature) body per fresh server,
for shapes that reach the Value path of stringify_body (nesting > 8) or other costs. Usage: refused-hwm.py BUILD(s57|r1|r2|r3) MODE(A|C) SIZE shape..."""
import sys, json, os, time, shutil, http.client
sys.path.insert(0, "/work/adv37")
from lib import *
BINS = {"s57": "/work/bin/s57/final", "r1": "/work/bin/s58/r1", "r2": "/work/bin/s58/r2", "r3": "/work/bin/s58/r3"}
binp, MODE, SIZE = BINS[sys.argv[1]], sys.argv[2], int(sys.argv[3])
HEAD = '{"event":"customer.profile.updated","client_id":"2155","customer_id":"u","gb_customer_id":1,"created_at":"2024-11-19T17:34:42.297Z","data":{"tier_name":"basic"},"u":'
def pad(prefix, unit, suffix, head=HEAD, tail="}"):
    n = (SIZE - len(head) - len(prefix) - len(suffix) - len(tail) - 1) // len(unit)
    return (head + prefix + (unit * n)[:-1] + suffix + tail).encode()
SH = {
 "plain-string": lambda: pad('"', "a", '"'),
 "small-ints": lambda: pad("[", "1,", "]"),
 "arr7-small-ints": lambda: pad("[" * 7, "1,", "]" * 7),
 "arr8-small-ints": lambda: pad("[" * 8, "1,", "]" * 8),
 "deep9-small-ints": lambda: pad("[" * 9, "1,", "]" * 9),
 "deep9-empty-arrays": lambda: pad("[" * 9, "[],", "]" * 9),
 "deep9-empty-objs": lambda: pad("[" * 9, "{},", "]" * 9),
 "deep9-1e20": lambda: pad("[" * 9, "1e20,", "]" * 9),
 "deep9-u-escapes": lambda: pad("[" * 9 + '"', "\\u0061", '"' + "]" * 9),
 "deep9-tiny-objs": lambda: pad("[" * 9, '{"1":0,"0":0},', "]" * 9),
 "deep9-distinct-keys-obj": lambda: pad("[" * 8 + "{", '"k":0,', "}" + "]" * 8),
 "one-pass-u-escapes": lambda: pad('"', "\\u0061", '"'),
 "one-pass-1e20": lambda: pad("[", "1e20,", "]"),
 "one-pass-tiny-objs": lambda: pad("[", '{"1":0,"0":0},', "]"),
 "prefix-string-then-cid": lambda: pad("", "\\\\", "", head='{"p":"', tail='","client_id":"2155"}'),
 "prefix-shallow-arrays-then-cid": lambda: pad("", "[[[[[[]]]]]],", "", head='{"p":[', tail='],"client_id":"2155"}'),
 "prefix-nested-then-cid": lambda: pad("", "[[[[[[[[[]]]]]]]]],", "", head='{"p":[', tail='],"client_id":"2155"}'),
}
def status():
    d = {}
    for l in open(f"/proc/{s.proc.pid}/status"):
        k = l.split(":")[0]
        if k in ("VmHWM", "VmRSS"): d[k] = int(l.split()[1])
    return d
def cpu():
    x = open(f"/proc/{s.proc.pid}/stat").read().split(); return (int(x[13]) + int(x[14])) / os.sysconf("SC_CLK_TCK")
secrets = f"/tmp/adv37/secrets_C.json"
json.dump({"default": ["test-secret"], "clients": {"2155": ["s2155a", "s2155b", "s2155c"], "3000": ["s3000"]}}, open(secrets, "w"))
for name in sys.argv[4:]:
    b = SH[name]()
    dd = f"/tmp/adv37/hwm_{sys.argv[1]}_{MODE}"; shutil.rmtree(dd, ignore_errors=True)
    ex = ["--max-body-bytes", str(max(SIZE, 65536))] + (["--webhook-secrets-file", secrets] if MODE == "C" else [])
    s = Server(dd, *ex, secret=(MODE == "A"), bin=binp, log=dd + ".log"); open(s.log, "w").close()
    assert s.start()
    try:
        time.sleep(0.3); h0 = status(); res = []
        c = http.client.HTTPConnection("127.0.0.1", s.wp, timeout=600)
        for i in range(int(os.environ.get("REPS", "3"))):
            if os.environ.get("SCAN") and i == 3: time.sleep(10.5)
            c0 = cpu(); t0 = time.time()
            c.request("POST", "/webhooks/gameball", body=b, headers={"Content-Type": "application/json", "X-GB-Signature": "0" * 40})
            r = c.getresponse(); r.read()
            res.append((r.status, round(time.time() - t0, 3), round(cpu() - c0, 3)))
        h1 = status()
        grow = (h1["VmHWM"] - h0["VmHWM"]) / 1024
        print(f"{sys.argv[1]} {MODE} {name:26s} {len(b):9d} B: (status, wall s, CPU s) {res}; VmHWM {h0['VmHWM']//1024}->{h1['VmHWM']//1024} MiB (+{grow:.0f} MiB = {grow*1048576/len(b):.1f}x body)", flush=True)
    finally:
        s.kill(); s.wait()
