//! Light threads (`ngx.thread.spawn/wait/kill`) in a plugin served by the real gateway binary,
//! against a line server this test runs on loopback: threads wait on the network at once, a
//! killed or aborted thread's socket is closed at the server, timers run threads too.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// What the line server saw.
#[derive(Default)]
struct Seen {
    /// Commands other than BARRIER and HOLD, in arrival order.
    commands: Mutex<Vec<String>>,
    /// HOLD connections whose client closed them.
    holds_closed: AtomicU64,
    /// HOLD connections open now.
    holds_open: AtomicU64,
    /// Arrivals per barrier name.
    barriers: Mutex<HashMap<String, u64>>,
    arrived: Condvar,
}

/// `BARRIER name n` answers `ok name` once n connections reached that barrier (or `late` after
/// 5 s); `HOLD` never answers (and counts the close); anything else is recorded and answered
/// `ok`.
fn serve(s: TcpStream, seen: &Seen) {
    let mut r = BufReader::new(s);
    let mut line = String::new();
    loop {
        line.clear();
        if !matches!(r.read_line(&mut line), Ok(n) if n > 0) {
            return;
        }
        let cmd = line.trim_end().to_string();
        let words: Vec<&str> = cmd.split(' ').collect();
        let out = match words[..] {
            ["BARRIER", name, n] => {
                let n: u64 = n.parse().unwrap_or(1);
                let mut b = seen.barriers.lock().unwrap();
                *b.entry(name.to_string()).or_default() += 1;
                seen.arrived.notify_all();
                let deadline = Instant::now() + Duration::from_secs(5);
                while b[name] < n && Instant::now() < deadline {
                    b = seen
                        .arrived
                        .wait_timeout(b, Duration::from_millis(100))
                        .unwrap()
                        .0;
                }
                if b[name] >= n {
                    format!("ok {name}\n")
                } else {
                    "late\n".to_string()
                }
            }
            ["HOLD"] => {
                seen.holds_open.fetch_add(1, Ordering::SeqCst);
                let mut rest = String::new();
                while matches!(r.read_line(&mut rest), Ok(n) if n > 0) {}
                seen.holds_open.fetch_sub(1, Ordering::SeqCst);
                seen.holds_closed.fetch_add(1, Ordering::SeqCst);
                return;
            }
            _ => {
                seen.commands.lock().unwrap().push(cmd.clone());
                "ok\n".to_string()
            }
        };
        if r.get_mut().write_all(out.as_bytes()).is_err() {
            return;
        }
    }
}

fn line_server() -> (u16, Arc<Seen>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    let seen = Arc::new(Seen::default());
    let s2 = seen.clone();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let s3 = s2.clone();
            std::thread::spawn(move || serve(c, &s3));
        }
    });
    (port, seen)
}

const PROBE: &str = r##"
local semaphore = require("ngx.semaphore")
local spawn, wait, kill = ngx.thread.spawn, ngx.thread.wait, ngx.thread.kill
local _M = { version = 0.1, priority = 100, name = "thread-probe", schema = { type = "object" } }
local ops = {}

local function line(conf, cmd)
    local s = ngx.socket.tcp()
    s:settimeout(10000)
    assert(s:connect("127.0.0.1", conf.port))
    assert(s:send(cmd .. "\n"))
    local l, err = s:receive()
    s:close()
    return l, err
end

-- Sends HOLD (the server never answers), tells `sema`, then waits for an answer.
local function hold(conf, sema)
    local s = ngx.socket.tcp()
    s:settimeout(10000)
    assert(s:connect("127.0.0.1", conf.port))
    assert(s:send("HOLD\n"))
    sema:post()
    return s:receive()
end

-- A thread holding a connection the server never answers, once the server has it.
local function spawn_hold(conf)
    local sema = semaphore.new(0)
    local t = spawn(hold, conf, sema)
    assert(sema:wait(5))
    return t
end

-- spawn runs the function at once, up to its first wait; wait returns the first to end.
function ops.order(conf)
    local out = {}
    local a, b = semaphore.new(0), semaphore.new(0)
    local function f(name, sema, ...)
        out[#out + 1] = name .. " starts"
        sema:wait(5)
        out[#out + 1] = name .. " ends"
        return name, ...
    end
    local ta = spawn(f, "a", a, 1, 2)
    out[#out + 1] = "spawned a"
    local tb = spawn(f, "b", b, 3)
    out[#out + 1] = "spawned b"
    b:post()
    local first = { wait(ta, tb) }
    a:post()
    local second = { wait(ta) }
    local ok3, err3 = wait(ta)
    local quick = spawn(function() return "at once" end)
    local _, q = wait(quick)
    return 200, { order = table.concat(out, ","), first = first, second = second,
                  again = tostring(ok3) .. "|" .. err3, quick = q, type = type(ta) }
end

-- Two threads wait on the network at once: the server answers neither until both are there.
function ops.concurrent(conf)
    local t1 = spawn(line, conf, "BARRIER req 2")
    local t2 = spawn(line, conf, "BARRIER req 2")
    local _, r1 = wait(t1)
    local _, r2 = wait(t2)
    return 200, { r1 = r1, r2 = r2 }
end

function ops.errors(conf)
    local t1 = spawn(function() local x; return x.field end)
    local t2 = spawn(function() ngx.sleep(0.01) error("late boom") end)
    local t3 = spawn(function() ngx.sleep(0.02) return "still fine" end)
    local ok1, err1 = wait(t1)
    local ok2, err2 = wait(t2)
    local ok3, r3 = wait(t3)
    local t4 = spawn(function() coroutine.yield() end)
    local ok4, err4 = wait(t4)
    return 200, { ok1 = ok1, err1 = err1, ok2 = ok2, err2 = err2, ok3 = ok3, r3 = r3,
                  ok4 = ok4, err4 = err4 }
end

local function s(...)
    local t = {}
    for i = 1, select("#", ...) do t[i] = tostring((select(i, ...))) end
    return table.concat(t, "|")
end

function ops.kill(conf)
    local held = spawn_hold(conf)
    local r = {}
    r.kill = s(kill(held))
    r.again = s(kill(held))
    r.wait_killed = s(wait(held))
    local done = spawn(function() return 1 end)
    r.ended = s(kill(done))
    local co = coroutine.create(function() end)
    r.plain = s(kill(co))
    local sibling = spawn(function() ngx.sleep(10) end)
    local t = spawn(function() return kill(sibling) end)
    r.not_parent = s(select(2, wait(t)))
    local w = spawn(function() return pcall(wait, sibling) end)
    r.wait_not_parent = s(select(2, wait(w)))
    kill(sibling)
    r.wait_plain = s(pcall(wait, co))
    r.wait_bad = s(pcall(wait, "x"))
    return 200, r
end

-- The entry returns nothing: the phase waits for its thread, which changes the request.
function ops.background(conf)
    spawn(function()
        ngx.sleep(0.05)
        ngx.req.set_header("X-From-Thread", (line(conf, "BACKGROUND")))
    end)
end

-- A returned status, ngx.exit in the entry or in a thread, or an error in the entry end the
-- phase at once: the threads still running are aborted (their sockets closed).
function ops.status(conf)
    spawn_hold(conf)
    return 201, { ended = "by status" }
end

function ops.exit(conf)
    spawn_hold(conf)
    ngx.say("exit from entry")
    ngx.exit(403)
end

function ops.thread_exit(conf)
    spawn_hold(conf)
    spawn(function()
        ngx.sleep(0.01)
        ngx.say("exit from thread")
        ngx.exit(202)
    end)
    ngx.sleep(10)
    return 500
end

function ops.entry_error(conf)
    spawn_hold(conf)
    ngx.sleep(0.01)
    error("entry fails")
end

-- Each stretch of a thread runs under the CPU budget; waiting does not count.
function ops.budget(conf)
    local slow = spawn(function() ngx.sleep(0.5) return "slept past the budget" end)
    local spin = spawn(function() ngx.sleep(0) while true do end end)
    local _, r = wait(slow)
    local ok2, err2 = wait(spin)
    return 200, { r = r, ok2 = ok2, err2 = tostring(err2) }
end

-- A thread that hits the VM's memory cap fails alone; its caller goes on.
function ops.memory(conf)
    local hog = spawn(function()
        local t = {}
        for i = 1, 1e9 do t[i] = string.rep("x", 16 * 1024 * 1024) .. i end
    end)
    local ok, err = wait(hog)
    return 200, { ok = ok, err = tostring(err) }
end

-- Threads spawn threads: a child waits for and kills its own children; a wait on several
-- skips one already waited for.
function ops.nested(conf)
    local t = spawn(function()
        local inner = spawn(function() ngx.sleep(0.01) return "grandchild" end)
        local _, v = wait(inner)
        local held = spawn_hold(conf)
        return v, kill(held)
    end)
    local ok, v, killed = wait(t)
    local done = spawn(function() return "x" end)
    wait(done)
    local slow = spawn(function() ngx.sleep(0.01) return "slow" end)
    local ok2, r2 = wait(done, slow)
    return 200, { ok = ok, v = v, killed = killed, multi = tostring(ok2) .. "|" .. tostring(r2) }
end

-- A coroutine the plugin made does network I/O (OpenResty's coroutines); its plain yields
-- still reach the code that resumed it. In a light thread too.
function ops.coroutine(conf)
    local gen = coroutine.wrap(function()
        for i = 1, 2 do coroutine.yield((line(conf, "CO " .. i))) end
    end)
    local a, b = gen(), gen()
    local t = spawn(function()
        local co = coroutine.create(function() return line(conf, "CO thread") end)
        return select(2, coroutine.resume(co))
    end)
    local _, c = wait(t)
    return 200, { a = a, b = b, c = c }
end

-- The timer's callback returns at once; its run goes on until its threads end.
function ops.timer(conf)
    local ok, err = ngx.timer.at(0, function(premature, port)
        local c = { port = port }
        for i = 1, 2 do
            spawn(function()
                line(c, "BARRIER timer 2")
                line(c, "FROM-TIMER-THREAD " .. i)
            end)
        end
        coroutine.wrap(function() line(c, "FROM-TIMER-COROUTINE") end)()
    end, conf.port)
    return 200, { ok = ok, err = err }
end

-- Threads in rewrite and before_proxy too (access passes).
function ops.phases(conf) end

function _M.rewrite(conf, ctx)
    if ngx.var.arg_op ~= "phases" then return end
    spawn(function()
        ngx.sleep(0.01)
        ngx.req.set_header("X-Rewrite-Thread", (line(conf, "REWRITE")))
    end)
end

function _M.before_proxy(conf, ctx)
    if ngx.var.arg_op ~= "phases" then return end
    local _, l = wait(spawn(line, conf, "BEFORE-PROXY"))
    ngx.req.set_header("X-Before-Proxy-Thread", l)
end

function _M.access(conf, ctx)
    return ops[ngx.var.arg_op](conf)
end

function _M.header_filter(conf, ctx)
    local ok, err = pcall(spawn, function() end)
    ngx.header["X-Spawn"] = tostring(err):match("API disabled[^\n]*")
end

return _M
"##;

fn poll(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn light_threads() {
    let (port, seen) = line_server();
    let up = Upstream::echo();
    let dir = tempfile::tempdir().expect("temp dir");
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).expect("plugins dir");
    std::fs::write(plugins.join("thread-probe.lua"), PROBE).expect("write plugin");
    let yaml = format!(
        "plugin_dirs:\n  - plugins\nworkers: 1\nlua:\n  call_budget_ms: 300\n  memory_limit_mb: 64\nroutes:\n  - id: t\n    uri: /t\n    plugins:\n      thread-probe: {{port: {port}}}\n    upstream:\n      nodes:\n        \"{}\": 1\n",
        up.node()
    );
    let gw = Gateway::start_in(dir.path(), &yaml);
    let call = |op: &str, status: u16| {
        let r = get(&gw.url(&format!("/t?op={op}")));
        assert_eq!(r.status, status, "{op}: {}\n{}", r.text(), gw.logs());
        r
    };
    let holds_closed = || seen.holds_closed.load(Ordering::SeqCst);

    let r = call("order", 200);
    let j = r.json();
    assert_eq!(
        j["order"], "a starts,spawned a,b starts,spawned b,b ends,a ends",
        "{j}"
    );
    assert_eq!(j["first"], serde_json::json!([true, "b", 3]), "{j}");
    assert_eq!(j["second"], serde_json::json!([true, "a", 1, 2]), "{j}");
    assert_eq!(j["again"], "nil|already waited or killed");
    assert_eq!(j["quick"], "at once");
    assert_eq!(j["type"], "thread");
    assert_eq!(
        r.header("x-spawn").as_deref(),
        Some("API disabled in the context of header_filter_by_lua*")
    );

    let j = call("concurrent", 200).json();
    assert_eq!(j["r1"], "ok req", "{j}");
    assert_eq!(j["r2"], "ok req", "{j}");

    let j = call("errors", 200).json();
    assert_eq!(j["ok1"], false, "{j}");
    assert!(
        j["err1"]
            .as_str()
            .unwrap_or("")
            .contains("attempt to index"),
        "{j}"
    );
    assert_eq!(j["ok2"], false);
    assert!(
        j["err2"].as_str().unwrap_or("").ends_with("late boom"),
        "{j}"
    );
    assert_eq!(j["ok3"], true);
    assert_eq!(j["r3"], "still fine");
    // A plain yield in a light thread is an error of that thread, not a turn for the others.
    assert_eq!(j["ok4"], false, "{j}");
    assert!(
        j["err4"]
            .as_str()
            .unwrap_or("")
            .contains("attempt to yield from outside a coroutine"),
        "{j}"
    );
    assert!(gw.wait_for_log("lua user thread aborted:", Duration::from_secs(5)));
    assert!(gw.logs().contains("late boom"), "{}", gw.logs());

    // A killed thread's pending receive is cancelled and its connection closed.
    let before = holds_closed();
    let j = call("kill", 200).json();
    assert_eq!(j["kill"], "1", "{j}");
    assert_eq!(j["again"], "nil|already waited or killed");
    assert_eq!(j["wait_killed"], "nil|already waited or killed");
    assert_eq!(j["ended"], "nil|already terminated");
    assert_eq!(j["plain"], "nil|not user thread");
    assert_eq!(j["not_parent"], "nil|killer not parent");
    let msg = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
    assert!(
        msg(&j["wait_not_parent"]).starts_with("false|")
            && msg(&j["wait_not_parent"])
                .contains("only the parent coroutine can wait on the thread"),
        "{j}"
    );
    assert!(
        msg(&j["wait_plain"]).starts_with("false|")
            && msg(&j["wait_plain"])
                .contains("attempt to wait on a coroutine that is not a user thread"),
        "{j}"
    );
    assert!(
        msg(&j["wait_bad"]).contains("bad argument #1 to 'wait' (lua thread expected)"),
        "{j}"
    );
    poll("the killed thread's connection to close", || {
        holds_closed() > before
    });

    // The phase waited for the thread, which set a header the upstream saw.
    let j = call("background", 200).json();
    assert_eq!(j["headers"]["x-from-thread"], "ok", "{j}");
    assert!(seen
        .commands
        .lock()
        .unwrap()
        .iter()
        .any(|c| c == "BACKGROUND"));

    for (op, status, body) in [
        ("status", 201, "{\"ended\":\"by status\"}\n"),
        ("exit", 403, "exit from entry\n"),
        ("thread_exit", 202, "exit from thread\n"),
        ("entry_error", 500, ""),
    ] {
        let before = holds_closed();
        let r = call(op, status);
        if !body.is_empty() {
            assert_eq!(r.text(), body, "{op}");
        }
        poll(
            &format!("{op}: the aborted thread's connection to close"),
            || holds_closed() > before,
        );
    }
    assert!(
        gw.wait_for_log("entry fails", Duration::from_secs(5)),
        "{}",
        gw.logs()
    );
    poll("no HOLD connection left open", || {
        seen.holds_open.load(Ordering::SeqCst) == 0
    });

    // 500 ms of waiting under a 300 ms budget; the spinning thread alone is stopped.
    let j = call("budget", 200).json();
    assert_eq!(j["r"], "slept past the budget", "{j}");
    assert_eq!(j["ok2"], false, "{j}");
    assert!(
        j["err2"]
            .as_str()
            .unwrap_or("")
            .contains("exceeded its time budget"),
        "{j}"
    );

    // 16 MiB a step under a 64 MiB cap: the thread is stopped, the request answers. The hog
    // runs inside spawn's stretch, so the budget (300 ms) leaves room for a loaded machine.
    let j = call("memory", 200).json();
    assert_eq!(j["ok"], false, "{j}");
    assert!(
        j["err"]
            .as_str()
            .unwrap_or("")
            .contains("not enough memory"),
        "{j}"
    );

    let j = call("phases", 200).json();
    assert_eq!(j["headers"]["x-rewrite-thread"], "ok", "{j}");
    assert_eq!(j["headers"]["x-before-proxy-thread"], "ok", "{j}");

    let before = holds_closed();
    let j = call("nested", 200).json();
    assert_eq!(j["ok"], true, "{j}");
    assert_eq!(j["v"], "grandchild", "{j}");
    assert_eq!(j["killed"], 1, "{j}");
    assert_eq!(j["multi"], "true|slow", "{j}");
    poll("the grandchild's connection to close", || {
        holds_closed() > before
    });

    let j = call("coroutine", 200).json();
    assert_eq!(
        (&j["a"], &j["b"], &j["c"]),
        (&"ok".into(), &"ok".into(), &"ok".into()),
        "{j}"
    );
    {
        let c = seen.commands.lock().unwrap();
        let co: Vec<&String> = c.iter().filter(|c| c.starts_with("CO ")).collect();
        assert_eq!(co, ["CO 1", "CO 2", "CO thread"], "{c:?}");
    }

    let j = call("timer", 200).json();
    assert_eq!(j["ok"], true, "{j}");
    poll("both timer threads to pass the barrier", || {
        let c = seen.commands.lock().unwrap();
        c.iter().any(|c| c == "FROM-TIMER-THREAD 1")
            && c.iter().any(|c| c == "FROM-TIMER-THREAD 2")
            && c.iter().any(|c| c == "FROM-TIMER-COROUTINE")
    });
}
