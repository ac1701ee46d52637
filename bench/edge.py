"""`bench/run.py --mode edge`: moongate's TLS and HTTP/2 edge against nginx's, same run.

Both gateways terminate TLS with the same ECDSA P-256 certificate (made here with openssl),
one worker each on CPU1 with the plain upstream of the load test behind them; every client runs
on CPU0. Three loads, interleaved per repetition with the order flipped every other one:

- `handshake`: full TLS 1.3 handshakes, `openssl s_time -new` (a new connection and a full
  handshake each, no resumption, no request). The client does as much work per handshake as
  the server, so the rate on two cores is the client's; the figure that compares the servers
  is each one's CPU per handshake, from /proc.
- `https`: keep-alive HTTPS requests, `wrk -c64` over TLS, proxied to the upstream.
- `h2`: HTTP/2 over TLS, `h2load -c8 -m8` (64 streams on 8 connections), proxied.

Per load and server: rate, the gateway's CPU µs per handshake or request (user+system of the
process tree), and per repetition the moongate/nginx ratios. Then memory per idle TLS
connection: `--tls-counts` connections (default 1000 and 5000), each after a handshake and one
request, held open; the growth of each server's RSS (settled) over the count. Writes
bench/out/edge.json.
"""

import json
import os
import re
import subprocess
import time

import run as r

CERT = os.path.join(r.RUN, "edge-cert.pem")
KEY = os.path.join(r.RUN, "edge-key.pem")
NAME = "bench.test"


def make_cert():
    os.makedirs(r.RUN, exist_ok=True)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", KEY, "-out", CERT, "-days", "30", "-subj", f"/CN={NAME}",
         "-addext", f"subjectAltName=DNS:{NAME},IP:127.0.0.1"],
        check=True, capture_output=True)


def nginx_edge_conf(port, up_port):
    """nginx terminating TLS 1.2/1.3 with HTTP/2, no session cache or tickets (full handshakes
    are what is measured; moongate's session cache does not serve `s_time -new` either)."""
    return f"""
worker_processes 1;
daemon off;
pid {r.RUN}/nginx-edge.pid;
error_log {r.RUN}/nginx-edge.err warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    keepalive_requests 1000000;
{r.nginx_backend(up_port)}    server {{
        listen 127.0.0.1:{port} ssl http2 backlog=4096;
        server_name {NAME};
        ssl_certificate {CERT};
        ssl_certificate_key {KEY};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache off;
        ssl_session_tickets off;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        location / {{
            proxy_pass http://backend;
        }}
    }}
}}
"""


def moongate_edge_conf(port, tls_port, up_port):
    def block(pem):
        return "\n".join("      " + line for line in pem.strip().splitlines())
    cert, key = open(CERT).read(), open(KEY).read()
    return f"""
listen: 127.0.0.1:{port}
workers: 1
log_level: warn
access_log: false
ssl:
  listen:
    - {{ip: 127.0.0.1, port: {tls_port}, enable_http2: true}}
  ssl_protocols: TLSv1.2 TLSv1.3
  ssl_session_tickets: false
  fallback_sni: {NAME}
ssls:
  - id: bench
    snis: [{NAME}]
    cert: |
{block(cert)}
    key: |
{block(key)}
routes:
  - id: plain
    uri: /*
    upstream:
      type: roundrobin
      nodes: {{"127.0.0.1:{up_port}": 1}}
      keepalive_pool: {{size: 128, idle_timeout: 60, requests: 1000000}}
"""


def s_time(port, seconds):
    """Full TLS 1.3 handshakes for `seconds`; the number completed. s_time sends no SNI:
    moongate serves its `fallback_sni` certificate, nginx its default server's."""
    out = subprocess.run(
        ["taskset", "-c", "0", "openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new",
         "-tls1_3", "-time", str(seconds)],
        capture_output=True, text=True).stdout
    m = re.search(r"(\d+) connections in ([\d.]+)s", out)
    if not m:
        raise RuntimeError(f"s_time: {out[-400:]}")
    return int(m.group(1)), float(m.group(2))


def h2load(url, seconds):
    out = subprocess.run(
        ["taskset", "-c", "0", "h2load", "-c8", "-m8", "-D", str(seconds), url],
        capture_output=True, text=True).stdout
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed", out)
    if not m:
        raise RuntimeError(f"h2load: {out[-400:]}")
    done, ok, failed = int(m.group(3)), int(m.group(4)), int(m.group(5))
    p = re.search(r"protocol: (\S+)", out)
    if not p or p.group(1) != "h2":
        raise RuntimeError(f"h2load did not speak h2: {out[-400:]}")
    return done, ok, failed


def measure(kind, port, seconds, pid):
    """One measured run of `kind` against the server on `port`; rate and CPU per unit."""
    g0 = r.cpu_ticks(pid)
    t0 = time.monotonic()
    errors = 0
    if kind == "handshake":
        n, took = s_time(port, seconds)
    elif kind == "https":
        out = r.wrk(f"https://127.0.0.1:{port}/", seconds, 64)
        w = r.parse_wrk(out)
        n, took = w["requests"], seconds
        errors = w["non2xx"]
    else:
        done, ok, failed = h2load(f"https://127.0.0.1:{port}/", seconds)
        n, took = ok, time.monotonic() - t0
        errors = failed + (done - ok)
    g1 = r.cpu_ticks(pid)
    per = 1e6 / r.CLK_TCK / max(n, 1)
    return {
        "count": n,
        "rate": n / took if took else 0.0,
        "cpu_us": ((g1[0] - g0[0]) + (g1[1] - g0[1])) * per,
        "errors": errors,
    }


def edge_mode(args):
    r.ensure_tools()
    for tool, pkg in (("h2load", "nghttp2-client"), ("openssl", "openssl")):
        if not r.shutil.which(tool):
            r.sh(["apt-get", "install", "-y", pkg])
    if not args.no_build:
        r.sh(["cargo", "build", "--release"], cwd=r.ROOT)
    r.raise_nofile()
    make_cert()
    up_port, ngx_port, mg_port, mg_tls = r.free_ports(4)
    files = {
        "upstream.conf": r.upstream_conf(up_port),
        "nginx-edge.conf": nginx_edge_conf(ngx_port, up_port),
        "moongate-edge.yaml": moongate_edge_conf(mg_port, mg_tls, up_port),
    }
    for name, text in files.items():
        with open(os.path.join(r.RUN, name), "w") as f:
            f.write(text)
    mg_bin = os.path.abspath(args.bin) if args.bin else os.path.join(r.ROOT, "target/release/moongate")
    procs = {
        "upstream": r.start("upstream", ["nginx", "-p", r.RUN, "-c", f"{r.RUN}/upstream.conf"],
                            f"{r.RUN}/upstream.stderr"),
        "nginx": r.start("nginx", ["nginx", "-p", r.RUN, "-c", f"{r.RUN}/nginx-edge.conf"],
                         f"{r.RUN}/nginx-edge.stderr"),
        "moongate": r.start("moongate", [mg_bin, "run", "-c", f"{r.RUN}/moongate-edge.yaml"],
                            f"{r.RUN}/moongate-edge.stderr"),
    }
    ports = {"nginx": ngx_port, "moongate": mg_tls}
    try:
        # Up, serving TLS with the certificate, and proxying: one request each way.
        for name, port in ports.items():
            for _ in range(100):
                try:
                    out = subprocess.run(
                        ["curl", "-sk", "--http2", "--resolve", f"{NAME}:{port}:127.0.0.1",
                         f"https://{NAME}:{port}/", "-w", " %{http_version}"],
                        capture_output=True, text=True, timeout=5).stdout
                    if out == "hello 2":
                        break
                except subprocess.TimeoutExpired:
                    pass
                time.sleep(0.1)
            else:
                raise RuntimeError(f"{name} does not answer over TLS and h2; see {r.RUN}")
        kinds = ["handshake", "https", "h2"]
        runs = {(k, s): [] for k in kinds for s in ports}
        for rep in range(args.reps):
            order = [(k, s) for k in kinds for s in ports]
            if rep % 2:
                order.reverse()
            for kind, server in order:
                if args.warmup > 0:
                    measure(kind, ports[server], args.warmup, procs[server].pid)
                m = measure(kind, ports[server], args.duration, procs[server].pid)
                m["rep"] = rep
                runs[(kind, server)].append(m)
                r.log(f"rep {rep} {kind:9} {server:8} {m['rate']:9.0f}/s  cpu {m['cpu_us']:.1f} us  "
                      f"errors {m['errors']}")
            for name, p in procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode}; see {r.RUN}")
        table = {}
        for kind in kinds:
            row = {}
            for s in ports:
                rs = runs[(kind, s)]
                row[s] = {"rate": r.summary([x["rate"] for x in rs]),
                          "cpu_us": r.summary([x["cpu_us"] for x in rs]),
                          "errors": sum(x["errors"] for x in rs)}
            by_rep = {x["rep"]: x for x in runs[(kind, "nginx")]}
            rate = [x["rate"] / by_rep[x["rep"]]["rate"] for x in runs[(kind, "moongate")]
                    if by_rep[x["rep"]]["rate"]]
            cpu = [x["cpu_us"] / by_rep[x["rep"]]["cpu_us"] for x in runs[(kind, "moongate")]
                   if by_rep[x["rep"]]["cpu_us"]]
            row["moongate/nginx"] = {"rate": r.summary(rate), "cpu": r.summary(cpu),
                                     "rate_per_rep": rate, "cpu_per_rep": cpu}
            table[kind] = row
        # Memory per idle TLS connection, each server alone with its connections.
        idle = {}
        for n in [int(c) for c in args.tls_counts.split(",") if c]:
            for server in ports:
                pid = procs[server].pid
                base = r.settled_mem(pid)
                clients, held, failed = r.open_conns(ports[server], n, tls=True)
                try:
                    time.sleep(args.idle_wait)
                    full = r.settled_mem(pid)
                finally:
                    r.close_conns(clients)
                per = (full[0] - base[0]) / max(held, 1)
                idle[f"{server}/{n}"] = {"held": held, "failed": failed, "rss_kib_per_conn": per,
                                         "pss_kib_per_conn": (full[1] - base[1]) / max(held, 1)}
                r.log(f"idle TLS {server:8} {n:6}: {per:.2f} KiB per connection "
                      f"({held} held, {failed} failed)")
                r.settled_mem(pid)
        meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "reps": args.reps,
                "duration_s": args.duration, "load_before": r.loadavg(),
                "moongate_commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=r.ROOT,
                                                  capture_output=True, text=True).stdout.strip(),
                "openssl": subprocess.run(["openssl", "version"], capture_output=True,
                                          text=True).stdout.strip()}
        out = os.path.join(r.OUT, "edge.json")
        with open(out, "w") as f:
            json.dump({"meta": meta, "table": table, "idle_tls": idle,
                       "runs": {f"{k}/{s}": v for (k, s), v in runs.items()}}, f, indent=1)
        print(f"| load | nginx rate | moongate rate | rate ratio median (min-max) | nginx CPU µs | "
              f"moongate CPU µs | CPU ratio median (min-max) | errors |")
        print("|---|---|---|---|---|---|---|---|")
        for kind in kinds if args.reps else []:
            row = table[kind]
            n, m, q = row["nginx"], row["moongate"], row["moongate/nginx"]

            def span(s, nd=2):
                return "-" if not s else f"{s['median']:.{nd}f} ({s['min']:.{nd}f}-{s['max']:.{nd}f})"
            print(f"| {kind} | {n['rate']['median']:.0f} | {m['rate']['median']:.0f} | {span(q['rate'])} | "
                  f"{n['cpu_us']['median']:.1f} | {m['cpu_us']['median']:.1f} | {span(q['cpu'])} | "
                  f"{n['errors']}/{m['errors']} |")
        for n in sorted({int(k.split("/")[1]) for k in idle}):
            ng, mg = idle.get(f"nginx/{n}"), idle.get(f"moongate/{n}")
            if ng and mg:
                ratio = mg["rss_kib_per_conn"] / ng["rss_kib_per_conn"] if ng["rss_kib_per_conn"] else float("nan")
                print(f"idle TLS connections {n}: nginx {ng['rss_kib_per_conn']:.2f} KiB, "
                      f"moongate {mg['rss_kib_per_conn']:.2f} KiB per connection ({ratio:.2f}x)")
        r.log(f"wrote {out}")
    finally:
        r.stop_all()
