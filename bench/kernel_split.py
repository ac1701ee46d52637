#!/usr/bin/env python3
"""Where a gateway's CPU time per request goes, kernel included: one profiled run per target.

Starts the same servers, configs and placement as bench/run.py, then for each target drives wrk
samples the gateway's stacks over one run (perf record -e cpu-clock -g, kernel frames included;
needs root or kernel.perf_event_paranoid <= 1) and counts its system calls over a second one
(perf's syscall tracepoints, which slow every call, so that run is not timed). Each sample is put in one bucket:

    user              no kernel frame
    syscall entry     the kernel's syscall entry/exit and fd lookup, whatever the call
    send              inside write/writev/sendto/sendmsg: the TCP send path and, on loopback,
                      the peer's receive path and wake-up run in softirq on the sender's time
                      (shown again as "of which: delivery to the peer")
    recv              inside read/readv/recvfrom/recvmsg
    epoll             inside epoll_wait/epoll_pwait
    other syscalls    any other call (named in the syscall counts)
    switch/irq        context switches on the way back to user space, interrupts

and turned into µs per request with the gateway's /proc CPU time over the sampled run. Sampling
costs some throughput, so the absolute µs run a little above bench/run.py's; compare the
columns with each other.

    python3 bench/kernel_split.py                        # every gateway target, 5 s each
    python3 bench/kernel_split.py --only nginx,moongate --no-build
"""

import argparse
import collections
import os
import signal
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402  (the servers, configs and helpers of the load test)

SEND = ("do_writev", "__x64_sys_write", "ksys_write", "__x64_sys_writev", "__sys_sendto",
        "__x64_sys_sendto", "__sys_sendmsg", "__x64_sys_sendmsg")
RECV = ("do_readv", "__x64_sys_read", "ksys_read", "__x64_sys_readv", "__sys_recvfrom",
        "__x64_sys_recvfrom", "__sys_recvmsg", "__x64_sys_recvmsg")
EPOLL = ("__x64_sys_epoll_wait", "__x64_sys_epoll_pwait", "do_epoll_wait")
ENTRY = ("do_syscall_64", "entry_SYSCALL", "syscall_exit", "syscall_enter", "fdget", "fdput",
         "__fget", "fput", "exit_to_user_mode_prepare")
BUCKETS = ["user", "syscall entry", "send", "  of which: delivery to the peer", "recv", "epoll",
           "other syscalls", "switch/irq"]


def ensure_perf():
    if subprocess.run(["perf", "--version"], capture_output=True).returncode == 0:
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run.sh(["apt-get", "update"], env=env)
    run.sh(["apt-get", "install", "-y", "linux-perf"], env=env)


def stacks(data):
    """Each sample's frames, leaf first, as symbol names."""
    out = subprocess.run(["perf", "script", "-i", data, "-F", "ip,sym"], capture_output=True,
                         text=True).stdout
    for block in out.split("\n\n"):
        frames = [line.split(None, 1)[1] if len(line.split(None, 1)) > 1 else "?"
                  for line in block.strip().splitlines() if line.strip()]
        if frames:
            yield frames


def bucket(frames):
    """(bucket, delivered-to-peer) for one sample."""
    kernel = [f for f in frames if not f.startswith("[unknown]")]
    if "do_syscall_64" not in frames and not any(f.startswith(("entry_SYSCALL", "asm_", "irq", "__sysvec"))
                                                 for f in frames):
        return "user", False
    if "do_syscall_64" not in frames:
        return "switch/irq", False
    leaf = kernel[0] if kernel else frames[0]
    if leaf.startswith(ENTRY):
        return "syscall entry", False
    if any(f.startswith(("exit_to_user_mode_loop", "schedule", "__schedule", "finish_task_switch"))
           for f in frames) and not any(f in EPOLL for f in frames):
        return "switch/irq", False
    if any(f in SEND for f in frames):
        return "send", "net_rx_action" in frames
    if any(f in RECV for f in frames):
        return "recv", False
    if any(f in EPOLL for f in frames):
        return "epoll", False
    return "other syscalls", False


def profile(url, seconds, conns, pids, tmp):
    """Two wrk runs of `seconds`: one sampled, one with its system calls counted (tracing every
    call slows the gateway, so the two are kept apart). Returns (CPU µs per request and samples
    by bucket from the first, syscalls per request by name from the second)."""
    data = os.path.join(tmp, "perf.data")
    pid_list = ",".join(map(str, pids))
    c0 = sum(run.cpu_ticks(pids[0]))
    rec = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", "1000", "-g", "-o", data,
                            "-p", pid_list, "--", "sleep", str(seconds)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r = run.parse_wrk(run.wrk(url, seconds, conns))
    rec.wait()
    c1 = sum(run.cpu_ticks(pids[0]))
    us_per_req = (c1 - c0) / run.CLK_TCK * 1e6 / max(r["requests"], 1)
    samples = collections.Counter()
    for frames in stacks(data):
        b, delivered = bucket(frames)
        samples[b] += 1
        if delivered:
            samples["  of which: delivery to the peer"] += 1

    stat = subprocess.Popen(["perf", "stat", "-x,", "-e", "syscalls:sys_enter_*", "-p", pid_list,
                             "--", "sleep", str(seconds)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    r = run.parse_wrk(run.wrk(url, seconds, conns))
    counts = {}
    for line in stat.communicate()[1].splitlines():
        parts = line.split(",")
        if len(parts) > 2 and parts[0].isdigit() and int(parts[0]) > 0:
            counts[parts[2].replace("syscalls:sys_enter_", "")] = int(parts[0]) / max(r["requests"], 1)
    return us_per_req, samples, counts


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated target names (default: every gateway target)")
    ap.add_argument("--duration", type=int, default=5, help="seconds profiled per target")
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--no-install", action="store_true")
    args = ap.parse_args()
    targets = [t for t in run.TARGETS if t[4] is not None]
    if args.only:
        want = set(args.only.split(","))
        targets = [t for t in run.TARGETS if t[0] in want]
    if not args.no_install:
        run.ensure_tools()
        ensure_perf()
    if not args.no_build:
        run.build()
    procs, base, _ = run.setup()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, server, path, gw, _up in targets:
            url = base[server] + path
            run.wrk(url, 1, args.conns)
            pids = run.tree(procs[gw].pid)
            us_per_req, samples, counts = profile(url, args.duration, args.conns, pids, tmp)
            n = sum(v for k, v in samples.items() if not k.startswith(" "))
            rows[name] = (us_per_req, {b: us_per_req * samples[b] / max(n, 1) for b in BUCKETS}, counts)
            run.log(f"{name}: {n} samples, {us_per_req:.1f} µs/req")

    names = list(rows)
    print(f"\nCPU µs per request by where it goes (perf cpu-clock samples x /proc CPU time, "
          f"c={args.conns}, {args.duration} s each)")
    print(f"{'':34}" + "".join(f"{n:>14}" for n in names))
    print(f"{'total':34}" + "".join(f"{rows[n][0]:14.1f}" for n in names))
    for b in BUCKETS:
        print(f"{b:34}" + "".join(f"{rows[n][1][b]:14.2f}" for n in names))
    calls = sorted({c for n in names for c in rows[n][2]},
                   key=lambda c: -max(rows[n][2].get(c, 0) for n in names))
    print("\nsystem calls per request")
    for c in calls:
        if max(rows[n][2].get(c, 0) for n in names) >= 0.01:
            print(f"{c:34}" + "".join(f"{rows[n][2].get(c, 0):14.2f}" for n in names))


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        main()
    except KeyboardInterrupt:
        run.log("interrupted")
        sys.exit(130)
    finally:
        run.stop_all()
