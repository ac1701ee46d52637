"""`bench/run.py --mode concurrency`: many concurrent keep-alive clients on the plain route.

For each worker count (`--workers`, default 1 and 2) fresh servers: the load test's upstream
(nginx `return 200 "hello"`, 1 worker) and four gateways in front of it on the plain route,
each with that many workers (threads): nginx (`proxy_pass`, `keepalive 128`), HAProxy
(`nbthread`), Pingora (`threads`) and moongate (`workers`). Every server runs on CPU1, wrk
on CPU0 (one wrk process: the client's 10,000 sockets fit in its 20,000 open files). For each
client count (`--levels`, default 1,000 and 10,000) and repetition, every gateway in turn (the
order flips every other repetition): a warm-up run, then the measured `wrk -t1 -cN --latency
--timeout T` run. Each run opens its N connections anew, so the accept burst is part of it.

Per run: rps, p50/p99 (wrk's latency distribution, which leaves out timed-out requests),
errors (non-2xx responses plus wrk's connect, read, write and timeout errors), the
gateway's CPU µs per request, and from the machine's TCP counters (`nstat`) the connections
opened per request beyond the client's (the gateway's upstream connects) and the listen-queue
overflows. Per repetition the ratios moongate/peer for rps and p99. Writes
bench/out/concurrency.json and concurrency.md.
"""

import json
import os
import re
import subprocess
import time

import peers
import run as r

GATEWAYS = ["nginx", "haproxy", "pingora", "moongate"]
# Files per process: the servers hold the client's sockets and their upstream connections.
NOFILE = 20_000


def upstream_conf(port):
    return r.upstream_conf(port).replace(
        "events { worker_connections 4096; }",
        f"worker_rlimit_nofile {NOFILE};\nevents {{ worker_connections {NOFILE - 100}; }}")


def nginx_conf(port, up_port, workers):
    return f"""
worker_processes {workers};
worker_rlimit_nofile {NOFILE};
daemon off;
pid {r.RUN}/nginx-conc.pid;
error_log {r.RUN}/nginx-conc.err warn;
events {{ worker_connections {NOFILE - 100}; }}
http {{
    access_log off;
    keepalive_requests 1000000;
{r.nginx_backend(up_port)}    server {{
        listen 127.0.0.1:{port} backlog=4096;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        location / {{
            proxy_pass http://backend;
        }}
    }}
}}
"""


def moongate_conf(port, up_port, workers):
    pool = "{size: 128, idle_timeout: 60, requests: 1000000}"
    return f"""
listen: 127.0.0.1:{port}
workers: {workers}
log_level: warn
access_log: false
routes:
  - id: plain
    uri: /*
    upstream:
      type: roundrobin
      nodes: {{"127.0.0.1:{up_port}": 1}}
      keepalive_pool: {pool}
"""


def start_servers(workers, mg_bin):
    os.makedirs(r.RUN, exist_ok=True)
    up_port, ngx_port, ha_port, pg_port, mg_port = r.free_ports(5)
    files = {
        "upstream-conc.conf": upstream_conf(up_port),
        "nginx-conc.conf": nginx_conf(ngx_port, up_port, workers),
        "moongate-conc.yaml": moongate_conf(mg_port, up_port, workers),
    }
    for name, text in files.items():
        with open(os.path.join(r.RUN, name), "w") as f:
            f.write(text)
    procs = {
        "upstream": r.start("upstream", ["nginx", "-p", r.RUN, "-c", f"{r.RUN}/upstream-conc.conf"],
                            f"{r.RUN}/upstream-conc.stderr"),
        "nginx": r.start("nginx", ["nginx", "-p", r.RUN, "-c", f"{r.RUN}/nginx-conc.conf"],
                         f"{r.RUN}/nginx-conc.stderr"),
        "haproxy": peers.start_haproxy(ha_port, up_port, peers.HAPROXY_MAX_CONNS, threads=workers),
        "pingora": peers.start_pingora(pg_port, up_port, threads=workers),
        "moongate": r.start("moongate", [mg_bin, "run", "-c", f"{r.RUN}/moongate-conc.yaml"],
                            f"{r.RUN}/moongate-conc.stderr"),
    }
    ports = {"nginx": ngx_port, "haproxy": ha_port, "pingora": pg_port, "moongate": mg_port}
    r.wait_http(f"http://127.0.0.1:{up_port}/", "hello")
    for gw, port in ports.items():
        r.wait_http(f"http://127.0.0.1:{port}/", "hello")
    return procs, ports


def parse_errors(text):
    """wrk's socket errors as a dict, and their sum."""
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    errs = dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups()))) if m else {}
    return errs


def run_wrk(port, conns, seconds, timeout):
    cmd = ["taskset", "-c", "0", "wrk", "-t1", f"-c{conns}", f"-d{seconds}s", f"--timeout", f"{timeout}s",
           "--latency", f"http://127.0.0.1:{port}/"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + timeout + 120)
    return p.stdout


# The machine's TCP counters (`nstat -az`), read around each run: only one gateway is loaded
# at a time, so their deltas are that run's (plus whatever else the machine does).
NSTAT = {"TcpActiveOpens": "tcp_opens", "TcpExtListenOverflows": "listen_overflows",
         "TcpExtTCPSynRetrans": "syn_retrans"}


def nstat():
    try:
        out = subprocess.run(["nstat", "-az"], capture_output=True, text=True).stdout
    except OSError:
        return {}
    vals = {}
    for line in out.splitlines():
        f = line.split()
        if len(f) >= 2 and f[0] in NSTAT:
            vals[NSTAT[f[0]]] = int(f[1])
    return vals


def measure(port, conns, seconds, timeout, pid):
    g0, n0 = r.cpu_ticks(pid), nstat()
    out = run_wrk(port, conns, seconds, timeout)
    g1, n1 = r.cpu_ticks(pid), nstat()
    w = r.parse_wrk(out)
    errs = parse_errors(out)
    n = max(w["requests"], 1)
    return {
        "rps": w["rps"], "requests": w["requests"], "p50_ms": w["p50_ms"], "p99_ms": w["p99_ms"],
        "non2xx": w["non2xx"], "socket_errors": errs,
        "errors": w["non2xx"] + sum(errs.values()),
        "cpu_us_per_req": (sum(g1) - sum(g0)) * 1e6 / r.CLK_TCK / n,
        # TCP connections opened during the run beyond the client's own: the gateway's
        # upstream connects (a pool that keeps too few idle connections churns).
        "upstream_opens_per_req": max(n1.get("tcp_opens", 0) - n0.get("tcp_opens", 0) - conns, 0) / n,
        "listen_overflows": n1.get("listen_overflows", 0) - n0.get("listen_overflows", 0),
    }


def span(s, nd=2):
    return "-" if not s else f"{s['median']:.{nd}f} ({s['min']:.{nd}f}-{s['max']:.{nd}f})"


def concurrency_mode(args):
    r.raise_nofile()
    levels = [int(c) for c in args.levels.split(",") if c]
    workers_list = [int(w) for w in args.workers.split(",") if w]
    mg_bin = os.path.abspath(args.bin) if args.bin else os.path.join(r.ROOT, "target/release/moongate")
    meta = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "moongate_commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=r.ROOT,
                                          capture_output=True, text=True).stdout.strip(),
        "reps": args.reps, "duration_s": args.duration, "warmup_s": args.warmup,
        "levels": levels, "workers": workers_list, "wrk_timeout_s": args.wrk_timeout,
        "bin": mg_bin, **peers.versions(),
        "placement": "wrk -t1 on CPU0; upstream (1 worker) and every gateway on CPU1",
        "load_before": [],
    }
    runs = {}
    for workers in workers_list:
        procs, ports = start_servers(workers, mg_bin)
        try:
            for rep in range(args.reps):
                meta["load_before"].append(r.loadavg())
                for conns in levels:
                    order = GATEWAYS if rep % 2 == 0 else list(reversed(GATEWAYS))
                    for gw in order:
                        if args.warmup > 0:
                            run_wrk(ports[gw], conns, args.warmup, args.wrk_timeout)
                        x = measure(ports[gw], conns, args.duration, args.wrk_timeout, procs[gw].pid)
                        x["rep"] = rep
                        runs.setdefault(f"w{workers} c{conns}", {}).setdefault(gw, []).append(x)
                        r.log(f"workers {workers} c={conns:5} rep {rep} {gw:8} {x['rps']:8.0f} rps  "
                              f"p50 {r.fmt(x['p50_ms'], 2)}  p99 {r.fmt(x['p99_ms'], 2)}  "
                              f"ms  errors {x['errors']} {x['socket_errors']}  "
                              f"cpu {x['cpu_us_per_req']:.1f} us/req  upstream opens/req "
                              f"{x['upstream_opens_per_req']:.2f}  listen overflows {x['listen_overflows']}")
                for name, p in procs.items():
                    if p.poll() is not None:
                        raise RuntimeError(f"{name} exited with {p.returncode}; see {r.RUN}")
        finally:
            r.stop_all()

    table = {}
    for step, by_gw in runs.items():
        row = {}
        for gw, xs in by_gw.items():
            row[gw] = {k: r.summary([x[k] for x in xs])
                       for k in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req", "upstream_opens_per_req",
                                 "listen_overflows")}
            row[gw]["errors"] = sum(x["errors"] for x in xs)
        mg = {x["rep"]: x for x in by_gw.get("moongate", [])}
        for peer in ("nginx", "haproxy", "pingora"):
            rps, p99 = [], []
            for x in by_gw.get(peer, []):
                y = mg.get(x["rep"])
                if y and x["rps"]:
                    rps.append(y["rps"] / x["rps"])
                if y and x["p99_ms"] and y["p99_ms"] is not None:
                    p99.append(y["p99_ms"] / x["p99_ms"])
            row[f"moongate/{peer}"] = {"rps": r.summary(rps), "p99": r.summary(p99),
                                       "rps_per_rep": rps, "p99_per_rep": p99}
        table[step] = row
    out = os.path.join(r.OUT, "concurrency.json")
    os.makedirs(r.OUT, exist_ok=True)
    with open(out, "w") as f:
        json.dump({"meta": meta, "table": table, "runs": runs}, f, indent=1)

    md = [f"{meta['date']}, commit {meta['moongate_commit']}, {args.reps} reps x {args.duration} s, "
          f"wrk --timeout {args.wrk_timeout}s, load (1 min) before each rep: "
          + " ".join(str(l[0]) for l in meta["load_before"]), "",
          "| workers, clients | gateway | rps median (min-max) | p50 / p99 ms | errors (all reps) | CPU µs/req "
          "| upstream opens/req | listen overflows |",
          "|---|---|---|---|---|---|---|---|"]
    for step, row in table.items():
        for gw in GATEWAYS:
            t = row.get(gw)
            if not t:
                continue
            md.append(f"| {step} | {gw} | {span(t['rps'], 0)} | {r.fmt(t['p50_ms'] and t['p50_ms']['median'], 2)} / "
                      f"{r.fmt(t['p99_ms'] and t['p99_ms']['median'], 2)} | {t['errors']} | "
                      f"{r.fmt(t['cpu_us_per_req'] and t['cpu_us_per_req']['median'])} | "
                      f"{r.fmt(t['upstream_opens_per_req'] and t['upstream_opens_per_req']['median'], 2)} | "
                      f"{r.fmt(t['listen_overflows'] and t['listen_overflows']['median'], 0)} |")
    md += ["", "| workers, clients | ratio | rps median (min-max) | p99 median (min-max) |", "|---|---|---|---|"]
    for step, row in table.items():
        for peer in ("nginx", "haproxy", "pingora"):
            q = row.get(f"moongate/{peer}")
            if q:
                md.append(f"| {step} | moongate/{peer} | {span(q['rps'])} | {span(q['p99'])} |")
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n" + "\n".join(md))
    print(f"json: {os.path.relpath(out, r.ROOT)} (markdown table beside it)")
