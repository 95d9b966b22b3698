"""The stacks of a `perf script` text dump: one list of symbols per sample, leaf first."""
import re


def samples(path):
    stacks, current = [], []
    for line in open(path, errors='replace'):
        if not line.strip():
            if current:
                stacks.append(current)
            current = []
            continue
        if line[0] in ' \t':
            parts = line.strip().split(' ', 1)
            if len(parts) == 2:
                symbol = re.sub(r'\+0x[0-9a-f]+ \(.*$', '', parts[1]).strip()
                current.append(re.sub(r' \(.*\)$', '', symbol))
    if current:
        stacks.append(current)
    return stacks
