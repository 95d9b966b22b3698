"""Medians of ab.sh's pairs (1-4) and get.sh's (5-10), base against new, from the JSON files."""
import glob
import json
import statistics as st


def value(path, metric):
    rows = json.load(open(path))['rows']
    return next(row['ours'][0] for row in rows if metric in row['metric'])


def pairs(prefix, metric, numbers):
    base = [value(f'{prefix}-base-{n}.json', metric) for n in numbers]
    new = [value(f'{prefix}-new-{n}.json', metric) for n in numbers]
    lower = sum(1 for b, n in zip(base, new) if n < b)
    print(f'{prefix:7} {metric:28} base {st.median(base):10.2f}  new {st.median(new):10.2f}'
          f'  new lower in {lower} of {len(base)}')


for prefix, metrics in {
    'get': ['GetProfile calls/s', 'server CPU per call'],
    'list': ['ListProfiles', 'server CPU per call'],
    'fanout': ['latency p50 (answer', 'latency p99 (answer', 'server CPU per delivery'],
}.items():
    for metric in metrics:
        pairs(prefix, metric, range(1, 5))
done = sorted({int(p.split('-')[-1][:-5]) for p in glob.glob('getx-new-*.json')})
for metric in ['GetProfile calls/s', 'server CPU per call']:
    pairs('getx', metric, [n for n in done if glob.glob(f'getx-base-{n}.json')])
