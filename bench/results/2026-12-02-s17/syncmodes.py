# syncmodes.py: 3,000 pwrite(8 KiB) [+ fdatasync] into a pre-zeroed 64 MiB f.dat (written and synced first if missing), buffered vs O_DIRECT vs O_DSYNC: rate and CPU per sync.
import os, time, mmap, resource
N=3000; TOTAL=64<<20; FILE='f.dat'
if not os.path.exists(FILE):
    fd=os.open(FILE,os.O_CREAT|os.O_WRONLY,0o644)
    for i in range(TOTAL>>20): os.write(fd,b'\0'*(1<<20))
    os.fsync(fd); os.close(fd)
def cpu():
    r=resource.getrusage(resource.RUSAGE_SELF); return r.ru_utime, r.ru_stime
def run(name, flags, size, sync=True):
    fd=os.open(FILE,os.O_WRONLY|flags)
    buf=mmap.mmap(-1,size); buf.write(b'z'*size)
    off=0; u0,s0=cpu(); t=time.perf_counter()
    for i in range(N):
        os.pwrite(fd,buf,off)
        if sync: os.fdatasync(fd)
        off=(off+size)%TOTAL
    el=time.perf_counter()-t; u1,s1=cpu(); os.close(fd)
    print(f"{name:26s} {N/el:6.0f}/s  {el/N*1e3:.3f} ms  user {(u1-u0)/N*1e6:5.1f} us sys {(s1-s0)/N*1e6:5.1f} us per op")
for r in range(3):
    run('buffered 8k + fdatasync',0,8192)
    run('O_DIRECT 8k + fdatasync',os.O_DIRECT,8192)
    run('O_DIRECT|O_DSYNC 8k',os.O_DIRECT|os.O_DSYNC,8192,False)
    run('buffered 8k no sync',0,8192,False)
