#!/usr/bin/env python3
"""Per-request instruction and allocation counts from two callgrind runs of the e2e bench.

usage: callgrind-per-request.py SHORT.out LONG.out [N]

Both runs must be of the same binary and variant (e.g. DUR_SECS=4 and DUR_SECS=16), recorded
with `--separate-callers6=malloc` so each malloc call site is its own context. The request
count is exact: the number of `Outbound::handle` futures dropped (one per meshed request).
Per request = (LONG - SHORT) / (requests LONG - requests SHORT), so start-up cancels. With N,
also prints the N malloc call sites with the most calls per request.
"""
import collections
import re
import sys

REQUEST = "core::ptr::drop_in_place<mesh_tower::outbound::Outbound::handle::{{closure}}>"


def load(path):
    names, calls, total, cfn = {}, collections.Counter(), 0, ""

    def resolve(s):
        m = re.match(r"\((\d+)\)(?: (.*))?", s)
        if not m:
            return s
        if m.group(2):
            names[m.group(1)] = m.group(2)
        return names.get(m.group(1), s)

    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("fn="):
                resolve(line[3:].strip())
            elif line.startswith("cfn="):
                cfn = resolve(line[4:].strip())
            elif line.startswith("calls="):
                calls[cfn] += int(line[6:].split()[0])
            elif line.startswith(("summary:", "totals:")):
                total = int(line.split()[1])
    return calls, total


def main():
    (a, ta), (b, tb) = load(sys.argv[1]), load(sys.argv[2])
    n = b[REQUEST] - a[REQUEST]
    if n <= 0:
        sys.exit("no meshed requests between the two runs")

    def per(prefix):
        return sum(b[k] - a.get(k, 0) for k in b if k.startswith(prefix)) / n

    print(f"requests {n}; Ir/request {(tb - ta) / n:.0f}; "
          f"malloc/request {per('malloc'):.2f}; realloc/request {per('realloc'):.2f}")
    if len(sys.argv) > 3:
        sites = {k: (b[k] - a.get(k, 0)) / n for k in b if k.startswith("malloc'")}
        for k, v in sorted(sites.items(), key=lambda x: -x[1])[: int(sys.argv[3])]:
            print(f"{v:5.2f}  " + " < ".join(p[:80] for p in k.split("'")[1:5]))


if __name__ == "__main__":
    main()
