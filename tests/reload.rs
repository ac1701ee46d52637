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

/// A config serving `/gen` with `X-Gen: GEN` (the response-headers plugin), on `addr`.
fn gen_config(listen: Option<std::net::SocketAddr>, up: &Upstream, gen: &str) -> String {
    let listen = listen.map(|a| format!("listen: {a}\n")).unwrap_or_default();
    format!(
        "{listen}plugin_dirs: [plugins]\nroutes:\n  - id: r1\n    uri: /gen\n    plugins:\n      response-headers: {{set: {{X-Gen: \"{gen}\"}}}}\n    upstream:\n      nodes: {{\"{}\": 1}}\n",
        up.node()
    )
}

fn served_gen(gw: &Gateway) -> Option<String> {
    get(&gw.url("/gen")).header("x-gen")
}

/// The last `new configuration generation is serving` line of the log.
fn last_reload_line(gw: &Gateway) -> String {
    gw.logs()
        .lines()
        .rfind(|l| l.contains("new configuration generation is serving"))
        .unwrap_or_default()
        .to_string()
}

/// A log file next to the config, written every 20 ms for as long as the test runs, must not
/// hold a reload back: only the config file and plugin files count towards the quiet period.
#[test]
fn a_busy_file_next_to_the_config_does_not_delay_a_reload() {
    let up = Upstream::echo();
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir(dir.path().join("plugins")).expect("plugins dir");
    let gw = Gateway::start_in(dir.path(), &gen_config(None, &up, "1"));
    assert_eq!(served_gen(&gw).as_deref(), Some("1"));

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, dir) = (stop.clone(), dir.path().to_path_buf());
        std::thread::spawn(move || {
            use std::io::Write;
            let mut log = std::fs::File::create(dir.join("access.log")).expect("log file");
            let mut db = std::fs::File::create(dir.join("plugins/.state.db")).expect("db file");
            // Bounded: 1000 writes (20 s) at most.
            for i in 0..1000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let _ = writeln!(log, "line {i}");
                let _ = writeln!(db, "row {i}");
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    // The writer is busy before the save.
    let log = dir.path().join("access.log");
    assert!(eventually(
        || std::fs::metadata(&log).is_ok_and(|m| m.len() > 20)
    ));
    atomic_write(gw.config_path(), &gen_config(Some(gw.addr()), &up, "2"));
    let served = eventually(|| served_gen(&gw).as_deref() == Some("2"));
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer thread");
    assert!(served, "the save never took effect; log:\n{}", gw.logs());
    let line = last_reload_line(&gw);
    let config = gw.config_path().display().to_string();
    assert!(line.contains(&format!("file change: {config}\"")), "{line}");
}

/// `sed -i` writes a temp file (`sedXXXXXX`) and renames it onto the config; an editor saves a
/// plugin as `.NAME.lua.tmp` renamed onto `NAME.lua`. The log names the file that changed.
#[test]
fn a_rename_save_logs_the_real_file_name() {
    let (gw, _up, dir) = start_with_probe("v1");
    let status = common::tool("sed")
        .arg("-i")
        .arg("s|uri: /probe|uri: /probe2|")
        .arg(gw.config_path())
        .status()
        .expect("run sed");
    assert!(status.success());
    assert!(
        eventually(|| get(&gw.url("/probe2")).status == 200),
        "the sed save never took effect; log:\n{}",
        gw.logs()
    );
    let line = last_reload_line(&gw);
    let config = gw.config_path().display().to_string();
    assert!(line.contains(&format!("file change: {config}\"")), "{line}");
    assert!(!line.contains("/sed"), "{line}");

    let plugin = dir.path().join("plugins/reload-probe.lua");
    let tmp = dir.path().join("plugins/.reload-probe.lua.tmp");
    std::fs::write(&tmp, probe_plugin("v2")).expect("write temp");
    std::fs::rename(&tmp, &plugin).expect("rename");
    assert!(
        eventually(|| get(&gw.url("/probe2")).header("x-probe-version").as_deref() == Some("v2")),
        "the plugin save never took effect; log:\n{}",
        gw.logs()
    );
    let line = last_reload_line(&gw);
    assert!(
        line.contains(&format!("file change: {}\"", plugin.display())),
        "{line}"
    );
}

/// A refused reload uses no generation number: the next good one follows the last served.
#[test]
fn generations_do_not_skip_after_a_refused_reload() {
    let up = Upstream::echo();
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir(dir.path().join("plugins")).expect("plugins dir");
    let gw = Gateway::start_in(dir.path(), &gen_config(None, &up, "1"));
    let listen = Some(gw.addr());
    atomic_write(gw.config_path(), &gen_config(listen, &up, "2"));
    assert!(eventually(|| served_gen(&gw).as_deref() == Some("2")));
    assert!(
        last_reload_line(&gw).contains("generation=2 previous=1"),
        "{}",
        gw.logs()
    );
    for _ in 0..2 {
        let before = gw.logs().matches("reload refused").count();
        atomic_write(
            gw.config_path(),
            &gen_config(listen, &up, "3").replace("response-headers", "no-such-plugin"),
        );
        assert!(
            eventually(|| gw.logs().matches("reload refused").count() > before),
            "{}",
            gw.logs()
        );
    }
    atomic_write(gw.config_path(), &gen_config(listen, &up, "3"));
    assert!(eventually(|| served_gen(&gw).as_deref() == Some("3")));
    let line = last_reload_line(&gw);
    assert!(line.contains("generation=3 previous=2"), "{line}");
}

/// A plugin whose module takes a while to load, and says when it starts loading: it holds the
/// first build open long enough for a save to land between reading the config and arming the
/// watchers.
const SLOW_LOAD: &str = r#"local marker = os.getenv("MOONGATE_TEST_MARKER")
if marker then
    local f = io.open(marker, "w")
    if f then f:write("loading") f:close() end
end
local t = os.clock()
while os.clock() - t < 0.3 do end
return { version = 0.1, priority = 1, name = "slow-load", schema = { type = "object" } }
"#;

/// A save made while the gateway starts (after the config was read, before the watchers were
/// armed) is not lost.
#[test]
fn a_save_during_start_up_is_not_lost() {
    let up = Upstream::echo();
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir(dir.path().join("plugins")).expect("plugins dir");
    std::fs::write(dir.path().join("plugins/slow-load.lua"), SLOW_LOAD).expect("plugin");
    let marker = dir.path().join("loading");
    std::env::set_var("MOONGATE_TEST_MARKER", &marker);
    let listen = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let config = dir.path().join("config.yaml");
    // The slow module load must not hit the Lua time budget on a busy machine.
    let text = |gen| {
        format!(
            "lua:\n  call_budget_ms: 20000\n{}",
            gen_config(Some(listen), &up, gen)
        )
    };
    std::fs::write(&config, text("1")).expect("config");
    let saver = {
        let (marker, config, text) = (marker.clone(), config.clone(), text("2"));
        std::thread::spawn(move || {
            // Bounded: the gateway loads the plugin within 10 s or the test fails below.
            let end = Instant::now() + SHOW_UP;
            while !marker.exists() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(5));
            }
            if marker.exists() {
                atomic_write(&config, &text);
            }
            marker.exists()
        })
    };
    let gw = Gateway::start_file(&config);
    assert!(
        saver.join().expect("saver thread"),
        "the plugin never loaded"
    );
    assert!(
        eventually(|| served_gen(&gw).as_deref() == Some("2")),
        "the save made during start-up was lost; log:\n{}",
        gw.logs()
    );
}
