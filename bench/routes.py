"""`bench/run.py --mode routes`: many routes.

Routes (`--routes`, default 10,000) with APISIX-style API paths, a third each: exact
(`/api/v2/svc17/items`), prefix (`/api/v2/svc17/files/*`) and `:param`
(`/api/v2/svc17/users/:id`); every other route has `hosts: [hN.example.com]` (100 hosts).
All use one upstream (`upstream_id`), the load test's nginx `return 200`. The requests (one
per route, shuffled) go through wrk with bench/routes.lua, which cycles over them, so every
route is hit in turn. Three targets, one worker each on CPU1, wrk on CPU0, interleaved:

- moongate_routes: moongate with all the routes in its config file;
- moongate_one: moongate with the one route `/*` (the same requests all match it);
- nginx_routes: nginx with the same paths as locations: exact routes as `location =`, prefix
  and `:param` routes as prefix locations (nginx has no parameters), the routes with hosts in
  one `server` per host (`server_name`), the others in the default server.

Per target: rps and the gateway's CPU µs per request; per repetition moongate_routes/moongate_one
and moongate_routes/nginx_routes. Then, for each count of `--snapshot-routes` (default 10,000
and 100,000): moongate started with that many routes and the Admin API on: the time from start
to the first answered request, the RSS against a one-route moongate, and the Admin API's
PUT-to-serving time (`PUT /apisix/admin/routes/probeN` with a new uri, then requests to it until
it answers 200; `--puts` times, median and max). Writes bench/out/routes.json and routes.md.
"""

import json
import os
import random
import subprocess
import time
import urllib.error
import urllib.request

import run as r

KEY = "bench-admin-key-0123456789"
SCRIPT = os.path.join(r.BENCH, "routes.lua")


def make_routes(n):
    """[(id, uri, host or None, request path)]"""
    routes = []
    for i in range(n):
        base = f"/api/v{1 + i % 3}/svc{i}"
        kind = i % 3
        if kind == 0:
            uri, path = f"{base}/items", f"{base}/items"
        elif kind == 1:
            uri, path = f"{base}/files/*", f"{base}/files/report.pdf"
        else:
            uri, path = f"{base}/users/:id", f"{base}/users/{1000 + i}"
        host = f"h{(i // 2) % 100}.example.com" if i % 2 else None
        routes.append((f"r{i}", uri, host, path))
    return routes


def requests_file(routes, path):
    reqs = [(host or "bench", p) for _, _, host, p in routes]
    random.Random(21).shuffle(reqs)
    with open(path, "w") as f:
        f.write("".join(f"{h} {p}\n" for h, p in reqs))


def moongate_conf(port, up_port, routes, admin_port=None, data_dir=None):
    pool = "{size: 128, idle_timeout: 60, requests: 1000000}"
    lines = [f"listen: 127.0.0.1:{port}", "workers: 1", "log_level: warn", "access_log: false"]
    if admin_port:
        lines += [f"data_dir: {data_dir}", "admin:", f"  listen: 127.0.0.1:{admin_port}", f"  key: {KEY}"]
    lines += ["upstreams:", "  - id: up", "    type: roundrobin",
              f"    nodes: {{\"127.0.0.1:{up_port}\": 1}}", f"    keepalive_pool: {pool}", "routes:"]
    for rid, uri, host, _ in routes:
        lines.append(f"  - {{id: {rid}, uri: \"{uri}\", upstream_id: up"
                     + (f", hosts: [\"{host}\"]" if host else "") + "}")
    return "\n".join(lines) + "\n"


def nginx_conf(port, up_port, routes):
    def location(uri):
        if uri.endswith("/*"):
            return f"        location {uri[:-1]} {{ proxy_pass http://backend; }}\n"
        if "/:" in uri:
            return f"        location {uri[:uri.index('/:') + 1]} {{ proxy_pass http://backend; }}\n"
        return f"        location = {uri} {{ proxy_pass http://backend; }}\n"
    by_host = {}
    for _, uri, host, _ in routes:
        by_host.setdefault(host, []).append(location(uri))
    servers = []
    for host, locs in sorted(by_host.items(), key=lambda kv: kv[0] or ""):
        head = (f"        listen 127.0.0.1:{port} default_server backlog=4096;\n" if host is None
                else f"        listen 127.0.0.1:{port};\n        server_name {host};\n")
        servers.append("    server {\n" + head + "".join(locs) + "    }\n")
    return f"""
worker_processes 1;
daemon off;
pid {r.RUN}/nginx-routes.pid;
error_log {r.RUN}/nginx-routes.err warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    server_names_hash_bucket_size 128;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
{r.nginx_backend(up_port)}{"".join(servers)}}}
"""


def run_wrk(port, seconds, conns, reqs_path):
    cmd = ["taskset", "-c", "0", "wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "-s", SCRIPT,
           f"http://127.0.0.1:{port}/", "--", reqs_path]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def measure(port, seconds, conns, reqs_path, pid):
    g0 = r.cpu_ticks(pid)
    out = run_wrk(port, seconds, conns, reqs_path)
    g1 = r.cpu_ticks(pid)
    w = r.parse_wrk(out)
    n = max(w["requests"], 1)
    return {"rps": w["rps"], "p50_ms": w["p50_ms"], "p99_ms": w["p99_ms"], "non2xx": w["non2xx"],
            "socket_errors": w["socket_errors"],
            "cpu_us_per_req": (sum(g1) - sum(g0)) * 1e6 / r.CLK_TCK / n}


def get_status(port, path, host="bench"):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Host": host})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def check_all(port, routes, sample=200):
    """A sample of the requests answers 200 (the route matched and proxied)."""
    for rid, _, host, path in random.Random(5).sample(routes, min(sample, len(routes))):
        code = get_status(port, path, host or "bench")
        if code != 200:
            raise RuntimeError(f"port {port}: {host} {path} ({rid}) answered {code}")


def put_to_serving(admin_port, port, j, up_port):
    """Seconds from the start of a PUT of a new route to the first 200 for it."""
    body = json.dumps({"uri": f"/probe/{j}", "upstream_id": "up"}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{admin_port}/apisix/admin/routes/probe{j}", data=body,
                                 method="PUT", headers={"X-API-KEY": KEY, "Content-Type": "application/json"})
    t0 = time.monotonic()
    with urllib.request.urlopen(req, timeout=120) as resp:
        if resp.status not in (200, 201):
            raise RuntimeError(f"PUT probe{j}: {resp.status}")
    t_put = time.monotonic() - t0
    deadline = t0 + 120
    while time.monotonic() < deadline:
        if get_status(port, f"/probe/{j}") == 200:
            return t_put, time.monotonic() - t0
    raise RuntimeError(f"route probe{j} not serving after 120 s")


def snapshot_figures(n, up_port, mg_bin, puts):
    """moongate with `n` routes and the Admin API: start-to-serving, settled RSS, PUT-to-serving."""
    routes = make_routes(n)
    port, admin_port = r.free_ports(2)
    data_dir = os.path.join(r.RUN, f"routes-data-{n}")
    subprocess.run(["rm", "-rf", data_dir], check=True)
    path = os.path.join(r.RUN, f"moongate-routes-{n}.yaml")
    with open(path, "w") as f:
        f.write(moongate_conf(port, up_port, routes, admin_port, data_dir))
    name = f"moongate_{n}"
    t0 = time.monotonic()
    p = r.start(name, [mg_bin, "run", "-c", path], f"{r.RUN}/{name}.stderr")
    probe = routes[-1]
    deadline = t0 + 600
    while get_status(port, probe[3], probe[2] or "bench") != 200:
        if p.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not serve; see {r.RUN}/{name}.stderr")
        time.sleep(0.02)
    start_s = time.monotonic() - t0
    check_all(port, routes, 50)
    rss = r.settled_mem(p.pid)[0]
    times = [put_to_serving(admin_port, port, j, up_port) for j in range(puts)]
    p.send_signal(15)
    p.wait(30)
    return {"routes": n, "start_to_serving_s": start_s, "rss_kb": rss,
            "put_answer_ms": [t[0] * 1000 for t in times], "put_to_serving_ms": [t[1] * 1000 for t in times]}


def routes_mode(args):
    os.makedirs(r.RUN, exist_ok=True)
    n = args.routes
    routes = make_routes(n)
    reqs_path = os.path.join(r.RUN, "routes-requests.txt")
    requests_file(routes, reqs_path)
    up_port, ngx_port, mg_port, one_port = r.free_ports(4)
    files = {
        "upstream.conf": r.upstream_conf(up_port),
        "nginx-routes.conf": nginx_conf(ngx_port, up_port, routes),
        "moongate-routes.yaml": moongate_conf(mg_port, up_port, routes),
        "moongate-one.yaml": moongate_conf(one_port, up_port, [("one", "/*", None, "/")]),
    }
    for name, text in files.items():
        with open(os.path.join(r.RUN, name), "w") as f:
            f.write(text)
    mg_bin = os.path.abspath(args.bin) if args.bin else os.path.join(r.ROOT, "target/release/moongate")
    meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "reps": args.reps, "duration_s": args.duration,
            "routes": n, "conns": args.conns,
            "moongate_commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=r.ROOT,
                                              capture_output=True, text=True).stdout.strip(),
            "placement": "wrk -t1 on CPU0; upstream and every gateway (1 worker) on CPU1", "load_before": []}
    procs = {
        "upstream": r.start("upstream", ["nginx", "-p", r.RUN, "-c", f"{r.RUN}/upstream.conf"],
                            f"{r.RUN}/upstream.stderr"),
        "nginx_routes": r.start("nginx", ["nginx", "-p", r.RUN, "-c", f"{r.RUN}/nginx-routes.conf"],
                                f"{r.RUN}/nginx-routes.stderr"),
        "moongate_routes": r.start("moongate", [mg_bin, "run", "-c", f"{r.RUN}/moongate-routes.yaml"],
                                   f"{r.RUN}/moongate-routes.stderr"),
        "moongate_one": r.start("moongate_one", [mg_bin, "run", "-c", f"{r.RUN}/moongate-one.yaml"],
                                f"{r.RUN}/moongate-one.stderr"),
    }
    ports = {"nginx_routes": ngx_port, "moongate_routes": mg_port, "moongate_one": one_port}
    targets = list(ports)
    runs = {t: [] for t in targets}
    snapshots = []
    try:
        r.wait_http(f"http://127.0.0.1:{up_port}/", "hello")
        for t, port in ports.items():
            for _ in range(600):
                if get_status(port, routes[0][3]) == 200:
                    break
                time.sleep(0.1)
            check_all(port, routes)
        for rep in range(args.reps):
            meta["load_before"].append(r.loadavg())
            order = targets if rep % 2 == 0 else list(reversed(targets))
            for t in order:
                if args.warmup > 0:
                    run_wrk(ports[t], args.warmup, args.conns, reqs_path)
                x = measure(ports[t], args.duration, args.conns, reqs_path, procs[t].pid)
                x["rep"] = rep
                runs[t].append(x)
                r.log(f"rep {rep} {t:16} {x['rps']:8.0f} rps  p99 {r.fmt(x['p99_ms'], 2)} ms  "
                      f"cpu {x['cpu_us_per_req']:.1f} us/req  errors {x['non2xx']} {x['socket_errors']}")
            for name, p in procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode}; see {r.RUN}")
        one_rss = r.settled_mem(procs["moongate_one"].pid)[0]
        for t in ("nginx_routes", "moongate_routes"):
            meta[f"{t}_rss_kb"] = r.settled_mem(procs[t].pid)[0]
        meta["moongate_one_rss_kb"] = one_rss
        for count in [int(c) for c in args.snapshot_routes.split(",") if c]:
            s = snapshot_figures(count, up_port, mg_bin, args.puts)
            s["rss_over_one_route_kb"] = s["rss_kb"] - one_rss
            snapshots.append(s)
            r.log(f"{count} routes: serving {s['start_to_serving_s']:.2f} s after start, RSS "
                  f"{s['rss_kb'] / 1024:.1f} MiB ({s['rss_over_one_route_kb'] / 1024:.1f} over one route), "
                  f"PUT to serving ms: {' '.join(f'{v:.0f}' for v in s['put_to_serving_ms'])}")
    finally:
        r.stop_all()

    table = {t: {k: r.summary([x[k] for x in xs]) for k in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req")}
             for t, xs in runs.items()}
    ratios = {}
    for a, b in (("moongate_routes", "moongate_one"), ("moongate_routes", "nginx_routes")):
        by = {x["rep"]: x for x in runs[b]}
        ratios[f"{a}/{b}"] = {
            "rps": r.summary([x["rps"] / by[x["rep"]]["rps"] for x in runs[a] if by[x["rep"]]["rps"]]),
            "cpu": r.summary([x["cpu_us_per_req"] / by[x["rep"]]["cpu_us_per_req"] for x in runs[a]
                              if by[x["rep"]]["cpu_us_per_req"]])}
    out = os.path.join(r.OUT, "routes.json")
    with open(out, "w") as f:
        json.dump({"meta": meta, "table": table, "ratios": ratios, "snapshots": snapshots, "runs": runs}, f, indent=1)

    def span(s, nd=2):
        return "-" if not s else f"{s['median']:.{nd}f} ({s['min']:.{nd}f}-{s['max']:.{nd}f})"
    md = [f"{meta['date']}, commit {meta['moongate_commit']}, {n} routes, {args.reps} reps x {args.duration} s, "
          f"c={args.conns}, load (1 min) before each rep: " + " ".join(str(l[0]) for l in meta["load_before"]), "",
          "| target | rps median (min-max) | p50 / p99 ms | CPU µs/req median (min-max) |", "|---|---|---|---|"]
    for t, s in table.items():
        md.append(f"| {t} | {span(s['rps'], 0)} | {r.fmt(s['p50_ms']['median'], 2)} / {r.fmt(s['p99_ms']['median'], 2)} "
                  f"| {span(s['cpu_us_per_req'], 1)} |")
    md += ["", "| per-rep ratio | rps | CPU/req |", "|---|---|---|"]
    for k, q in ratios.items():
        md.append(f"| {k} | {span(q['rps'])} | {span(q['cpu'])} |")
    md += ["", f"RSS settled after the load, MiB: nginx_routes {meta['nginx_routes_rss_kb'] / 1024:.1f}, "
           f"moongate_routes {meta['moongate_routes_rss_kb'] / 1024:.1f}, moongate_one {meta['moongate_one_rss_kb'] / 1024:.1f}",
           "", "| routes | start to serving s | RSS MiB (over one route) | PUT answered ms median (max) | PUT to serving ms median (max) |",
           "|---|---|---|---|---|"]
    for s in snapshots:
        pa, ps = s["put_answer_ms"], s["put_to_serving_ms"]
        md.append(f"| {s['routes']} | {s['start_to_serving_s']:.2f} | {s['rss_kb'] / 1024:.1f} "
                  f"({s['rss_over_one_route_kb'] / 1024:.1f}) | {sorted(pa)[len(pa) // 2]:.0f} ({max(pa):.0f}) | "
                  f"{sorted(ps)[len(ps) // 2]:.0f} ({max(ps):.0f}) |")
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n" + "\n".join(md))
    print(f"json: {os.path.relpath(out, r.ROOT)} (markdown table beside it)")
