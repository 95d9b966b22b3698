import os,threading,time,sys
path='/work/ref13/syncpar.dat'
fd=os.open(path,os.O_RDWR|os.O_CREAT,0o644)
os.ftruncate(fd,0); os.pwrite(fd,b'\0'*(64<<20),0); os.fsync(fd)
def worker(tid,nthreads,dur,res):
    off=tid*8192; n=0; lat=0.0; end=time.time()+dur
    while time.time()<end:
        t=time.perf_counter()
        os.pwrite(fd,b'x'*8000,off); os.fdatasync(fd)
        lat+=time.perf_counter()-t; n+=1; off+=nthreads*8192
    res[tid]=(n,lat)
for nt in [1,2,3,4,1,2]:
    res={}; ths=[threading.Thread(target=worker,args=(i,nt,3,res)) for i in range(nt)]
    [t.start() for t in ths]; [t.join() for t in ths]
    n=sum(v[0] for v in res.values()); lat=sum(v[1] for v in res.values())
    print(f"threads={nt} syncs/s={n/3:.0f} mean latency={1000*lat/n:.2f} ms")
os.close(fd); os.unlink(path)
