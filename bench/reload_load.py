"""`bench/run.py --mode reload`: configuration changes under load, against `nginx -s reload`.

moongate (1 worker, the Admin API on) serves `/*` from a route made through the Admin API, with
a Lua plugin (`bench-reload`, a file in bench/out/run/reload-plugins/) that sets a request
header in access; nginx (1 worker, lua-nginx-module) serves the same with
`access_by_lua_block`. Both proxy to the load test's upstream. Per repetition and gateway, two
runs of `wrk -t1 -c64 --latency` for `--reload-seconds` (default 30):

- quiet: no change;
- changes: one change a second. moongate: alternately the plugin file saved (a new version
  written beside it and renamed over it, as editors do) and the route replaced through the
  Admin API (`PUT /apisix/admin/routes/1` with a new plugin conf); nginx: `nginx -s reload`
  (a new worker, the old one finishes its requests and closes its keep-alive connections).

Per run: rps, p50/p99, errors (non-2xx plus wrk's socket errors), the gateway's CPU µs per
request (its process tree, with the nginx workers a reload retired). Per repetition: rps and CPU
per request during changes / quiet and the p99 rise (changes minus quiet) of each, and
moongate's rise over nginx's. After each changes run the script checks that the last change is what serves (the
response carries the version of the plugin file and of the route conf). Writes
bench/out/reload.json and reload.md.
"""

import json
import os
import subprocess
import threading
import time
import urllib.request

import run as r

KEY = "bench-admin-key-0123456789"
PLUGIN_DIR = os.path.join(r.RUN, "reload-plugins")


def plugin_source(version):
    """The route's Lua plugin; `version` goes into the upstream request (X-Plugin-Version) with
    the route conf's `n` (X-Route-Version), which the upstream's /check echoes."""
    return f"""-- bench-reload (bench/reload_load.py): version {version}
local core = require("apisix.core")
local schema = {{ type = "object", properties = {{ n = {{ type = "integer" }} }} }}
local _M = {{ version = 0.1, priority = 0, name = "bench-reload", schema = schema }}
function _M.check_schema(conf) return core.schema.check(schema, conf) end
function _M.access(conf, ctx)
    core.request.set_header(ctx, "X-Gw", "{version}:" .. tostring(conf.n or 0))
end
return _M
"""


def save_plugin(version):
    os.makedirs(PLUGIN_DIR, exist_ok=True)
    path = os.path.join(PLUGIN_DIR, "bench-reload.lua")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(plugin_source(version))
    os.replace(tmp, path)


def moongate_conf(port, admin_port, data_dir):
    return f"""
listen: 127.0.0.1:{port}
workers: 1
plugin_dirs: [{PLUGIN_DIR}]
log_level: warn
access_log: false
data_dir: {data_dir}
admin:
  listen: 127.0.0.1:{admin_port}
  key: {KEY}
"""


def nginx_conf(port, up_port):
    return f"""
load_module {r.NGINX_MODULES}/ndk_http_module.so;
load_module {r.NGINX_MODULES}/ngx_http_lua_module.so;
worker_processes 1;
daemon off;
pid {r.RUN}/nginx-reload.pid;
error_log {r.RUN}/nginx-reload.err warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
{r.nginx_backend(up_port)}    server {{
        listen 127.0.0.1:{port} backlog=4096;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        location / {{
            access_by_lua_block {{ ngx.req.set_header("X-Gw", "1") }}
            proxy_pass http://backend;
        }}
    }}
}}
"""


def put_route(admin_port, up_port, n):
    body = json.dumps({
        "uri": "/*",
        "plugins": {"bench-reload": {"n": n}},
        "upstream": {"type": "roundrobin", "nodes": {f"127.0.0.1:{up_port}": 1},
                     "keepalive_pool": {"size": 128, "idle_timeout": 60, "requests": 1000000}},
    }).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{admin_port}/apisix/admin/routes/1", data=body,
                                 method="PUT", headers={"X-API-KEY": KEY, "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        if resp.status not in (200, 201):
            raise RuntimeError(f"PUT routes/1: {resp.status}")


def changer(kind, seconds, state, ctx, stop):
    """One change a second, the first half a second into the run."""
    t0 = time.monotonic()
    for i in range(seconds):
        wait = t0 + 0.5 + i - time.monotonic()
        if stop.wait(max(wait, 0)):
            return
        if kind == "nginx":
            subprocess.run(["nginx", "-p", r.RUN, "-c", f"{r.RUN}/nginx-reload.conf", "-s", "reload"],
                           check=True, capture_output=True)
        elif i % 2 == 0:
            state["plugin"] += 1
            save_plugin(state["plugin"])
        else:
            state["route"] += 1
            put_route(ctx["admin_port"], ctx["up_port"], state["route"])
        state["changes"] += 1


def run_wrk(port, seconds, conns):
    cmd = ["taskset", "-c", "0", "wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency",
           f"http://127.0.0.1:{port}/"]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def cpu_ticks(pid):
    """utime+stime of the process tree, plus the children it has waited for (cutime+cstime):
    an nginx worker that a reload retires takes its CPU time to the master's counters when it
    exits."""
    total = sum(r.cpu_ticks(pid))
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[13]) + int(fields[14])
    except OSError:
        pass
    return total


def measure(gw, port, seconds, conns, with_changes, state, ctx, pid):
    stop = threading.Event()
    c0 = cpu_ticks(pid)
    t = None
    if with_changes:
        t = threading.Thread(target=changer, args=(gw, seconds, state, ctx, stop), daemon=True)
        t.start()
    try:
        out = run_wrk(port, seconds + 1, conns)
    finally:
        stop.set()
        if t:
            t.join(30)
    c1 = cpu_ticks(pid)
    w = r.parse_wrk(out)
    errs = 0
    if w["socket_errors"]:
        errs = sum(int(x.split()[-1]) for x in w["socket_errors"].split(","))
    return {"rps": w["rps"], "requests": w["requests"], "p50_ms": w["p50_ms"], "p99_ms": w["p99_ms"],
            "non2xx": w["non2xx"], "socket_errors": w["socket_errors"], "errors": w["non2xx"] + errs,
            "cpu_us_per_req": (c1 - c0) * 1e6 / r.CLK_TCK / max(w["requests"], 1)}


def check_serving(port, state):
    """The last plugin file version and route conf are what serves (the upstream echoes X-Gw)."""
    want = f"x-gw={state['plugin']}:{state['route']}"
    r.wait_http(f"http://127.0.0.1:{port}/check", want)


def reload_mode(args):
    os.makedirs(r.RUN, exist_ok=True)
    up_port, ngx_port, mg_port, admin_port = r.free_ports(4)
    data_dir = os.path.join(r.RUN, "reload-data")
    subprocess.run(["rm", "-rf", data_dir], check=True)
    with open(f"{r.RUN}/upstream.conf", "w") as f:
        f.write(r.upstream_conf(up_port))
    with open(f"{r.RUN}/nginx-reload.conf", "w") as f:
        f.write(nginx_conf(ngx_port, up_port))
    with open(f"{r.RUN}/moongate-reload.yaml", "w") as f:
        f.write(moongate_conf(mg_port, admin_port, data_dir))
    state = {"plugin": 1, "route": 1, "changes": 0}
    save_plugin(state["plugin"])
    mg_bin = os.path.abspath(args.bin) if args.bin else os.path.join(r.ROOT, "target/release/moongate")
    seconds = args.reload_seconds
    meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "reps": args.reps, "seconds": seconds,
            "conns": args.conns,
            "moongate_commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=r.ROOT,
                                              capture_output=True, text=True).stdout.strip(),
            "placement": "wrk -t1 on CPU0; upstream, nginx (1 worker), moongate (1 worker) on CPU1; "
                         "the changes are made from CPU0",
            "load_before": []}
    procs = {
        "upstream": r.start("upstream", ["nginx", "-p", r.RUN, "-c", f"{r.RUN}/upstream.conf"],
                            f"{r.RUN}/upstream.stderr"),
        "nginx": r.start("nginx", ["nginx", "-p", r.RUN, "-c", f"{r.RUN}/nginx-reload.conf"],
                         f"{r.RUN}/nginx-reload.stderr"),
        "moongate": r.start("moongate", [mg_bin, "run", "-c", f"{r.RUN}/moongate-reload.yaml"],
                            f"{r.RUN}/moongate-reload.stderr"),
    }
    ctx = {"admin_port": admin_port, "up_port": up_port}
    ports = {"nginx": ngx_port, "moongate": mg_port}
    runs = {}
    try:
        r.wait_http(f"http://127.0.0.1:{up_port}/", "hello")
        r.wait_http(f"http://127.0.0.1:{ngx_port}/check", "x-gw=1")
        for _ in range(100):
            try:
                put_route(admin_port, up_port, state["route"])
                break
            except OSError:
                time.sleep(0.1)
        check_serving(mg_port, state)
        # The changes run on CPU0 with wrk, as an operator's tooling would run beside the node.
        os.sched_setaffinity(0, {0})
        for rep in range(args.reps):
            meta["load_before"].append(r.loadavg())
            order = [(gw, ch) for gw in ("nginx", "moongate") for ch in (False, True)]
            if rep % 2:
                order.reverse()
            for gw, ch in order:
                if args.warmup > 0:
                    run_wrk(ports[gw], args.warmup, args.conns)
                before = state["changes"]
                x = measure(gw, ports[gw], seconds, args.conns, ch, state, ctx, procs[gw].pid)
                x["changes"] = state["changes"] - before
                if ch and gw == "moongate":
                    check_serving(mg_port, state)
                x["rep"] = rep
                key = f"{gw} {'changes' if ch else 'quiet'}"
                runs.setdefault(key, []).append(x)
                r.log(f"rep {rep} {key:17} {x['rps']:8.0f} rps  p50 {r.fmt(x['p50_ms'], 2)}  "
                      f"p99 {r.fmt(x['p99_ms'], 2)} ms  errors {x['errors']} {x['socket_errors']}  "
                      f"cpu {x['cpu_us_per_req']:.1f} us/req  changes {x['changes']}")
            for name, p in procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode}; see {r.RUN}")
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count())))
        r.stop_all()

    table = {k: {"rps": r.summary([x["rps"] for x in xs]), "p50_ms": r.summary([x["p50_ms"] for x in xs]),
                 "cpu_us_per_req": r.summary([x["cpu_us_per_req"] for x in xs]),
                 "p99_ms": r.summary([x["p99_ms"] for x in xs]), "errors": sum(x["errors"] for x in xs),
                 "changes": sum(x["changes"] for x in xs)} for k, xs in runs.items()}
    per_rep = []
    for rep in range(args.reps):
        row = {"rep": rep}
        for gw in ("nginx", "moongate"):
            q = next(x for x in runs[f"{gw} quiet"] if x["rep"] == rep)
            c = next(x for x in runs[f"{gw} changes"] if x["rep"] == rep)
            row[f"{gw} rps ratio"] = c["rps"] / q["rps"] if q["rps"] else None
            row[f"{gw} p99 rise ms"] = c["p99_ms"] - q["p99_ms"]
            row[f"{gw} CPU/req ratio"] = c["cpu_us_per_req"] / q["cpu_us_per_req"] if q["cpu_us_per_req"] else None
        nr = row["nginx p99 rise ms"]
        row["moongate rise / nginx rise"] = row["moongate p99 rise ms"] / nr if nr > 0 else None
        per_rep.append(row)
    ratios = {k: r.summary([x[k] for x in per_rep]) for k in per_rep[0] if k != "rep"}
    out = os.path.join(r.OUT, "reload.json")
    with open(out, "w") as f:
        json.dump({"meta": meta, "table": table, "per_rep": per_rep, "ratios": ratios, "runs": runs}, f, indent=1)

    def span(s, nd=2):
        return "-" if not s else f"{s['median']:.{nd}f} ({s['min']:.{nd}f}-{s['max']:.{nd}f})"
    md = [f"{meta['date']}, commit {meta['moongate_commit']}, {args.reps} reps x {seconds} s, c={args.conns}, "
          "load (1 min) before each rep: " + " ".join(str(l[0]) for l in meta["load_before"]), "",
          "| run | rps median (min-max) | p50 / p99 ms | CPU µs/req | errors (all reps) | changes (all reps) |",
          "|---|---|---|---|---|---|"]
    for k, t in table.items():
        md.append(f"| {k} | {span(t['rps'], 0)} | {r.fmt(t['p50_ms']['median'], 2)} / {r.fmt(t['p99_ms']['median'], 2)} | "
                  f"{t['cpu_us_per_req']['median']:.1f} | {t['errors']} | {t['changes']} |")
    md += ["", "| per-rep figure | median (min-max) |", "|---|---|"]
    for k, s in ratios.items():
        md.append(f"| {k} | {span(s)} |")
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n" + "\n".join(md))
    print(f"json: {os.path.relpath(out, r.ROOT)} (markdown table beside it)")
