"""Micro-timing of the sidecar's counter increments through the call surface callers use.

``.venv/bin/python bench/micro/stats_inc.py`` prints ns per increment (best and median of 7
runs of 200,000, the empty loop subtracted). Not a test: speed is never asserted.
"""

import time

from diktyo.proxy.stats import Stats


def timeit(fn, n=200_000, reps=7):
    best = []
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        fn(n)
        best.append((time.perf_counter_ns() - t0) / n)
    best.sort()
    return best[0], best[len(best) // 2]


s = Stats()
CL = "outbound|9080|v1|reviews.default.svc.cluster.local"
server = s.server
inc = s.inc_cluster


def empty(n):
    for _ in range(n):
        pass


def server_inc(n):
    for _ in range(n):
        server["downstream_rq_total"] += 1


def server_get(n):
    for _ in range(n):
        server["downstream_rq_internal_error"] = server.get("downstream_rq_internal_error", 0) + 1


def cluster_fam(n):
    for _ in range(n):
        inc(CL, "upstream_rq_retry")


def cluster_dict(n):
    for _ in range(n):
        inc(CL, "upstream_cx_total")


fam = s.families["config_pushes"]
block = s.cluster_stats(CL) if hasattr(s, "cluster_stats") else None


def held_block(n):
    for _ in range(n):
        block["upstream_rq_retry"] += 1


def family_inc(n):
    for _ in range(n):
        fam.inc()


e = timeit(empty)[0]
for name, fn in [
    ("server[k] += 1", server_inc),
    ("server[k] = server.get(k,0)+1", server_get),
    ("inc_cluster(c, 'upstream_rq_retry')", cluster_fam),
    ("inc_cluster(c, 'upstream_cx_total')", cluster_dict),
    ("families['config_pushes'].inc()", family_inc),
] + ([("block['upstream_rq_retry'] += 1", held_block)] if block is not None else []):
    b, m = timeit(fn)
    print(f"{name:40s} best {b - e:6.1f} ns  median {m - e:6.1f} ns")
