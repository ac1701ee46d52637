//! APISIX's status API (`status: {ip, port}`): `/status` while the process serves,
//! `/status/ready` only while every worker has taken up the configuration in force. (Readiness
//! during etcd loss is in tests/etcd.rs, which has the etcd.)

mod common;

use std::time::{Duration, Instant};

use common::observability::status_addr;
use common::*;
use serde_json::json;

/// Spins until the Lua time budget stops it, holding its worker's event loop.
const SPIN: &str = r#"
local core = require("apisix.core")
local _M = { version = 0.1, priority = 100, name = "spin", schema = { type = "object" } }
function _M.check_schema(conf) return true end
function _M.access(conf, ctx)
    core.log.warn("spinning now")
    local x = 0
    while true do x = x + 1 end
end
return _M
"#;

/// Polls `url` until it answers `status`; returns the last body.
fn wait_for(url: &str, status: u16, gw: &Gateway) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = get(url);
        if r.status == status {
            return r.json();
        }
        assert!(
            Instant::now() < deadline,
            "{url} still answers {} {}; log:\n{}",
            r.status,
            r.text(),
            gw.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn status_and_ready_answer_as_apisix() {
    let gw = Gateway::start("workers: 2\nstatus: {ip: 127.0.0.1, port: 0}\n");
    let addr = status_addr(&gw);
    let r = get(&format!("http://{addr}/status"));
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"status": "ok"}));
    // Both workers report once their event loops run.
    let ready = wait_for(&format!("http://{addr}/status/ready"), 200, &gw);
    assert_eq!(ready, json!({"status": "ok"}));
    assert_eq!(get(&format!("http://{addr}/other")).status, 404);
    assert_eq!(
        request("POST", &format!("http://{addr}/status")).status,
        404
    );
    // Not on the proxy port.
    assert_eq!(get(&gw.url("/status")).status, 404);
}

#[test]
fn ready_is_503_while_a_worker_has_not_taken_up_the_new_configuration() {
    let gw = Gateway::start_with_plugins(
        &[("spin", SPIN)],
        "workers: 1\nstatus: {ip: 127.0.0.1, port: 0}\nlua:\n  call_budget_ms: 8000\n\
routes:\n  - id: spin\n    uri: /spin\n    plugins:\n      spin: {}\n",
    );
    let ready_url = format!("http://{}/status/ready", status_addr(&gw));
    wait_for(&ready_url, 200, &gw);
    let url = gw.url("/spin");
    let spinner = std::thread::spawn(move || get(&url).status);
    assert!(
        gw.wait_for_log("spinning now", Duration::from_secs(20)),
        "{}",
        gw.logs()
    );
    // A new generation while the only worker's loop is held by the plugin.
    // SAFETY: kill(2) on the gateway process this test started.
    assert_eq!(
        unsafe { libc::kill(gw.pid() as libc::pid_t, libc::SIGHUP) },
        0
    );
    assert!(
        gw.wait_for_log("trigger=\"SIGHUP\"", Duration::from_secs(20)),
        "{}",
        gw.logs()
    );
    let r = get(&ready_url);
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"status": "error", "error": "worker id: 0 has not received configuration"})
    );
    // The budget stops the plugin; the worker takes up the generation and is ready again.
    assert_eq!(spinner.join().expect("spinner"), 500);
    wait_for(&ready_url, 200, &gw);
}

#[test]
fn the_status_api_is_off_unless_configured_and_checks_its_fields() {
    let gw = Gateway::start("workers: 1\n");
    assert_eq!(get(&gw.url("/")).status, 404);
    assert!(!gw.logs().contains("status API listening"), "{}", gw.logs());
    let (code, out) = check("status: {ip: 127.0.0.1, prot: 7085}\n");
    assert_eq!(code, 1);
    assert!(out.contains("status") && out.contains("prot"), "{out}");
}
