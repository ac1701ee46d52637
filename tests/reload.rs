//! Hot reload: edits to the config file and to Lua plugin files serve the next requests; a
//! broken edit leaves the last good generation serving; nothing is dropped while reloading.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{get, Gateway, Upstream};

/// How long a test waits for a change to show. Generous on purpose: the bench measures the
/// real delay; a test only checks that the change arrives.
const SHOW_UP: Duration = Duration::from_secs(10);

/// A plugin whose header_filter reports its version and the worker that served the request.
fn probe_plugin(version: &str) -> String {
    format!(
        r#"local core = require("apisix.core")
local _M = {{
    version = 0.1,
    priority = 10,
    name = "reload-probe",
    schema = {{type = "object", properties = {{}}}},
}}

function _M.header_filter(conf, ctx)
    core.response.set_header("X-Probe-Version", "{version}")
    core.response.set_header("X-Worker", tostring(ngx.worker.id()))
end

return _M
"#
    )
}

/// Saves like an editor: write a temp file next to it, then rename over.
fn atomic_write(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).expect("write temp file");
    std::fs::rename(&tmp, path).expect("rename over");
}

fn config(upstream: &Upstream, plugin: bool) -> String {
    let plugins = if plugin {
        "    plugins:\n      reload-probe: {}\n"
    } else {
        ""
    };
    format!(
        "workers: 2\nplugin_dirs: [plugins]\nroutes:\n  - id: r1\n    uri: /probe\n{plugins}    upstream:\n      nodes: {{\"{}\": 1}}\n",
        upstream.node()
    )
}

fn start_with_probe(version: &str) -> (Gateway, Upstream, tempfile::TempDir) {
    let up = Upstream::echo();
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir(dir.path().join("plugins")).expect("plugins dir");
    std::fs::write(
        dir.path().join("plugins/reload-probe.lua"),
        probe_plugin(version),
    )
    .expect("write plugin");
    let gw = Gateway::start_in(dir.path(), &config(&up, true));
    (gw, up, dir)
}

fn probe_version(gw: &Gateway) -> Option<String> {
    let r = get(&gw.url("/probe"));
    assert_eq!(r.status, 200, "body: {}", r.text());
    r.header("x-probe-version")
}

/// Polls until `f` holds, for at most [`SHOW_UP`].
fn eventually(mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + SHOW_UP;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn editing_a_plugin_serves_the_new_code_on_every_worker() {
    let (gw, _up, dir) = start_with_probe("v1");
    assert_eq!(probe_version(&gw).as_deref(), Some("v1"));

    atomic_write(
        &dir.path().join("plugins/reload-probe.lua"),
        &probe_plugin("v2"),
    );
    assert!(
        eventually(|| probe_version(&gw).as_deref() == Some("v2")),
        "v2 never served; log:\n{}",
        gw.logs()
    );
    // Every request from now on, on any worker, runs v2. Fresh connections spread over the
    // workers' SO_REUSEPORT queues.
    let mut workers = HashSet::new();
    for _ in 0..60 {
        let r = get(&gw.url("/probe"));
        assert_eq!(r.header("x-probe-version").as_deref(), Some("v2"));
        workers.insert(r.header("x-worker").unwrap_or_default());
    }
    assert!(
        workers.len() > 1,
        "only one worker served 60 connections: {workers:?}"
    );
}

#[test]
fn a_broken_plugin_file_keeps_the_last_good_version() {
    let (gw, _up, dir) = start_with_probe("v1");
    let file = dir.path().join("plugins/reload-probe.lua");

    std::fs::write(
        &file,
        "local _M = {\n  version = 0.1,\n  priority = = 10,\n}\nreturn _M\n",
    )
    .expect("write broken file");
    assert!(
        gw.wait_for_log("reload refused", SHOW_UP),
        "no refusal logged:\n{}",
        gw.logs()
    );
    assert!(
        gw.logs().contains("reload-probe.lua:3"),
        "the error names file:line:\n{}",
        gw.logs()
    );
    for _ in 0..10 {
        assert_eq!(probe_version(&gw).as_deref(), Some("v1"));
    }

    std::fs::write(&file, probe_plugin("v3")).expect("write fixed file");
    assert!(
        eventually(|| probe_version(&gw).as_deref() == Some("v3")),
        "fixed file never served; log:\n{}",
        gw.logs()
    );
}

#[test]
fn a_module_that_fails_at_load_keeps_the_last_good_version() {
    let (gw, _up, dir) = start_with_probe("v1");
    let file = dir.path().join("plugins/reload-probe.lua");
    std::fs::write(&file, "error(\"boom at load\")\n").expect("write");
    assert!(
        gw.wait_for_log("boom at load", SHOW_UP),
        "log:\n{}",
        gw.logs()
    );
    assert_eq!(probe_version(&gw).as_deref(), Some("v1"));
}

#[test]
fn a_new_plugin_file_and_a_route_using_it() {
    let up = Upstream::echo();
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir(dir.path().join("plugins")).expect("plugins dir");
    let gw = Gateway::start_in(dir.path(), &config(&up, false));
    assert_eq!(probe_version(&gw), None);

    std::fs::write(
        dir.path().join("plugins/reload-probe.lua"),
        probe_plugin("new"),
    )
    .expect("write plugin");
    atomic_write(
        &dir.path().join("config.yaml"),
        &format!("listen: {}\n{}", gw.addr(), config(&up, true)),
    );
    assert!(
        eventually(|| probe_version(&gw).as_deref() == Some("new")),
        "new plugin never served; log:\n{}",
        gw.logs()
    );
}

#[test]
fn deleting_a_plugin_a_route_uses_is_refused() {
    let (gw, _up, dir) = start_with_probe("v1");
    std::fs::remove_file(dir.path().join("plugins/reload-probe.lua")).expect("remove");
    assert!(
        gw.wait_for_log("unknown plugin [reload-probe]", SHOW_UP),
        "log:\n{}",
        gw.logs()
    );
    assert_eq!(probe_version(&gw).as_deref(), Some("v1"));
}

#[test]
fn changing_a_route_in_the_config_file() {
    let up = Upstream::echo();
    let gw = Gateway::start(&format!(
        "routes:\n  - id: r1\n    uri: /old\n    upstream:\n      nodes: {{\"{}\": 1}}\n",
        up.node()
    ));
    assert_eq!(get(&gw.url("/old")).status, 200);
    atomic_write(
        gw.config_path(),
        &format!(
            "listen: {}\nroutes:\n  - id: r1\n    uri: /new\n    upstream:\n      nodes: {{\"{}\": 1}}\n",
            gw.addr(),
            up.node()
        ),
    );
    assert!(
        eventually(|| get(&gw.url("/new")).status == 200),
        "log:\n{}",
        gw.logs()
    );
    assert_eq!(get(&gw.url("/old")).status, 404);
}

#[test]
fn a_bad_config_edit_keeps_serving_and_is_reported() {
    let up = Upstream::echo();
    let gw = Gateway::start(&format!(
        "routes:\n  - id: r1\n    uri: /a\n    upstream:\n      nodes: {{\"{}\": 1}}\n",
        up.node()
    ));
    atomic_write(
        gw.config_path(),
        &format!(
            "listen: {}\nroutes:\n  - id: r1\n    uri: /a\n    upstream:\n      nodes: 7\n",
            gw.addr()
        ),
    );
    assert!(
        gw.wait_for_log("routes[0].upstream.nodes", SHOW_UP),
        "log:\n{}",
        gw.logs()
    );
    assert_eq!(get(&gw.url("/a")).status, 200);
}

/// 50 plugin edits while a client sends requests without pause: every request succeeds, and
/// every edit is eventually served.
#[test]
fn fifty_reloads_under_load_drop_nothing() {
    let (gw, _up, dir) = start_with_probe("v0");
    let url = gw.url("/probe");
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..2 {
        let (url, stop, sent, failed) = (url.clone(), stop.clone(), sent.clone(), failed.clone());
        clients.push(std::thread::spawn(move || {
            // Bounded: stops when told, or after 20,000 requests.
            for _ in 0..20_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let r = get(&url);
                sent.fetch_add(1, Ordering::Relaxed);
                if r.status != 200 {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let file = dir.path().join("plugins/reload-probe.lua");
    for i in 1..=50 {
        let v = format!("v{i}");
        atomic_write(&file, &probe_plugin(&v));
        assert!(
            eventually(|| probe_version(&gw).as_deref() == Some(v.as_str())),
            "edit {i} never served; log:\n{}",
            gw.logs()
        );
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().expect("client thread");
    }
    assert!(sent.load(Ordering::Relaxed) > 50);
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed during reloads"
    );
}
