//! The access log (`nginx_config.http.access_log`): lines in APISIX's default format and as
//! JSON, escaping, HTTP/1.1, HTTP/2 and WebSocket requests alike, reopening on SIGUSR1, and a
//! full queue that drops lines instead of holding up requests.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::websocket::{WsClient, WsServer};
use common::*;
use serde_json::Value;

/// Registers `$tenant` (`core.ctx.register_var`) when it loads.
const TENANT: &str = r#"
local core = require("apisix.core")
core.ctx.register_var("tenant", function(ctx) return "t-" .. ctx.var.uri end)
local _M = { version = 0.1, priority = 100, name = "tenant", schema = { type = "object" } }
function _M.check_schema(conf) return true end
function _M.access(conf, ctx) ctx.var.plan = "gold" end
return _M
"#;

const DENY: &str = r#"
local _M = { version = 0.1, priority = 100, name = "deny", schema = { type = "object" } }
function _M.check_schema(conf) return true end
function _M.access(conf, ctx) return 403, { message = "denied" } end
return _M
"#;

/// Waits until `path` holds at least `n` lines; returns them.
fn wait_lines(path: &Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{} has {} of {n} lines:\n{text}",
            path.display(),
            lines.len()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn log_path(gw: &Gateway) -> PathBuf {
    gw.config_dir().join("logs/access.log")
}

/// `03/Dec/2026:19:09:00 +0000`.
fn is_time_local(s: &str) -> bool {
    let b = s.as_bytes();
    s.len() == 26
        && b[2] == b'/'
        && b[6] == b'/'
        && b[11] == b':'
        && b[20] == b' '
        && (b[21] == b'+' || b[21] == b'-')
}

/// A number of seconds with three decimals, as nginx writes `$request_time`.
fn is_seconds(s: &str) -> bool {
    s.split_once('.').is_some_and(|(a, b)| {
        !a.is_empty() && b.len() == 3 && s.replace('.', "").bytes().all(|c| c.is_ascii_digit())
    })
}

#[test]
fn default_format_for_proxied_local_and_plugin_answers() {
    let up = Upstream::echo();
    let gw = Gateway::start_with_plugins(
        &[("deny", DENY)],
        &format!(
            "nginx_config:\n  http:\n    access_log: logs/access.log\n\
routes:\n  - id: r1\n    uri: /hello\n    upstream:\n      nodes:\n        \"{node}\": 1\n\
\x20 - id: r2\n    uri: /denied\n    plugins:\n      deny: {{}}\n    upstream:\n      nodes:\n        \"{node}\": 1\n",
            node = up.node()
        ),
    );
    let r = Req::get(&gw.url("/hello?a=1"))
        .header("host", "example.com")
        .header("user-agent", "t-agent/1")
        .header("referer", "http://ref.example/")
        .header("authorization", "Basic YWxpY2U6cHc=") // alice:pw
        .send();
    assert_eq!(r.status, 200);
    let lines = wait_lines(&log_path(&gw), 1);
    // `$remote_addr - $remote_user [$time_local] $http_host "$request" $status
    // $body_bytes_sent $request_time "$http_referer" "$http_user_agent" $upstream_addr
    // $upstream_status $upstream_response_time "$upstream_scheme://$upstream_host$upstream_uri"
    // "$apisix_request_id"`
    let line = &lines[0];
    let (head, rest) = line.split_once(" [").expect("a [time]");
    assert_eq!(head, "127.0.0.1 - alice");
    let (time, rest) = rest.split_once("] ").expect("time ends");
    assert!(is_time_local(time), "{time}");
    let quoted: Vec<&str> = rest.split('"').collect();
    // host, request, numbers, referer, " ", ua, upstream part, url, " ", id, end
    assert_eq!(quoted[0], "example.com ");
    assert_eq!(quoted[1], "GET /hello?a=1 HTTP/1.1");
    let nums: Vec<&str> = quoted[2].split_whitespace().collect();
    assert_eq!(nums[0], "200");
    assert_eq!(nums[1], r.body.len().to_string());
    assert!(is_seconds(nums[2]), "{line}");
    assert_eq!(quoted[3], "http://ref.example/");
    assert_eq!(quoted[5], "t-agent/1");
    let ups: Vec<&str> = quoted[6].split_whitespace().collect();
    assert_eq!(ups[0], up.node());
    assert_eq!(ups[1], "200");
    assert!(is_seconds(ups[2]), "{line}");
    assert_eq!(quoted[7], "http://example.com/hello?a=1");
    assert_eq!(quoted[9].len(), 32, "{line}");
    assert!(quoted[9].bytes().all(|b| b.is_ascii_hexdigit()), "{line}");

    // No route: no upstream, so its variables are `-`.
    assert_eq!(
        Req::get(&gw.url("/nope"))
            .header("host", "example.com")
            .send()
            .status,
        404
    );
    // A plugin's answer: the route's upstream was never called.
    assert_eq!(Req::get(&gw.url("/denied")).send().status, 403);
    let lines = wait_lines(&log_path(&gw), 3);
    // Each worker hands over its own batch of lines, so two workers' lines are in the file in
    // batch order, not request order (as with nginx's buffered access log).
    let find = |what: &str| {
        lines
            .iter()
            .find(|l| l.contains(what))
            .unwrap_or_else(|| panic!("no line for {what}: {lines:#?}"))
    };
    let nope = find("GET /nope ");
    assert!(nope.starts_with("127.0.0.1 - - ["), "{nope}");
    assert!(
        nope.contains("] example.com \"GET /nope HTTP/1.1\" 404 "),
        "{nope}"
    );
    let q: Vec<&str> = nope.split('"').collect();
    assert_eq!(q[3], "-", "{nope}");
    assert_eq!(q[5], "-", "{nope}");
    assert_eq!(q[6].trim(), "- - -", "{nope}");
    let denied = find("GET /denied ");
    assert!(denied.contains("\"GET /denied HTTP/1.1\" 403 "), "{denied}");
    let q: Vec<&str> = denied.split('"').collect();
    assert_eq!(q[6].trim(), "- - -", "{denied}");
    // The default access log replaces the summary line on stderr.
    assert!(
        !gw.logs().contains("GET /hello?a=1 200 route=r1"),
        "{}",
        gw.logs()
    );
}

#[test]
fn json_lines_escape_a_hostile_header() {
    let up = Upstream::echo();
    // One worker: its lines are written in the order it served them.
    let gw = Gateway::start(&format!(
        "workers: 1\nnginx_config:\n  http:\n    access_log: logs/access.log\n    access_log_format:\n      client: $remote_addr\n      status: $status\n      route: $route_id\n      upstream: $upstream_addr\n      evil: $http_x_evil\n      missing: $http_x_missing\n      req: \"$request_method $uri\"\n\
routes:\n  - id: r1\n    uri: /hello\n    upstream:\n      nodes:\n        \"{}\": 1\n",
        up.node()
    ));
    // A quote, a backslash, a tab, a byte that is not UTF-8, and a would-be JSON key.
    let evil: &[u8] = b"a\"b\\c\td\xff\", \"status\": \"999";
    let mut req = b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Evil: ".to_vec();
    req.extend_from_slice(evil);
    req.extend_from_slice(b"\r\n\r\n");
    assert_eq!(raw_resp(gw.addr(), &req).status, 200);
    assert_eq!(get(&gw.url("/none")).status, 404);
    let lines = wait_lines(&log_path(&gw), 2);
    let first: Value = serde_json::from_str(&lines[0]).expect("a JSON line");
    assert_eq!(
        first,
        serde_json::json!({
            "client": "127.0.0.1",
            "status": "200",
            "route": "r1",
            "upstream": up.node(),
            "evil": "a\"b\\c\td\u{fffd}\", \"status\": \"999",
            "missing": null,
            "req": "GET /hello",
        })
    );
    let second: Value = serde_json::from_str(&lines[1]).expect("a JSON line");
    assert_eq!(second["status"], "404");
    assert_eq!(second["route"], Value::Null);
    assert_eq!(second["upstream"], Value::Null);
}

#[test]
fn text_formats_escape_as_nginx_default_and_json() {
    for (escape, expected) in [
        ("default", "[a\\x22b\\x5Cc\\x09d\\xFF] [-]"),
        ("json", "[a\\\"b\\\\c\\td\u{fffd}] []"),
    ] {
        let gw = Gateway::start(&format!(
            "nginx_config:\n  http:\n    access_log: logs/access.log\n    access_log_format: '[$http_x_evil] [$upstream_addr] $status'\n    access_log_format_escape: {escape}\n"
        ));
        let req =
            b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Evil: a\"b\\c\td\xff\r\n\r\n";
        assert_eq!(raw_resp(gw.addr(), req).status, 404);
        let lines = wait_lines(&log_path(&gw), 1);
        assert_eq!(lines[0], format!("{expected} 404"), "escape {escape}");
    }
}

#[test]
fn http2_and_websocket_requests_get_the_same_line() {
    let up = Upstream::echo();
    let ws = WsServer::start();
    // One worker: its lines are written in the order it served them.
    let gw = Gateway::start(&format!(
        "workers: 1\nlisten:\n  - {{ip: 127.0.0.1, port: 0, enable_http2: true}}\n\
nginx_config:\n  http:\n    access_log: logs/access.log\n    access_log_format: '$server_protocol $request_method $uri $status $route_id $upstream_status'\n\
routes:\n  - id: r1\n    uri: /hello\n    upstream:\n      nodes:\n        \"{}\": 1\n\
\x20 - id: ws\n    uri: /ws\n    enable_websocket: true\n    upstream:\n      nodes:\n        \"{}\": 1\n",
        up.node(),
        ws.node()
    ));
    assert_eq!(get(&gw.url("/hello")).status, 200);
    let out = tool("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--http2-prior-knowledge",
        ])
        .args(["--max-time", "30"])
        .arg(gw.url("/hello"))
        .output()
        .expect("run curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    let mut c = WsClient::connect(gw.addr(), "/ws");
    c.send(1, b"hi");
    assert_eq!(c.recv(), (1, b"hi".to_vec()));
    c.close();
    let lines = wait_lines(&log_path(&gw), 3);
    assert_eq!(lines[0], "HTTP/1.1 GET /hello 200 r1 200");
    assert_eq!(lines[1], "HTTP/2.0 GET /hello 200 r1 200");
    assert_eq!(lines[2], "HTTP/1.1 GET /ws 101 ws 101");
}

#[test]
fn sigusr1_reopens_the_file_after_logrotate_renamed_it() {
    let gw = Gateway::start(
        "nginx_config:\n  http:\n    access_log: logs/access.log\n    access_log_format: '$uri $status'\n",
    );
    let path = log_path(&gw);
    assert_eq!(get(&gw.url("/before")).status, 404);
    wait_lines(&path, 1);
    let rotated = gw.config_dir().join("logs/access.log.1");
    std::fs::rename(&path, &rotated).expect("rename the log");
    // Until the signal the renamed file is still the one written.
    assert_eq!(get(&gw.url("/renamed")).status, 404);
    wait_lines(&rotated, 2);
    // To the supervisor, which passes it on, as `kill -USR1 $(cat moongate.pid)` would.
    // SAFETY: kill(2) on the gateway process this test started.
    let rc = unsafe { libc::kill(gw.pid() as libc::pid_t, libc::SIGUSR1) };
    assert_eq!(rc, 0);
    assert!(
        gw.wait_for_log("access log reopened", Duration::from_secs(20)),
        "{}",
        gw.logs()
    );
    assert_eq!(get(&gw.url("/after")).status, 404);
    assert_eq!(wait_lines(&path, 1), vec!["/after 404"]);
    assert_eq!(
        std::fs::read_to_string(&rotated).unwrap(),
        "/before 404\n/renamed 404\n"
    );
    // The serving process is still the first one: the signal did not stop it.
    assert_eq!(get(&gw.url("/still")).status, 404);
}

#[test]
fn a_full_queue_drops_lines_instead_of_holding_up_requests() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let fifo = tmp.path().join("access.fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    // A reader that never reads: the pipe fills, then the writer blocks on it.
    use std::os::unix::fs::OpenOptionsExt;
    let reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .expect("open the fifo for reading");
    let gw = Gateway::start_in(
        tmp.path(),
        &format!(
            "nginx_config:\n  http:\n    access_log: {}\n    access_log_format: '$uri $http_x_pad'\n    access_log_queue: 4\n    access_log_buffer: 4096\n\
plugin_attr:\n  prometheus:\n    export_addr: {{ip: 127.0.0.1, port: 0}}\n",
            fifo.display()
        ),
    );
    // 200 lines of 8 KiB: far more than the pipe (64 KiB), the buffer and the queue hold.
    let pad = "p".repeat(8192);
    let total = 200;
    for i in 0..total {
        let r = Req::get(&gw.url(&format!("/r{i}")))
            .header("x-pad", &pad)
            .send();
        assert_eq!(r.status, 404);
    }
    let url = common::observability::metrics_url(&gw);
    let dropped = || {
        let (_, samples, _) = common::observability::scrape(&url, None);
        common::observability::value(&samples, "moongate_access_log_dropped_total", &[]) as usize
    };
    assert!(dropped() > 0, "nothing dropped");
    // What was not dropped reaches the reader once it reads: every request is accounted for.
    let mut reader = reader;
    let mut text = Vec::new();
    let mut buf = vec![0u8; 65536];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        use std::io::Read;
        match reader.read(&mut buf) {
            Ok(n) => text.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let got = text.iter().filter(|&&b| b == b'\n').count();
                let d = dropped();
                if got + d == total {
                    break;
                }
                assert!(got + d < total, "{got} lines read, {d} dropped, of {total}");
                assert!(
                    Instant::now() < deadline,
                    "{got} lines read, {d} dropped, of {total}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("reading the fifo: {e}"),
        }
    }
    assert!(
        gw.wait_for_log(
            "line(s) dropped, the queue to the writer was full",
            Duration::from_secs(20)
        ),
        "{}",
        gw.logs()
    );
}

#[test]
fn bad_settings_are_refused_with_their_path() {
    let (code, out) = check("nginx_config:\n  http:\n    access_logs: x\n");
    assert_eq!(code, 1);
    assert!(out.contains("nginx_config.http"), "{out}");
    assert!(out.contains("access_logs"), "{out}");
    let (code, out) = check("nginx_config:\n  http:\n    access_log_format: 'a ${oops'\n");
    assert_eq!(code, 1);
    assert!(
        out.contains("nginx_config.http.access_log_format: unterminated variable name"),
        "{out}"
    );
    let (code, out) = check("nginx_config:\n  http:\n    access_log_format: {a: 1}\n");
    assert_eq!(code, 1);
    assert!(
        out.contains("nginx_config.http.access_log_format.a: must be a string"),
        "{out}"
    );
    let (code, out) = check("nginx_config:\n  http:\n    access_log_format_escape: xml\n");
    assert_eq!(code, 1);
    assert!(
        out.contains("nginx_config.http.access_log_format_escape"),
        "{out}"
    );
}

#[test]
fn lua_registered_and_plugin_set_variables_work_in_the_format() {
    let up = Upstream::echo();
    let gw = Gateway::start_with_plugins(
        &[("tenant", TENANT)],
        &format!(
            "nginx_config:\n  http:\n    access_log: logs/access.log\n    access_log_format: '$uri $tenant $plan $never_set'\n\
routes:\n  - id: r1\n    uri: /hello\n    plugins:\n      tenant: {{}}\n    upstream:\n      nodes:\n        \"{}\": 1\n",
            up.node()
        ),
    );
    assert_eq!(get(&gw.url("/hello")).status, 200);
    assert_eq!(
        wait_lines(&log_path(&gw), 1),
        vec!["/hello t-/hello gold -"]
    );
}
