//! TLS termination against real peers: a rustls client written here, `openssl s_client` for
//! raw ALPN/SNI/alert checks and `curl` for HTTP/2 over TLS. Certificates are made at test time
//! (rcgen; RSA keys by `openssl genpkey`).

mod common;

use std::time::{Duration, Instant};

use common::tls::*;
use common::*;

/// A Lua plugin answering with the TLS variables APISIX plugins read.
const TLS_VARS: &str = r#"
local core = require("apisix.core")
local _M = { version = 0.1, priority = 0, name = "tls-vars", schema = { type = "object" } }
function _M.access(conf, ctx)
    local v = ctx.var
    return 200, {
        scheme = v.scheme, https = v.https, sni = v.ssl_server_name,
        protocol = v.ssl_protocol, reused = v.ssl_session_reused,
        verify = v.ssl_client_verify, s_dn = v.ssl_client_s_dn, i_dn = v.ssl_client_i_dn,
        serial = v.ssl_client_serial, v_end = v.ssl_client_v_end,
    }
end
return _M
"#;

/// One `ssls` item in YAML.
fn ssl_item(id: &str, snis: &[&str], pair: &Pair, extra: &str) -> String {
    let snis: Vec<String> = snis.iter().map(|s| format!("\"{s}\"")).collect();
    format!(
        "  - id: {id}\n    snis: [{}]\n    cert: |\n{}    key: |\n{}{extra}",
        snis.join(", "),
        yaml_block(&pair.cert, 6),
        yaml_block(&pair.key, 6)
    )
}

struct Setup {
    pki: Pki,
    a: Pair,
    rsa: Pair,
    ecdsa: Pair,
    client_ca: Pki,
    up: Upstream,
}

impl Setup {
    fn new() -> Setup {
        let pki = Pki::new("moongate test CA");
        let rsa_key = rsa_key();
        Setup {
            a: pki.server(&["a.test"], "a-1"),
            rsa: pki.server_with_key(&["pair.test"], "pair-rsa", &rsa_key),
            ecdsa: pki.server(&["pair.test"], "pair-ecdsa"),
            client_ca: Pki::new("moongate client CA"),
            up: Upstream::echo(),
            pki,
        }
    }

    /// The config: two TLS listeners (HTTP/2 on the first only), `a` as given, and `fallback`.
    fn yaml(&self, a: &Pair, fallback: Option<&str>) -> String {
        let p = &self.pki;
        let mut ssls = String::new();
        ssls += &ssl_item("a", &["a.test"], a, "");
        ssls += &ssl_item(
            "wild",
            &["*.wild.test"],
            &p.server(&["*.wild.test"], "wild"),
            "",
        );
        ssls += &ssl_item(
            "exact",
            &["X.Wild.Test."],
            &p.server(&["x.wild.test"], "exact"),
            "",
        );
        ssls += &ssl_item(
            "pair",
            &["pair.test"],
            &self.rsa,
            &format!(
                "    certs:\n      - |\n{}    keys:\n      - |\n{}",
                yaml_block(&self.ecdsa.cert, 8),
                yaml_block(&self.ecdsa.key, 8)
            ),
        );
        ssls += &ssl_item(
            "mtls",
            &["mtls.test"],
            &p.server(&["mtls.test"], "mtls"),
            &format!(
                "    client:\n      ca: |\n{}",
                yaml_block(&self.client_ca.ca_pem, 8)
            ),
        );
        ssls += &ssl_item("old", &["old.test"], &p.expired(&["old.test"], "old"), "");
        let fallback = fallback
            .map(|f| format!("  fallback_sni: {f}\n"))
            .unwrap_or_default();
        format!(
            "workers: 1\nplugin_dirs: [plugins]\nssl:\n  listen:\n    - {{ip: 127.0.0.1, port: 0}}\n    - {{ip: 127.0.0.1, port: 0, enable_http2: false}}\n{fallback}ssls:\n{ssls}routes:\n  - id: echo\n    uri: /echo\n    upstream:\n      nodes:\n        \"{}\": 1\n  - id: vars\n    uri: /vars\n    plugins:\n      tls-vars: {{}}\n",
            self.up.node()
        )
    }
}

fn start(yaml: &str) -> Gateway {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().to_path_buf();
    std::fs::create_dir_all(dir.join("plugins")).expect("plugins dir");
    std::fs::write(dir.join("plugins/tls-vars.lua"), TLS_VARS).expect("write plugin");
    // The temp dir lives as long as the test process.
    std::mem::forget(tmp);
    Gateway::start_in(&dir, yaml)
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[test]
fn sni_selection_mtls_alpn_and_certificate_swap() {
    let s = Setup::new();
    let gw = start(&s.yaml(&s.a, None));
    let addrs = https_addrs(&gw);
    assert_eq!(addrs.len(), 2, "{}", gw.logs());
    let (h2_addr, h1_addr) = (addrs[0], addrs[1]);
    let ca = s.pki.ca_pem.as_str();

    // Exact names, wildcards one label deep, exact before wildcard (names are normalised).
    for (name, cn) in [
        ("a.test", "a-1"),
        ("y.wild.test", "wild"),
        ("x.wild.test", "exact"),
    ] {
        let conn = tls_connect(h2_addr, &ClientOpts::new(ca, name))
            .unwrap_or_else(|e| panic!("{name}: {e}\n{}", gw.logs()));
        assert_eq!(peer_cn(&conn), cn, "{name}");
    }

    // No match, no SNI, no fallback_sni: unrecognized_name, one log line each.
    let e = tls_connect(h2_addr, &ClientOpts::new(ca, "deep.y.wild.test")).err();
    assert!(
        e.as_deref().is_some_and(|e| e.contains("UnrecognisedName")),
        "{e:?}"
    );
    let mut no_sni = ClientOpts::new(ca, "a.test");
    no_sni.send_sni = false;
    let e = tls_connect(h2_addr, &no_sni).err();
    assert!(
        e.as_deref().is_some_and(|e| e.contains("UnrecognisedName")),
        "{e:?}"
    );
    let out = s_client(h2_addr, &["-servername", "nope.test"]);
    assert!(out.contains("unrecognized name"), "{out}");
    assert!(gw.wait_for_log(
        "no ssls entry serves server name \"nope.test\"",
        Duration::from_secs(5)
    ));
    assert!(gw.logs().contains("server name (none sent)"));

    // HTTP/1.1 over TLS: the upstream is told https; Lua sees the TLS variables.
    let mut kept = tls_connect(h2_addr, &ClientOpts::new(ca, "a.test")).expect("connect a.test");
    let r = tls_get(&mut kept, "a.test", "/echo").expect("GET /echo");
    assert_eq!(r.status, 200, "{}", r.body);
    let echo = json(&r.body);
    assert_eq!(echo["headers"]["x-forwarded-proto"], "https");
    assert_eq!(
        echo["headers"]["x-forwarded-port"],
        h2_addr.port().to_string()
    );
    let cfg = client_config(&ClientOpts::new(ca, "a.test"));
    let mut c = tls_connect_with(h2_addr, cfg.clone(), "a.test").expect("connect");
    let v = json(&tls_get(&mut c, "a.test", "/vars").expect("GET /vars").body);
    assert_eq!(v["scheme"], "https");
    assert_eq!(v["https"], "on");
    assert_eq!(v["sni"], "a.test");
    assert_eq!(v["protocol"], "TLSv1.3");
    assert_eq!(v["reused"], ".");
    assert_eq!(v["verify"], "NONE");
    drop(c);
    // Session resumption: the same client config resumes.
    let mut c = tls_connect_with(h2_addr, cfg, "a.test").expect("reconnect");
    let v = json(&tls_get(&mut c, "a.test", "/vars").expect("GET /vars").body);
    assert_eq!(v["reused"], "r", "{v}");

    // ECDSA beside RSA: the client's signature algorithms choose.
    let out = s_client(h2_addr, &["-servername", "pair.test"]);
    assert!(out.contains("CN = pair-ecdsa"), "{out}");
    let out = s_client(
        h2_addr,
        &["-servername", "pair.test", "-sigalgs", "RSA-PSS+SHA256"],
    );
    assert!(out.contains("CN = pair-rsa"), "{out}");
    let out = s_client(
        h2_addr,
        &[
            "-servername",
            "pair.test",
            "-tls1_2",
            "-sigalgs",
            "RSA+SHA256",
        ],
    );
    assert!(
        out.contains("CN = pair-rsa") && out.contains("TLSv1.2"),
        "{out}"
    );

    // An expired certificate is served, with a warning.
    assert!(gw.logs().contains("ssls[5].cert: the certificate for"));
    assert!(gw.logs().contains("expired on"));

    // mTLS: a certificate from the client CA is required, and plugins see who it is.
    let good = s.client_ca.client("client-1");
    let mut opts = ClientOpts::new(ca, "mtls.test");
    assert!(tls_get_any(tls_connect(h2_addr, &opts)).is_err());
    let stranger = s.pki.client("stranger");
    opts.client_cert = Some(&stranger);
    assert!(tls_get_any(tls_connect(h2_addr, &opts)).is_err());
    opts.client_cert = Some(&good);
    let mut c = tls_connect(h2_addr, &opts).expect("mTLS connect");
    let v = json(
        &tls_get(&mut c, "mtls.test", "/vars")
            .expect("GET /vars")
            .body,
    );
    assert_eq!(v["verify"], "SUCCESS", "{v}");
    assert_eq!(v["s_dn"], "O=moongate tests,CN=client-1", "{v}");
    assert_eq!(v["i_dn"], "CN=moongate client CA", "{v}");
    assert!(v["serial"].as_str().is_some_and(|s| !s.is_empty()), "{v}");
    assert!(
        v["v_end"].as_str().is_some_and(|s| s.ends_with(" GMT")),
        "{v}"
    );

    // ALPN: h2 on the first listener (curl --http2), HTTP/1.1 only on the second.
    let out = s_client(h2_addr, &["-servername", "a.test", "-alpn", "h2,http/1.1"]);
    assert!(out.contains("ALPN protocol: h2"), "{out}");
    let out = s_client(h1_addr, &["-servername", "a.test", "-alpn", "h2,http/1.1"]);
    assert!(out.contains("ALPN protocol: http/1.1"), "{out}");
    let dir = tempfile::tempdir().expect("temp dir");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca).expect("write CA");
    for (addr, want) in [(h2_addr, "HTTP/2 200"), (h1_addr, "HTTP/1.1 200")] {
        let out = tool("curl")
            .args(["-s", "--http2", "-D", "-", "--max-time", "20", "--cacert"])
            .arg(&ca_file)
            .arg("--resolve")
            .arg(format!("a.test:{}:127.0.0.1", addr.port()))
            .arg(format!("https://a.test:{}/vars", addr.port()))
            .output()
            .expect("run curl");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.starts_with(want), "{want}: {text}");
        assert!(text.contains("\"scheme\":\"https\""), "{text}");
    }

    // The config file changes a.test's certificate and sets fallback_sni: the next handshake
    // gets the new certificate, with no restart, and the connection opened before keeps
    // serving.
    let a2 = s.pki.server(&["a.test"], "a-2");
    std::fs::write(gw.config_path(), s.yaml(&a2, Some("a.test"))).expect("rewrite config");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let conn = tls_connect(h2_addr, &ClientOpts::new(ca, "a.test")).expect("connect");
        if peer_cn(&conn) == "a-2" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was not served; log:\n{}",
            gw.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = tls_get(&mut kept, "a.test", "/echo").expect("old connection after the swap");
    assert_eq!(r.status, 200);
    // fallback_sni now serves clients without SNI and with unknown names.
    let conn = tls_connect(h2_addr, &no_sni).expect("fallback without SNI");
    assert_eq!(peer_cn(&conn), "a-2");
    let out = s_client(h2_addr, &["-servername", "nope.test"]);
    assert!(out.contains("CN = a-2"), "{out}");
}

/// Makes a request on a connection that may have been refused late (TLS 1.3 clients learn of
/// a refused client certificate only on their first read).
fn tls_get_any(conn: Result<TlsConn, String>) -> Result<TlsResp, String> {
    tls_get(&mut conn?, "mtls.test", "/vars")
}

#[test]
fn bad_certificates_are_refused_with_their_path() {
    let pki = Pki::new("ca");
    let good = pki.server(&["a.test"], "a");
    let other = pki.server(&["b.test"], "b");
    let garbage = Pair {
        cert:
            "-----BEGIN CERTIFICATE-----\nMIIBzzCCAXWgAwIBAgIUZm9vYmFy\n-----END CERTIFICATE-----\n"
                .to_string(),
        key: good.key.clone(),
    };
    let mismatched = Pair {
        cert: good.cert.clone(),
        key: other.key.clone(),
    };
    let not_pem = Pair {
        cert: "hello".to_string(),
        key: "world".to_string(),
    };
    let yaml = format!(
        "ssls:\n{}{}{}{}",
        ssl_item("1", &["a.test"], &garbage, ""),
        ssl_item("2", &["a.test"], &mismatched, ""),
        ssl_item("3", &["c.test"], &not_pem, ""),
        ssl_item("4", &["d.*.test"], &good, "    certs: [x]\n"),
    );
    let (code, out) = check(&yaml);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("ssls[0].cert: failed to parse cert"), "{out}");
    assert!(
        out.contains("ssls[1].key: the key does not match the certificate"),
        "{out}"
    );
    assert!(out.contains("ssls[2].cert: failed to parse cert"), "{out}");
    assert!(
        out.contains("ssls[3].keys: mismatched number of certs and keys"),
        "{out}"
    );
    assert!(out.contains("ssls[3].snis[0]: bad server name"), "{out}");
    // Two entries for one name.
    let yaml = format!(
        "ssls:\n{}{}",
        ssl_item("1", &["a.test"], &good, ""),
        ssl_item("2", &["A.test"], &good, ""),
    );
    let (code, out) = check(&yaml);
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("ssls[1].snis[0]: server name \"a.test\" is already served by ssl \"1\""),
        "{out}"
    );
}

#[test]
fn a_silent_client_is_dropped_after_the_handshake_timeout() {
    let gw = Gateway::start(
        "proxy:\n  client_header_timeout: 0.5\nssl:\n  listen: [{ip: 127.0.0.1, port: 0}]\n",
    );
    let addr = https_addrs(&gw)[0];
    let mut tcp = std::net::TcpStream::connect(addr).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut buf = [0u8; 16];
    let n = std::io::Read::read(&mut tcp, &mut buf).expect("closed, not timed out");
    assert_eq!(n, 0);
}

const ADMIN_KEY: &str = "tls-admin-key-0123456789";

fn admin(gw: &Gateway, method: &str, path: &str, body: Option<serde_json::Value>) -> Resp {
    let body = body.map(|b| b.to_string());
    admin_request(gw.admin_addr(), ADMIN_KEY, method, path, body.as_deref())
}

fn ssl_json(snis: &[&str], pair: &Pair) -> serde_json::Value {
    serde_json::json!({ "snis": snis, "cert": pair.cert, "key": pair.key })
}

/// `ssls` through the Admin API: a PUT serves the next handshake while a connection opened
/// before keeps serving; keys never come back; bad entries are refused with their field.
#[test]
fn ssls_through_the_admin_api() {
    let pki = Pki::new("admin CA");
    let up = Upstream::echo();
    let gw = Gateway::start(&format!(
        "workers: 1\nadmin:\n  listen: 127.0.0.1:0\n  key: {ADMIN_KEY}\ndata_encryption:\n  keyring: [qeddd145sfvddff3]\nssl:\n  listen: [{{ip: 127.0.0.1, port: 0}}]\nroutes:\n  - id: echo\n    uri: /echo\n    upstream:\n      nodes:\n        \"{}\": 1\n",
        up.node()
    ));
    let addr = https_addrs(&gw)[0];
    let ca = pki.ca_pem.as_str();
    let opts = ClientOpts::new(ca, "a.test");

    let a1 = pki.server(&["a.test"], "a-1");
    let r = admin(&gw, "PUT", "/ssls/1", Some(ssl_json(&["a.test"], &a1)));
    assert_eq!(r.status, 201, "{}", r.text());
    let v = r.json();
    assert_eq!(v["key"], "/apisix/ssls/1");
    assert_eq!(v["value"]["snis"], serde_json::json!(["a.test"]));
    assert_eq!(v["value"]["cert"], a1.cert.as_str());
    assert!(v["value"].get("key").is_none(), "{v}");
    assert!(v.get("warning").is_none(), "{v}");

    let mut kept = tls_connect(addr, &opts).unwrap_or_else(|e| panic!("{e}\n{}", gw.logs()));
    assert_eq!(peer_cn(&kept), "a-1");
    let first_serial = peer_serial(&kept);
    assert_eq!(
        tls_get(&mut kept, "a.test", "/echo").expect("GET").status,
        200
    );

    // A new certificate for the name: a 2xx means serving, so the next handshake has it.
    let a2 = pki.server(&["a.test", "b.test"], "a-2");
    let r = admin(&gw, "PUT", "/ssls/1", Some(ssl_json(&["a.test"], &a2)));
    assert_eq!(r.status, 200, "{}", r.text());
    let conn = tls_connect(addr, &opts).expect("handshake after the PUT");
    assert_eq!(peer_cn(&conn), "a-2");
    assert_ne!(peer_serial(&conn), first_serial);
    let r = tls_get(&mut kept, "a.test", "/echo").expect("old connection after the PUT");
    assert_eq!(r.status, 200, "{}", r.body);

    // Reads never show the keys (extra pairs' keys neither).
    let ecdsa = pki.server(&["a.test", "b.test"], "a-3");
    let mut with_pairs = ssl_json(&["a.test"], &a2);
    with_pairs["certs"] = serde_json::json!([ecdsa.cert]);
    with_pairs["keys"] = serde_json::json!([ecdsa.key]);
    let r = admin(&gw, "PUT", "/ssls/1", Some(with_pairs));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = admin(&gw, "GET", "/ssls/1", None).json();
    assert_eq!(v["value"]["id"], "1");
    assert!(
        v["value"].get("key").is_none() && v["value"].get("keys").is_none(),
        "{v}"
    );
    assert_eq!(v["value"]["certs"][0], ecdsa.cert.as_str());
    let list = admin(&gw, "GET", "/ssls", None).json();
    assert_eq!(list["total"], 1);
    let text = list.to_string();
    assert!(
        !text.contains("PRIVATE KEY") && !text.contains("\"key\":\"-"),
        "{text}"
    );

    // PATCH adds a name; the stored (encrypted) key still serves.
    let r = admin(
        &gw,
        "PATCH",
        "/ssls/1",
        Some(serde_json::json!({"snis": ["a.test", "b.test"]})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json()["value"].get("key").is_none());
    let conn = tls_connect(addr, &ClientOpts::new(ca, "b.test")).expect("b.test after PATCH");
    assert_eq!(peer_cn(&conn), "a-2");

    // Refusals name the field; nothing changes.
    let other = pki.server(&["c.test"], "c");
    let cases = [
        (
            serde_json::json!({"snis": ["c.test"], "cert": "garbage", "key": other.key}),
            "invalid configuration: cert: failed to parse cert",
        ),
        (
            serde_json::json!({"snis": ["c.test"], "cert": other.cert, "key": a1.key}),
            "invalid configuration: key: the key does not match the certificate's public key",
        ),
        (
            serde_json::json!({"snis": ["c.test"], "cert": other.cert, "key": other.key,
                "certs": [other.cert, a1.cert], "keys": [other.key, other.key]}),
            "invalid configuration: keys[1]: the key does not match",
        ),
        (
            serde_json::json!({"snis": ["c.test"], "cert": other.cert,
                "key": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"}),
            "invalid configuration: key: failed to parse key",
        ),
        (
            // With a keyring, a value that is not PEM is taken for an encrypted one (APISIX).
            serde_json::json!({"snis": ["c.test"], "cert": other.cert, "key": "not a key"}),
            "invalid configuration: key: failed to decrypt previous encrypted key",
        ),
        (
            serde_json::json!({"snis": ["b.test"], "cert": other.cert, "key": other.key}),
            "server name \"b.test\" is already served by ssl \"1\"",
        ),
    ];
    for (body, want) in cases {
        let r = admin(&gw, "PUT", "/ssls/2", Some(body));
        assert_eq!(r.status, 400, "{want}: {}", r.text());
        let msg = r.json()["error_msg"].as_str().unwrap_or("").to_string();
        assert!(msg.contains(want), "want {want:?}, got {msg:?}");
    }
    assert_eq!(admin(&gw, "GET", "/ssls/2", None).status, 404);

    // An expired certificate is stored and served, with a warning in the answer and the log.
    let old = pki.expired(&["old.test"], "old");
    let r = admin(&gw, "POST", "/ssls", Some(ssl_json(&["old.test"], &old)));
    assert_eq!(r.status, 201, "{}", r.text());
    let v = r.json();
    let warning = v["warning"].as_str().unwrap_or("").to_string();
    assert!(warning.contains("expired on"), "{v}");
    let id = v["value"]["id"].as_str().expect("generated id").to_string();
    assert_eq!(id.len(), 20, "{id}");
    // The warning line is written as the answer goes out: wait for it rather than read once.
    assert!(
        gw.wait_for_log("the certificate for", Duration::from_secs(5)),
        "{}",
        gw.logs()
    );
    let out = s_client(addr, &["-servername", "old.test"]);
    assert!(out.contains("CN = old"), "{out}");

    // A client certificate (for upstreams) needs no names and is not served.
    let client = pki.client("to-upstream");
    let r = admin(
        &gw,
        "PUT",
        "/ssls/c1",
        Some(serde_json::json!({"type": "client", "cert": client.cert, "key": client.key})),
    );
    assert_eq!(r.status, 201, "{}", r.text());

    // Deleting the entry: the name is unknown again.
    let r = admin(&gw, "DELETE", "/ssls/1", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["deleted"], "1");
    let e = tls_connect(addr, &opts).err();
    assert!(
        e.as_deref().is_some_and(|e| e.contains("UnrecognisedName")),
        "{e:?}"
    );
    let r = tls_get(&mut kept, "a.test", "/echo").expect("old connection after the DELETE");
    assert_eq!(r.status, 200);
}

/// A plugin of our own that reads the node config as APISIX plugins do, and redirects plain
/// requests to the TLS listener it finds there (what APISIX's `redirect` does with
/// `http_to_https`).
const NODE_CONF: &str = r#"
local core = require("apisix.core")
local plugin = require("apisix.plugin")
local _M = { version = 0.1, priority = 0, name = "node-conf", schema = { type = "object" } }
function _M.access(conf, ctx)
    local lc = core.config.local_conf()
    local ssl = lc.apisix.ssl
    local port = ssl.listen[1].port
    if ctx.var.scheme ~= "https" then
        core.response.set_header("Location",
            "https://" .. ctx.var.host .. ":" .. port .. ctx.var.request_uri)
        return 301
    end
    return 200, {
        ssl_enable = ssl.enable, ssl_port = port, server_port = tonumber(ctx.var.server_port),
        node_port = lc.apisix.node_listen[1].port, attr = plugin.plugin_attr("node-conf"),
    }
end
return _M
"#;

#[test]
fn lua_plugins_see_the_node_config_with_bound_ports() {
    let pki = Pki::new("conf CA");
    let a = pki.server(&["a.test"], "a");
    let gw = Gateway::start_with_plugins(
        &[("node-conf", NODE_CONF)],
        &format!(
            "workers: 1\nplugin_attr:\n  node-conf: {{answer: 42}}\nssl:\n  listen: [{{ip: 127.0.0.1, port: 0}}]\nssls:\n{}routes:\n  - id: c\n    uri: /conf\n    plugins:\n      node-conf: {{}}\n",
            ssl_item("a", &["a.test"], &a, "")
        ),
    );
    let tls_port = https_addrs(&gw)[0].port();
    let r = Req::get(&gw.url("/conf?x=1"))
        .header("host", "a.test")
        .send();
    assert_eq!(r.status, 301, "{}", r.text());
    let location = r.header("location").expect("Location");
    assert_eq!(location, format!("https://a.test:{tls_port}/conf?x=1"));

    // Following it reaches the TLS listener, where the plugin sees the same table.
    let mut conn = tls_connect(
        ([127, 0, 0, 1], tls_port).into(),
        &ClientOpts::new(&pki.ca_pem, "a.test"),
    )
    .expect("connect to the TLS port");
    let r = tls_get(&mut conn, "a.test", "/conf?x=1").expect("GET over TLS");
    assert_eq!(r.status, 200, "{}", r.body);
    let v = json(&r.body);
    assert_eq!(v["ssl_enable"], true);
    assert_eq!(v["ssl_port"], tls_port);
    assert_eq!(v["server_port"], tls_port);
    assert_eq!(v["node_port"], gw.addr().port());
    assert_eq!(v["attr"]["answer"], 42);
}

/// A TLS keep-alive connection idle long enough to be parked (the gateway's `PARK_AFTER`,
/// 1 s, with margin) keeps its TLS session: the next requests on it are served, see the same
/// TLS variables and are forwarded as https; a client that closes while parked is let go.
#[test]
fn idle_tls_connections_are_served_again_with_their_session() {
    const PARKED: Duration = Duration::from_millis(1600);
    let s = Setup::new();
    let gw = start(&s.yaml(&s.a, None));
    let addrs = https_addrs(&gw);
    let ca = s.pki.ca_pem.as_str();
    for &addr in &addrs {
        let mut c = tls_connect(addr, &ClientOpts::new(ca, "a.test")).expect("connect");
        let first = json(&tls_get(&mut c, "a.test", "/vars").expect("GET /vars").body);
        assert_eq!(first["sni"], "a.test", "{first}");
        for round in 0..2 {
            std::thread::sleep(PARKED);
            let v = json(&tls_get(&mut c, "a.test", "/vars").expect("GET /vars").body);
            assert_eq!(v, first, "round {round}");
            std::thread::sleep(PARKED);
            let r = tls_get(&mut c, "a.test", "/echo").expect("GET /echo");
            assert_eq!(r.status, 200, "{}", r.body);
            assert_eq!(json(&r.body)["headers"]["x-forwarded-proto"], "https");
        }
        std::thread::sleep(PARKED);
        drop(c);
    }
    // The gateway still serves new connections after those closed while parked.
    let mut c = tls_connect(addrs[0], &ClientOpts::new(ca, "a.test")).expect("connect");
    assert_eq!(
        tls_get(&mut c, "a.test", "/echo")
            .expect("GET /echo")
            .status,
        200
    );
}
