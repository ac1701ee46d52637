//! Start-up and `moongate check`: both go through one start-up path, so `check` refuses exactly
//! what `run` refuses, with the same lines; every problem is reported in one pass, in file
//! order. Each test runs the real binary on config files in a temp dir (as `conf/config.yaml`,
//! run from the dir above it, as a user does) and compares what a user sees.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Gateway;

/// What one `moongate` command printed.
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Writes `files` (path relative to a fresh temp dir, contents) and returns the dir.
fn layout(files: &[(&str, &str)]) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("temp dir");
    for (path, text) in files {
        let path = tmp.path().join(path);
        std::fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
        std::fs::write(path, text).expect("write file");
    }
    tmp
}

/// Runs `moongate ARGS` in `dir` (no admin key from the environment, the default log level)
/// and waits for it to end: at most 30 s, then it is killed and the test fails.
fn moongate(dir: &Path, args: &[&str]) -> Out {
    let mut child = Command::new(env!("CARGO_BIN_EXE_moongate"))
        .args(args)
        .current_dir(dir)
        .env_remove("MOONGATE_ADMIN_KEY")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start moongate");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for moongate") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("moongate {args:?} did not end within 30 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Out {
        code: status.code().unwrap_or(-1),
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

/// `moongate check -c conf/config.yaml`.
fn check(dir: &Path) -> Out {
    moongate(dir, &["check", "-c", "conf/config.yaml"])
}

/// `moongate run -c conf/config.yaml`, for a config it must refuse.
fn run(dir: &Path) -> Out {
    moongate(dir, &["run", "-c", "conf/config.yaml"])
}

/// Whether a stderr line is a log line (`2026-12-03T14:18:43.123122Z  INFO ...`).
fn is_log_line(line: &str) -> bool {
    line.len() > 20 && line.as_bytes()[4] == b'-' && line.as_bytes()[10] == b'T'
}

/// Asserts that `check` and `run` both refuse the config in `dir` with exactly `problems`:
/// `check` on stdout, `run` on stderr (where its only other line is the supervisor's
/// start-up log line).
fn assert_refused(dir: &Path, problems: &[&str]) {
    let c = check(dir);
    assert_eq!(c.code, 1, "check: {}{}", c.stdout, c.stderr);
    assert_eq!(c.stdout.lines().collect::<Vec<_>>(), problems, "check");
    assert_eq!(c.stderr, "", "check's stderr");
    let r = run(dir);
    assert_eq!(r.code, 1, "run: {}", r.stderr);
    let (logs, lines): (Vec<&str>, Vec<&str>) = r.stderr.lines().partition(|l| is_log_line(l));
    assert_eq!(lines, problems, "run's stderr:\n{}", r.stderr);
    for l in logs {
        assert!(
            l.contains("supervisor started the serving process"),
            "unexpected log line from run: {l}"
        );
    }
}

/// The line for a plugin that is neither native nor a file in `conf/plugins`.
fn unknown_plugin(at: &str, name: &str) -> String {
    format!(
        "{at}: unknown plugin [{name}]: it is not a native plugin and there is no {name}.lua or \
         {name}/init.lua in plugin_dirs (conf/plugins); APISIX's bundled plugin files run \
         unmodified: `moongate plugins import /path/to/apisix {name} --to DIR` stages one with \
         what it requires (see \"APISIX's bundled Lua plugins, unmodified\" in \
         docs/compatibility.md)"
    )
}

#[test]
fn an_admin_block_without_a_key_is_refused_by_check_and_run() {
    let dir = layout(&[(
        "conf/config.yaml",
        "listen: 127.0.0.1:0\nadmin:\n  listen: 127.0.0.1:0\n",
    )]);
    assert_refused(
        dir.path(),
        &["admin.key: no key: set admin.key in the config file or the MOONGATE_ADMIN_KEY environment variable (moongate has no built-in default key)"],
    );
}

#[test]
fn apisix_default_admin_key_is_refused_by_check_and_run() {
    let dir = layout(&[(
        "conf/config.yaml",
        "listen: 127.0.0.1:0\nadmin:\n  listen: 127.0.0.1:0\n  key: edd1c9f034335f136f87ad84b625c8f1\n",
    )]);
    assert_refused(
        dir.path(),
        &["admin.key: the key is a default published in APISIX's documentation; choose your own"],
    );
}

#[test]
fn etcd_settings_are_refused_by_check_as_by_run() {
    // What can be told without contacting etcd.
    let dir = layout(&[(
        "conf/config.yaml",
        "listen: 127.0.0.1:0\nconfig_provider: etcd\n",
    )]);
    assert_refused(
        dir.path(),
        &["config_provider: is etcd, but the config file has no `etcd` section"],
    );
    let dir = layout(&[(
        "conf/config.yaml",
        "listen: 127.0.0.1:0\nconfig_provider: etcd\netcd:\n  endpoints: [\"127.0.0.1:2379\"]\n",
    )]);
    assert_refused(
        dir.path(),
        &["etcd: etcd endpoint \"127.0.0.1:2379\" must start with http:// or https://"],
    );
}

#[test]
fn every_problem_is_reported_in_one_pass_in_file_order() {
    // upstreams[0] does not parse, so routes[1]'s reference to it is not a second problem;
    // routes[0] does not parse, yet routes[1] and routes[2] are still checked (and named by
    // their place in the file).
    let dir = layout(&[(
        "conf/config.yaml",
        r#"listen: 127.0.0.1:0
upstreams:
  - id: u1
    nodes: "127.0.0.1:80"
  - id: u2
    nodes:
      "127.0.0.1:1980": 1
routes:
  - id: r1
    uri: /a
    priority: high
    upstream_id: u2
  - id: r2
    uri: /b
    upstream_id: u1
    plugins:
      no-such-plugin: {}
  - id: r3
    uri: /c
    upstream_id: missing
admin:
  listen: 127.0.0.1:0
  key: edd1c9f034335f136f87ad84b625c8f1
workers: many
"#,
    )]);
    let unknown = unknown_plugin("routes[1].plugins.no-such-plugin", "no-such-plugin");
    assert_refused(
        dir.path(),
        &[
            "upstreams[0].nodes: expected a map of \"host:port\" to weight, or a list of {host, port, weight}",
            "routes[0].priority: invalid type: string \"high\", expected i64",
            &unknown,
            "routes[2].upstream_id: upstream \"missing\" not found",
            "admin.key: the key is a default published in APISIX's documentation; choose your own",
            "workers: invalid type: string \"many\", expected usize",
        ],
    );
}

#[test]
fn a_broken_plugin_file_does_not_hide_the_config_problems() {
    // The route naming the broken plugin gets no "unknown plugin" line: the file's own error
    // says what is wrong. The plugin file's problem comes after the config file's.
    let dir = layout(&[
        (
            "conf/config.yaml",
            "listen: 127.0.0.1:0\nroutes:\n  - id: r1\n    uri: /a\n    plugins:\n      broken: {}\n  - id: r2\n    uri: /b\n    plugins:\n      no-such-plugin: {}\n",
        ),
        ("conf/plugins/broken.lua", "local x = = 1\n"),
    ]);
    let unknown = unknown_plugin("routes[1].plugins.no-such-plugin", "no-such-plugin");
    assert_refused(
        dir.path(),
        &[
            &unknown,
            "conf/plugins/broken.lua:1: unexpected symbol near '='",
        ],
    );
}

#[test]
fn a_syntax_error_names_the_file_line_and_column() {
    let dir = layout(&[(
        "conf/config.yaml",
        "routes:\n  - id: 1\n   uri: /a\n  bad\n",
    )]);
    assert_refused(
        dir.path(),
        &["conf/config.yaml:3:4: did not find expected '-' indicator, while parsing a block collection at line 2 column 3"],
    );
    let dir = layout(&[(
        "conf/config.yaml",
        "{\"routes\": [{\"id\": 1, \"uri\": \"/a\"}\n",
    )]);
    assert_refused(
        dir.path(),
        &["conf/config.yaml:2:1: did not find expected ',' or ']', while parsing a flow sequence at line 1 column 12"],
    );
}

#[test]
fn an_unknown_plugin_says_where_it_was_looked_for() {
    let dir = layout(&[(
        "conf/config.yaml",
        "listen: 127.0.0.1:0\nroutes:\n  - id: 1\n    uri: /a\n    plugins:\n      limit-count: {}\n",
    )]);
    let line = unknown_plugin("routes[0].plugins.limit-count", "limit-count");
    assert_refused(dir.path(), &[&line]);
    // The same in the node's `plugins` list.
    let dir = layout(&[(
        "conf/config.yaml",
        "listen: 127.0.0.1:0\nplugins:\n  - response-headers\n  - limit-count\n",
    )]);
    let line = unknown_plugin("plugins[1]", "limit-count");
    assert_refused(dir.path(), &[&line]);
}

#[test]
fn a_plugin_file_outside_the_enabled_list_is_named() {
    let dir = layout(&[
        (
            "conf/config.yaml",
            "listen: 127.0.0.1:0\nplugins:\n  - response-headers\nroutes:\n  - id: 1\n    uri: /a\n    plugins:\n      hello: {}\n",
        ),
        (
            "conf/plugins/hello.lua",
            "return {name = 'hello', priority = 1, version = 0.1, schema = {type = 'object'}}\n",
        ),
    ]);
    assert_refused(
        dir.path(),
        &["routes[0].plugins.hello: unknown plugin [hello]: conf/plugins/hello.lua is not enabled: add hello to the node's plugins list"],
    );
}

/// A Lua file named like a native plugin is never loaded (this one would fail if it were).
const FAKE_OPENFUNCTION: &str = "error('conf/plugins/openfunction.lua must not be loaded')\n";
const NATIVE_WINS: &str = "conf/plugins/openfunction.lua is not loaded: openfunction is a native plugin, which takes precedence over a Lua file of the same name";
const OPENFUNCTION_ROUTE: &str = "listen: 127.0.0.1:0\nroutes:\n  - id: fn\n    uri: /fn\n    plugins:\n      openfunction:\n        function_uri: http://127.0.0.1:1/fn\n";

#[test]
fn a_lua_file_named_like_a_native_plugin_is_skipped_by_check() {
    let dir = layout(&[
        ("conf/config.yaml", OPENFUNCTION_ROUTE),
        ("conf/plugins/openfunction.lua", FAKE_OPENFUNCTION),
    ]);
    let c = check(dir.path());
    assert_eq!(c.code, 0, "{}{}", c.stdout, c.stderr);
    assert!(
        c.stdout.starts_with("conf/config.yaml: ok (1 routes, "),
        "{}",
        c.stdout
    );
    assert_eq!(c.stderr, format!("warning: {NATIVE_WINS}\n"));
}

#[test]
fn a_plugins_warning_at_check_is_plain_text() {
    // Fields after the message (plugin=, phase=) carry no terminal colour codes when stderr is
    // not a terminal: the lines end up in CI logs and editors.
    let dir = layout(&[
        (
            "conf/config.yaml",
            "listen: 127.0.0.1:0\nroutes:\n  - id: w\n    uri: /w\n    plugins:\n      warner: {}\n",
        ),
        (
            "conf/plugins/warner.lua",
            "local core = require('apisix.core')\n\
             return {name = 'warner', priority = 1, version = 0.1, schema = {type = 'object'},\n\
             check_schema = function(conf) core.log.warn('risky conf'); return true end}\n",
        ),
    ]);
    let c = check(dir.path());
    assert_eq!(c.code, 0, "{}{}", c.stdout, c.stderr);
    assert!(
        c.stderr.contains("risky conf plugin=warner"),
        "{}",
        c.stderr
    );
    assert!(!c.stderr.contains('\x1b'), "{:?}", c.stderr);
}

#[test]
fn a_lua_file_named_like_a_native_plugin_is_skipped_by_run_and_reload() {
    let dir = layout(&[
        ("conf/config.yaml", OPENFUNCTION_ROUTE),
        ("conf/plugins/openfunction.lua", FAKE_OPENFUNCTION),
    ]);
    let config = dir.path().join("conf/config.yaml");
    let gw = Gateway::start_file(&config);
    let warnings = |gw: &Gateway| gw.logs().matches(NATIVE_WINS).count();
    assert_eq!(warnings(&gw), 1, "{}", gw.logs());
    // SIGHUP rebuilds from the files: the same rule, the same single warning. (Sent as soon
    // as the gateway says it listens: its handler is installed by then.)
    let pid = libc::pid_t::try_from(gw.pid()).expect("pid fits");
    // SAFETY: kill(2) on the gateway process this test started and still owns.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    assert!(
        gw.wait_for_log(
            "new configuration generation is serving",
            Duration::from_secs(20)
        ),
        "{}",
        gw.logs()
    );
    assert_eq!(warnings(&gw), 2, "{}", gw.logs());
    assert!(!gw.logs().contains("reload refused"), "{}", gw.logs());
}
