//! A plugin must not be able to take the gateway down: `os.exit` is an error in the calling
//! plugin, and a crash that cannot be caught in-process (a segfault in FFI code) costs one
//! restart of the serving process while the supervisor keeps the listening sockets open.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Writes `plugins` (name, source) into a temp `plugins/` dir and starts a gateway with
/// `rest` (routes and the like) after the plugin settings.
fn gateway_with_plugins(plugins: &[(&str, &str)], rest: &str) -> (tempfile::TempDir, Gateway) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("plugins");
    std::fs::create_dir_all(&dir).expect("plugins dir");
    for (name, src) in plugins {
        std::fs::write(dir.join(format!("{name}.lua")), src).expect("write plugin");
    }
    let yaml = format!("workers: 2\nplugin_dirs:\n  - plugins\n{rest}");
    let gw = Gateway::start_in(tmp.path(), &yaml);
    (tmp, gw)
}

/// A plugin whose access phase runs `body`, then answers 200 `ok`.
fn access_plugin(name: &str, body: &str) -> String {
    format!(
        r#"local _M = {{ version = 0.1, priority = 7, name = "{name}", schema = {{ type = "object" }} }}
function _M.access(conf, ctx)
{body}
    return 200, "ok"
end
return _M
"#
    )
}

fn route(id: &str, uri: &str, plugin: &str) -> String {
    format!("  - id: {id}\n    uri: {uri}\n    plugins:\n      {plugin}: {{}}\n")
}

#[test]
fn os_exit_in_a_plugin_fails_only_its_request() {
    let (_tmp, gw) = gateway_with_plugins(
        &[
            ("exiter", &access_plugin("exiter", "    os.exit(3)")),
            ("fine", &access_plugin("fine", "")),
        ],
        &format!(
            "routes:\n{}{}",
            route("x", "/exit", "exiter"),
            route("f", "/fine", "fine")
        ),
    );
    let r = get(&gw.url("/exit"));
    assert_eq!(r.status, 500, "{}", r.text());
    // The process is still there and serving, on every route.
    for _ in 0..4 {
        assert_eq!(get(&gw.url("/fine")).status, 200);
    }
    assert!(
        gw.wait_for_log("os.exit is disabled", Duration::from_secs(5)),
        "no log line about os.exit; log:\n{}",
        gw.logs()
    );
    let lines = gw
        .logs()
        .lines()
        .filter(|l| l.contains("os.exit is disabled"))
        .count();
    assert_eq!(
        lines,
        1,
        "one log line per failed request; log:\n{}",
        gw.logs()
    );
}

/// One `GET path` on a fresh connection, as raw bytes; the status (0 when the connection
/// closed without an answer). Panics when the connection is refused: the supervisor keeps
/// the port open, so a refusal is the failure this file tests for.
fn raw_get(gw: &Gateway, path: &str) -> u16 {
    raw_status(&raw(
        gw.addr(),
        format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
    ))
}

#[test]
fn a_segfault_in_a_plugin_costs_one_restart_and_the_port_keeps_accepting() {
    const KEY: &str = "supervisor-test-key-0123";
    let crasher = access_plugin(
        "crasher",
        "    local ffi = require(\"ffi\")\n    ffi.cast(\"int *\", 0)[0] = 1",
    );
    let (tmp, gw) = gateway_with_plugins(
        &[("crasher", &crasher), ("fine", &access_plugin("fine", ""))],
        &format!(
            "data_dir: data\nadmin:\n  listen: 127.0.0.1:0\n  key: {KEY}\nroutes:\n{}{}",
            route("c", "/crash", "crasher"),
            route("f", "/fine", "fine")
        ),
    );
    let admin = gw.admin_addr();
    // An Admin API write before the crash: stored, so it must serve after the restart.
    let put = admin_request(
        admin,
        KEY,
        "PUT",
        "/routes/stored",
        Some(r#"{"uri":"/stored","plugins":{"fine":{}}}"#),
    );
    assert_eq!(put.status, 201, "{}", put.text());
    let first = gw.serving_pid();
    assert_eq!(raw_get(&gw, "/fine"), 200);

    // The request that crashes gets no answer: its process is gone.
    assert_eq!(raw_get(&gw, "/crash"), 0);
    let crashed = Instant::now();
    // Every connection from now on is accepted (queued while no process serves) and
    // answered; poll until the new process answers on the same address.
    let deadline = crashed + Duration::from_secs(1);
    let mut status = raw_get(&gw, "/fine");
    while status != 200 && Instant::now() < deadline {
        status = raw_get(&gw, "/fine");
    }
    assert_eq!(
        status,
        200,
        "no answer within a second of the crash; log:\n{}",
        gw.logs()
    );
    eprintln!("serving again {:?} after the crash", crashed.elapsed());
    assert_ne!(gw.serving_pid(), first, "a new serving process");
    assert!(
        gw.logs().contains("killed by signal 11 (SIGSEGV)"),
        "the cause is logged; log:\n{}",
        gw.logs()
    );
    // The Admin API answers on its address, with what was stored before the crash.
    let r = admin_request(admin, KEY, "GET", "/routes/stored", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(raw_get(&gw, "/stored"), 200);
    drop(tmp);
}

#[test]
fn sigterm_reaches_the_serving_process_and_the_port_closes() {
    let (_tmp, mut gw) = gateway_with_plugins(
        &[("fine", &access_plugin("fine", ""))],
        &format!("routes:\n{}", route("f", "/fine", "fine")),
    );
    assert_eq!(raw_get(&gw, "/fine"), 200);
    let serving = gw.serving_pid();
    gw.terminate();
    let status = gw.wait_exit(Duration::from_secs(20)).expect("exits");
    assert!(status.success(), "{status:?}; log:\n{}", gw.logs());
    assert!(
        !std::path::Path::new(&format!("/proc/{serving}/status")).exists()
            || std::fs::read_to_string(format!("/proc/{serving}/status"))
                .is_ok_and(|s| s.contains("State:\tZ")),
        "the serving process ended too"
    );
    assert!(!accepts_connections(gw.addr()), "the port is closed");
}

#[test]
fn a_second_gateway_on_a_port_in_use_fails_at_start() {
    let (_tmp, gw) = gateway_with_plugins(&[], "routes: []\n");
    let addr = gw.addr();
    let tmp = tempfile::tempdir().expect("temp dir");
    let config = tmp.path().join("config.yaml");
    std::fs::write(&config, format!("listen: {addr}\nroutes: []\n")).expect("write config");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_moongate"))
        .args(["run", "-c"])
        .arg(&config)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run moongate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("address already in use: {addr}")),
        "{stderr}"
    );
    // The first one still serves alone.
    assert_eq!(raw_get(&gw, "/"), 404);
}

#[test]
fn sighup_reloads_the_files_in_the_same_serving_process() {
    let (_tmp, gw) = gateway_with_plugins(
        &[("fine", &access_plugin("fine", ""))],
        &format!("routes:\n{}", route("f", "/fine", "fine")),
    );
    let serving = gw.serving_pid();
    let pid = libc::pid_t::try_from(gw.pid()).expect("pid fits");
    // SAFETY: kill(2) on the child this test spawned and has not reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    assert!(
        gw.wait_for_log("trigger=\"SIGHUP\"", Duration::from_secs(10)),
        "no SIGHUP reload; log:\n{}",
        gw.logs()
    );
    assert_eq!(gw.serving_pid(), serving, "no restart for a SIGHUP");
    assert_eq!(raw_get(&gw, "/fine"), 200);
}
