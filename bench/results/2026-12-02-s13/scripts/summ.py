import json,sys,statistics as st
# summ.py FILES...: one line per ingest run from the bench's JSON
for f in sys.argv[1:]:
    d=json.load(open(f)); rows={r['metric']:r for r in d['rows']}
    def med(m,k='ours'):
        r=rows.get(m); v=r and r.get(k)
        return st.median(v) if v else float('nan')
    def ratio(m):
        r=rows.get(m); return r['ratio'] if r and r.get('ratio') is not None else float('nan')
    print(f"{f.split('/')[-1]:28s} noop={med('req/s (--ephemeral)','baseline'):7.0f} eph={med('req/s (--ephemeral)'):7.0f} eph/noop={ratio('req/s (--ephemeral)'):.2f} "
          f"durable={med('req/s durable vs --ephemeral'):7.0f} dur/eph={ratio('req/s durable vs --ephemeral'):.2f} "
          f"cpu_eph={med('server CPU per req (--ephemeral)'):.1f} cpu_dur={med('server CPU per req durable'):.1f} "
          f"per_append={med('durable: webhooks per journal append (group commit)'):.1f} append_ms={med('durable: mean journal append incl. fdatasync'):.2f} p50_dur={med('latency p50 durable'):.2f}")
