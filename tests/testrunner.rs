//! `moongate test`: the real binary run on test files, as a plugin author runs it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A temp folder with `plugins/NAME.lua` files and `plugins/tests/NAME.test.yaml` files.
struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    fn new() -> Project {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir_all(dir.path().join("plugins/tests")).expect("plugins/tests");
        Project { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Writes `rel` the way editors save: a temporary file renamed over the old one.
    fn write(&self, rel: &str, text: &str) {
        let path = self.path(rel);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("folder");
        let tmp = path.with_extension("tmp-save");
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, &path).expect("rename");
    }

    /// `moongate test ARGS` in the project folder.
    fn test(&self, args: &[&str]) -> Run {
        run_in(self.dir.path(), args)
    }
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn out(&self) -> String {
        format!("stdout:\n{}\nstderr:\n{}", self.stdout, self.stderr)
    }
}

fn run_in(dir: &Path, args: &[&str]) -> Run {
    let Output {
        status,
        stdout,
        stderr,
    } = Command::new(env!("CARGO_BIN_EXE_moongate"))
        .arg("test")
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .output()
        .expect("run moongate test");
    Run {
        code: status.code(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// Fails unless `text` contains each of `wants`.
fn assert_contains(text: &str, wants: &[&str]) {
    for want in wants {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn example_key_auth() -> String {
    std::fs::read_to_string(repo().join("plugins/example-key-auth.lua")).expect("example plugin")
}

/// A plugin whose access phase fails with a Lua error two calls deep.
const BOOM: &str = r#"local core = require("apisix.core")
local _M = { version = 0.1, priority = 10, name = "boom", schema = { type = "object" } }

local function explode(conf)
    local t = conf.missing
    return t.field
end

function _M.access(conf, ctx)
    core.log.warn("about to explode")
    explode(conf)
end

return _M
"#;

#[test]
fn the_example_plugins_pass_and_junit_says_so() {
    let junit = tempfile::NamedTempFile::new().expect("junit file");
    let junit_path = junit.path().to_string_lossy().into_owned();
    let r = run_in(&repo(), &["plugins/tests", "--junit", &junit_path]);
    assert_eq!(r.code, Some(0), "{}", r.out());
    let lines: Vec<&str> = r.stdout.lines().collect();
    let ok = lines.iter().filter(|l| l.starts_with("ok   ")).count();
    assert!(ok >= 10, "{}", r.out());
    assert!(!r.stdout.contains("FAIL"), "{}", r.out());
    assert_eq!(
        lines.last(),
        Some(&format!("{ok} passed, 0 failed").as_str())
    );
    let xml = std::fs::read_to_string(junit.path()).expect("junit written");
    let report = parse_junit(&xml);
    assert_eq!(report.tests, ok, "{xml}");
    assert_eq!(report.failures, 0, "{xml}");
    assert_eq!(report.cases.len(), ok, "{xml}");
    assert!(report
        .cases
        .iter()
        .any(|c| c.suite == "plugins/tests/example-key-auth.test.yaml"
            && c.name == "a request without a key is refused"));
}

/// What a JUnit file holds, read with an XML parser.
struct Junit {
    tests: usize,
    failures: usize,
    cases: Vec<JunitCase>,
}

struct JunitCase {
    suite: String,
    name: String,
    failure: Option<String>,
}

fn parse_junit(xml: &str) -> Junit {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    let attr = |e: &quick_xml::events::BytesStart, name: &str| -> String {
        e.attributes()
            .flatten()
            .find(|a| a.key.as_ref() == name.as_bytes())
            .map(|a| a.unescape_value().expect("attribute").into_owned())
            .unwrap_or_default()
    };
    let mut out = Junit {
        tests: 0,
        failures: 0,
        cases: Vec::new(),
    };
    let mut suite = String::new();
    let mut in_failure = false;
    loop {
        match reader.read_event().expect("well-formed XML") {
            Event::Start(e) | Event::Empty(e) if e.name().as_ref() == b"testsuites" => {
                out.tests = attr(&e, "tests").parse().expect("tests count");
                out.failures = attr(&e, "failures").parse().expect("failures count");
            }
            Event::Start(e) if e.name().as_ref() == b"testsuite" => suite = attr(&e, "name"),
            Event::Start(e) | Event::Empty(e) if e.name().as_ref() == b"testcase" => {
                out.cases.push(JunitCase {
                    suite: suite.clone(),
                    name: attr(&e, "name"),
                    failure: None,
                });
            }
            Event::Start(e) if e.name().as_ref() == b"failure" => {
                in_failure = true;
                if let Some(c) = out.cases.last_mut() {
                    c.failure = Some(String::new());
                }
            }
            // Text comes in pieces: plain runs and entity references (`&quot;`).
            Event::Text(t) if in_failure => push_failure(&mut out, &t.decode().expect("text")),
            Event::GeneralRef(r) if in_failure => {
                let name = r.decode().expect("entity").into_owned();
                let text = match r.resolve_char_ref().expect("char ref") {
                    Some(c) => c.to_string(),
                    None => quick_xml::escape::resolve_xml_entity(&name)
                        .expect("known entity")
                        .to_string(),
                };
                push_failure(&mut out, &text);
            }
            Event::End(e) if e.name().as_ref() == b"failure" => in_failure = false,
            Event::Eof => break,
            _ => {}
        }
    }
    out
}

fn push_failure(out: &mut Junit, text: &str) {
    if let Some(Some(f)) = out.cases.last_mut().map(|c| c.failure.as_mut()) {
        f.push_str(text);
    }
}

#[test]
fn a_failing_case_shows_a_diff_and_junit_carries_it() {
    let p = Project::new();
    p.write("plugins/example-key-auth.lua", &example_key_auth());
    p.write(
        "plugins/tests/key.test.yaml",
        r#"cases:
  - name: right key
    route: {uri: /a, plugins: {example-key-auth: {key: k}}}
    request: {headers: {apikey: k}}
    expect: {status: 200}
  - name: wrong key expected to pass
    route: {uri: /a, plugins: {example-key-auth: {key: k}}}
    request: {headers: {apikey: nope}}
    expect:
      status: 200
      json: {message: welcome}
      headers_present: [x-missing]
"#,
    );
    let junit = p.path("junit.xml");
    let r = p.test(&["--junit", &junit.to_string_lossy()]);
    assert_eq!(r.code, Some(1), "{}", r.out());
    let out = &r.stdout;
    assert!(
        out.contains("ok   plugins/tests/key.test.yaml: right key"),
        "{}",
        r.out()
    );
    assert!(
        out.contains("FAIL plugins/tests/key.test.yaml: wrong key expected to pass"),
        "{}",
        r.out()
    );
    assert_contains(
        &r.stdout,
        &[
            "request GET /a:",
            "status:\n           - 200\n           + 401",
            "json.message:\n           - \"welcome\"\n           + \"Invalid API key in request\"",
            "header x-missing:\n           - present\n           + (absent)",
            "rejected an invalid API key",
        ],
    );
    assert!(out.ends_with("1 passed, 1 failed\n"), "{}", r.out());
    let report = parse_junit(&std::fs::read_to_string(&junit).expect("junit"));
    assert_eq!((report.tests, report.failures), (2, 1));
    assert!(report.cases[0].failure.is_none());
    let failure = report.cases[1].failure.as_deref().expect("failure element");
    assert!(failure.contains("+ 401"), "{failure}");
    assert!(failure.contains("- \"welcome\""), "{failure}");
}

#[test]
fn a_lua_error_shows_file_line_and_traceback() {
    let p = Project::new();
    p.write("plugins/boom.lua", BOOM);
    // The same plugin as a folder: NAME/init.lua.
    p.write(
        "plugins/boom2/init.lua",
        &BOOM.replace("\"boom\"", "\"boom2\""),
    );
    p.write(
        "plugins/tests/boom.test.yaml",
        "cases:\n  - name: file plugin\n    route: {plugins: {boom: {}}}\n    expect: {status: 200}\n  - name: folder plugin\n    route: {plugins: {boom2: {}}}\n    expect: {status: 200}\n",
    );
    let r = p.test(&[]);
    assert_eq!(r.code, Some(1), "{}", r.out());
    let out = &r.stdout;
    assert_contains(
        &r.stdout,
        &[
            "FAIL plugins/tests/boom.test.yaml: file plugin",
            "+ 500",
            "boom.lua:10: about to explode",
            "plugins/boom.lua:6: attempt to index local 't' (a nil value)",
            "stack traceback:",
            "plugins/boom.lua:11: in",
            "plugins/boom2/init.lua:6: attempt to index local 't' (a nil value)",
            "plugins/boom2/init.lua:11: in",
            "0 passed, 2 failed",
        ],
    );
    // The traceback is shown on its own lines, not as one joined log line, and without the
    // gateway's own runner frames.
    assert!(!out.contains(" | stack traceback"), "{}", r.out());
    assert!(!out.contains("moongate.call"), "{}", r.out());
}

#[test]
fn no_test_files_is_an_error() {
    // A CI job pointed at the wrong folder must fail, not pass with nothing run.
    let p = Project::new();
    let r = p.test(&[]);
    assert_eq!(r.code, Some(1), "{}", r.out());
    assert!(
        r.stderr
            .contains("no test files (*.test.yaml) found in tests, plugins/tests"),
        "{}",
        r.out()
    );
    std::fs::create_dir_all(p.path("empty")).expect("folder");
    let r = p.test(&["empty"]);
    assert_eq!(r.code, Some(1), "{}", r.out());
    assert!(r.stderr.contains("found in empty"), "{}", r.out());
    let r = p.test(&["missing.test.yaml"]);
    assert_eq!(r.code, Some(1), "{}", r.out());
    assert!(
        r.stderr
            .contains("missing.test.yaml: no such file or folder"),
        "{}",
        r.out()
    );
}

#[test]
fn schema_errors_are_cases() {
    let p = Project::new();
    p.write("plugins/example-key-auth.lua", &example_key_auth());
    p.write(
        "plugins/tests/conf.test.yaml",
        r#"cases:
  - name: a key is required
    route: {plugins: {example-key-auth: {header: x}}}
    expect: {check_error: 'property "key" is required'}
  - name: a consumer's conf is checked too
    consumers:
      - username: jack
        plugins: {example-key-auth: {key: 1}}
    expect: {check_error: 'consumers[0]'}
  - name: expects an error the conf does not have
    route: {plugins: {example-key-auth: {key: k}}}
    expect: {check_error: 'property "key" is required'}
  - name: a wrong error text
    route: {plugins: {example-key-auth: {}}}
    expect: {check_error: 'no such words'}
  - name: an unknown plugin
    route: {plugins: {no-such-plugin: {}}}
    expect: {check_error: 'no-such-plugin'}
"#,
    );
    let r = p.test(&["plugins/tests/conf.test.yaml"]);
    assert_eq!(r.code, Some(1), "{}", r.out());
    assert_contains(
        &r.stdout,
        &[
            "ok   plugins/tests/conf.test.yaml: a key is required",
            "ok   plugins/tests/conf.test.yaml: a consumer's conf is checked too",
            "FAIL plugins/tests/conf.test.yaml: expects an error the conf does not have",
            "+ the conf was accepted",
            "FAIL plugins/tests/conf.test.yaml: a wrong error text",
            "- an error containing \"no such words\"",
            "+ route.plugins.example-key-auth: ",
            "ok   plugins/tests/conf.test.yaml: an unknown plugin",
            "3 passed, 2 failed",
        ],
    );
}

/// A plugin with state across requests: it lets `limit` requests through per conf, then 429,
/// counting in a shared dictionary the test file's `node:` declares.
const QUOTA: &str = r#"local core = require("apisix.core")
local _M = {
    version = 0.1, priority = 1000, name = "quota",
    schema = { type = "object", properties = { limit = { type = "integer", minimum = 1 } }, required = { "limit" } },
}

function _M.check_schema(conf)
    return core.schema.check(_M.schema, conf)
end

function _M.access(conf, ctx)
    local dict = ngx.shared.quota
    local n = dict:incr(ctx.conf_id .. ":" .. ctx.conf_version, 1, 0)
    core.response.set_header("X-Quota-Left", conf.limit - n)
    if n > conf.limit then
        return 429, { message = "quota used up" }
    end
end

return _M
"#;

#[test]
fn a_stateful_case_sends_its_requests_in_order() {
    let p = Project::new();
    p.write("plugins/quota.lua", QUOTA);
    p.write(
        "plugins/tests/quota.test.yaml",
        r#"node:
  lua:
    shared_dicts: {quota: 1m}
cases:
  - name: two pass, the third is refused
    route: {uri: /q, plugins: {quota: {limit: 2}}}
    steps:
      - expect: {status: 200, headers: {x-quota-left: "1"}, received: true}
      - expect: {status: 200, headers: {x-quota-left: "0"}}
      - expect: {status: 429, json: {message: quota used up}, received: false}
  - name: a new case starts with a new count
    route: {uri: /q, plugins: {quota: {limit: 1}}}
    steps:
      - expect: {status: 200}
      - expect: {status: 200}
      - expect: {status: 200}
"#,
    );
    let r = p.test(&[]);
    assert_eq!(r.code, Some(1), "{}", r.out());
    assert_contains(
        &r.stdout,
        &[
            "ok   plugins/tests/quota.test.yaml: two pass, the third is refused",
            "FAIL plugins/tests/quota.test.yaml: a new case starts with a new count",
            "request 2 of 3 (GET /q):",
            "- 200\n           + 429",
            "(requests 3 to 3 not sent)",
            "1 passed, 1 failed",
        ],
    );
}

#[test]
fn a_copied_example_catches_a_change_to_the_plugin() {
    let p = Project::new();
    let plugin = example_key_auth();
    p.write("plugins/example-key-auth.lua", &plugin);
    p.write(
        "plugins/tests/example-key-auth.test.yaml",
        &std::fs::read_to_string(repo().join("plugins/tests/example-key-auth.test.yaml"))
            .expect("example test file"),
    );
    let r = p.test(&[]);
    assert_eq!(r.code, Some(0), "{}", r.out());
    assert!(!r.stdout.contains("FAIL"), "{}", r.out());
    // The author changes the plugin: a wrong key now gets 403 with another message.
    let changed = plugin.replace(
        "return 401, { message = \"Invalid API key in request\" }",
        "return 403, { message = \"Forbidden\" }",
    );
    assert_ne!(changed, plugin, "the example plugin changed shape");
    p.write("plugins/example-key-auth.lua", &changed);
    let r = p.test(&[]);
    assert_eq!(r.code, Some(1), "{}", r.out());
    assert_contains(
        &r.stdout,
        &[
            "FAIL plugins/tests/example-key-auth.test.yaml: a wrong key is refused and logged",
            "status:\n           - 401\n           + 403",
            "json.message:\n           - \"Invalid API key in request\"\n           + \"Forbidden\"",
        ],
    );
    assert!(
        r.stdout.contains(
            "ok   plugins/tests/example-key-auth.test.yaml: a request without a key is refused"
        ),
        "{}",
        r.out()
    );
}

/// `moongate test --watch` in the background, its stdout read line by line.
struct Watch {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Watch {
    fn start(dir: &Path) -> Watch {
        let mut child = Command::new(env!("CARGO_BIN_EXE_moongate"))
            .args(["test", "--watch"])
            .current_dir(dir)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moongate test --watch");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Watch {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Lines up to and including the first one for which `f` is true (30 s at most).
    fn until(&mut self, f: impl Fn(&str) -> bool) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut out = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    let done = f(&l);
                    out.push(l);
                    if done {
                        return out;
                    }
                }
                Err(_) => break,
            }
        }
        panic!("no such line; so far:\n{}", self.seen.join("\n"));
    }
}

impl Watch {
    /// The lines of the next re-run, and its summary line.
    fn next_run(&mut self) -> (String, String) {
        let lines = self.until(|l| l.contains(" passed, ") && l.contains("after the save"));
        let summary = lines.last().cloned().unwrap_or_default();
        (lines.join("\n"), summary)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn watch_mode_reruns_when_a_plugin_or_test_is_saved() {
    let p = Project::new();
    let plugin = example_key_auth();
    p.write("plugins/example-key-auth.lua", &plugin);
    p.write("plugins/boom.lua", BOOM);
    p.write(
        "plugins/tests/key.test.yaml",
        "cases:\n  - name: wrong key\n    route: {plugins: {example-key-auth: {key: k}}}\n    request: {headers: {apikey: x}}\n    expect: {status: 401}\n",
    );
    let mut w = Watch::start(p.dir.path());
    let first = w.until(|l| l.starts_with("watching for changes"));
    assert!(first.iter().any(|l| l == "1 passed, 0 failed"), "{first:?}");

    // The plugin changes: the case fails, and only that file is re-run.
    p.write(
        "plugins/example-key-auth.lua",
        &plugin.replace(
            "return 401, { message = \"Invalid",
            "return 402, { message = \"Invalid",
        ),
    );
    let (text, summary) = w.next_run();
    assert_contains(
        &text,
        &[
            "changed: plugins/example-key-auth.lua",
            "FAIL plugins/tests/key.test.yaml: wrong key",
            "+ 402",
        ],
    );
    assert!(summary.starts_with("0 passed, 1 failed ("), "{text}");

    // The test file changes to match: it passes again.
    p.write(
        "plugins/tests/key.test.yaml",
        "cases:\n  - name: wrong key\n    route: {plugins: {example-key-auth: {key: k}}}\n    request: {headers: {apikey: x}}\n    expect: {status: 402}\n",
    );
    let (text, summary) = w.next_run();
    assert_contains(&text, &["ok   plugins/tests/key.test.yaml: wrong key"]);
    assert!(summary.starts_with("1 passed, 0 failed ("), "{text}");

    // A plugin that no longer loads fails the run as a whole (as a hot reload would refuse it).
    p.write("plugins/boom.lua", "local x = = 1\n");
    let (text, _) = w.next_run();
    assert_contains(&text, &["the plugins did not load", "boom.lua:1:"]);
}
