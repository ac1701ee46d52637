//! A cluster of moongate nodes on a real etcd (Debian's `etcd-server`, `/usr/bin/etcd`)
//! started by each test on loopback ports with a temp data dir: writes through one node serve
//! on the others, etcd restarts do not fail traffic, bad values written straight into etcd are
//! skipped and reported, late nodes see everything.
//!
//! These tests need the etcd binary; without it they fail (CI installs `etcd-server`).

mod common;

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use common::*;
use serde_json::{json, Value};

const KEY: &str = "etcd-test-admin-key-0123";
const ETCD_BIN: &str = "/usr/bin/etcd";

// ---------------------------------------------------------------------------------------------
// etcd
// ---------------------------------------------------------------------------------------------

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A single-member etcd on loopback with its own data dir.
struct Etcd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
}

impl Etcd {
    fn start() -> Etcd {
        assert!(
            std::path::Path::new(ETCD_BIN).exists(),
            "{ETCD_BIN} is missing: these tests need a real etcd (apt-get install etcd-server)"
        );
        let mut etcd = Etcd {
            child: None,
            dir: tempfile::tempdir().expect("temp dir"),
            client_port: free_port(),
            peer_port: free_port(),
        };
        etcd.spawn();
        etcd
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn spawn(&mut self) {
        let client = self.url();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::File::create(self.dir.path().join("etcd.log")).expect("etcd log");
        let child = Command::new(ETCD_BIN)
            .arg("--name=t")
            .arg(format!("--data-dir={}", self.data_dir().display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=t={peer}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.child = Some(child);
        let addr: SocketAddr = ([127, 0, 0, 1], self.client_port).into();
        let ready = poll(Duration::from_secs(30), || {
            if !accepts_connections(addr) {
                return false;
            }
            let r = Req::post(&format!("{}/v3/kv/range", self.url()))
                .body(json!({"key": B64.encode("/")}).to_string())
                .send();
            r.status == 200
        });
        assert!(
            ready,
            "etcd did not answer within 30s; its log:\n{}",
            std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
        );
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the same member again on the same ports and data.
    fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    fn call(&self, path: &str, body: Value) -> Value {
        let r = Req::post(&format!("{}{path}", self.url()))
            .body(body.to_string())
            .send();
        assert_eq!(r.status, 200, "etcd {path}: {}", r.text());
        r.json()
    }

    /// Writes a raw value, as `etcdctl put` would.
    fn put(&self, key: &str, value: &str) {
        self.call(
            "/v3/kv/put",
            json!({"key": B64.encode(key), "value": B64.encode(value)}),
        );
    }

    /// The value at `key` as text, if any.
    fn get(&self, key: &str) -> Option<String> {
        let v = self.call("/v3/kv/range", json!({"key": B64.encode(key)}));
        let kv = v["kvs"].as_array()?.first()?.clone();
        let bytes = B64.decode(kv["value"].as_str()?).ok()?;
        Some(String::from_utf8_lossy(&bytes).into_owned())
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------------
// nodes
// ---------------------------------------------------------------------------------------------

/// Calls `f` every 50 ms until it returns true; false after `bound`.
fn poll(bound: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + bound;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn node_yaml(etcd: &Etcd) -> String {
    format!(
        "workers: 1\nconfig_provider: etcd\netcd:\n  endpoints: [\"{}\"]\n  prefix: /apisix\n  timeout: 3\nadmin:\n  listen: 127.0.0.1:0\n  key: {KEY}\n",
        etcd.url()
    )
}

struct Node {
    gw: Gateway,
    /// The Admin API listener.
    admin: SocketAddr,
}

impl Node {
    fn start(etcd: &Etcd) -> Node {
        let gw = Gateway::start(&node_yaml(etcd));
        let addr = gw.admin_addr();
        Node { gw, admin: addr }
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Resp {
        admin_request(
            self.admin,
            KEY,
            method,
            path,
            body.map(|b| b.to_string()).as_deref(),
        )
    }

    fn put(&self, path: &str, body: Value) -> Resp {
        self.call("PUT", path, Some(body))
    }

    fn status(&self) -> Value {
        let r = self.call("GET", "/moongate/status", None);
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["store_status"].clone()
    }

    fn get(&self, path: &str) -> Resp {
        get(&self.gw.url(path))
    }
}

fn route(uri: &str, up: &Upstream) -> Value {
    json!({"uri": uri, "upstream": {"type": "roundrobin", "nodes": {up.node(): 1}}})
}

/// Polls `node` until `path` answers `status`; panics with the node's log after `bound`.
fn wait_status(node: &Node, path: &str, status: u16, bound: Duration) -> Duration {
    let started = Instant::now();
    let ok = poll(bound, || node.get(path).status == status);
    assert!(
        ok,
        "{path} did not answer {status} within {bound:?}; log:\n{}",
        node.gw.logs()
    );
    started.elapsed()
}

// ---------------------------------------------------------------------------------------------
// tests
// ---------------------------------------------------------------------------------------------

#[test]
fn a_write_through_one_node_serves_on_the_other() {
    let etcd = Etcd::start();
    let up = Upstream::echo();
    let a = Node::start(&etcd);
    let b = Node::start(&etcd);
    assert_eq!(b.get("/shared").status, 404);

    let r = a.put("/routes/shared", route("/shared", &up));
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["key"], "/apisix/routes/shared");
    // Live on A when the write answered; on B through the watch.
    assert_eq!(a.get("/shared").status, 200);
    let took = wait_status(&b, "/shared", 200, Duration::from_secs(10));
    eprintln!("PUT on node A served on node B after {took:?}");
    assert_eq!(b.get("/shared").json()["uri"], "/shared");

    // APISIX's layout: the route JSON at /apisix/routes/ID with id and the times.
    let stored: Value = serde_json::from_str(&etcd.get("/apisix/routes/shared").expect("stored"))
        .expect("JSON value");
    assert_eq!(stored["id"], "shared");
    assert_eq!(stored["uri"], "/shared");
    assert!(stored["create_time"].is_u64() && stored["update_time"].is_u64());

    // B's Admin API reads it; a POST on B gets an id from etcd's revision; A serves that too.
    let r = b.call("GET", "/routes/shared", None);
    assert_eq!(r.status, 200, "{}", r.text());
    let r = b.call("POST", "/routes", Some(route("/posted", &up)));
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["value"]["id"].as_str().expect("id").to_string();
    assert_eq!(id.len(), 20, "{id}");
    wait_status(&a, "/posted", 200, Duration::from_secs(10));

    // A delete on B disappears from A; an update on A changes B.
    let r = b.call("DELETE", "/routes/shared", None);
    assert_eq!(r.status, 200, "{}", r.text());
    wait_status(&a, "/shared", 404, Duration::from_secs(10));
    let r = a.put(
        &format!("/routes/{id}"),
        json!({"uri": "/posted", "upstream": {"nodes": {up.node(): 1}},
               "plugins": {"response-headers": {"set": {"X-From": "a"}}}}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let ok = poll(Duration::from_secs(10), || {
        b.get("/posted").header("x-from").as_deref() == Some("a")
    });
    assert!(ok, "update did not reach B; log:\n{}", b.gw.logs());
}

#[test]
fn etcd_restart_while_both_nodes_serve() {
    let mut etcd = Etcd::start();
    let up = Upstream::echo();
    let a = Node::start(&etcd);
    let b = Node::start(&etcd);
    let r = a.put("/routes/steady", route("/steady", &up));
    assert_eq!(r.status, 201, "{}", r.text());
    wait_status(&b, "/steady", 200, Duration::from_secs(10));

    // Traffic on both nodes for the whole outage.
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for url in [a.gw.url("/steady"), b.gw.url("/steady")] {
        let (stop, served, failed) = (stop.clone(), served.clone(), failed.clone());
        clients.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if get(&url).status == 200 {
                    served.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }));
    }

    etcd.stop();
    for n in [&a, &b] {
        let down = poll(Duration::from_secs(20), || {
            n.status()["connected"] == json!(false)
        });
        assert!(
            down,
            "status never said etcd is down; log:\n{}",
            n.gw.logs()
        );
        assert!(
            n.gw.wait_for_log(
                "serving the last good configuration",
                Duration::from_secs(5)
            ),
            "{}",
            n.gw.logs()
        );
    }
    // Nothing is acknowledged that etcd did not store.
    let r = a.put("/routes/lost", route("/lost", &up));
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(
        r.json()["error_msg"]
            .as_str()
            .unwrap_or_default()
            .contains("etcd is unreachable"),
        "{}",
        r.text()
    );
    assert_eq!(a.get("/lost").status, 404);
    let st = a.status();
    assert!(st["last_error"].is_string(), "{st}");

    etcd.restart();
    for n in [&a, &b] {
        let up_again = poll(Duration::from_secs(20), || {
            n.status()["connected"] == json!(true)
        });
        assert!(up_again, "never reconnected; log:\n{}", n.gw.logs());
    }
    let r = a.put("/routes/after", route("/after", &up));
    assert_eq!(r.status, 201, "{}", r.text());
    wait_status(&b, "/after", 200, Duration::from_secs(10));
    // Also a write through B after the restart reaches A.
    let r = b.put("/routes/after-b", route("/after-b", &up));
    assert_eq!(r.status, 201, "{}", r.text());
    wait_status(&a, "/after-b", 200, Duration::from_secs(10));

    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().expect("client thread");
    }
    let (ok, bad) = (
        served.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
    eprintln!("during the etcd outage and restart: {ok} requests served, {bad} failed");
    assert!(ok > 0);
    assert_eq!(bad, 0, "proxied requests failed during the etcd outage");
}

#[test]
fn invalid_values_written_into_etcd_are_skipped_and_reported() {
    let etcd = Etcd::start();
    let up = Upstream::echo();
    // Present before the node starts: the start-up read skips it too.
    etcd.put(
        "/apisix/routes/bad-plugin",
        &json!({"uri": "/bad", "plugins": {"no-such-plugin": {}},
                "upstream": {"nodes": {up.node(): 1}}})
        .to_string(),
    );
    etcd.put("/apisix/routes/good", &route("/good", &up).to_string());
    let n = Node::start(&etcd);
    assert_eq!(n.get("/good").status, 200);
    assert_eq!(n.get("/bad").status, 404);
    assert!(
        n.gw.wait_for_log("/apisix/routes/bad-plugin", Duration::from_secs(5)),
        "{}",
        n.gw.logs()
    );

    // Written while the node runs: a field moongate does not know, a value that is not JSON,
    // and a route naming a missing upstream.
    etcd.put("/apisix/routes/typo", r#"{"urii": "/typo"}"#);
    etcd.put("/apisix/routes/not-json", "{this is not json");
    etcd.put(
        "/apisix/routes/dangling",
        &json!({"uri": "/dangling", "upstream_id": "nope"}).to_string(),
    );
    // A header injection in a plugin conf: refused by the same check as files and the API.
    etcd.put(
        "/apisix/routes/crlf",
        &json!({"uri": "/crlf", "plugins": {"response-headers": {"set": {"X-A": "v\r\nX-B: 1"}}},
                "upstream": {"nodes": {up.node(): 1}}})
        .to_string(),
    );
    etcd.put("/apisix/routes/later", &route("/later", &up).to_string());
    wait_status(&n, "/later", 200, Duration::from_secs(10));
    assert_eq!(n.get("/crlf").status, 404);
    assert_eq!(n.get("/good").status, 200);
    assert_eq!(n.get("/dangling").status, 404);

    let skipped = |n: &Node| -> Vec<String> {
        n.status()["skipped"]
            .as_array()
            .map(|l| {
                l.iter()
                    .map(|s| format!("{} {}", s["key"].as_str().unwrap_or(""), s["error"]))
                    .collect()
            })
            .unwrap_or_default()
    };
    let all_reported = poll(Duration::from_secs(10), || skipped(&n).len() == 5);
    let list = skipped(&n);
    assert!(all_reported, "{list:?}\n{}", n.gw.logs());
    let find = |key: &str| list.iter().find(|s| s.starts_with(key)).cloned();
    assert!(
        find("/apisix/routes/bad-plugin ").is_some_and(|s| s.contains("no-such-plugin")),
        "{list:?}"
    );
    assert!(
        find("/apisix/routes/typo ").is_some_and(|s| s.contains("urii")),
        "{list:?}"
    );
    assert!(
        find("/apisix/routes/not-json ").is_some_and(|s| s.contains("not JSON")),
        "{list:?}"
    );
    assert!(
        find("/apisix/routes/dangling ").is_some_and(|s| s.contains("nope")),
        "{list:?}"
    );
    assert!(
        find("/apisix/routes/crlf ")
            .is_some_and(|s| s.contains("\\\"set.X-A\\\" must not hold CR, LF or NUL")),
        "{list:?}"
    );
    for key in [
        "/apisix/routes/typo",
        "/apisix/routes/not-json",
        "/apisix/routes/dangling",
    ] {
        assert!(
            n.gw.logs().contains(key),
            "no log line names {key}:\n{}",
            n.gw.logs()
        );
    }

    // Fixing the data heals the node: the upstream appears, the typo is corrected.
    etcd.put(
        "/apisix/upstreams/nope",
        &json!({"nodes": {up.node(): 1}, "type": "roundrobin"}).to_string(),
    );
    etcd.put("/apisix/routes/typo", &route("/typo", &up).to_string());
    wait_status(&n, "/dangling", 200, Duration::from_secs(10));
    wait_status(&n, "/typo", 200, Duration::from_secs(10));
    let healed = poll(Duration::from_secs(10), || skipped(&n).len() == 3);
    assert!(healed, "{:?}", skipped(&n));
}

#[test]
fn a_node_started_after_many_writes_sees_them_all() {
    let etcd = Etcd::start();
    let up = Upstream::echo();
    let a = Node::start(&etcd);
    let r = a.put(
        "/upstreams/u",
        json!({"type": "roundrobin", "nodes": {up.node(): 1}}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    for i in 0..60 {
        let r = a.put(
            &format!("/routes/r{i}"),
            json!({"uri": format!("/r{i}"), "upstream_id": "u"}),
        );
        assert_eq!(r.status, 201, "{}", r.text());
    }
    for i in 0..10 {
        let r = a.call("DELETE", &format!("/routes/r{i}"), None);
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // Compaction of everything so far: the late node reads the current state, not history.
    let rev = a.status()["revision"].as_i64().expect("revision");
    etcd.call("/v3/kv/compaction", json!({"revision": rev.to_string()}));

    let b = Node::start(&etcd);
    let r = b.call("GET", "/routes", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["total"], 50, "{}", r.text());
    for i in 0..60 {
        let want = if i < 10 { 404 } else { 200 };
        assert_eq!(b.get(&format!("/r{i}")).status, want, "/r{i}");
    }
    // And it keeps watching.
    let r = a.put("/routes/r0", json!({"uri": "/r0", "upstream_id": "u"}));
    assert_eq!(r.status, 201, "{}", r.text());
    wait_status(&b, "/r0", 200, Duration::from_secs(10));
}

#[test]
fn a_node_without_a_reachable_etcd_does_not_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:0\nworkers: 1\nconfig_provider: etcd\netcd:\n  endpoints: [\"http://127.0.0.1:{}\"]\n  timeout: 1\n",
            closed_port()
        ),
    )
    .expect("write config");
    let out = Command::new(env!("CARGO_BIN_EXE_moongate"))
        .args(["run", "-c"])
        .arg(&config)
        .stdin(Stdio::null())
        .output()
        .expect("run moongate");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{log}");
    assert!(
        log.contains("moongate does not start without its etcd data"),
        "{log}"
    );
}

#[test]
fn consumers_groups_and_credentials_in_apisix_key_layout() {
    let etcd = Etcd::start();
    let up = Upstream::echo();
    let plugins = tempfile::tempdir().expect("plugins dir");
    std::fs::write(
        plugins.path().join("token-auth.lua"),
        common::lua_plugins::TOKEN_AUTH,
    )
    .expect("write plugin");
    // Written as APISIX's tooling writes them: a group, a consumer naming it, a credential
    // under the consumer's key.
    etcd.put(
        "/apisix/consumer_groups/gold",
        &json!({"plugins": {"response-headers": {"set": {"X-Group": "gold"}}}}).to_string(),
    );
    etcd.put(
        "/apisix/consumers/jack",
        &json!({"username": "jack", "group_id": "gold"}).to_string(),
    );
    etcd.put(
        "/apisix/consumers/jack/credentials/k1",
        &json!({"id": "k1", "plugins": {"token-auth": {"token": "jack-k1"}}}).to_string(),
    );
    let yaml = format!(
        "{}plugin_dirs:\n  - \"{}\"\n",
        node_yaml(&etcd),
        plugins.path().display()
    );
    let gw = Gateway::start(&yaml);
    let admin = gw.admin_addr().to_string();
    let call = |method: &str, path: &str, body: Option<Value>| {
        admin_request(
            &admin,
            KEY,
            method,
            path,
            body.map(|b| b.to_string()).as_deref(),
        )
    };
    let r = call(
        "PUT",
        "/routes/auth",
        Some(json!({"uri": "/auth", "plugins": {"token-auth": {}},
                    "upstream": {"nodes": {up.node(): 1}}})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let send = |token: &str| Req::get(&gw.url("/auth")).header("X-Token", token).send();
    let r = send("jack-k1");
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.logs());
    assert_eq!(r.json()["headers"]["x-credential-identifier"], "k1");
    assert_eq!(r.header("x-group").as_deref(), Some("gold"));

    // A credential written through the Admin API lands under the consumer's key.
    let r = call(
        "PUT",
        "/consumers/jack/credentials/k2",
        Some(json!({"plugins": {"token-auth": {"token": "jack-k2"}}})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let stored: Value = serde_json::from_str(
        &etcd
            .get("/apisix/consumers/jack/credentials/k2")
            .expect("stored credential"),
    )
    .expect("JSON value");
    assert_eq!(stored["id"], "k2");
    assert_eq!(send("jack-k2").status, 200);
    let r = call("GET", "/consumers/jack/credentials", None);
    assert_eq!(r.json()["total"], 2, "{}", r.text());

    // Deleting the consumer deletes its credentials in etcd too.
    let r = call("DELETE", "/consumers/jack", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(etcd.get("/apisix/consumers/jack/credentials/k1"), None);
    assert_eq!(etcd.get("/apisix/consumers/jack/credentials/k2"), None);
    assert_eq!(send("jack-k1").status, 401);
}

/// A plugin that puts its metadata's `greeting` into `X-Greeting` (`none` without metadata).
const GREETER: &str = r#"
local core = require("apisix.core")
local plugin = require("apisix.plugin")
local _M = {
    version = 0.1, priority = 12, name = "greeter", schema = { type = "object" },
    metadata_schema = {
        type = "object",
        properties = { greeting = { type = "string", default = "hello" } },
    },
}
function _M.header_filter(conf, ctx)
    local m = plugin.plugin_metadata("greeter")
    core.response.set_header("X-Greeting", m and m.value.greeting or "none")
end
return _M
"#;

#[test]
fn plugin_metadata_in_apisix_key_layout() {
    let etcd = Etcd::start();
    let up = Upstream::echo();
    let plugins = tempfile::tempdir().expect("plugins dir");
    std::fs::write(plugins.path().join("greeter.lua"), GREETER).expect("write plugin");
    // Written as APISIX's tooling writes it: the key names the plugin.
    etcd.put(
        "/apisix/plugin_metadata/greeter",
        &json!({"greeting": "from etcd"}).to_string(),
    );
    let yaml = format!(
        "{}plugin_dirs:\n  - \"{}\"\n",
        node_yaml(&etcd),
        plugins.path().display()
    );
    let start = || {
        let gw = Gateway::start(&yaml);
        let addr = gw.admin_addr();
        Node { gw, admin: addr }
    };
    let a = start();
    let b = start();
    let r = a.put(
        "/routes/g",
        json!({"uri": "/g", "plugins": {"greeter": {}}, "upstream": {"nodes": {up.node(): 1}}}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    wait_status(&b, "/g", 200, Duration::from_secs(10));
    assert_eq!(
        b.get("/g").header("x-greeting").as_deref(),
        Some("from etcd")
    );

    // Through node a's Admin API: stored under APISIX's key, seen by node b.
    let r = a.put("/plugin_metadata/greeter", json!({}));
    assert_eq!(r.status, 200, "{}", r.text());
    let stored: Value =
        serde_json::from_str(&etcd.get("/apisix/plugin_metadata/greeter").expect("stored"))
            .expect("JSON");
    assert_eq!(stored, json!({"id": "greeter"}));
    assert!(
        poll(Duration::from_secs(10), || {
            b.get("/g").header("x-greeting").as_deref() == Some("hello")
        }),
        "node b did not see the metadata change; log:\n{}",
        b.gw.logs()
    );
    let r = b.call("DELETE", "/plugin_metadata/greeter", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(poll(Duration::from_secs(10), || {
        a.get("/g").header("x-greeting").as_deref() == Some("none")
    }));
}

/// `/status/ready` answers 503 with the reason while etcd is down and 200 once the watch is
/// back; `/status` stays 200 throughout. APISIX's `apisix_etcd_reachable` follows the same
/// state, and `apisix_etcd_modify_indexes` gives each kind's newest modification.
#[test]
fn readiness_and_etcd_metrics_follow_the_etcd_watch() {
    let mut etcd = Etcd::start();
    let up = Upstream::echo();
    etcd.put("/apisix/routes/1", &route("/m", &up).to_string());
    etcd.put(
        "/apisix/upstreams/u1",
        &json!({"nodes": {up.node(): 1}}).to_string(),
    );
    let mod_rev = |key: &str| {
        let v = etcd.call("/v3/kv/range", json!({"key": B64.encode(key)}));
        v["kvs"][0]["mod_revision"]
            .as_str()
            .and_then(|r| r.parse::<f64>().ok())
            .expect("mod_revision")
    };
    let (route_rev, upstream_rev) = (mod_rev("/apisix/routes/1"), mod_rev("/apisix/upstreams/u1"));
    let gw = Gateway::start(&format!(
        "{}status: {{ip: 127.0.0.1, port: 0}}
plugin_attr:
  prometheus:
    export_addr: {{ip: 127.0.0.1, port: 0}}
",
        node_yaml(&etcd)
    ));
    let addr = common::observability::status_addr(&gw);
    let metrics = common::observability::metrics_url(&gw);
    let gauge = |name: &str, labels: &[(&str, &str)]| {
        let (_, samples, _) = common::observability::scrape(&metrics, None);
        common::observability::value(&samples, name, labels)
    };
    let reachable = |want: f64| {
        poll(Duration::from_secs(30), || {
            gauge("apisix_etcd_reachable", &[]) == want
        })
    };
    let ready = format!("http://{addr}/status/ready");
    // A reconnect publishes a generation that the workers take up a moment later, so each
    // state is polled for as a whole answer, never read once after another poll.
    let answers = |status: u16, error: &str| {
        poll(Duration::from_secs(30), || {
            let r = get(&ready);
            let body = r.json();
            r.status == status
                && match status {
                    200 => body == json!({"status": "ok"}),
                    _ => {
                        body["status"] == "error"
                            && body["error"].as_str().is_some_and(|e| e.starts_with(error))
                    }
                }
        })
    };
    assert!(answers(200, ""), "not ready; log:\n{}", gw.logs());
    assert!(reachable(1.0), "{}", gw.logs());
    let index = |key: &str| gauge("apisix_etcd_modify_indexes", &[("key", key)]);
    assert_eq!(index("routes"), route_rev);
    assert_eq!(index("upstreams"), upstream_rev);
    assert_eq!(index("services"), 0.0);
    assert_eq!(index("max_modify_index"), route_rev.max(upstream_rev));
    assert!(index("x_etcd_index") >= route_rev.max(upstream_rev));

    etcd.stop();
    assert!(
        answers(503, "etcd is not connected: "),
        "not 503 with the etcd reason while etcd is down: {}; log:\n{}",
        get(&ready).text(),
        gw.logs()
    );
    assert!(reachable(0.0), "{}", gw.logs());
    assert_eq!(get(&format!("http://{addr}/status")).status, 200);

    etcd.restart();
    assert!(
        answers(200, ""),
        "not ready after etcd came back; log:\n{}",
        gw.logs()
    );
    assert!(reachable(1.0), "{}", gw.logs());
}

/// `openssl enc` with APISIX's key encryption (AES-128-CBC, the keyring entry as key and IV,
/// base64 on one line); `decrypt` reverses it.
fn apisix_cipher(keyring_entry: &str, input: &str, decrypt: bool) -> String {
    use std::io::Write;
    let hex: String = keyring_entry.bytes().map(|b| format!("{b:02x}")).collect();
    let mut args = vec![
        "enc",
        "-aes-128-cbc",
        "-base64",
        "-A",
        "-K",
        &hex,
        "-iv",
        &hex,
    ];
    if decrypt {
        args.push("-d");
    }
    let mut child = Command::new("openssl")
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run openssl enc");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write to openssl");
    let out = child.wait_with_output().expect("openssl enc");
    assert!(out.status.success(), "openssl enc failed");
    String::from_utf8(out.stdout).expect("text")
}

/// `ssls` under `/apisix/ssls/ID`: an entry APISIX wrote (its key encrypted with the keyring)
/// serves; one written through the Admin API is stored encrypted and serves on the other node.
#[test]
fn ssls_in_apisix_key_layout_with_encrypted_keys() {
    use common::tls::*;
    const KEYRING: &str = "qeddd145sfvddff3";
    let etcd = Etcd::start();
    let pki = Pki::new("etcd CA");
    let a = pki.server(&["a.test"], "from-apisix");
    etcd.put(
        "/apisix/ssls/1",
        &json!({"id": "1", "snis": ["a.test"], "cert": a.cert,
            "key": apisix_cipher(KEYRING, &a.key, false), "create_time": 1, "update_time": 1})
        .to_string(),
    );
    let yaml = format!(
        "{}ssl:\n  listen: [{{ip: 127.0.0.1, port: 0}}]\ndata_encryption:\n  keyring: [{KEYRING}]\n",
        node_yaml(&etcd)
    );
    let start = || {
        let gw = Gateway::start(&yaml);
        let addr = gw.admin_addr();
        Node { gw, admin: addr }
    };
    let n1 = start();
    let n2 = start();
    let ca = pki.ca_pem.as_str();
    let conn = tls_connect(https_addrs(&n1.gw)[0], &ClientOpts::new(ca, "a.test"))
        .unwrap_or_else(|e| panic!("{e}\n{}", n1.gw.logs()));
    assert_eq!(peer_cn(&conn), "from-apisix");

    let b = pki.server(&["b.test"], "from-admin");
    let r = n1.put(
        "/ssls/2",
        json!({"snis": ["b.test"], "cert": b.cert, "key": b.key}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(r.json()["value"].get("key").is_none());
    let stored: Value =
        serde_json::from_str(&etcd.get("/apisix/ssls/2").expect("stored")).expect("JSON");
    let key = stored["key"].as_str().expect("key stored");
    assert!(!key.starts_with("---"), "stored in clear: {key}");
    assert_eq!(apisix_cipher(KEYRING, key, true), b.key);
    let n2_addr = https_addrs(&n2.gw)[0];
    assert!(
        poll(Duration::from_secs(10), || {
            tls_connect(n2_addr, &ClientOpts::new(ca, "b.test"))
                .is_ok_and(|c| peer_cn(&c) == "from-admin")
        }),
        "node 2 did not serve the new entry; log:\n{}",
        n2.gw.logs()
    );
    let got = n2.call("GET", "/ssls/1", None).json();
    assert_eq!(got["value"]["cert"], a.cert.as_str());
    assert!(got["value"].get("key").is_none(), "{got}");
}
