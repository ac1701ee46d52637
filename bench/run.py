#!/usr/bin/env python3
"""Load test: moongate against nginx proxy_pass and nginx + lua-nginx-module, on loopback.

One run starts every server, then measures all targets interleaved, repetition after
repetition (the order flips every other repetition so slow drift of the machine hits both
sides alike). Placement as in the method notes ("A"): wrk alone on CPU0, every server (the
upstream, the function server, redis-server, nginx, moongate) on CPU1, one worker each,
keep-alive on both sides. For each target: requests/s (median, min, max), p50/p99 latency, the gateway's CPU
microseconds per request (utime+stime delta from /proc/PID/stat over the requests wrk
completed, also split into user and kernel time), its context switches per request (voluntary +
involuntary, every thread) and its peak RSS (VmHWM). Per-repetition ratios moongate/nginx are the figures to
trust; absolute rps on a shared VM drift by tens of percent.

    python3 bench/run.py            # 5 reps x 5 s, 1 s warm-up per target and rep
    python3 bench/run.py --quick    # 2 reps x 2 s
    python3 bench/run.py --only nginx,moongate --reps 9
    python3 bench/run.py --only nginx_lua_redis,moongate_redis,moongate,moongate_http

Output: a table on stdout and bench/out/results.json. Every server it started is stopped by
PID at the end, also on Ctrl-C or error.
"""

import argparse
import base64
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

# The helper modules beside this file (peers, edge, ...) `import run`: let them get this module
# when it runs as a script, so the servers they start are in the same `started` list.
sys.modules.setdefault("run", sys.modules[__name__])
import peers  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
OUT = os.path.join(BENCH, "out")
RUN = os.path.join(OUT, "run")
CLK_TCK = os.sysconf("SC_CLK_TCK")
NGINX_MODULES = "/usr/lib/nginx/modules"
# lua-resty-redis from Debian's lua-nginx-redis, as resty/redis.lua (never committed).
LUA_LIBS = os.path.join(OUT, "lua")
FN_TOKEN = "test:test"

# name, server that answers, path, the gateway whose CPU is charged, the upstream behind it
TARGETS = [
    ("upstream", "upstream", "/", "upstream", None),
    ("nginx", "nginx", "/", "nginx", "upstream"),
    ("moongate", "moongate", "/", "moongate", "upstream"),
    # The other peers on the plain route (bench/peers.py): HAProxy and a minimal Pingora proxy.
    ("haproxy", "haproxy", "/", "haproxy", "upstream"),
    ("pingora", "pingora", "/", "pingora", "upstream"),
    ("nginx_lua", "nginx", "/lua/", "nginx", "upstream"),
    ("moongate_lua", "moongate", "/lua/", "moongate", "upstream"),
    ("fn_direct", "function", "/default/function-sample/test", "function", None),
    ("nginx_fn", "nginx", "/fn/test", "nginx", "function"),
    ("moongate_fn", "moongate", "/fn/test", "moongate", "function"),
    # One Redis INCR per request (bench/plugins/bench-redis-incr.lua, the same file on both
    # sides, with Debian's lua-resty-redis), then proxied. Redis's CPU is not charged.
    ("nginx_lua_redis", "nginx", "/redis/", "nginx", "upstream"),
    ("moongate_redis", "moongate", "/redis/", "moongate", "upstream"),
    # One resty.http GET to the upstream's /ping per request (bench/plugins/bench-http-get.lua),
    # then proxied: against "moongate", what the call adds. The upstream serves both requests.
    ("moongate_http", "moongate", "/http/", "moongate", "upstream"),
    # The plain route on a second moongate with `prometheus` as a global rule (every request
    # recorded, as an operator enables it): against "moongate", what the metrics cost.
    ("moongate_prom", "moongate_prom", "/", "moongate_prom", "upstream"),
    # The plain route on a third moongate writing APISIX's default access-log line per request
    # to a file: against "moongate", what the access log costs.
    ("moongate_log", "moongate_log", "/", "moongate_log", "upstream"),
]

# (label, numerator, denominator): per-repetition ratios
PAIRS = [
    ("moongate/nginx", "moongate", "nginx"),
    ("moongate/haproxy", "moongate", "haproxy"),
    ("moongate/pingora", "moongate", "pingora"),
    ("moongate_lua/nginx_lua", "moongate_lua", "nginx_lua"),
    ("moongate_fn/nginx_fn", "moongate_fn", "nginx_fn"),
    ("moongate_lua/moongate", "moongate_lua", "moongate"),
    ("nginx_lua/nginx", "nginx_lua", "nginx"),
    ("moongate_redis/nginx_lua_redis", "moongate_redis", "nginx_lua_redis"),
    ("moongate_http/moongate", "moongate_http", "moongate"),
    ("moongate_prom/moongate", "moongate_prom", "moongate"),
    ("moongate_log/moongate", "moongate_log", "moongate"),
]

started = []  # (name, Popen)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def sh(cmd, **kw):
    log("+ " + " ".join(cmd))
    subprocess.run(cmd, check=True, **kw)


def ensure_tools():
    have_lua = os.path.exists(os.path.join(NGINX_MODULES, "ngx_http_lua_module.so"))
    peers.ensure_haproxy()
    if shutil.which("nginx") and shutil.which("wrk") and shutil.which("redis-server") and have_lua:
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    sh(["apt-get", "update"], env=env)
    sh(["apt-get", "install", "-y", "nginx", "libnginx-mod-http-lua", "wrk", "redis-server"], env=env)


def ensure_lua_redis():
    """Debian's lua-nginx-redis (lua-resty-redis 0.27) as bench/out/lua/resty/redis.lua: the
    installed file when the package is installed, else the package fetched with `apt-get
    download` and unpacked with `dpkg -x` (installing it would pull in nginx-extras)."""
    dst = os.path.join(LUA_LIBS, "resty", "redis.lua")
    if os.path.exists(dst):
        return
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    installed = "/usr/share/lua/5.1/nginx/redis.lua"
    if os.path.exists(installed):
        shutil.copy(installed, dst)
        return
    work = os.path.join(OUT, "deb")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    sh(["apt-get", "download", "-q", "lua-nginx-redis"], cwd=work)
    deb = next(f for f in os.listdir(work) if f.endswith(".deb"))
    sh(["dpkg", "-x", os.path.join(work, deb), os.path.join(work, "root")])
    shutil.copy(os.path.join(work, "root/usr/share/lua/5.1/nginx/redis.lua"), dst)
    shutil.rmtree(work)


def build():
    sh(["cargo", "build", "--release"], cwd=ROOT)
    peers.build_pingora()
    sh(["cargo", "build", "--release", "--example", "function_sample"], cwd=ROOT)


def free_ports(n):
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def upstream_conf(port):
    return f"""
worker_processes 1;
daemon off;
pid {RUN}/upstream.pid;
error_log {RUN}/upstream.err warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ return 200 "hello"; }}
        location /check {{ return 200 "x-gw=$http_x_gw"; }}
        location /lua/check {{ return 200 "x-gw=$http_x_gw"; }}
        location /redis/check {{ return 200 "x-hits=$http_x_hits"; }}
        location /http/check {{ return 200 "x-got=$http_x_got"; }}
        location /ping {{ return 200 "pong"; }}
    }}
}}
"""


def nginx_backend(up_port):
    """The `upstream backend` block every nginx proxy config here uses: the upstream, with as
    many kept-alive connections as moongate's pool."""
    return f"""    upstream backend {{
        server 127.0.0.1:{up_port};
        keepalive 128;
        keepalive_requests 1000000;
    }}
"""


def nginx_conf(port, up_port, fn_port, redis_port):
    auth = base64.b64encode(FN_TOKEN.encode()).decode()
    return f"""
load_module {NGINX_MODULES}/ndk_http_module.so;
load_module {NGINX_MODULES}/ngx_http_lua_module.so;
worker_processes 1;
daemon off;
pid {RUN}/nginx.pid;
error_log {RUN}/nginx.err warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    lua_package_path "{BENCH}/plugins/?.lua;{LUA_LIBS}/?.lua;;";
    # The plugin's conf, made once as moongate makes it once per route version.
    init_by_lua_block {{ bench_redis_conf = {{ host = "127.0.0.1", port = {redis_port} }} }}
    upstream backend {{
        server 127.0.0.1:{up_port};
        keepalive 128;
        keepalive_requests 1000000;
    }}
    upstream function {{
        server 127.0.0.1:{fn_port};
        keepalive 128;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        location / {{
            proxy_pass http://backend;
        }}
        location /lua/ {{
            access_by_lua_block {{ ngx.req.set_header("X-Gw", "1") }}
            proxy_pass http://backend;
        }}
        location /redis/ {{
            access_by_lua_block {{
                local code = require("bench-redis-incr").access(bench_redis_conf)
                if code then return ngx.exit(code) end
            }}
            proxy_pass http://backend;
        }}
        location /fn/ {{
            # proxy_set_header at this level replaces the server's: repeat Connection "".
            proxy_set_header Connection "";
            proxy_set_header Authorization "Basic {auth}";
            proxy_pass http://function/default/function-sample/;
        }}
    }}
}}
"""


def moongate_conf(port, up_port, fn_port, redis_port):
    pool = "{size: 128, idle_timeout: 60, requests: 1000000}"
    return f"""
listen: 127.0.0.1:{port}
workers: 1
plugin_dirs: [{BENCH}/plugins]
log_level: warn
access_log: false
lua:
  package_path: ["{LUA_LIBS}/?.lua"]
routes:
  - id: plain
    uri: /*
    upstream:
      type: roundrobin
      nodes: {{"127.0.0.1:{up_port}": 1}}
      keepalive_pool: {pool}
  - id: lua
    uri: /lua/*
    plugins:
      bench-set-header: {{}}
    upstream:
      type: roundrobin
      nodes: {{"127.0.0.1:{up_port}": 1}}
      keepalive_pool: {pool}
  - id: redis
    uri: /redis/*
    plugins:
      bench-redis-incr: {{host: 127.0.0.1, port: {redis_port}}}
    upstream:
      type: roundrobin
      nodes: {{"127.0.0.1:{up_port}": 1}}
      keepalive_pool: {pool}
  - id: http
    uri: /http/*
    plugins:
      bench-http-get: {{url: "http://127.0.0.1:{up_port}/ping"}}
    upstream:
      type: roundrobin
      nodes: {{"127.0.0.1:{up_port}": 1}}
      keepalive_pool: {pool}
  - id: fn
    uri: /fn/*
    plugins:
      openfunction:
        function_uri: http://127.0.0.1:{fn_port}/default/function-sample
        authorization:
          service_token: "{FN_TOKEN}"
        keepalive_pool: 128
"""


def moongate_prom_conf(port, up_port, fn_port, redis_port, export_port):
    """moongate's config with the `prometheus` plugin as a global rule and its export server."""
    return moongate_conf(port, up_port, fn_port, redis_port) + f"""
plugin_attr:
  prometheus:
    export_addr: {{ip: 127.0.0.1, port: {export_port}}}
global_rules:
  - id: prometheus
    plugins:
      prometheus: {{}}
"""


def moongate_log_conf(port, up_port, fn_port, redis_port):
    """moongate's config with the access log on: APISIX's default format, to a file."""
    text = moongate_conf(port, up_port, fn_port, redis_port).replace("access_log: false\n", "")
    return text + f"""
nginx_config:
  http:
    access_log: {RUN}/moongate-access.log
"""


def start(name, cmd, stderr_path):
    err = open(stderr_path, "wb")
    p = subprocess.Popen(
        ["taskset", "-c", "1"] + cmd,
        stdout=subprocess.DEVNULL,
        stderr=err,
        start_new_session=True,
    )
    started.append((name, p))
    return p


def stop_all():
    for name, p in reversed(started):
        if p.poll() is None:
            try:
                # nginx: QUIT is a graceful stop; moongate treats TERM as one.
                # redis-server: TERM (it saves nothing: --save "").
                # pingora: INT is its fast shutdown (TERM waits out a grace period).
                p.send_signal(signal.SIGQUIT if name in ("upstream", "nginx") else
                              signal.SIGINT if name == "pingora" else signal.SIGTERM)
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            except ProcessLookupError:
                pass
    started.clear()


def wait_http(url, expect=None, tries=100):
    last = None
    for _ in range(tries):
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                body = r.read().decode(errors="replace")
                if expect is None or expect in body:
                    return body
                last = f"unexpected body {body!r}"
        except Exception as e:  # not up yet
            last = e
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer as expected: {last}")


def wait_redis(port, tries=100):
    for _ in range(tries):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"redis-server on port {port} did not answer PING")


def tree(pid):
    """pid and its children (nginx: master and its worker)."""
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pids += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return pids


def cpu_ticks(pid):
    """(utime, stime) in clock ticks, summed over the process tree."""
    user = system = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            user += int(fields[11])
            system += int(fields[12])
        except OSError:
            pass
    return user, system


def ctx_switches(pid):
    """Voluntary + involuntary context switches of every thread in the process tree."""
    total = 0
    for p in tree(pid):
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/status") as f:
                    for line in f:
                        if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                            total += int(line.split()[1])
            except OSError:
                pass
    return total


def status_kb(pid, key):
    """Largest `key` (VmHWM, VmRSS) over the process tree, in KiB."""
    best = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        best = max(best, int(line.split()[1]))
        except OSError:
            pass
    return best


def loadavg():
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def to_ms(v):
    m = re.match(r"([\d.]+)(us|ms|s|m)", v)
    if not m:
        return None
    n, u = float(m.group(1)), m.group(2)
    return {"us": n / 1000, "ms": n, "s": n * 1000, "m": n * 60000}[u]


def parse_wrk(text):
    r = {}
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", text)
    r["requests"] = int(m.group(1)) if m else 0
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    r["rps"] = float(m.group(1)) if m else 0.0
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}(?:\.000)?%\s+(\S+)", text, re.M)
        r[f"p{pct}_ms"] = to_ms(m.group(1)) if m else None
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    r["non2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: (.*)", text)
    r["socket_errors"] = m.group(1).strip() if m else ""
    return r


def wrk(url, seconds, conns):
    cmd = ["taskset", "-c", "0", "wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return out


def measure(url, seconds, conns, gw_pid, up_pid):
    g0, c0 = cpu_ticks(gw_pid), ctx_switches(gw_pid)
    u0 = sum(cpu_ticks(up_pid)) if up_pid else 0
    out = wrk(url, seconds, conns)
    g1, c1 = cpu_ticks(gw_pid), ctx_switches(gw_pid)
    u1 = sum(cpu_ticks(up_pid)) if up_pid else 0
    r = parse_wrk(out)
    n = max(r["requests"], 1)
    per_req = 1e6 / CLK_TCK / n
    r["user_us_per_req"] = (g1[0] - g0[0]) * per_req
    r["sys_us_per_req"] = (g1[1] - g0[1]) * per_req
    r["cpu_us_per_req"] = r["user_us_per_req"] + r["sys_us_per_req"]
    r["ctx_switches_per_req"] = (c1 - c0) / n
    r["upstream_cpu_us_per_req"] = (u1 - u0) * per_req if up_pid else None
    r["peak_rss_kb"] = status_kb(gw_pid, "VmHWM")
    return r


def summary(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}


def fmt(v, nd=1):
    return "-" if v is None else f"{v:.{nd}f}"


def setup():
    """Writes the configs to bench/out/run/, starts every server on CPU1 and checks that each
    answers as the table says. Returns (processes, base URLs, idle RSS KiB), by server name."""
    os.makedirs(RUN, exist_ok=True)
    (up_port, ngx_port, mg_port, fn_port, redis_port, prom_port, export_port, log_port,
     ha_port, pg_port) = free_ports(10)
    files = {
        "upstream.conf": upstream_conf(up_port),
        "nginx.conf": nginx_conf(ngx_port, up_port, fn_port, redis_port),
        "moongate.yaml": moongate_conf(mg_port, up_port, fn_port, redis_port),
        "moongate_prom.yaml": moongate_prom_conf(prom_port, up_port, fn_port, redis_port, export_port),
        "moongate_log.yaml": moongate_log_conf(log_port, up_port, fn_port, redis_port),
    }
    for name, text in files.items():
        with open(os.path.join(RUN, name), "w") as f:
            f.write(text)
    if os.path.exists(f"{RUN}/moongate-access.log"):
        os.remove(f"{RUN}/moongate-access.log")

    mg_bin = os.path.join(ROOT, "target/release/moongate")
    fn_bin = os.path.join(ROOT, "target/release/examples/function_sample")
    procs = {
        "redis": start("redis", ["redis-server", "--bind", "127.0.0.1", "--port", str(redis_port),
                                 "--save", "", "--appendonly", "no"], f"{RUN}/redis.stderr"),
        "upstream": start("upstream", ["nginx", "-p", RUN, "-c", f"{RUN}/upstream.conf"], f"{RUN}/upstream.stderr"),
        "function": start("function", [fn_bin, "--listen", f"127.0.0.1:{fn_port}"], f"{RUN}/function.stderr"),
        "nginx": start("nginx", ["nginx", "-p", RUN, "-c", f"{RUN}/nginx.conf"], f"{RUN}/nginx.stderr"),
        "moongate": start("moongate", [mg_bin, "run", "-c", f"{RUN}/moongate.yaml"], f"{RUN}/moongate.stderr"),
        "moongate_prom": start("moongate_prom", [mg_bin, "run", "-c", f"{RUN}/moongate_prom.yaml"],
                               f"{RUN}/moongate_prom.stderr"),
        "moongate_log": start("moongate_log", [mg_bin, "run", "-c", f"{RUN}/moongate_log.yaml"],
                              f"{RUN}/moongate_log.stderr"),
        "haproxy": peers.start_haproxy(ha_port, up_port),
        "pingora": peers.start_pingora(pg_port, up_port),
    }
    base = {
        "upstream": f"http://127.0.0.1:{up_port}",
        "function": f"http://127.0.0.1:{fn_port}",
        "nginx": f"http://127.0.0.1:{ngx_port}",
        "moongate": f"http://127.0.0.1:{mg_port}",
        "moongate_prom": f"http://127.0.0.1:{prom_port}",
        "moongate_log": f"http://127.0.0.1:{log_port}",
        "haproxy": f"http://127.0.0.1:{ha_port}",
        "pingora": f"http://127.0.0.1:{pg_port}",
    }
    # Up, and doing what the table says: the Lua rows really set the header.
    wait_redis(redis_port)
    wait_http(base["upstream"] + "/", "hello")
    wait_http(base["function"] + "/default/function-sample/x", "Hello, x!")
    wait_http(base["nginx"] + "/", "hello")
    wait_http(base["moongate"] + "/", "hello")
    wait_http(base["haproxy"] + "/", "hello")
    wait_http(base["pingora"] + "/", "hello")
    wait_http(base["nginx"] + "/lua/check", "x-gw=1")
    wait_http(base["moongate"] + "/lua/check", "x-gw=1")
    wait_http(base["nginx"] + "/fn/test", "Hello, test!")
    # The Redis rows really count (each check is one more INCR), the http row really calls.
    for gw in ("nginx", "moongate"):
        body = wait_http(base[gw] + "/redis/check", "x-hits=")
        if not re.fullmatch(r"x-hits=\d+", body):
            raise RuntimeError(f"{gw} /redis/check: {body!r}")
    wait_http(base["moongate"] + "/http/check", "x-got=200")
    wait_http(base["moongate"] + "/fn/test", "Hello, test!")
    # The prometheus row really records: the request just made is in the scrape.
    wait_http(base["moongate_prom"] + "/", "hello")
    wait_http(f"http://127.0.0.1:{export_port}/apisix/prometheus/metrics",
              'apisix_http_status{code="200",route="plain"')
    # The access-log row really writes: the request just made is in the file.
    wait_http(base["moongate_log"] + "/", "hello")
    log_file = f"{RUN}/moongate-access.log"
    for _ in range(50):
        if os.path.exists(log_file) and '"GET / HTTP/1.1" 200' in open(log_file).read():
            break
        time.sleep(0.1)
    else:
        raise RuntimeError(f"{log_file} has no line for the check request")
    time.sleep(0.5)
    idle_rss = {k: status_kb(p.pid, "VmRSS") for k, p in procs.items()}
    return procs, base, idle_rss


# ---- --mode conns: memory per connection -------------------------------------------------

# Each client process holds at most this many connections (the machine allows 20,000 open
# files per process; the servers hold the other end of all of them).
CONNS_PER_CLIENT = 4000
# Seconds a client process may take to open and serve its connections.
CLIENT_TIME = 120


def raise_nofile():
    """Soft RLIMIT_NOFILE up to the hard limit; returns it."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def read_response(s):
    """Reads one response with a Content-Length body from `s`; returns its status line."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            raise ConnectionError("closed before the response head")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    want = int(m.group(1)) if m else 0
    while len(body) < want:
        chunk = s.recv(4096)
        if not chunk:
            raise ConnectionError("closed before the end of the body")
        body += chunk
    return head.split(b"\r\n", 1)[0]


def conns_client(port, n, pipe, tls=False):
    """One client process: opens `n` keep-alive connections to 127.0.0.1:`port` (over TLS 1.3,
    unverified, with `tls`), sends one request on each and reads its response, keeps them all
    open, tells the parent how many are held, and closes them when the parent says so (or
    after CLIENT_TIME)."""
    raise_nofile()
    wrap = None
    if tls:
        import ssl
        wrap = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        wrap.check_hostname = False
        wrap.verify_mode = ssl.CERT_NONE
        wrap.minimum_version = ssl.TLSVersion.TLSv1_3
    socks, failed = [], 0
    req = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
    deadline = time.monotonic() + CLIENT_TIME
    for _ in range(n):
        if time.monotonic() > deadline:
            break
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            if wrap:
                s = wrap.wrap_socket(s)
            s.sendall(req)
            if b" 200 " not in read_response(s) + b" ":
                failed += 1
            socks.append(s)
        except OSError:
            failed += 1
    pipe.send((len(socks), failed))
    if pipe.poll(CLIENT_TIME):
        pipe.recv()
    for s in socks:
        s.close()
    pipe.send("closed")


def open_conns(port, n, tls=False):
    """Opens `n` held connections (TLS ones with `tls`) from client processes on CPU0. Returns
    (clients, held, failed); close_conns(clients) closes them."""
    import multiprocessing
    ctx = multiprocessing.get_context("fork")
    clients = []
    left = n
    while left > 0:
        k = min(left, CONNS_PER_CLIENT)
        left -= k
        ours, theirs = ctx.Pipe()
        p = ctx.Process(target=conns_client, args=(port, k, theirs, tls), daemon=True)
        p.start()
        os.sched_setaffinity(p.pid, {0})
        clients.append((p, ours))
    held = failed = 0
    for p, pipe in clients:
        if not pipe.poll(CLIENT_TIME + 10):
            raise RuntimeError("a connection client did not report")
        h, f = pipe.recv()
        held += h
        failed += f
    return clients, held, failed


def close_conns(clients):
    for p, pipe in clients:
        try:
            pipe.send("close")
        except OSError:
            pass
    for p, pipe in clients:
        pipe.poll(30)
        p.join(30)
        if p.is_alive():
            p.kill()
            p.join()


def mem_kb(pid):
    """(VmRSS, Pss) in KiB summed over the process tree (nginx: master and worker; moongate:
    supervisor and serving process)."""
    rss = pss = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                rss += next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
            with open(f"/proc/{p}/smaps_rollup") as f:
                pss += next(int(l.split()[1]) for l in f if l.startswith("Pss:"))
        except (OSError, StopIteration):
            pass
    return rss, pss


def settled_mem(pid, tries=20):
    """mem_kb once two readings 0.1 s apart agree (the server has finished with the last
    connection), at most `tries` readings."""
    last = mem_kb(pid)
    for _ in range(tries):
        time.sleep(0.1)
        now = mem_kb(pid)
        if now == last:
            return now
        last = now
    return last


def nginx_conns_conf(port, up_port, worker_connections):
    """nginx for the conns mode: the load test's plain proxy (no Lua module), with room for
    the connections."""
    return f"""
worker_processes 1;
worker_rlimit_nofile {worker_connections + 1024};
daemon off;
pid {RUN}/nginx.pid;
error_log {RUN}/nginx.err warn;
events {{ worker_connections {worker_connections}; }}
http {{
    access_log off;
    keepalive_requests 1000000;
{nginx_backend(up_port)}    server {{
        listen 127.0.0.1:{port} backlog=4096;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        location / {{
            proxy_pass http://backend;
        }}
    }}
}}
"""


def start_conn_servers(worker_connections, bases=(), mg_bin=None):
    """The upstream and moongate of the load test (same configs) and nginx's plain proxy,
    started fresh; for each (name, binary) of `bases` another moongate from that binary
    (gateway "moongate-NAME", the same config on its own port). Returns (procs, ports)."""
    os.makedirs(RUN, exist_ok=True)
    up_port, ngx_port, mg_port, fn_port, redis_port, *base_ports = free_ports(5 + len(bases))
    files = {
        "upstream.conf": upstream_conf(up_port),
        "nginx.conf": nginx_conns_conf(ngx_port, up_port, worker_connections),
        "moongate.yaml": moongate_conf(mg_port, up_port, fn_port, redis_port),
    }
    for (name, _), port in zip(bases, base_ports):
        files[f"moongate-{name}.yaml"] = moongate_conf(port, up_port, fn_port, redis_port)
    for name, text in files.items():
        with open(os.path.join(RUN, name), "w") as f:
            f.write(text)
    mg_bin = mg_bin or os.path.join(ROOT, "target/release/moongate")
    procs = {
        "upstream": start("upstream", ["nginx", "-p", RUN, "-c", f"{RUN}/upstream.conf"], f"{RUN}/upstream.stderr"),
        "nginx": start("nginx", ["nginx", "-p", RUN, "-c", f"{RUN}/nginx.conf"], f"{RUN}/nginx.stderr"),
        "moongate": start("moongate", [mg_bin, "run", "-c", f"{RUN}/moongate.yaml"], f"{RUN}/moongate.stderr"),
    }
    ports = {"nginx": ngx_port, "moongate": mg_port}
    ha_port, pg_port = free_ports(2)
    procs["haproxy"] = peers.start_haproxy(ha_port, up_port, min(worker_connections, peers.HAPROXY_MAX_CONNS))
    procs["pingora"] = peers.start_pingora(pg_port, up_port)
    ports["haproxy"], ports["pingora"] = ha_port, pg_port
    for (name, path), port in zip(bases, base_ports):
        gw = f"moongate-{name}"
        procs[gw] = start(gw, [path, "run", "-c", f"{RUN}/{gw}.yaml"], f"{RUN}/{gw}.stderr")
        ports[gw] = port
    wait_http(f"http://127.0.0.1:{up_port}/", "hello")
    for gw in ports:
        wait_http(f"http://127.0.0.1:{ports[gw]}/", "hello")
    return procs, ports


def warm(port, n=8):
    """A few connections with one request each, closed: what the first requests set up once
    (the upstream's keep-alive connection, lazily made state) is in the baseline."""
    clients, held, failed = open_conns(port, n)
    close_conns(clients)
    if failed or held != n:
        raise RuntimeError(f"warm-up on port {port}: {held} held, {failed} failed")


def measure_idle(pid, port, n, idle_wait):
    warm(port)
    before = settled_mem(pid)
    t0 = time.monotonic()
    clients, held, failed = open_conns(port, n)
    took = time.monotonic() - t0
    # Idle means idle for a while: moongate parks a connection that has waited 1 s for its
    # next request (nginx has nothing that changes with time).
    time.sleep(idle_wait)
    after = settled_mem(pid)
    close_conns(clients)
    return {
        "conns": n, "held": held, "failed": failed, "open_s": took,
        "rss_before_kb": before[0], "rss_after_kb": after[0],
        "rss_kb_per_conn": (after[0] - before[0]) / max(held, 1),
        "pss_kb_per_conn": (after[1] - before[1]) / max(held, 1),
    }


def measure_active(pid, port, conns, seconds):
    """RSS growth while wrk holds `conns` busy connections: the highest reading over the run,
    less the baseline, per connection."""
    warm(port)
    before = settled_mem(pid)
    cmd = ["taskset", "-c", "0", "wrk", "-t1", f"-c{conns}", f"-d{seconds}s", f"http://127.0.0.1:{port}/"]
    w = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak = before
    deadline = time.monotonic() + seconds + 30
    while w.poll() is None and time.monotonic() < deadline:
        now = mem_kb(pid)
        peak = (max(peak[0], now[0]), max(peak[1], now[1]))
        time.sleep(0.1)
    if w.poll() is None:
        w.kill()
    r = parse_wrk(w.communicate()[0])
    return {
        "conns": conns, "rps": r["rps"], "errors": r["non2xx"], "socket_errors": r["socket_errors"],
        "rss_before_kb": before[0], "rss_peak_kb": peak[0],
        "rss_kb_per_conn": (peak[0] - before[0]) / conns,
        "pss_kb_per_conn": (peak[1] - before[1]) / conns,
    }


def conns_mode(args):
    """Memory per connection: for each count (and the active load), fresh servers, then
    nginx and moongate measured one after the other (the order flips every repetition)."""
    raise_nofile()
    counts = [int(c) for c in args.counts.split(",") if c]
    worker_connections = max(counts + [args.active, 1000]) + 1000
    steps = [("idle", n) for n in counts] + ([("active", args.active)] if args.active else [])
    meta = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "nproc": os.cpu_count(),
        "kernel": os.uname().release,
        "nginx": subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip(),
        "moongate_commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "reps": args.reps, "counts": counts, "active": args.active, "duration_s": args.duration,
        "idle_wait_s": args.idle_wait,
        "placement": "client processes and wrk on CPU0; upstream, nginx (1 worker), moongate (1 worker) on CPU1",
    }
    bases = []
    for b in args.base or []:
        name, sep, path = b.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--base {b}: NAME=BINARY expected")
        bases.append((name, os.path.abspath(path)))
    mg_bin = args.bin and os.path.abspath(args.bin)
    if mg_bin:
        meta["bin"] = mg_bin
    if bases:
        meta["bases"] = dict(bases)
    gws = ["nginx", "haproxy", "pingora"] + [f"moongate-{name}" for name, _ in bases] + ["moongate"]
    runs = {}
    for rep in range(args.reps):
        for kind, n in steps:
            procs, ports = start_conn_servers(worker_connections, bases, mg_bin)
            try:
                order = [gw for gw in gws if gw in ports]
                if rep % 2:
                    order.reverse()
                for gw in order:
                    if gw == "haproxy" and n > peers.HAPROXY_MAX_CONNS:
                        # One HAProxy process budgets a server socket for every client
                        # connection; under 20,000 files it refuses a maxconn above this.
                        continue
                    if kind == "idle":
                        r = measure_idle(procs[gw].pid, ports[gw], n, args.idle_wait)
                        log(f"rep {rep} idle {n:6} {gw:9} {r['rss_kb_per_conn']:6.2f} KiB/conn RSS "
                            f"({r['pss_kb_per_conn']:.2f} Pss)  held {r['held']} failed {r['failed']} in {r['open_s']:.1f} s")
                    else:
                        r = measure_active(procs[gw].pid, ports[gw], n, args.duration)
                        log(f"rep {rep} active {n:4} {gw:9} {r['rss_kb_per_conn']:6.2f} KiB/conn RSS "
                            f"({r['pss_kb_per_conn']:.2f} Pss)  {r['rps']:.0f} rps errors {r['errors']} {r['socket_errors']}")
                    r["rep"] = rep
                    runs.setdefault(f"{kind} {n}", {}).setdefault(gw, []).append(r)
                for name, p in procs.items():
                    if p.poll() is not None:
                        raise RuntimeError(f"{name} exited with {p.returncode}; see {RUN}/{name}.stderr")
            finally:
                stop_all()

    mgs = [gw for gw in gws if gw != "nginx"]
    table = {}
    for step, by_gw in runs.items():
        row = {gw: {"rss_kb_per_conn": summary([r["rss_kb_per_conn"] for r in rs]),
                    "pss_kb_per_conn": summary([r["pss_kb_per_conn"] for r in rs])}
               for gw, rs in by_gw.items()}
        ng = {r["rep"]: r["rss_kb_per_conn"] for r in by_gw.get("nginx", [])}
        for gw in mgs:
            key = "ratio" if gw == "moongate" else f"ratio {gw}"
            row[key] = summary([r["rss_kb_per_conn"] / ng[r["rep"]] for r in by_gw.get(gw, [])
                                if ng.get(r["rep"], 0) > 0])
        mg = {r["rep"]: r["rss_kb_per_conn"] for r in by_gw.get("moongate", [])}
        for peer in ("haproxy", "pingora"):
            row[f"ratio moongate/{peer}"] = summary([mg[r["rep"]] / r["rss_kb_per_conn"] for r in by_gw.get(peer, [])
                                                     if r["rss_kb_per_conn"] > 0 and r["rep"] in mg])
        table[step] = row
    out = args.out if args.out != os.path.join(OUT, "results.json") else os.path.join(OUT, "conns.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"meta": meta, "table": table, "runs": runs}, f, indent=1)

    def cell(x, key):
        v = x and x.get(key)
        return "-" if not v else f"{v['median']:.2f} ({v['min']:.2f}-{v['max']:.2f})"
    md = [f"{meta['date']}, commit {meta['moongate_commit']}"
          + "".join(f", moongate-{name}: {path}" for name, path in bases)
          + f", {args.reps} reps; RSS growth per connection "
          "(KiB, median (min-max)); ratio: per-rep moongate/nginx", "",
          "| connections | " + " | ".join(gws) + " | " + " | ".join(f"{gw}/nginx" for gw in mgs)
          + " | moongate/haproxy | moongate/pingora | " + " | ".join(f"{gw} Pss" for gw in gws) + " |",
          "|---" * (3 + 2 * len(gws) + len(mgs)) + "|"]
    for step, row in table.items():
        ratios = [cell(row, "ratio" if gw == "moongate" else f"ratio {gw}") for gw in mgs]
        ratios += [cell(row, "ratio moongate/haproxy"), cell(row, "ratio moongate/pingora")]
        md.append(f"| {step} | " + " | ".join(cell(row.get(gw), "rss_kb_per_conn") for gw in gws) + " | "
                  + " | ".join(ratios) + " | "
                  + " | ".join(cell(row.get(gw), "pss_kb_per_conn") for gw in gws) + " |")
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n" + "\n".join(md))
    print(f"json: {os.path.relpath(out, ROOT)} (markdown table beside it)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 reps x 2 s")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--duration", type=int, default=5, help="seconds per measured run")
    ap.add_argument("--warmup", type=int, default=1, help="seconds of warm-up per target and rep")
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--only", help="comma-separated target names")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--no-install", action="store_true")
    ap.add_argument("--out", default=os.path.join(OUT, "results.json"))
    ap.add_argument("--mode", choices=["load", "conns", "edge", "concurrency", "reload", "routes"], default="load",
                    help="load: the load test; conns: memory per idle and per active connection; "
                         "edge: TLS handshakes, HTTPS and HTTP/2 against nginx (bench/edge.py); "
                         "concurrency: 1,000 and 10,000 clients against nginx, HAProxy and Pingora "
                         "(bench/concurrency.py); reload: a change a second under load against "
                         "nginx -s reload (bench/reload_load.py); routes: 10,000 routes against one "
                         "and against nginx locations, snapshot build and Admin PUT-to-serving "
                         "(bench/routes.py)")
    ap.add_argument("--routes", type=int, default=10000, help="routes mode: routes under load")
    ap.add_argument("--snapshot-routes", default="10000,100000",
                    help="routes mode: route counts for start-up, memory and PUT-to-serving (empty: none)")
    ap.add_argument("--puts", type=int, default=10, help="routes mode: Admin PUTs timed per route count")
    ap.add_argument("--reload-seconds", type=int, default=30,
                    help="reload mode: seconds of each run (one change a second in the changes runs)")
    ap.add_argument("--levels", default="1000,10000", help="concurrency mode: client counts")
    ap.add_argument("--workers", default="1,2", help="concurrency mode: worker counts of every gateway")
    ap.add_argument("--wrk-timeout", type=int, default=2,
                    help="concurrency mode: wrk's --timeout in seconds (wrk's default: 2)")
    ap.add_argument("--counts", default="1000,5000,15000", help="conns mode: idle connection counts")
    ap.add_argument("--tls-counts", default="1000,5000",
                    help="edge mode: idle TLS connection counts for the memory figure (empty: none)")
    ap.add_argument("--idle-wait", type=float, default=3.0,
                    help="conns and edge modes: seconds the idle connections are held (after the "
                    "last one's response) before the reading")
    ap.add_argument("--active", type=int, default=1000,
                    help="conns mode: connections of the active load (0: none)")
    ap.add_argument("--bin", help="conns, concurrency and edge modes: the moongate binary (default: "
                    "target/release/moongate); edge with --reps 0 measures only idle TLS memory")
    ap.add_argument("--base", action="append", metavar="NAME=BINARY",
                    help="conns mode: another moongate binary (e.g. built from the commit before a "
                    "change) measured in the same run as gateway moongate-NAME; repeatable")
    args = ap.parse_args()
    if args.quick:
        args.reps, args.duration = 2, 2

    if args.mode == "edge":
        import edge
        edge.edge_mode(args)
        return

    if args.mode == "concurrency":
        if not args.no_install:
            ensure_tools()
        if not args.no_build:
            sh(["cargo", "build", "--release"], cwd=ROOT)
            peers.build_pingora()
        import concurrency
        concurrency.concurrency_mode(args)
        return

    if args.mode == "routes":
        if not args.no_install:
            ensure_tools()
        if not args.no_build:
            sh(["cargo", "build", "--release"], cwd=ROOT)
        import routes
        routes.routes_mode(args)
        return

    if args.mode == "reload":
        if not args.no_install:
            ensure_tools()
        if not args.no_build:
            sh(["cargo", "build", "--release"], cwd=ROOT)
        import reload_load
        reload_load.reload_mode(args)
        return

    if args.mode == "conns":
        if not args.no_install:
            ensure_tools()
        if not args.no_build:
            sh(["cargo", "build", "--release"], cwd=ROOT)
            peers.build_pingora()
        conns_mode(args)
        return

    targets = TARGETS
    if args.only:
        want = set(args.only.split(","))
        targets = [t for t in TARGETS if t[0] in want]

    if not args.no_install:
        ensure_tools()
    ensure_lua_redis()
    if not args.no_build:
        build()
    procs, base, idle_rss = setup()

    meta = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "nproc": os.cpu_count(),
        "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), ""),
        "kernel": os.uname().release,
        "nginx": subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip(),
        "moongate_commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "reps": args.reps, "duration_s": args.duration, "warmup_s": args.warmup, "conns": args.conns,
        "placement": "wrk -t1 on CPU0; upstream, function server, redis-server, nginx (1 worker), moongate (1 worker) on CPU1",
        "idle_rss_kb": idle_rss,
        "load_before_reps": [],
    }
    log(f"nproc={meta['nproc']} load={loadavg()} idle RSS KiB={idle_rss}")

    runs = {t[0]: [] for t in targets}
    for rep in range(args.reps):
        order = targets if rep % 2 == 0 else list(reversed(targets))
        meta["load_before_reps"].append(loadavg())
        for name, server, path, gw, up in order:
            url = base[server] + path
            gw_pid = procs[gw].pid
            up_pid = procs[up].pid if up else None
            if args.warmup > 0:
                wrk(url, args.warmup, args.conns)
            r = measure(url, args.duration, args.conns, gw_pid, up_pid)
            r["rep"] = rep
            r["load"] = loadavg()
            runs[name].append(r)
            log(f"rep {rep} {name:13} {r['rps']:9.0f} rps  p50 {fmt(r['p50_ms'], 2)} ms  p99 {fmt(r['p99_ms'], 2)} ms  "
                f"cpu {r['cpu_us_per_req']:.1f} us/req  errors {r['non2xx']} {r['socket_errors']}")
        for name, p in procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode}; see {RUN}/{name}.stderr")

    table = {}
    for name, rs in runs.items():
        table[name] = {
            "rps": summary([r["rps"] for r in rs]),
            "p50_ms": summary([r["p50_ms"] for r in rs]),
            "p99_ms": summary([r["p99_ms"] for r in rs]),
            "cpu_us_per_req": summary([r["cpu_us_per_req"] for r in rs]),
            "user_us_per_req": summary([r["user_us_per_req"] for r in rs]),
            "sys_us_per_req": summary([r["sys_us_per_req"] for r in rs]),
            "ctx_switches_per_req": summary([r["ctx_switches_per_req"] for r in rs]),
            "upstream_cpu_us_per_req": summary([r["upstream_cpu_us_per_req"] for r in rs]),
            "peak_rss_kb": max((r["peak_rss_kb"] for r in rs), default=None),
            "errors": sum(r["non2xx"] for r in rs),
        }
    ratios = {}
    for label, a, b in PAIRS:
        if a not in runs or b not in runs:
            continue
        by_rep = {r["rep"]: r for r in runs[b]}
        rps = [r["rps"] / by_rep[r["rep"]]["rps"] for r in runs[a] if by_rep.get(r["rep"], {}).get("rps")]
        cpu = [r["cpu_us_per_req"] / by_rep[r["rep"]]["cpu_us_per_req"] for r in runs[a]
               if by_rep.get(r["rep"], {}).get("cpu_us_per_req")]
        ratios[label] = {"rps": summary(rps), "cpu": summary(cpu), "rps_per_rep": rps, "cpu_per_rep": cpu}

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "targets": table, "ratios": ratios, "runs": runs}, f, indent=1)

    md = [f"{meta['date']}, commit {meta['moongate_commit']}, nproc {meta['nproc']}, {args.reps} reps x "
          f"{args.duration} s, c={args.conns}, load (1 min) before each rep: "
          + " ".join(str(l[0]) for l in meta["load_before_reps"]), "",
          "| target | rps median (min-max) | p50 / p99 ms | gateway CPU µs/req median (min) | user / sys µs/req | context switches/req | upstream CPU µs/req | peak RSS MB |",
          "|---|---|---|---|---|---|---|---|"]
    for name, t in table.items():
        rps, cpu, up = t["rps"], t["cpu_us_per_req"], t["upstream_cpu_us_per_req"]
        md.append(f"| {name} | {rps['median']:.0f} ({rps['min']:.0f}-{rps['max']:.0f}) | "
                  f"{fmt(t['p50_ms'] and t['p50_ms']['median'], 2)} / {fmt(t['p99_ms'] and t['p99_ms']['median'], 2)} | "
                  f"{cpu['median']:.1f} ({cpu['min']:.1f}) | {t['user_us_per_req']['median']:.1f} / "
                  f"{t['sys_us_per_req']['median']:.1f} | {t['ctx_switches_per_req']['median']:.2f} | "
                  f"{fmt(up and up['median'])} | {t['peak_rss_kb'] / 1024:.1f} |")
    md += ["", "| per-rep ratio | rps median (min-max) | CPU/req median (min-max) |", "|---|---|---|"]
    for label, r in ratios.items():
        if r["rps"] and r["cpu"]:
            md.append(f"| {label} | {r['rps']['median']:.2f} ({r['rps']['min']:.2f}-{r['rps']['max']:.2f}) | "
                      f"{r['cpu']['median']:.2f} ({r['cpu']['min']:.2f}-{r['cpu']['max']:.2f}) |")
    md += ["", "Idle RSS MB: " + ", ".join(f"{k} {v / 1024:.1f}" for k, v in idle_rss.items())]
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write("\n".join(md) + "\n")

    print(f"\nmoongate bench  {meta['date']}  nproc={meta['nproc']}  {args.reps} reps x {args.duration}s, "
          f"c={args.conns}  load before reps: {' '.join(str(l[0]) for l in meta['load_before_reps'])}")
    print(f"{'target':14} {'rps median':>10} {'(min-max)':>15} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'gw cpu us/req':>13} {'(min)':>6} {'usr/sys':>9} {'cs/req':>6} {'up cpu':>7} {'peak RSS MB':>11}")
    for name, t in table.items():
        rps, cpu, up = t["rps"], t["cpu_us_per_req"], t["upstream_cpu_us_per_req"]
        print(f"{name:14} {rps['median']:10.0f} {rps['min']:7.0f}-{rps['max']:<7.0f} "
              f"{fmt(t['p50_ms'] and t['p50_ms']['median'], 2):>7} {fmt(t['p99_ms'] and t['p99_ms']['median'], 2):>7} "
              f"{cpu['median']:13.1f} {cpu['min']:6.1f} "
              f"{t['user_us_per_req']['median']:4.1f}/{t['sys_us_per_req']['median']:<4.1f} "
              f"{t['ctx_switches_per_req']['median']:6.2f} {fmt(up and up['median']):>7} "
              f"{t['peak_rss_kb'] / 1024:11.1f}")
    print("\nper-rep ratios (median, min-max)")
    for label, r in ratios.items():
        if r["rps"] and r["cpu"]:
            print(f"  {label:24} rps {r['rps']['median']:.2f} ({r['rps']['min']:.2f}-{r['rps']['max']:.2f})   "
                  f"cpu/req {r['cpu']['median']:.2f} ({r['cpu']['min']:.2f}-{r['cpu']['max']:.2f})")
    print("\nidle RSS MB: " + ", ".join(f"{k} {v / 1024:.1f}" for k, v in idle_rss.items()))
    print(f"json: {os.path.relpath(args.out, ROOT)} (markdown table beside it)")


if __name__ == "__main__":
    # Ctrl-C and TERM both end in stop_all() through the finally below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        main()
    except KeyboardInterrupt:
        log("interrupted")
        sys.exit(130)
    finally:
        stop_all()
