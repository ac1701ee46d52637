"""The peers measured beside nginx in bench/run.py: HAProxy and a minimal Pingora proxy.

- HAProxy: Debian's (2.6), `mode http`, `http-reuse always`, `nbthread 1`, no logging, the same
  upstream as nginx's `proxy_pass`. It adds no forwarding headers (no `option forwardfor`).
- Pingora: bench/pingora/, a `ProxyHttp` whose `upstream_peer` returns the upstream, one
  worker thread (`threads: 1`, no work stealing), upstream keep-alive pool 128 as nginx's and
  moongate's. Its own Cargo.toml, lock file and target directory (bench/pingora/target): it is
  not part of moongate's build, tests or CI.
"""

import os
import shutil
import subprocess

import run as r

PINGORA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pingora")
PINGORA_BIN = os.path.join(PINGORA_DIR, "target", "release", "bench-pingora")


def ensure_haproxy():
    if shutil.which("haproxy"):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r.sh(["apt-get", "update"], env=env)
    r.sh(["apt-get", "install", "-y", "haproxy"], env=env)


def build_pingora():
    # flate2's zlib-ng backend, which pingora pulls in, builds with cmake.
    if not shutil.which("cmake"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        r.sh(["apt-get", "update"], env=env)
        r.sh(["apt-get", "install", "-y", "cmake"], env=env)
    r.sh(["cargo", "build", "--release", "--manifest-path", os.path.join(PINGORA_DIR, "Cargo.toml")])


def haproxy_conf(port, up_port, maxconn=4096, name="haproxy", threads=1):
    """HAProxy in front of the upstream: one thread, keep-alive on both sides, idle server
    connections shared between client connections (`http-reuse always`)."""
    return f"""
global
    nbthread {threads}
    maxconn {maxconn}
    pidfile {r.RUN}/{name}.pid
defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
    timeout queue 60s
frontend fe
    bind 127.0.0.1:{port}
    maxconn {maxconn}
    default_backend be
backend be
    server up 127.0.0.1:{up_port}
"""


def start_haproxy(port, up_port, maxconn=4096, name="haproxy", threads=1):
    path = os.path.join(r.RUN, f"{name}.cfg")
    with open(path, "w") as f:
        f.write(haproxy_conf(port, up_port, maxconn, name, threads))
    return r.start(name, ["haproxy", "-db", "-f", path], f"{r.RUN}/{name}.stderr")


def start_pingora(port, up_port, threads=1, name="pingora"):
    if not os.path.exists(PINGORA_BIN):
        raise SystemExit(f"{PINGORA_BIN} is missing: run without --no-build once "
                         f"(cargo build --release --manifest-path bench/pingora/Cargo.toml)")
    return r.start(name, [PINGORA_BIN, "--listen", f"127.0.0.1:{port}",
                          "--upstream", f"127.0.0.1:{up_port}", "--threads", str(threads)],
                   f"{r.RUN}/{name}.stderr")


def versions():
    h = subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout.split("\n", 1)[0]
    return {"haproxy": h.strip(), "pingora": "pingora 0.9.1 (bench/pingora)"}


# One HAProxy process budgets two sockets per connection (client and server side) and refuses
# to start with a maxconn whose sockets exceed its open-file limit: 20,000 here.
HAPROXY_MAX_CONNS = 9_980
