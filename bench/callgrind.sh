#!/usr/bin/env bash
# Instructions per proxied request of the release gateway, counted by valgrind's callgrind
# (repeatable on a shared machine, unlike timings).
#
#   bench/callgrind.sh [PATH] [BINARY]     # PATH defaults to /, BINARY to target/release/moongate
#
# Uses the configs bench/run.py wrote to bench/out/run/ (run it once first): starts the nginx
# upstream from upstream.conf if it is not running, runs the gateway under callgrind with
# moongate.yaml, warms up with wrk -c8 (CONNS=N: -cN) for 2 s, zeroes the counters, drives wrk for 4 s,
# dumps, and prints the worker's instructions divided by the requests wrk completed. The
# gateway forks its worker process, so valgrind follows children and the counters zeroed and
# dumped are the worker's.
set -euo pipefail
cd "$(dirname "$0")/.."
path=${1:-/}
conns=${CONNS:-8}
bin=${2:-target/release/moongate}
run=bench/out/run
cfg=$run/moongate.yaml
[ -f "$cfg" ] || { echo "no $cfg: run python3 bench/run.py once first" >&2; exit 2; }
command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install valgrind)" >&2; exit 2; }
port=$(awk '/^listen:/{split($2,a,":"); print a[2]}' "$cfg")
out=$(mktemp -d)
started_upstream=
if ! pgrep -f "$PWD/$run/upstream.conf" >/dev/null; then
    setsid nginx -p "$PWD/$run" -c "$PWD/$run/upstream.conf" </dev/null >/dev/null 2>&1 &
    started_upstream=1
    sleep 0.5
fi
valgrind --tool=callgrind --trace-children=yes --callgrind-out-file="$out/cg.%p" "$bin" run -c "$cfg" >"$out/log" 2>&1 &
vpid=$!
cleanup() {
    kill -INT "$vpid" 2>/dev/null || true
    wait "$vpid" 2>/dev/null || true
    if [ -n "$started_upstream" ] && [ -f "$run/upstream.pid" ]; then
        kill -QUIT "$(cat "$run/upstream.pid")" 2>/dev/null || true
    fi
}
trap cleanup EXIT
for _ in $(seq 60); do
    curl -s -o /dev/null "http://127.0.0.1:$port$path" && break
    sleep 0.5
done
wrk -t1 -c"$conns" -d2s "http://127.0.0.1:$port$path" >/dev/null
worker=$(pgrep -P "$vpid" | head -1)
[ -n "$worker" ] || worker=$vpid
callgrind_control -z "$worker" >/dev/null 2>&1
n=$(wrk -t1 -c"$conns" -d4s "http://127.0.0.1:$port$path" | awk '/requests in/{print $1}')
callgrind_control -d "$worker" >/dev/null 2>&1
sleep 0.5
best=0 file=
for f in "$out"/cg."$worker"*; do
    s=$(grep -m1 '^summary:' "$f" 2>/dev/null | awk '{print $2}' || true)
    if [ -n "$s" ] && [ "$s" -gt "$best" ]; then best=$s file=$f; fi
done
echo "requests $n, instructions $best, per request $((best / n)) (profile: $file; callgrind_annotate --inclusive=yes it)"
