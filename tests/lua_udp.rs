//! `ngx.socket.udp()` in a plugin served by the real gateway binary, against a UDP server this
//! test runs on loopback (and a datagram unix socket): request phases, light threads, timers.

mod common;

use std::net::UdpSocket;
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// Datagrams a server received, in order.
type Seen = Arc<Mutex<Vec<String>>>;

/// Answers each datagram with `echo: DATA`, except `SILENT` (no answer) and `TWICE` (two
/// answers: `one`, `two`).
fn udp_server() -> (u16, Seen) {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let port = s.local_addr().expect("addr").port();
    let seen: Seen = Arc::default();
    let log = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).to_string();
            log.lock().unwrap().push(text.clone());
            match text.as_str() {
                "SILENT" => {}
                "TWICE" => {
                    let _ = s.send_to(b"one", from);
                    let _ = s.send_to(b"two", from);
                }
                _ => {
                    let _ = s.send_to(format!("echo: {text}").as_bytes(), from);
                }
            }
        }
    });
    (port, seen)
}

/// A datagram unix socket that records what it receives.
fn unix_server(path: &std::path::Path) -> Seen {
    let s = UnixDatagram::bind(path).expect("bind unix datagram");
    let seen: Seen = Arc::default();
    let log = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while let Ok(n) = s.recv(&mut buf) {
            log.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&buf[..n]).to_string());
        }
    });
    seen
}

const PROBE: &str = r##"
local _M = { version = 0.1, priority = 100, name = "udp-probe", schema = { type = "object" } }
local ops = {}

local function s(...)
    local t = {}
    for i = 1, select("#", ...) do t[i] = tostring((select(i, ...))) end
    return table.concat(t, "|")
end

function ops.basic(conf)
    local r = {}
    local u = ngx.socket.udp()
    r.type = tostring(u):match("^udp socket") or tostring(u)
    r.unconnected_send = s(u:send("x"))
    r.unconnected_receive = s(u:receive())
    u:settimeout(5000)
    r.peer = s(u:setpeername("127.0.0.1", conf.port))
    r.send = s(u:send({ "hel", { "lo" }, 1 }))
    r.receive = s(u:receive())
    assert(u:send("TWICE"))
    r.first = s(u:receive(2))   -- a datagram is cut to the buffer size
    r.second = s(u:receive())
    r.by_name = s(u:setpeername("localhost", conf.port))
    assert(u:send("renamed"))
    r.renamed = s(u:receive())
    r.close = s(u:close())
    r.close_again = s(u:close())
    r.after_close = s(u:send("x"))
    r.bad_port = s(pcall(u.setpeername, u, "127.0.0.1", 70000))
    r.bad_size = s(pcall(u.receive, u, true))
    return 200, r
end

function ops.timeout(conf)
    local u = ngx.socket.udp()
    assert(u:setpeername("127.0.0.1", conf.port))
    u:settimeout(50)
    assert(u:send("SILENT"))
    local r = { timeout = s(u:receive()) }
    -- The socket stays usable after a timeout.
    u:settimeout(5000)
    assert(u:send("after timeout"))
    r.after = s(u:receive())
    return 200, r
end

function ops.refused(conf)
    local u = ngx.socket.udp()
    u:settimeout(5000)
    assert(u:setpeername("127.0.0.1", conf.closed_port))
    assert(u:send("anyone?"))
    return 200, { refused = s(u:receive()) }
end

function ops.unix(conf)
    local u = ngx.socket.udp()
    local r = { peer = s(u:setpeername("unix:" .. conf.unix)) }
    r.send = s(u:send("over unix"))
    return 200, r
end

-- Two light threads wait on their own sockets at once.
function ops.threads(conf)
    local function ask(word)
        local u = ngx.socket.udp()
        u:settimeout(5000)
        assert(u:setpeername("127.0.0.1", conf.port))
        assert(u:send(word))
        return u:receive()
    end
    local a = ngx.thread.spawn(ask, "from thread a")
    local b = ngx.thread.spawn(ask, "from thread b")
    local _, ra = ngx.thread.wait(a)
    local _, rb = ngx.thread.wait(b)
    return 200, { a = ra, b = rb }
end

-- The log phase cannot make sockets; a timer can.
function ops.timer(conf)
    return 200, { ok = true }
end

function _M.access(conf, ctx)
    return ops[ngx.var.arg_op](conf)
end

function _M.log(conf, ctx)
    if ngx.var.arg_op ~= "timer" then return end
    local ok, err = pcall(ngx.socket.udp)
    ngx.timer.at(0, function(premature, port, msg)
        local u = ngx.socket.udp()
        assert(u:setpeername("127.0.0.1", port))
        assert(u:send("from timer: " .. msg))
    end, conf.port, tostring(err):match("API disabled[^\n]*"))
end

return _M
"##;

#[test]
fn udp_cosockets() {
    let (port, seen) = udp_server();
    // A port nothing listens on: bound, then closed.
    let closed_port = {
        let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
        s.local_addr().expect("addr").port()
    };
    let up = Upstream::echo();
    let dir = tempfile::tempdir().expect("temp dir");
    let unix_path = dir.path().join("dgram.sock");
    let unix_seen = unix_server(&unix_path);
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).expect("plugins dir");
    std::fs::write(plugins.join("udp-probe.lua"), PROBE).expect("write plugin");
    let yaml = format!(
        "plugin_dirs:\n  - plugins\nworkers: 1\nroutes:\n  - id: t\n    uri: /t\n    plugins:\n      udp-probe: {{port: {port}, closed_port: {closed_port}, unix: \"{}\"}}\n    upstream:\n      nodes:\n        \"{}\": 1\n",
        unix_path.display(),
        up.node()
    );
    let gw = Gateway::start_in(dir.path(), &yaml);
    let call = |op: &str| {
        let r = get(&gw.url(&format!("/t?op={op}")));
        assert_eq!(r.status, 200, "{op}: {}\n{}", r.text(), gw.logs());
        r.json()
    };

    let j = call("basic");
    assert_eq!(j["type"], "udp socket", "{j}");
    assert_eq!(j["unconnected_send"], "nil|closed", "{j}");
    assert_eq!(j["unconnected_receive"], "nil|closed", "{j}");
    assert_eq!(j["peer"], "1", "{j}");
    assert_eq!(j["send"], "1", "{j}");
    assert_eq!(j["receive"], "echo: hello1", "{j}");
    assert_eq!(j["first"], "on", "{j}");
    assert_eq!(j["second"], "two", "{j}");
    assert_eq!(j["by_name"], "1", "{j}");
    assert_eq!(j["renamed"], "echo: renamed", "{j}");
    assert_eq!(j["close"], "1", "{j}");
    assert_eq!(j["close_again"], "nil|closed", "{j}");
    assert_eq!(j["after_close"], "nil|closed", "{j}");
    assert!(
        j["bad_port"]
            .as_str()
            .unwrap_or("")
            .contains("bad port number: 70000"),
        "{j}"
    );
    assert!(
        j["bad_size"]
            .as_str()
            .unwrap_or("")
            .contains("bad argument #2 to 'receive' (number expected, got boolean)"),
        "{j}"
    );
    assert!(seen.lock().unwrap().iter().any(|d| d == "hello1"));

    let j = call("timeout");
    assert_eq!(j["timeout"], "nil|timeout", "{j}");
    assert_eq!(j["after"], "echo: after timeout", "{j}");

    let j = call("refused");
    assert_eq!(j["refused"], "nil|connection refused", "{j}");

    let j = call("unix");
    assert_eq!(j["peer"], "1", "{j}");
    assert_eq!(j["send"], "1", "{j}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !unix_seen.lock().unwrap().iter().any(|d| d == "over unix") {
        assert!(Instant::now() < deadline, "no datagram on the unix socket");
        std::thread::sleep(Duration::from_millis(20));
    }

    let j = call("threads");
    assert_eq!(j["a"], "echo: from thread a", "{j}");
    assert_eq!(j["b"], "echo: from thread b", "{j}");

    call("timer");
    let want = "from timer: API disabled in the context of log_by_lua*";
    let deadline = Instant::now() + Duration::from_secs(10);
    while !seen.lock().unwrap().iter().any(|d| d == want) {
        assert!(
            Instant::now() < deadline,
            "no datagram from the timer; got {:?}\n{}",
            seen.lock().unwrap(),
            gw.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A server process, killed when the test ends.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const DNS_PROBE: &str = r##"
local resolver = require("resty.dns.resolver")
local _M = { version = 0.1, priority = 100, name = "dns-probe", schema = { type = "object" } }

local function first(answers, field)
    for _, a in ipairs(answers) do
        if a[field] then return a[field] end
    end
end

function _M.access(conf, ctx)
    local r, err = resolver:new{ nameservers = { { "127.0.0.1", conf.port } },
                                 retrans = 2, timeout = 2000 }
    if not r then return 500, { err = err } end
    local out = {}
    local a, err = r:query("svc.test", { qtype = r.TYPE_A })
    out.a = a and first(a, "address") or err
    local cname = r:query("alias.test", { qtype = r.TYPE_A })
    out.cname = cname and first(cname, "cname")
    out.cname_address = cname and first(cname, "address")
    local txt = r:query("txt.test", { qtype = r.TYPE_TXT })
    out.txt = txt and first(txt, "txt")
    local srv = r:query("_http._tcp.svc.test", { qtype = r.TYPE_SRV })
    out.srv = srv and (first(srv, "target") .. ":" .. first(srv, "port"))
    local nx = r:query("nope.test")
    out.nx = nx and (tostring(nx.errcode) .. " " .. tostring(nx.errstr))
    -- The same query over TCP (the resolver's cosocket path for truncated answers).
    local tcp, err = r:tcp_query("svc.test", { qtype = r.TYPE_A })
    out.tcp = tcp and first(tcp, "address") or err
    return 200, out
end

return _M
"##;

/// The real lua-resty-dns (Debian's lua-nginx-dns, unmodified) over UDP and TCP cosockets,
/// against dnsmasq on loopback.
#[test]
fn real_dns_resolver_against_dnsmasq() {
    let dir = tempfile::tempdir().expect("temp dir");
    let libs = dir.path().join("libs");
    common::lua_libs::install_as_resty("lua-nginx-dns", "dns/resolver.lua", &libs);
    // dnsmasq listens on UDP and TCP: a port free for UDP may be taken for TCP by the time it
    // binds, and then it exits; such a start is tried again on another port.
    let pid_file = dir.path().join("dnsmasq.pid");
    let start = |port: u16| {
        std::process::Command::new("dnsmasq")
            .args([
                "-k",
                "-C",
                "/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--user=root",
            ])
            .arg(format!("--port={port}"))
            .args([
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--local=/test/",
            ])
            .arg(format!("--pid-file={}", pid_file.display()))
            .args([
                "--host-record=svc.test,10.1.2.3",
                "--cname=alias.test,svc.test",
                "--txt-record=txt.test,hello dns",
                "--srv-host=_http._tcp.svc.test,svc.test,8080",
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start dnsmasq")
    };
    let mut started = None;
    let mut exits = Vec::new();
    for _ in 0..5 {
        let port = {
            let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
            s.local_addr().expect("addr").port()
        };
        let mut server = Server(start(port));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                started = Some((port, server));
                break;
            }
            if let Ok(Some(status)) = server.0.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = server.0.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                exits.push(format!("port {port}: {status}: {}", err.trim()));
                break;
            }
            assert!(
                Instant::now() < deadline,
                "dnsmasq did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        if started.is_some() {
            break;
        }
    }
    let Some((port, _dnsmasq)) = started else {
        panic!("dnsmasq did not start: {exits:?}");
    };
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).expect("plugins dir");
    std::fs::write(plugins.join("dns-probe.lua"), DNS_PROBE).expect("write plugin");
    let yaml = format!(
        "plugin_dirs:\n  - plugins\nworkers: 1\nlua:\n  package_path:\n    - libs/?.lua\nroutes:\n  - id: d\n    uri: /d\n    plugins:\n      dns-probe: {{port: {port}}}\n    upstream:\n      nodes:\n        \"127.0.0.1:1\": 1\n"
    );
    let gw = Gateway::start_in(dir.path(), &yaml);
    let r = get(&gw.url("/d"));
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.logs());
    let j = r.json();
    assert_eq!(j["a"], "10.1.2.3", "{j}");
    assert_eq!(j["cname"], "svc.test", "{j}");
    assert_eq!(j["cname_address"], "10.1.2.3", "{j}");
    assert_eq!(j["txt"], "hello dns", "{j}");
    assert_eq!(j["srv"], "svc.test:8080", "{j}");
    assert_eq!(j["nx"], "3 name error", "{j}");
    assert_eq!(j["tcp"], "10.1.2.3", "{j}");
}
