//! `tcpsock:sslhandshake` and `resty.http` over https, in a plugin served by the real gateway
//! binary, against TLS servers this test runs on loopback with certificates from a test CA that
//! the gateway trusts through `ssl.ssl_trusted_certificate`.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::tls::{Pair, Pki};
use common::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// What a TLS server saw.
#[derive(Default)]
struct Seen {
    /// TCP connections accepted.
    accepted: AtomicU64,
    /// Completed handshakes, and of them the resumed ones.
    handshakes: AtomicU64,
    resumed: AtomicU64,
    /// The SNI of each completed handshake ("-" for none).
    snis: Mutex<Vec<String>>,
}

/// Lines are answered `ok LINE`; a request head starting with `GET ` gets an HTTP response
/// whose body says the path and the SNI (keep-alive).
fn serve(mut tls: rustls::StreamOwned<rustls::ServerConnection, TcpStream>, seen: &Seen) {
    // Complete the handshake before anything is read, to record it.
    while tls.conn.is_handshaking() {
        if tls.conn.complete_io(&mut tls.sock).is_err() {
            return;
        }
    }
    let sni = tls.conn.server_name().unwrap_or("-").to_string();
    seen.handshakes.fetch_add(1, Ordering::SeqCst);
    if tls.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
        seen.resumed.fetch_add(1, Ordering::SeqCst);
    }
    seen.snis.lock().unwrap().push(sni.clone());
    let mut r = BufReader::new(tls);
    let mut line = String::new();
    loop {
        line.clear();
        if !matches!(r.read_line(&mut line), Ok(n) if n > 0) {
            return;
        }
        let out = if let Some(rest) = line.strip_prefix("GET ") {
            let path = rest.split(' ').next().unwrap_or("").to_string();
            let mut host = String::new();
            loop {
                let mut h = String::new();
                if !matches!(r.read_line(&mut h), Ok(n) if n > 0) {
                    return;
                }
                if h == "\r\n" {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("host:") {
                    host = v.trim().to_string();
                }
            }
            let body = format!("path={path} sni={sni} host={host}");
            format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
        } else {
            format!("ok {line}")
        };
        let w = r.get_mut();
        if w.write_all(out.as_bytes()).and_then(|_| w.flush()).is_err() {
            return;
        }
    }
}

fn tls_server(pair: &Pair) -> (u16, Arc<Seen>) {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pair.cert.as_bytes())
        .map(|c| c.expect("cert PEM"))
        .collect();
    let key = PrivateKeyDer::from_pem_slice(pair.key.as_bytes()).expect("key PEM");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("server cert");
    let config = Arc::new(config);
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    let seen = Arc::new(Seen::default());
    let s2 = seen.clone();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            s2.accepted.fetch_add(1, Ordering::SeqCst);
            let Ok(conn) = rustls::ServerConnection::new(config.clone()) else {
                continue;
            };
            let s3 = s2.clone();
            std::thread::spawn(move || serve(rustls::StreamOwned::new(conn, c), &s3));
        }
    });
    (port, seen)
}

/// A self-signed certificate for `name`.
fn self_signed(name: &str) -> Pair {
    let c = rcgen::generate_simple_self_signed(vec![name.to_string()]).expect("cert");
    Pair {
        cert: c.cert.pem(),
        key: c.key_pair.serialize_pem(),
    }
}

const PROBE: &str = r##"
local _M = { version = 0.1, priority = 100, name = "tls-probe", schema = { type = "object" } }
local ops = {}

local function s(...)
    local t = {}
    for i = 1, select("#", ...) do t[i] = tostring((select(i, ...))) end
    return table.concat(t, "|")
end

local function connect(port)
    local sock = ngx.socket.tcp()
    sock:settimeout(5000)
    assert(sock:connect("127.0.0.1", port))
    return sock
end

-- A verified handshake, a line over TLS, the connection kept alive and taken again.
function ops.verified(conf)
    local r = {}
    local sock = connect(conf.ports.good)
    local sess, err = sock:sslhandshake(nil, "a.test", true)
    r.sess_type = type(sess)
    r.sess_text = tostring(sess):match("^ssl session") or tostring(err)
    assert(sock:send("hello\n"))
    r.line = s(sock:receive())
    r.again = s(sock:sslhandshake(false, "a.test", true))
    r.keepalive = s(sock:setkeepalive())
    local sock2 = connect(conf.ports.good)
    r.reused = s(sock2:getreusedtimes())
    r.again2 = s(sock2:sslhandshake(false, "a.test", true))
    assert(sock2:send("again\n"))
    r.line2 = s(sock2:receive())
    sock2:close()
    return 200, r
end

-- A second fresh connection to the same name resumes the first one's session.
function ops.resume(conf)
    local r = {}
    for i = 1, 2 do
        local sock = connect(conf.ports.good)
        local sess, err = sock:sslhandshake(nil, "a.test", true)
        assert(sess, err)
        assert(sock:send("resume " .. i .. "\n"))
        r[i] = s(sock:receive())
        sock:close()
    end
    return 200, r
end

function ops.failures(conf)
    local r = {}
    local sock = connect(conf.ports.good)
    r.mismatch = s(sock:sslhandshake(false, "b.test", true))
    r.after = s(sock:send("x\n"))
    r.self_signed = s(connect(conf.ports.self):sslhandshake(false, "a.test", true))
    r.expired = s(connect(conf.ports.expired):sslhandshake(false, "a.test", true))
    r.unknown_ca = s(connect(conf.ports.other):sslhandshake(false, "a.test", true))
    r.bad_name = s(pcall(sock.sslhandshake, connect(conf.ports.good), false, 42))
    -- Not verified: OpenResty's default.
    local plain = connect(conf.ports.self)
    r.unverified = s(plain:sslhandshake(false, "a.test"))
    assert(plain:send("unverified\n"))
    r.unverified_line = s(plain:receive())
    -- Verified without a name: the chain is checked, no SNI is sent.
    local noname = connect(conf.ports.good)
    r.noname = s(noname:sslhandshake(false, nil, true))
    assert(noname:send("noname\n"))
    r.noname_line = s(noname:receive())
    r.noname_other_ca = s(connect(conf.ports.other):sslhandshake(false, nil, true))
    return 200, r
end

function ops.http(conf)
    local http = require("resty.http")
    local r = {}
    local base = "https://127.0.0.1:" .. conf.ports.good
    for i = 1, 2 do
        local httpc = http.new()
        local res, err = httpc:request_uri(base .. "/p" .. i, { ssl_server_name = "a.test" })
        r["body" .. i] = res and res.body or err
        r["status" .. i] = res and res.status
    end
    -- lua-resty-http's defaults: verified, against the host's name (an address here, which
    -- the certificate names; no SNI goes out for an address).
    local res, err = http.new():request_uri(base .. "/x")
    r.default_verify = res and res.body or err
    res, err = http.new():request_uri("https://127.0.0.1:" .. conf.ports.other .. "/z")
    r.default_refused = res and res.body or err
    res, err = http.new():request_uri("https://127.0.0.1:" .. conf.ports.self .. "/y",
        { ssl_verify = false })
    r.unverified = res and res.body or err
    return 200, r
end

function _M.access(conf, ctx)
    return ops[ngx.var.arg_op](conf)
end

return _M
"##;

/// A route to `port` over https that verifies the upstream's certificate.
fn https_route(id: &str, port: u16) -> String {
    format!("  - id: {id}\n    uri: /{id}\n    upstream:\n      scheme: https\n      tls: {{verify: true}}\n      nodes:\n        \"127.0.0.1:{port}\": 1\n")
}

#[test]
fn sslhandshake_and_https() {
    let pki = Pki::new("moongate test CA");
    let other = Pki::new("another CA");
    let (good, good_seen) = tls_server(&pki.server(&["a.test", "127.0.0.1"], "a.test"));
    let (selfp, _) = tls_server(&self_signed("a.test"));
    let (expired, _) = tls_server(&pki.expired(&["a.test"], "a.test"));
    let (otherp, _) = tls_server(&other.server(&["a.test"], "a.test"));

    let up = Upstream::echo();
    let dir = tempfile::tempdir().expect("temp dir");
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).expect("plugins dir");
    std::fs::write(plugins.join("tls-probe.lua"), PROBE).expect("write plugin");
    std::fs::write(dir.path().join("ca.pem"), &pki.ca_pem).expect("write CA");
    let yaml = format!(
        "plugin_dirs:\n  - plugins\nworkers: 1\nssl:\n  enable: false\n  ssl_trusted_certificate: ca.pem\nroutes:\n  - id: t\n    uri: /t\n    plugins:\n      tls-probe:\n        ports: {{good: {good}, self: {selfp}, expired: {expired}, other: {otherp}}}\n    upstream:\n      nodes:\n        \"{}\": 1\n{}{}",
        up.node(),
        https_route("up", good),
        https_route("up-other", otherp),
    );
    let gw = Gateway::start_in(dir.path(), &yaml);
    let call = |op: &str| {
        let r = get(&gw.url(&format!("/t?op={op}")));
        assert_eq!(r.status, 200, "{op}: {}\n{}", r.text(), gw.logs());
        r.json()
    };

    let j = call("verified");
    assert_eq!(j["sess_type"], "userdata", "{j}");
    assert_eq!(j["sess_text"], "ssl session", "{j}");
    assert_eq!(j["line"], "ok hello", "{j}");
    assert_eq!(j["again"], "true", "{j}");
    assert_eq!(j["keepalive"], "1", "{j}");
    assert_eq!(j["reused"], "1", "{j}");
    assert_eq!(j["again2"], "true", "{j}");
    assert_eq!(j["line2"], "ok again", "{j}");
    // One TCP connection, one handshake: the pooled connection stayed TLS.
    assert_eq!(good_seen.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(good_seen.handshakes.load(Ordering::SeqCst), 1);
    assert_eq!(good_seen.snis.lock().unwrap()[0], "a.test");

    let resumed_before = good_seen.resumed.load(Ordering::SeqCst);
    let j = call("resume");
    assert_eq!(j[0], "ok resume 1", "{j}");
    assert_eq!(j[1], "ok resume 2", "{j}");
    assert!(
        good_seen.resumed.load(Ordering::SeqCst) > resumed_before,
        "a later handshake to a.test resumed a session"
    );

    let j = call("failures");
    assert_eq!(j["mismatch"], "nil|certificate host mismatch", "{j}");
    assert_eq!(j["after"], "nil|closed", "{j}");
    assert_eq!(j["self_signed"], "nil|18: self-signed certificate", "{j}");
    assert_eq!(j["expired"], "nil|10: certificate has expired", "{j}");
    assert_eq!(
        j["unknown_ca"], "nil|20: unable to get local issuer certificate",
        "{j}"
    );
    assert!(
        j["bad_name"]
            .as_str()
            .unwrap_or("")
            .contains("bad server_name arg: string expected, got number"),
        "{j}"
    );
    assert_eq!(j["unverified"], "true", "{j}");
    assert_eq!(j["unverified_line"], "ok unverified", "{j}");
    assert_eq!(j["noname"], "true", "{j}");
    assert_eq!(j["noname_line"], "ok noname", "{j}");
    assert_eq!(
        j["noname_other_ca"], "nil|20: unable to get local issuer certificate",
        "{j}"
    );
    assert!(good_seen.snis.lock().unwrap().iter().any(|s| s == "-"));
    assert!(
        gw.logs()
            .contains("lua ssl certificate verify error: (18: self-signed certificate)"),
        "{}",
        gw.logs()
    );

    let accepted = good_seen.accepted.load(Ordering::SeqCst);
    let j = call("http");
    let host = format!("host=127.0.0.1:{good}");
    assert_eq!(j["status1"], 200, "{j}");
    assert_eq!(j["body1"], format!("path=/p1 sni=a.test {host}"), "{j}");
    assert_eq!(j["body2"], format!("path=/p2 sni=a.test {host}"), "{j}");
    assert!(
        j["default_verify"]
            .as_str()
            .unwrap_or("")
            .starts_with("path=/x sni=- "),
        "{j}"
    );
    assert_eq!(
        j["default_refused"], "20: unable to get local issuer certificate",
        "{j}"
    );
    assert!(
        j["unverified"]
            .as_str()
            .unwrap_or("")
            .starts_with("path=/y sni=- "),
        "{j}"
    );
    // request_uri keeps the connection alive: /p2 came over /p1's connection; /x (another
    // server name, so another pool) made one more, and the unverified one went elsewhere.
    assert_eq!(good_seen.accepted.load(Ordering::SeqCst), accepted + 2);

    // The upstream client trusts the same CA set.
    let r = get(&gw.url("/up"));
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.logs());
    assert!(r.text().starts_with("path=/up "), "{}", r.text());
    let r = get(&gw.url("/up-other"));
    assert_eq!(
        r.status,
        502,
        "a certificate of an untrusted CA: {}",
        r.text()
    );
}

#[test]
fn a_missing_trusted_certificate_file_is_refused() {
    let (code, out) =
        check("ssl:\n  enable: false\n  ssl_trusted_certificate: /nonexistent/ca.pem\n");
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("ssl.ssl_trusted_certificate")
            && out.contains("certificate path /nonexistent/ca.pem doesn't exist"),
        "{out}"
    );
}
