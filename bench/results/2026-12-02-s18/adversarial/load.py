import sys, time, json, hashlib, socket, selectors
port=int(sys.argv[1]); n=int(sys.argv[2]); period=float(sys.argv[3])/1000; dur=float(sys.argv[4])
SECRET=b"bench-secret"
def req(i,k):
    body=json.dumps({"event":"customer.profile.updated","client_id":"2155","customer_id":f"adv-{i}-{k%50}","gb_customer_id":1000+i,"created_at":"2024-11-19T17:34:42.297Z","data":{"email":"c@example.com","tier_name":"basic","tier_order":1,"activated_points":k,"pending_points":10,"total_points":100+k}}).encode()
    sig=hashlib.sha1(body+b":"+SECRET).hexdigest()
    return (b"POST /webhooks/gameball HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-GB-Signature: "+sig.encode()+b"\r\nContent-Length: "+str(len(body)).encode()+b"\r\n\r\n"+body)
socks=[socket.create_connection(("127.0.0.1",port)) for _ in range(n)]
for s in socks: s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY,1)
sel=selectors.DefaultSelector()
lat=[]; errs=0; k=0
t0=time.monotonic()+0.2
while True:
    t=t0+k*period
    if t>t0+dur: break
    d=t-time.monotonic()
    if d>0: time.sleep(d)
    reqs=[req(i,k) for i in range(n)]
    st={}
    for i,s in enumerate(socks):
        st[i]=time.monotonic(); s.sendall(reqs[i])
    pend=set(range(n)); buf={i:b"" for i in range(n)}
    for i,s in enumerate(socks): sel.register(s, selectors.EVENT_READ, i)
    while pend:
        for key,_ in sel.select(5):
            i=key.data; buf[i]+=key.fileobj.recv(65536)
            b=buf[i]
            if b"\r\n\r\n" in b:
                h,_,rest=b.partition(b"\r\n\r\n")
                cl=0
                for line in h.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"): cl=int(line.split(b":")[1])
                if len(rest)>=cl:
                    lat.append(time.monotonic()-st[i])
                    if not h.startswith(b"HTTP/1.1 2"): errs+=1
                    pend.discard(i); sel.unregister(key.fileobj)
    k+=1
lat.sort()
p=lambda q: lat[min(len(lat)-1,int(q*len(lat)))]*1e6
print(json.dumps({"sent":len(lat),"errs":errs,"p50us":round(p(.5)),"p99us":round(p(.99))}))
