//! Lua plugins that talk to the network: `ngx.socket.tcp` against a line server this test runs
//! on loopback (TCP and a unix socket), through the real gateway binary.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// What the line server saw.
#[derive(Default)]
struct Seen {
    accepted: AtomicU64,
    /// Connections whose client closed (EOF).
    closed: AtomicU64,
    commands: Mutex<Vec<String>>,
}

/// A line protocol: `PING` -> `+PONG\r\n`; `MULTI` -> two parts after `--B` boundaries;
/// then close; `PARTIAL` -> `abc` then close; `SLOW ms` -> `late\n` after ms; `BYTES n` -> n `x` then
/// close; `ANY` -> `hello`; anything else is recorded and answered `ok\n`.
fn serve<S: std::io::Read + Write>(s: S, seen: &Seen) {
    let mut r = BufReader::new(s);
    let mut line = String::new();
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => {
                seen.closed.fetch_add(1, Ordering::SeqCst);
                return;
            }
            Ok(_) => {}
        }
        let cmd = line.trim_end().to_string();
        seen.commands.lock().unwrap().push(cmd.clone());
        let w = r.get_mut();
        let mut words = cmd.split(' ');
        let out: Vec<u8> = match words.next().unwrap_or("") {
            "PING" => b"+PONG\r\n".to_vec(),
            "MULTI" => {
                let _ = w.write_all(b"first--Bsecond part--Bthird");
                return;
            }
            "PARTIAL" => {
                let _ = w.write_all(b"abc");
                return;
            }
            "SLOW" => {
                let ms = words.next().and_then(|n| n.parse().ok()).unwrap_or(500);
                std::thread::sleep(Duration::from_millis(ms));
                b"late\n".to_vec()
            }
            "BYTES" => {
                let n = words.next().and_then(|n| n.parse().ok()).unwrap_or(0);
                let _ = w.write_all(&vec![b'x'; n]);
                return;
            }
            "ANY" => b"hello".to_vec(),
            _ => b"ok\n".to_vec(),
        };
        if w.write_all(&out).is_err() {
            return;
        }
    }
}

/// Serves every connection `conns` yields on a thread of its own.
fn accept_all<S, I>(conns: I) -> Arc<Seen>
where
    S: std::io::Read + Write + Send + 'static,
    I: Iterator<Item = S> + Send + 'static,
{
    let seen = Arc::new(Seen::default());
    let s2 = seen.clone();
    std::thread::spawn(move || {
        for c in conns {
            s2.accepted.fetch_add(1, Ordering::SeqCst);
            let s3 = s2.clone();
            std::thread::spawn(move || serve(c, &s3));
        }
    });
    seen
}

fn line_server() -> (u16, Arc<Seen>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    let conns = std::iter::from_fn(move || l.accept().ok().map(|(s, _)| s));
    (port, accept_all::<TcpStream, _>(conns))
}

fn unix_server(path: &std::path::Path) -> Arc<Seen> {
    let l = UnixListener::bind(path).expect("bind unix");
    let conns = std::iter::from_fn(move || l.accept().ok().map(|(s, _)| s));
    accept_all::<UnixStream, _>(conns)
}

const PROBE: &str = r#"
local core = require("apisix.core")
local _M = { version = 0.1, priority = 100, name = "sock-probe", schema = { type = "object" } }

local function connect(conf)
    local s = ngx.socket.tcp()
    local ok, err = s:connect("127.0.0.1", conf.port)
    assert(ok == 1, err)
    return s
end

local ops = {}

function ops.basic(conf)
    local s = connect(conf)
    local sent, err = s:send({ "PI", { "N", "G" }, "\n" })
    local line = s:receive()
    local reused = s:getreusedtimes()
    local ok = s:setkeepalive(10000, 4)
    return { sent = sent, line = line, reused = reused, keepalive = ok, closed = select(2, s:send("x")) }
end

ops["until"] = function(conf)
    local s = connect(conf)
    s:send("MULTI\n")
    local r = s:receiveuntil("--B")
    local a = r()
    local b = s:receiveuntil("--B", { inclusive = true })()
    local rest, err, partial = s:receive(10)
    return { a = a, b = b, err = err, partial = partial }
end

function ops.sized(conf)
    local s = connect(conf)
    s:send("MULTI\n")
    local r = s:receiveuntil("--B")
    local chunks = {}
    for _ = 1, 10 do
        local data, err = r(2)
        if not data then
            chunks[#chunks + 1] = err and ("err:" .. err) or "done"
            break
        end
        chunks[#chunks + 1] = data
    end
    -- The iterator resets: it reads up to the next boundary.
    local second = r()
    return { chunks = table.concat(chunks, "|"), second = second }
end

function ops.partial(conf)
    local s = connect(conf)
    s:send("PARTIAL\n")
    local data, err, partial = s:receive(10)
    local _, after = s:receive()
    return { data = data or "nil", err = err, partial = partial, after = after }
end

function ops.timeout(conf)
    local s = connect(conf)
    s:settimeouts(1000, 1000, 100)
    s:send("SLOW 400\n")
    local data, err, partial = s:receive()
    -- A read timeout leaves the socket usable.
    s:settimeout(2000)
    local late = s:receive()
    return { err = err, partial = partial, late = late }
end

function ops.wait(conf)
    -- Waits far longer than the CPU budget: waiting is not running.
    local s = connect(conf)
    s:send("SLOW 400\n")
    local late, err = s:receive("*l")
    s:close()
    return { late = late, err = err }
end

function ops.all(conf)
    local s = connect(conf)
    -- a flat table with a number, as lua-resty-redis sends its commands
    s:send({ "BYTES ", 20000, "\n" })
    local data, err = s:receive("*a")
    return { len = data and #data, err = err }
end

function ops.any(conf)
    local s = connect(conf)
    s:send("ANY\n")
    local a = s:receiveany(3)
    local b = s:receiveany(100)
    local ok, err = pcall(s.receiveany, s, 0)
    return { a = a, b = b, bad = tostring(err) }
end

function ops.refused(conf)
    local s = ngx.socket.tcp()
    local ok, err = s:connect("127.0.0.1", conf.closed_port)
    local _, err2 = s:send("x")
    return { ok = ok or "nil", err = err, send = err2 }
end

function ops.resolve(conf)
    local s = ngx.socket.tcp()
    local ok, err = s:connect("localhost", conf.port)
    if ok then s:send("PING\n") end
    local line = ok and s:receive()
    local ok2, err2 = ngx.socket.tcp():connect("no-such-host.invalid", 80)
    return { ok = ok, line = line, bad = err2 }
end

function ops.unix(conf)
    local s, err = ngx.socket.connect("unix:" .. conf.path)
    if not s then return { err = err } end
    s:send("PING\n")
    local line = s:receive()
    return { line = line, peer = s:getpeername() }
end

function ops.pool(conf)
    local s = ngx.socket.tcp()
    assert(s:connect("127.0.0.1", conf.port, { pool = "named" }))
    s:send("PING\n")
    s:receive()
    local reused = s:getreusedtimes()
    s:setkeepalive()
    return { reused = reused }
end

function ops.leak(conf)
    local s = connect(conf)
    s:send("LEAK\n")
    s:receive()
    return { left = "open" }
end

function ops.timer(conf)
    local ok, err = ngx.timer.at(0, function(premature, port)
        local s = ngx.socket.tcp()
        assert(s:connect("127.0.0.1", port))
        s:send("FROM-TIMER\n")
        s:receive()
        s:setkeepalive()
    end, conf.port)
    return { ok = ok }
end

local function s(...)
    local t = {}
    for i = 1, select('#', ...) do t[i] = tostring((select(i, ...))) end
    return table.concat(t, "|")
end

-- opts.backlog: at most pool_size connections of the pool open; more connects wait in a queue
-- of `backlog`, for a connection to be parked or closed.
function ops.backlog(conf)
    local opts = { pool = "limited", pool_size = 1, backlog = 1 }
    local r = {}
    local function open(timeout)
        local sock = ngx.socket.tcp()
        sock:settimeout(timeout or 5000)
        return sock, sock:connect("127.0.0.1", conf.port, opts)
    end
    local a = select(1, open())
    local waiter = ngx.thread.spawn(function()
        local b, ok, err = open()
        if not ok then return "b: " .. err end
        local reused = b:getreusedtimes()
        b:send("PING\n")
        local line = b:receive()
        b:close()
        return "b got a's connection: reused " .. reused .. ", " .. line
    end)
    -- b waits in the backlog: a third connect has no room.
    r.third = s(select(2, open()))
    a:setkeepalive()
    r.waiter = select(2, ngx.thread.wait(waiter))
    -- b closed it: the pool has room again.
    local h, ok = open()
    r.held = s(ok)
    r.queued_timeout = s(select(2, open(100)))
    h:close()
    local n, ok = open()
    r.after_close = s(ok)
    n:close()
    r.bad = s(pcall(ngx.socket.tcp().connect, ngx.socket.tcp(), "127.0.0.1", conf.port,
        { backlog = -1 }))
    return r
end

function ops.lib(conf)
    -- From lua.package_path (relative to the config file's folder).
    local greet = require("probe.greet")
    -- A library on the path wins over moongate's stand-in; without one the stand-in loads.
    local connector = require("resty.redis.connector")
    local _, cluster_err = require("resty.rediscluster").new()
    return { hello = greet.hello(), where = package.path:match("^[^;]*"),
             connector = connector.from, cluster = cluster_err }
end

-- Errors raised by moongate's Rust functions reach Lua code as strings (OpenResty's are), with
-- luaL_argerror's text for a bad argument.
function ops.errors(conf)
    local r = {}
    local function probe(name, ok, err)
        r[name] = { ok = ok, type = type(err), text = "prefix: " .. err,
                    found = err:find("expected", 1, true) ~= nil,
                    fmt = string.format("%s", err) }
    end
    probe("through_pcall", pcall(ngx.decode_base64, {}))
    -- Not tail calls: the caller's frame names the function, as luaL_argerror reads it.
    probe("direct", pcall(function() local v = ngx.decode_base64({}) return v end))
    probe("method", pcall(function() local v = ngx.socket.tcp():connect(nil) return v end))
    probe("runtime", pcall(function() return ngx.socket.tcp():receive("*x") end))
    probe("xpcall", xpcall(function() local v = ngx.decode_base64({}) return v end,
        function(e) return "handled: " .. e end))
    local tb_ok, tb = xpcall(ngx.decode_base64, debug.traceback, {})
    r.traceback = { type = type(tb), first = tb:match("^[^\n]*") }
    local co = coroutine.create(function() local v = ngx.decode_base64(true) return v end)
    probe("coroutine", coroutine.resume(co))
    probe("wrap", pcall(coroutine.wrap(function() local v = ngx.decode_base64(true) return v end)))
    local th = ngx.thread.spawn(function() local v = ngx.decode_base64({}) return v end)
    probe("thread", ngx.thread.wait(th))
    -- Lua's own error values are left as they are.
    local t = {}
    local _, same = pcall(error, t)
    local _, str = pcall(error, "plain", 0)
    r.lua = { same_table = same == t, str = str }
    return r
end

function _M.access(conf, ctx)
    local op = ngx.var.arg_op
    return 200, ops[op](conf)
end

function _M.header_filter(conf, ctx)
    local ok, err = pcall(ngx.socket.tcp)
    ngx.header["X-Header-Filter"] = tostring(err):match("API disabled[^\n]*")
end

function _M.log(conf, ctx)
    local ok, err = pcall(ngx.socket.tcp)
    core.log.warn("log phase socket: ", tostring(err):match("API disabled[^\n]*"))
end

return _M
"#;

fn poll(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn tcp_cosockets() {
    let (port, seen) = line_server();
    let dir = tempfile::tempdir().expect("temp dir");
    let sock_path = dir.path().join("line.sock");
    let useen = unix_server(&sock_path);
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).expect("plugins dir");
    std::fs::write(plugins.join("sock-probe.lua"), PROBE).expect("write plugin");
    let libs = dir.path().join("libs/probe");
    std::fs::create_dir_all(&libs).expect("libs dir");
    std::fs::write(
        libs.join("greet.lua"),
        "return { hello = function() return 'hi from libs' end }\n",
    )
    .expect("write lib");
    let connector = dir.path().join("libs/resty/redis");
    std::fs::create_dir_all(&connector).expect("libs dir");
    std::fs::write(
        connector.join("connector.lua"),
        "return { from = 'libs' }\n",
    )
    .expect("write lib");
    let yaml = format!(
        "plugin_dirs:\n  - plugins\nworkers: 1\nlua:\n  call_budget_ms: 100\n  package_path:\n    - libs/?.lua\nroutes:\n  - id: s\n    uri: /s\n    plugins:\n      sock-probe: {{port: {port}, closed_port: {}, path: \"{}\"}}\n    upstream:\n      nodes:\n        \"127.0.0.1:1\": 1\n",
        closed_port(),
        sock_path.display()
    );
    let gw = Gateway::start_in(dir.path(), &yaml);
    let call = |op: &str| {
        eprintln!("op {op}");
        let r = get(&gw.url(&format!("/s?op={op}")));
        assert_eq!(r.status, 200, "{op}: {}\n{}", r.text(), gw.logs());
        r
    };

    // Send a nested table, read a line (CR dropped), keep the connection alive: the second
    // request reuses it (one accepted connection, reused once).
    let r = call("basic");
    let j = r.json();
    assert_eq!(j["sent"], 5);
    assert_eq!(j["line"], "+PONG");
    assert_eq!(j["reused"], 0);
    assert_eq!(j["keepalive"], 1);
    assert_eq!(j["closed"], "closed", "{j}");
    assert_eq!(
        r.header("x-header-filter").as_deref(),
        Some("API disabled in the context of header_filter_by_lua*")
    );
    let accepted = seen.accepted.load(Ordering::SeqCst);
    let j = call("basic").json();
    assert_eq!(j["reused"], 1, "{j}");
    assert_eq!(seen.accepted.load(Ordering::SeqCst), accepted);
    assert!(gw.wait_for_log(
        "log phase socket: API disabled in the context of log_by_lua*",
        Duration::from_secs(5)
    ));

    let j = call("lib").json();
    assert_eq!(j["hello"], "hi from libs");
    assert_eq!(j["where"], format!("{}/libs/?.lua", dir.path().display()));
    assert_eq!(j["connector"], "libs", "{j}");
    assert_eq!(
        j["cluster"],
        "resty.rediscluster is not installed (moongate has only a stand-in): put the library on lua.package_path",
        "{j}"
    );

    let j = call("until").json();
    assert_eq!(j["a"], "first");
    assert_eq!(j["b"], "second part--B");
    assert_eq!(j["err"], "closed");
    assert_eq!(j["partial"], "third");

    let j = call("sized").json();
    assert_eq!(j["chunks"], "fi|rs|t|done", "{j}");
    assert_eq!(j["second"], "second part");

    let j = call("partial").json();
    assert_eq!(j["data"], "nil");
    assert_eq!(j["err"], "closed");
    assert_eq!(j["partial"], "abc");
    assert_eq!(j["after"], "closed");

    let j = call("timeout").json();
    assert_eq!(j["err"], "timeout");
    assert_eq!(j["partial"], "");
    assert_eq!(j["late"], "late");

    // 400 ms of waiting under a 100 ms CPU budget.
    let j = call("wait").json();
    assert_eq!(j["late"], "late", "{j}");

    let j = call("all").json();
    assert_eq!(j["len"], 20000, "{j}");

    let j = call("any").json();
    assert_eq!(j["a"], "hel");
    assert_eq!(j["b"], "lo");
    assert!(
        j["bad"].as_str().unwrap_or("").contains("bad max argument"),
        "{j}"
    );

    // Errors from Rust-backed functions are strings a plugin can concatenate and search.
    let j = call("errors").json();
    let bad_table = "bad argument #1 to '?' (string expected, got table)";
    let expect = [
        ("through_pcall", bad_table.to_string()),
        (
            "direct",
            "bad argument #1 to 'decode_base64' (string expected, got table)".into(),
        ),
        (
            "method",
            "bad argument #1 to 'connect' (string expected, got nil)".into(),
        ),
        (
            "coroutine",
            "bad argument #1 to 'decode_base64' (string expected, got boolean)".into(),
        ),
        (
            "wrap",
            "bad argument #1 to 'decode_base64' (string expected, got boolean)".into(),
        ),
        (
            "thread",
            "bad argument #1 to 'decode_base64' (string expected, got table)".into(),
        ),
    ];
    for (name, text) in expect {
        let p = &j[name];
        assert_eq!(p["ok"], false, "{name}: {j}");
        assert_eq!(p["type"], "string", "{name}: {j}");
        assert_eq!(p["text"], format!("prefix: {text}"), "{name}: {j}");
        assert_eq!(p["fmt"], text, "{name}: {j}");
        assert_eq!(p["found"], true, "{name}: {j}");
    }
    assert_eq!(j["runtime"]["type"], "string", "{j}");
    assert_eq!(
        j["runtime"]["fmt"], "bad argument #1 to 'receive' (bad pattern argument)",
        "{j}"
    );
    assert_eq!(
        j["xpcall"]["fmt"],
        "handled: bad argument #1 to 'decode_base64' (string expected, got table)",
        "{j}"
    );
    assert_eq!(j["traceback"]["type"], "string", "{j}");
    assert_eq!(j["traceback"]["first"], bad_table, "{j}");
    assert_eq!(j["lua"]["same_table"], true, "{j}");
    assert_eq!(j["lua"]["str"], "plain", "{j}");

    let j = call("refused").json();
    assert_eq!(j["err"], "connection refused");
    assert_eq!(j["send"], "closed");

    let j = call("resolve").json();
    assert_eq!(j["line"], "+PONG", "{j}");
    assert!(
        j["bad"]
            .as_str()
            .unwrap_or("")
            .contains("could not be resolved"),
        "{j}"
    );

    let j = call("unix").json();
    assert_eq!(j["line"], "+PONG", "{j}");
    assert_eq!(j["peer"], sock_path.display().to_string());
    assert_eq!(useen.accepted.load(Ordering::SeqCst), 1);

    // opts.pool names the pool: a new pool, then reused.
    let before = seen.accepted.load(Ordering::SeqCst);
    assert_eq!(call("pool").json()["reused"], 0);
    assert_eq!(call("pool").json()["reused"], 1);
    assert_eq!(seen.accepted.load(Ordering::SeqCst), before + 1);

    // backlog: a+b share one connection (b waited for a's), h and n make one each, and the
    // connect that timed out in the queue made none.
    let before = seen.accepted.load(Ordering::SeqCst);
    let j = call("backlog").json();
    assert_eq!(j["third"], "nil|too many waiting connect operations", "{j}");
    assert_eq!(j["waiter"], "b got a's connection: reused 1, +PONG", "{j}");
    assert_eq!(j["held"], "1", "{j}");
    assert_eq!(j["queued_timeout"], "nil|timeout", "{j}");
    assert_eq!(j["after_close"], "1", "{j}");
    assert!(
        j["bad"]
            .as_str()
            .unwrap_or("")
            .contains("bad \"backlog\" option value: -1"),
        "{j}"
    );
    // The server counts a connection when its accept loop takes it, which may trail the
    // connect the gateway saw complete.
    poll("the server to count three connections", || {
        seen.accepted.load(Ordering::SeqCst) >= before + 3
    });
    assert_eq!(seen.accepted.load(Ordering::SeqCst), before + 3);

    // A socket the request left open is closed when the request ends.
    let closed = seen.closed.load(Ordering::SeqCst);
    call("leak");
    poll("the leaked socket to be closed", || {
        seen.closed.load(Ordering::SeqCst) > closed
    });

    // Timers can use cosockets.
    call("timer");
    poll("the timer's command", || {
        seen.commands
            .lock()
            .unwrap()
            .iter()
            .any(|c| c == "FROM-TIMER")
    });
}

#[test]
fn package_path_patterns_are_checked() {
    let (code, out) = check("lua:\n  package_path:\n    - /opt/lua/x.lua\n");
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("lua.package_path") && out.contains("has no \"?\""),
        "{out}"
    );
    let (code, out) = check("lua:\n  package_path:\n    - \"/a/?.lua;/b/?.lua\"\n");
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("one pattern per list item"), "{out}");
    let (code, out) = check("lua:\n  package_path:\n    - /opt/lua/?.lua\n");
    assert_eq!(code, 0, "{out}");
    let (code, out) = check("lua:\n  package_cpath:\n    - /opt/lua/x.so\n");
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("lua.package_cpath") && out.contains("has no \"?\""),
        "{out}"
    );
    let (code, out) = check("lua:\n  package_cpath:\n    - /opt/lua/?.so\n");
    assert_eq!(code, 0, "{out}");
}

/// A server process this test started; killed when dropped.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cmd` (a server that will listen on `port`) and waits until the port accepts.
fn start_server(cmd: &mut std::process::Command, port: u16) -> Server {
    let child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let server = Server(child);
    poll("the server to listen", || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    server
}

/// Redis's `CLIENT LIST`, one line per connected client.
fn redis_clients(port: u16) -> Vec<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to redis");
    s.write_all(b"CLIENT LIST\r\n").expect("send");
    let mut r = BufReader::new(s);
    let mut head = String::new();
    r.read_line(&mut head).expect("read");
    let len: usize = head
        .trim_start_matches('$')
        .trim()
        .parse()
        .expect("bulk length");
    let mut body = vec![0u8; len];
    std::io::Read::read_exact(&mut r, &mut body).expect("read body");
    String::from_utf8_lossy(&body)
        .lines()
        .map(str::to_string)
        .collect()
}

const KV_PROBE: &str = r#"
local _M = { version = 0.1, priority = 100, name = "kv-probe", schema = { type = "object" } }

local function redis_incr(conf)
    local redis = require("resty.redis")
    local red = redis:new()
    red:set_timeout(1000)
    local ok, err = red:connect("127.0.0.1", conf.redis_port)
    if not ok then return { err = err } end
    local n, err = red:incr("moongate:hits")
    local reused = red:get_reused_times()
    local kept = red:set_keepalive(10000, 8)
    return { n = n, err = err, reused = reused, kept = kept }
end

local function memcached_incr(conf)
    local memcached = require("resty.memcached")
    local m = memcached:new()
    m:set_timeout(1000)
    local ok, err = m:connect("127.0.0.1", conf.memcached_port)
    if not ok then return { err = err } end
    m:add("hits", 0)
    local n, err = m:incr("hits", 1)
    local reused = m:get_reused_times()
    local kept = m:set_keepalive(10000, 8)
    return { n = tonumber(n), err = err, reused = reused, kept = kept }
end

function _M.access(conf, ctx)
    if ngx.var.arg_kv == "memcached" then
        return 200, memcached_incr(conf)
    end
    return 200, redis_incr(conf)
end

return _M
"#;

/// The real lua-resty-redis and lua-resty-memcached (Debian's lua-nginx-redis and
/// lua-nginx-memcached, unmodified) over cosockets, against redis-server and memcached.
#[test]
fn real_redis_and_memcached_clients() {
    let dir = tempfile::tempdir().expect("temp dir");
    let libs = dir.path().join("libs");
    common::lua_libs::install_as_resty("lua-nginx-redis", "redis.lua", &libs);
    common::lua_libs::install_as_resty("lua-nginx-memcached", "memcached.lua", &libs);
    let redis_port = closed_port();
    let _redis = start_server(
        std::process::Command::new("redis-server")
            .args(["--port", &redis_port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]),
        redis_port,
    );
    let mc_port = closed_port();
    let _memcached = start_server(
        std::process::Command::new("memcached").args([
            "-l",
            "127.0.0.1",
            "-p",
            &mc_port.to_string(),
            "-U",
            "0",
            "-u",
            "root",
        ]),
        mc_port,
    );
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).expect("plugins dir");
    std::fs::write(plugins.join("kv-probe.lua"), KV_PROBE).expect("write plugin");
    let yaml = format!(
        "plugin_dirs:\n  - plugins\nworkers: 1\nlua:\n  package_path:\n    - libs/?.lua\nroutes:\n  - id: kv\n    uri: /kv\n    plugins:\n      kv-probe: {{redis_port: {redis_port}, memcached_port: {mc_port}}}\n    upstream:\n      nodes:\n        \"127.0.0.1:1\": 1\n"
    );
    let gw = Gateway::start_in(dir.path(), &yaml);
    for kv in ["redis", "memcached"] {
        for i in 1..=5 {
            let r = get(&gw.url(&format!("/kv?kv={kv}")));
            assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.logs());
            let j = r.json();
            assert_eq!(j["n"], i, "{kv}: {j}");
            assert_eq!(j["kept"], 1, "{kv}: {j}");
            // One connection, kept alive: every request after the first reuses it.
            assert_eq!(j["reused"], i - 1, "{kv}: {j}");
        }
    }
    // Redis sees the gateway's one pooled connection (and this one).
    let clients = redis_clients(redis_port);
    assert_eq!(clients.len(), 2, "{clients:?}");
}

/// A keep-alive HTTP/1.1 server: `/hello` (Content-Length), `/chunked`, `/stall` (sends part
/// of its body, then nothing), `/big` (10 MB), `/echo` (the request head and body back),
/// `/close` (Connection: close). Counts the connections it accepted.
fn http_server() -> (u16, Arc<AtomicU64>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    let accepted = Arc::new(AtomicU64::new(0));
    let a2 = accepted.clone();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            a2.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || http_conn(c));
        }
    });
    (port, accepted)
}

fn http_conn(c: TcpStream) {
    let mut r = BufReader::new(c);
    loop {
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line == "\r\n" {
                break;
            }
            head.push(line.trim_end().to_string());
        }
        let len: usize = head
            .iter()
            .find_map(|h| {
                h.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap_or(0))
            })
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        if std::io::Read::read_exact(&mut r, &mut body).is_err() {
            return;
        }
        let target = head
            .first()
            .and_then(|l| l.split(' ').nth(1))
            .unwrap_or("/")
            .to_string();
        let path = target.split('?').next().unwrap_or("/").to_string();
        let w = r.get_mut();
        let ok = match path.as_str() {
            "/hello" => w.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Multi: a\r\nX-Multi: b\r\nContent-Length: 5\r\n\r\nhello"),
            "/chunked" => w.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nchun\r\n6;ext=1\r\nked ok\r\n0\r\nX-Trailer: t\r\n\r\n"),
            "/stall" => {
                let _ = w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b");
                std::thread::sleep(Duration::from_millis(1500));
                return;
            }
            "/big" => {
                let chunk = vec![b'z'; 1 << 20];
                let mut r = w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10485760\r\n\r\n");
                for _ in 0..10 {
                    r = r.and_then(|_| w.write_all(&chunk));
                }
                r
            }
            "/close" => {
                let _ = w.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nby");
                return;
            }
            _ => {
                let mut out = head.join("\n");
                out.push_str("\n\n");
                out.push_str(&String::from_utf8_lossy(&body));
                w.write_all(format!("HTTP/1.1 201 Created\r\nContent-Length: {}\r\n\r\n{out}", out.len()).as_bytes())
            }
        };
        if ok.is_err() {
            return;
        }
    }
}

const HTTP_PROBE: &str = r#"
local http = require("resty.http")
local _M = { version = 0.1, priority = 100, name = "http-probe", schema = { type = "object" } }
local ops = {}

function ops.uri(conf)
    local httpc = http.new()
    local res, err = httpc:request_uri("http://127.0.0.1:" .. conf.port .. "/echo?a=1", {
        method = "POST", body = "payload", headers = { ["X-Probe"] = "yes" },
    })
    if not res then return { err = err } end
    return { status = res.status, body = res.body }
end

function ops.hello(conf)
    local httpc = http.new()
    assert(httpc:connect({ scheme = "http", host = "127.0.0.1", port = conf.port }))
    local reused = httpc:get_reused_times()
    local res, err = httpc:request({ path = "/hello" })
    if not res then return { err = err } end
    local body = res:read_body()
    assert(httpc:set_keepalive(10000, 4))
    local n = 0
    for _ in pairs(res.headers) do n = n + 1 end
    return { status = res.status, body = body, ct = res.headers["content_type"], count = n,
             multi = table.concat(res.headers["X-Multi"], ","), reused = reused }
end

function ops.chunked(conf)
    local httpc = http.new()
    assert(httpc:connect({ scheme = "http", host = "127.0.0.1", port = conf.port }))
    local res = assert(httpc:request({ path = "/chunked", query = { x = "1" } }))
    local body, err = res:read_body()
    local ok, kerr = httpc:set_keepalive()
    return { body = body, err = err, kept = ok }
end

function ops.stall(conf)
    local httpc = http.new()
    httpc:set_timeouts(1000, 1000, 200)
    assert(httpc:connect("127.0.0.1", conf.port))
    local res = assert(httpc:request({ path = "/stall" }))
    local body, err, partial = res:read_body()
    local ok, kerr = httpc:set_keepalive()
    return { status = res.status, err = err, partial = partial, kerr = kerr }
end

function ops.big(conf)
    local httpc = http.new()
    assert(httpc:connect("127.0.0.1", conf.port))
    local res = assert(httpc:request({ path = "/big" }))
    collectgarbage("collect")
    local base = collectgarbage("count")
    local total, biggest, peak = 0, 0, 0
    while true do
        local chunk, err = res.body_reader(65536)
        if err then return { err = err } end
        if not chunk then break end
        total = total + #chunk
        if #chunk > biggest then biggest = #chunk end
        local used = collectgarbage("count") - base
        if used > peak then peak = used end
    end
    httpc:set_keepalive()
    return { total = total, biggest = biggest, peak_kb = math.floor(peak) }
end

function ops.close(conf)
    local httpc = http.new()
    local res = assert(httpc:request_uri("http://127.0.0.1:" .. conf.port .. "/close"))
    return { body = res.body }
end

function ops.refused(conf)
    local res, err = http.new():request_uri("http://127.0.0.1:" .. conf.closed_port .. "/")
    local p = http:parse_uri("http://example.com:8080/a/b?c=d", false)
    return { err = err, parsed = p[2] .. "|" .. p[3] .. "|" .. p[4] .. "|" .. p[5] }
end

function _M.access(conf, ctx)
    return 200, ops[ngx.var.arg_op](conf)
end

return _M
"#;

/// `resty.http` (lua-resty-http's API) against a server this test runs: keep-alive reuse seen
/// at the server, chunked bodies, a read timeout mid-body, a 10 MB body streamed through
/// `body_reader`.
#[test]
fn resty_http_client() {
    let (port, accepted) = http_server();
    let dir = tempfile::tempdir().expect("temp dir");
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).expect("plugins dir");
    std::fs::write(plugins.join("http-probe.lua"), HTTP_PROBE).expect("write plugin");
    let yaml = format!(
        "plugin_dirs:\n  - plugins\nworkers: 1\nroutes:\n  - id: h\n    uri: /h\n    plugins:\n      http-probe: {{port: {port}, closed_port: {}}}\n    upstream:\n      nodes:\n        \"127.0.0.1:1\": 1\n",
        closed_port()
    );
    let gw = Gateway::start_in(dir.path(), &yaml);
    let call = |op: &str| {
        let r = get(&gw.url(&format!("/h?op={op}")));
        assert_eq!(r.status, 200, "{op}: {}\n{}", r.text(), gw.logs());
        r.json()
    };

    let j = call("uri");
    assert_eq!(j["status"], 201, "{j}");
    let body = j["body"].as_str().unwrap_or("");
    assert!(body.starts_with("POST /echo?a=1 HTTP/1.1\n"), "{body}");
    assert!(body.contains(&format!("Host: 127.0.0.1:{port}")), "{body}");
    assert!(
        body.contains("X-Probe: yes") && body.contains("Content-Length: 7"),
        "{body}"
    );
    assert!(body.contains("User-Agent: lua-resty-http/"), "{body}");
    assert!(body.ends_with("\n\npayload"), "{body}");

    // Kept alive: the next requests reuse the connection; the server accepted one.
    for i in 1..=3 {
        let j = call("hello");
        assert_eq!(j["status"], 200);
        assert_eq!(j["body"], "hello");
        assert_eq!(j["ct"], "text/plain");
        assert_eq!(j["multi"], "a,b");
        assert_eq!(j["count"], 3, "{j}");
        assert_eq!(j["reused"], i, "{j}");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);

    let j = call("chunked");
    assert_eq!(j["body"], "chunked ok", "{j}");
    assert_eq!(j["kept"], 1, "{j}");

    let j = call("stall");
    assert_eq!(j["status"], 200);
    assert_eq!(j["err"], "timeout", "{j}");
    assert_eq!(j["partial"], "", "{j}");
    assert_eq!(j["kerr"], "response not fully read", "{j}");

    let j = call("big");
    assert_eq!(j["total"], 10 * 1024 * 1024, "{j}");
    assert_eq!(j["biggest"], 65536, "{j}");
    // Streamed: the VM never held the body (garbage of a few chunks at most).
    assert!(j["peak_kb"].as_i64().unwrap_or(i64::MAX) < 4096, "{j}");

    let before = accepted.load(Ordering::SeqCst);
    assert_eq!(call("close")["body"], "by");
    // Connection: close is not pooled: the next request connects anew.
    assert_eq!(call("hello")["status"], 200);
    assert_eq!(accepted.load(Ordering::SeqCst), before + 1);

    let j = call("refused");
    assert_eq!(j["err"], "connection refused");
    assert_eq!(j["parsed"], "example.com|8080|/a/b|c=d");
}

const SEMA_PROBE: &str = r#"
local semaphore = require("ngx.semaphore")
local process = require("ngx.process")
local sema = semaphore.new(0)
local _M = { version = 0.1, priority = 100, name = "sema-probe", schema = { type = "object" } }

function _M.access(conf, ctx)
    local op = ngx.var.arg_op
    if op == "wait" then
        local ok, err = sema:wait(5)
        return 200, { ok = ok, err = err }
    elseif op == "count" then
        return 200, { count = sema:count() }
    elseif op == "post" then
        return 200, { posted = sema:post(1) }
    elseif op == "short" then
        local ok, err = sema:wait(0.05)
        local ok0, err0 = sema:wait(0)
        return 200, { err = err, err0 = err0 }
    end
    return 200, { type = process.type(), master = process.get_master_pid() }
end

return _M
"#;

/// `ngx.semaphore` between two requests of one worker, and `ngx.process`.
#[test]
fn semaphores_and_process() {
    let dir = tempfile::tempdir().expect("temp dir");
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).expect("plugins dir");
    std::fs::write(plugins.join("sema-probe.lua"), SEMA_PROBE).expect("write plugin");
    let yaml = "plugin_dirs:\n  - plugins\nworkers: 1\nroutes:\n  - id: m\n    uri: /m\n    plugins:\n      sema-probe: {}\n    upstream:\n      nodes:\n        \"127.0.0.1:1\": 1\n";
    let gw = Gateway::start_in(dir.path(), yaml);
    let url = |op: &str| gw.url(&format!("/m?op={op}"));

    let j = get(&url("short")).json();
    assert_eq!(j["err"], "timeout");
    assert_eq!(j["err0"], "timeout");

    let wait_url = url("wait");
    let waiter = std::thread::spawn(move || get(&wait_url).json());
    // The waiter is parked: the count goes negative.
    poll("the waiter to park", || {
        get(&url("count")).json()["count"] == -1
    });
    assert_eq!(get(&url("post")).json()["posted"], true);
    let j = waiter.join().expect("waiter");
    assert_eq!(j["ok"], true, "{j}");
    assert_eq!(get(&url("count")).json()["count"], 0);

    let j = get(&url("process")).json();
    assert_eq!(j["type"], "worker");
    assert_eq!(j["master"], gw.pid());
}

const WS_PROBE: &str = r##"
local client = require("nginx.websocket.client")
local _M = { version = 0.1, priority = 100, name = "ws-client", schema = { type = "object" } }

local function frame(ws)
    local data, typ, err = ws:recv_frame()
    return tostring(typ) .. ":" .. tostring(data) .. (err and (":" .. tostring(err)) or "")
end

function _M.access(conf, ctx)
    local out = {}
    local ws, err = client:new({ timeout = 5000, max_payload_len = 1024 * 1024 })
    local ok, err = ws:connect("ws://127.0.0.1:" .. conf.port .. "/echo")
    if not ok then return 500, { err = err } end
    assert(ws:send_text("hello"))
    out.text = frame(ws)
    assert(ws:send_binary("\0\1\2"))
    local data, typ = ws:recv_frame()
    out.binary = typ .. ":" .. #data
    assert(ws:send_text(string.rep("x", 100000)))
    local big, typ = ws:recv_frame()
    out.big = typ .. ":" .. #big
    assert(ws:send_ping("are you there"))
    out.pong = frame(ws)
    out.close = tostring(ws:send_close(1000, "done"))
    -- The server says goodbye itself on /bye: a text frame, then a close frame.
    local bye = client:new({ timeout = 5000 })
    assert(bye:connect("ws://127.0.0.1:" .. conf.port .. "/bye"))
    out.bye = frame(bye)
    out.bye_close = frame(bye)
    if conf.wss_port then
        -- wss: the client's sslhandshake, verified against the node's trusted CAs.
        local tls = client:new({ timeout = 5000 })
        ok, err = tls:connect("wss://127.0.0.1:" .. conf.wss_port .. "/secure",
            { ssl_verify = true })
        out.wss_connect = ok and "ok" or err
        if ok then
            assert(tls:send_text("over tls"))
            out.wss = frame(tls)
            tls:send_close()
        end
    end
    return 200, out
end

return _M
"##;

/// The real lua-resty-websocket client (Debian's lua-nginx-websocket, unmodified) over
/// cosockets, against the `websockets` echo server.
#[test]
fn real_websocket_client() {
    let server = common::websocket::WsServer::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = common::tls::Pki::new("websocket test CA");
    let pair = pki.server(&["127.0.0.1"], "ws");
    let (cert, key) = (dir.path().join("ws.pem"), dir.path().join("ws.key"));
    std::fs::write(&cert, &pair.cert).expect("write cert");
    std::fs::write(&key, &pair.key).expect("write key");
    std::fs::write(dir.path().join("ca.pem"), &pki.ca_pem).expect("write CA");
    let secure = common::websocket::WsServer::start_tls(&cert, &key);
    let wss_port = secure.node().rsplit(':').next().unwrap_or("").to_string();
    let libs = dir.path().join("libs");
    for file in ["websocket/client.lua", "websocket/protocol.lua"] {
        common::lua_libs::install_as_debian("lua-nginx-websocket", file, &libs);
    }
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).expect("plugins dir");
    std::fs::write(plugins.join("ws-client.lua"), WS_PROBE).expect("write plugin");
    let port = server.node().rsplit(':').next().unwrap_or("").to_string();
    let yaml = format!(
        "plugin_dirs:\n  - plugins\nworkers: 1\nssl:\n  enable: false\n  ssl_trusted_certificate: ca.pem\nlua:\n  package_path:\n    - libs/?.lua\nroutes:\n  - id: w\n    uri: /w\n    plugins:\n      ws-client: {{port: {port}, wss_port: {wss_port}}}\n    upstream:\n      nodes:\n        \"127.0.0.1:1\": 1\n"
    );
    let gw = Gateway::start_in(dir.path(), &yaml);
    let r = get(&gw.url("/w"));
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.logs());
    let j = r.json();
    assert_eq!(j["text"], "text:hello", "{j}");
    assert_eq!(j["binary"], "binary:3", "{j}");
    assert_eq!(j["big"], "text:100000", "{j}");
    assert_eq!(j["pong"], "pong:are you there", "{j}");
    assert_eq!(j["bye"], "text:bye", "{j}");
    assert_eq!(j["bye_close"], "close:done:1000", "{j}");
    assert_eq!(j["wss_connect"], "ok", "{j}");
    assert_eq!(j["wss"], "text:over tls", "{j}");
    assert_eq!(server.closed("/echo").as_deref(), Some("1000"));
    assert!(secure.closed("/secure").is_some());
}
