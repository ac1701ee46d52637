//! A plugin must not be able to take the gateway down: `os.exit` is an error in the calling
//! plugin, and a crash that cannot be caught in-process (a segfault in FFI code) costs one
//! restart of the serving process while the supervisor keeps the listening sockets open.

mod common;

use std::time::Duration;

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
    assert_eq!(lines, 1, "one log line per failed request; log:\n{}", gw.logs());
}
