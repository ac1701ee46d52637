//! Upstream mTLS (APISIX's upstream `tls.client_cert`/`client_key` and `tls.client_cert_id`):
//! a real TLS upstream on loopback that requires a client certificate signed by a test CA, and
//! the gateway presenting one.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{json, Value};

use common::tls::*;
use common::*;

const ADMIN_KEY: &str = "mtls-admin-key-0123456789";

/// An HTTPS server that completes a handshake only with a client certificate its CA signed.
/// Each response says who the client was and which connection carried it.
struct MtlsUpstream {
    addr: SocketAddr,
    /// (client certificate's common name, request path) of every request, in order.
    seen: Arc<Mutex<Vec<(String, String)>>>,
    rt: Option<tokio::runtime::Runtime>,
}

impl MtlsUpstream {
    fn start(server: &Pair, client_ca: &str) -> MtlsUpstream {
        MtlsUpstream::start_with(server, client_ca, false)
    }

    /// `h2`: HTTP/2 by ALPN (a grpcs upstream), answering with gRPC trailers.
    fn start_with(server: &Pair, client_ca: &str, h2: bool) -> MtlsUpstream {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(client_ca.as_bytes()) {
            roots.add(c.expect("CA PEM")).expect("add CA");
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.into(),
            provider.clone(),
        )
        .build()
        .expect("client verifier");
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                CertificateDer::pem_slice_iter(server.cert.as_bytes())
                    .map(|c| c.expect("cert PEM"))
                    .collect(),
                PrivateKeyDer::from_pem_slice(server.key.as_bytes()).expect("key PEM"),
            )
            .expect("server config");
        if h2 {
            config.alpn_protocols = vec![b"h2".to_vec()];
        }
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let conns = Arc::new(AtomicU64::new(0));
        let log = seen.clone();
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, log) = (acceptor.clone(), log.clone());
                let conn = conns.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let cn = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|der| common_name(der))
                        .unwrap_or_default();
                    if h2 {
                        serve_h2(tls, cn, conn, log).await;
                        return;
                    }
                    let svc = hyper::service::service_fn(move |req: Request<_>| {
                        let path = req.uri().path().to_string();
                        log.lock().unwrap().push((cn.clone(), path.clone()));
                        let body = json!({"subject": cn, "conn": conn, "path": path}).to_string();
                        async move { Ok::<_, Infallible>(Response::new(full(body))) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        MtlsUpstream {
            addr,
            seen,
            rt: Some(rt),
        }
    }

    fn node(&self) -> String {
        self.addr.to_string()
    }

    /// Waits (at most `timeout`) until a request for `path` arrived; its client's name.
    fn wait_for_path(&self, path: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some((cn, _)) = self.seen.lock().unwrap().iter().find(|(_, p)| p == path) {
                return Some(cn.clone());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for MtlsUpstream {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Answers each HTTP/2 stream as a gRPC server would: 200, a body, `grpc-status: 0`.
async fn serve_h2(
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    cn: String,
    conn: u64,
    log: Arc<Mutex<Vec<(String, String)>>>,
) {
    let Ok(mut h2) = h2::server::handshake(tls).await else {
        return;
    };
    while let Some(Ok((req, mut respond))) = h2.accept().await {
        let path = req.uri().path().to_string();
        log.lock().unwrap().push((cn.clone(), path.clone()));
        let head = http::Response::builder()
            .status(200)
            .header("content-type", "application/grpc")
            .body(())
            .expect("response head");
        let Ok(mut send) = respond.send_response(head, false) else {
            continue;
        };
        let body = json!({"subject": cn, "conn": conn, "path": path}).to_string();
        let _ = send.send_data(bytes::Bytes::from(body), false);
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let _ = send.send_trailers(trailers);
    }
}

fn common_name(der: &CertificateDer<'_>) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("parse client certificate");
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or("")
        .to_string();
    cn
}

/// The test's certificates: the upstream's server certificate, the CA it trusts for clients,
/// two clients that CA signed and one signed by another CA.
struct Certs {
    server: Pair,
    /// The CA that signed `server`.
    server_ca: String,
    client_ca: String,
    alice: Pair,
    bob: Pair,
    mallory: Pair,
}

fn certs() -> Certs {
    let upstream_ca = Pki::new("upstream server CA");
    let clients = Pki::new("upstream client CA");
    let rogue = Pki::new("rogue CA");
    Certs {
        server: upstream_ca.server(&["127.0.0.1", "localhost"], "upstream"),
        server_ca: upstream_ca.ca_pem.clone(),
        client_ca: clients.ca_pem.clone(),
        alice: clients.client("alice"),
        bob: clients.client("bob"),
        mallory: rogue.client("mallory"),
    }
}

/// A YAML line `KEY: JSON` (JSON is YAML's flow style, PEM newlines escaped).
fn yaml_key(key: &str, value: Value) -> String {
    format!("{key}: {value}\n")
}

fn https_upstream(node: &str, tls: Option<Value>) -> Value {
    let mut u = json!({"scheme": "https", "nodes": {node: 1}});
    if let Some(t) = tls {
        u["tls"] = t;
    }
    u
}

fn inline(pair: &Pair) -> Value {
    json!({"client_cert": pair.cert, "client_key": pair.key})
}

fn body(r: &Resp) -> Value {
    r.json()
}

#[test]
fn client_certificates_reach_an_upstream_that_requires_one() {
    let c = certs();
    let up = MtlsUpstream::start(&c.server, &c.client_ca);
    let node = up.node();
    let routes = json!([
        {"id": "none", "uri": "/none", "upstream": https_upstream(&node, None)},
        {"id": "verify-only", "uri": "/verify-only",
         "upstream": https_upstream(&node, Some(json!({"verify": false})))},
        {"id": "inline", "uri": "/inline", "upstream": https_upstream(&node, Some(inline(&c.alice)))},
        {"id": "by-id", "uri": "/by-id",
         "upstream": https_upstream(&node, Some(json!({"client_cert_id": "bob"})))},
        {"id": "rogue", "uri": "/rogue", "upstream": https_upstream(&node, Some(inline(&c.mallory)))},
    ]);
    let ssls = json!([{"id": "bob", "type": "client", "cert": c.bob.cert, "key": c.bob.key}]);
    let gw = Gateway::start(&(yaml_key("routes", routes) + &yaml_key("ssls", ssls)));

    let r = get(&gw.url("/none"));
    assert_eq!(r.status, 502, "no client certificate: {}", r.text());
    // The error line is written as the 502 goes out: wait for it rather than read once.
    assert!(
        gw.wait_for_log("CertificateRequired", Duration::from_secs(5)),
        "{}",
        gw.logs()
    );
    let r = get(&gw.url("/verify-only"));
    assert_eq!(r.status, 502, "tls.verify alone presents nothing");

    let r = get(&gw.url("/inline"));
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.logs());
    assert_eq!(body(&r)["subject"], "alice");

    let r = get(&gw.url("/by-id"));
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.logs());
    assert_eq!(body(&r)["subject"], "bob");

    let r = get(&gw.url("/rogue"));
    assert_eq!(
        r.status, 502,
        "a certificate of another CA is refused by the upstream"
    );
}

#[test]
fn two_client_certificates_to_one_node_never_share_a_connection() {
    let c = certs();
    let up = MtlsUpstream::start(&c.server, &c.client_ca);
    let node = up.node();
    let upstreams = json!([
        {"id": "a", "scheme": "https", "nodes": {&node: 1}, "tls": inline(&c.alice)},
        {"id": "b", "scheme": "https", "nodes": {&node: 1}, "tls": {"client_cert_id": "bob"}},
        {"id": "plain", "scheme": "https", "nodes": {&node: 1}},
    ]);
    let routes = json!([
        {"id": "a", "uri": "/a", "upstream_id": "a"},
        {"id": "b", "uri": "/b", "upstream_id": "b"},
        {"id": "plain", "uri": "/plain", "upstream_id": "plain"},
    ]);
    let ssls = json!([{"id": "bob", "type": "client", "cert": c.bob.cert, "key": c.bob.key}]);
    let gw = Gateway::start(
        &("workers: 1\n".to_string()
            + &yaml_key("upstreams", upstreams)
            + &yaml_key("routes", routes)
            + &yaml_key("ssls", ssls)),
    );
    let mut conns_a = Vec::new();
    let mut conns_b = Vec::new();
    for _ in 0..4 {
        let a = get(&gw.url("/a"));
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(body(&a)["subject"], "alice", "upstream a presents alice");
        conns_a.push(body(&a)["conn"].as_u64().unwrap());
        let b = get(&gw.url("/b"));
        assert_eq!(b.status, 200, "{}", b.text());
        assert_eq!(body(&b)["subject"], "bob", "upstream b presents bob");
        conns_b.push(body(&b)["conn"].as_u64().unwrap());
        // The upstream without a certificate must not get a pooled alice or bob connection.
        assert_eq!(get(&gw.url("/plain")).status, 502);
    }
    conns_a.dedup();
    conns_b.dedup();
    assert_eq!(
        conns_a.len(),
        1,
        "alice's connection is kept alive: {conns_a:?}"
    );
    assert_eq!(
        conns_b.len(),
        1,
        "bob's connection is kept alive: {conns_b:?}"
    );
    assert_ne!(conns_a, conns_b);
}

fn admin(gw: &Gateway, method: &str, path: &str, body: Option<Value>) -> Resp {
    let body = body.map(|b| b.to_string());
    admin_request(gw.admin_addr(), ADMIN_KEY, method, path, body.as_deref())
}

fn error_msg(r: &Resp) -> String {
    r.json()["error_msg"].as_str().unwrap_or("").to_string()
}

#[test]
fn admin_api_upstream_mtls_and_a_changed_certificate() {
    let c = certs();
    let carol = {
        // Another client of the same CA would need the CA's key; a fresh CA and a server that
        // trusts both is simpler.
        let other = Pki::new("second client CA");
        (other.ca_pem.clone(), other.client("carol"))
    };
    let up = MtlsUpstream::start(&c.server, &format!("{}{}", c.client_ca, carol.0));
    let node = up.node();
    let gw = Gateway::start(&format!(
        "workers: 1\nadmin:\n  listen: 127.0.0.1:0\n  key: {ADMIN_KEY}\ndata_encryption:\n  keyring: [qeddd145sfvddff3]\n"
    ));

    // APISIX's t/node/upstream-mtls.t: a client ssl, an upstream naming it, a route.
    let client_ssl = |p: &Pair| json!({"type": "client", "cert": p.cert, "key": p.key});
    let r = admin(&gw, "PUT", "/ssls/1", Some(client_ssl(&c.alice)));
    assert_eq!(r.status, 201, "{}", r.text());
    let r = admin(
        &gw,
        "PUT",
        "/upstreams/1",
        Some(https_upstream(&node, Some(json!({"client_cert_id": 1})))),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let r = admin(
        &gw,
        "PUT",
        "/routes/1",
        Some(json!({"uri": "/hello", "upstream_id": 1})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let r = get(&gw.url("/hello"));
    assert_eq!(
        (r.status, body(&r)["subject"].clone()),
        (200, json!("alice")),
        "{}",
        gw.logs()
    );
    let first_conn = body(&r)["conn"].clone();

    // The ssl's certificate changes: the next connection presents the new one.
    let r = admin(&gw, "PUT", "/ssls/1", Some(client_ssl(&carol.1)));
    assert_eq!(r.status, 200, "{}", r.text());
    let r = get(&gw.url("/hello"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(body(&r)["subject"], "carol");
    assert_ne!(
        body(&r)["conn"],
        first_conn,
        "a new connection for the new certificate"
    );

    // Inline pair on a route's upstream; the key is stored encrypted and never answered.
    let route = json!({"uri": "/inline", "upstream": https_upstream(&node, Some(inline(&c.bob)))});
    let r = admin(&gw, "PUT", "/routes/2", Some(route));
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(
        r.json()["value"]["upstream"]["tls"]
            .get("client_key")
            .is_none(),
        "{}",
        r.text()
    );
    let v = admin(&gw, "GET", "/routes/2", None).json();
    assert_eq!(
        v["value"]["upstream"]["tls"]["client_cert"],
        json!(c.bob.cert)
    );
    assert!(
        v["value"]["upstream"]["tls"].get("client_key").is_none(),
        "{v}"
    );
    let r = get(&gw.url("/inline"));
    assert_eq!(
        (r.status, body(&r)["subject"].clone()),
        (200, json!("bob")),
        "{}",
        gw.logs()
    );
    let r = admin(
        &gw,
        "PUT",
        "/upstreams/2",
        Some(https_upstream(&node, Some(inline(&c.bob)))),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let v = admin(&gw, "GET", "/upstreams/2", None).json();
    assert!(v["value"]["tls"].get("client_key").is_none(), "{v}");
    let list = admin(&gw, "GET", "/upstreams", None).text();
    assert!(!list.contains("PRIVATE KEY"), "{list}");
    // A PATCH that leaves the key alone keeps it (stored encrypted, decrypted by the build).
    let r = admin(
        &gw,
        "PATCH",
        "/upstreams/2",
        Some(json!({"tls": {"verify": false}})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = admin(
        &gw,
        "PUT",
        "/routes/3",
        Some(json!({"uri": "/two", "upstream_id": 2})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let r = get(&gw.url("/two"));
    assert_eq!(
        (r.status, body(&r)["subject"].clone()),
        (200, json!("bob")),
        "{}",
        gw.logs()
    );

    // Refusals, with APISIX's wording and the field's path.
    let server_ssl = json!({"cert": c.server.cert, "key": c.server.key, "snis": ["upstream.test"]});
    let r = admin(&gw, "PUT", "/ssls/9", Some(server_ssl.clone()));
    assert_eq!(r.status, 201, "{}", r.text());
    let cases = [
        (json!({"client_cert_id": 9}), "tls.client_cert_id: failed to fetch ssl info by ssl id [9], wrong ssl type"),
        (json!({"client_cert_id": 404}), "tls.client_cert_id: failed to fetch ssl info by ssl id [404], response code: 404"),
        (json!({"client_cert": c.alice.cert, "client_key": "AAA".repeat(128)}), "tls.client_key: failed to decrypt previous encrypted key"),
        (json!({"client_cert": c.alice.cert, "client_key": c.bob.key}), "tls.client_key: the key does not match the certificate's public key"),
        (json!({"client_cert": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "client_key": c.alice.key}), "tls.client_cert: failed to parse cert"),
        (json!({"client_cert": c.alice.cert}), "tls: failed to validate dependent schema for \"client_cert\": property \"client_key\" is required"),
        (json!({"client_cert": c.alice.cert, "client_key": c.alice.key, "client_cert_id": 1}), "tls: failed to validate dependent schema for \"client_cert_id\""),
    ];
    for (tls, want) in cases {
        let r = admin(
            &gw,
            "PUT",
            "/upstreams/5",
            Some(https_upstream(&node, Some(tls.clone()))),
        );
        assert_eq!(r.status, 400, "{tls}: {}", r.text());
        assert!(
            error_msg(&r).contains(want),
            "{tls}: want {want:?}, got {}",
            r.text()
        );
    }
    assert_eq!(admin(&gw, "GET", "/upstreams/5", None).status, 404);

    // The client ssl an upstream presents can neither go nor become a server certificate.
    let r = admin(&gw, "DELETE", "/ssls/1", None);
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(
        error_msg(&r),
        "can not delete this ssl, upstream [1] is still using it now"
    );
    let r = admin(&gw, "PUT", "/ssls/1", Some(server_ssl));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(error_msg(&r).contains("wrong ssl type"), "{}", r.text());
    let r = get(&gw.url("/hello"));
    assert_eq!(
        (r.status, body(&r)["subject"].clone()),
        (200, json!("carol"))
    );
}

#[test]
fn bad_upstream_client_certificates_are_refused_with_their_path() {
    let c = certs();
    let ups = json!([
        {"id": "1", "scheme": "https", "nodes": {"127.0.0.1:1": 1},
         "tls": {"client_cert": c.alice.cert, "client_key": c.bob.key}},
        {"id": "2", "scheme": "https", "nodes": {"127.0.0.1:1": 1},
         "tls": {"client_cert_id": "srv"}},
        {"id": "3", "scheme": "https", "nodes": {"127.0.0.1:1": 1},
         "tls": {"client_cert_id": "nope"}},
        {"id": "4", "scheme": "https", "nodes": {"127.0.0.1:1": 1},
         "tls": {"client_key": c.alice.key}},
    ]);
    let routes = json!([
        {"id": "r", "uri": "/r",
         "upstream": {"scheme": "https", "nodes": {"127.0.0.1:1": 1},
                      "tls": {"client_cert": "not a pem", "client_key": c.alice.key}}},
    ]);
    let ssls =
        json!([{"id": "srv", "cert": c.server.cert, "key": c.server.key, "snis": ["a.test"]}]);
    let (code, out) = check(
        &(yaml_key("upstreams", ups) + &yaml_key("routes", routes) + &yaml_key("ssls", ssls)),
    );
    assert_ne!(code, 0, "{out}");
    for want in [
        "upstreams[0].tls.client_key: the key does not match the certificate's public key",
        "upstreams[1].tls.client_cert_id: failed to fetch ssl info by ssl id [srv], wrong ssl type",
        "upstreams[2].tls.client_cert_id: failed to fetch ssl info by ssl id [nope], response code: 404",
        "upstreams[3].tls: failed to validate dependent schema for \"client_key\": property \"client_cert\" is required",
        "routes[0].upstream.tls.client_cert: failed to parse cert",
    ] {
        assert!(out.contains(want), "want {want:?} in:\n{out}");
    }
}

#[test]
fn https_health_checks_present_the_client_certificate() {
    let c = certs();
    let up = MtlsUpstream::start(&c.server, &c.client_ca);
    let upstreams = json!([{
        "id": "1", "scheme": "https", "nodes": {up.node(): 1}, "tls": inline(&c.alice),
        "checks": {"active": {"type": "https", "http_path": "/healthz",
                               "https_verify_certificate": false,
                               "healthy": {"interval": 1}, "unhealthy": {"interval": 1}}}
    }]);
    let routes = json!([{"id": "r", "uri": "/r", "upstream_id": "1"}]);
    let _gw = Gateway::start(&(yaml_key("upstreams", upstreams) + &yaml_key("routes", routes)));
    assert_eq!(
        up.wait_for_path("/healthz", Duration::from_secs(15))
            .as_deref(),
        Some("alice"),
        "the probe reached the upstream with alice's certificate"
    );
}

#[test]
fn https_health_checks_verify_the_node_certificate_unless_told_not_to() {
    let c = certs();
    // The node's certificate is signed by a CA the gateway does not trust.
    let up = MtlsUpstream::start(&c.server, &c.client_ca);
    let upstream = |id: &str, verify: bool| {
        json!({
            "id": id, "scheme": "https", "nodes": {up.node(): 1}, "tls": inline(&c.alice),
            "checks": {"active": {"type": "https", "http_path": format!("/{id}"),
                                   "https_verify_certificate": verify,
                                   "healthy": {"interval": 1},
                                   "unhealthy": {"interval": 1, "tcp_failures": 1}}}
        })
    };
    let upstreams = json!([upstream("verified", true), upstream("unverified", false)]);
    let routes = json!([
        {"id": "a", "uri": "/a", "upstream_id": "verified"},
        {"id": "b", "uri": "/b", "upstream_id": "unverified"}
    ]);
    let gw = Gateway::start(&(yaml_key("upstreams", upstreams) + &yaml_key("routes", routes)));
    assert!(
        gw.wait_for_log("upstream node marked unhealthy", Duration::from_secs(15)),
        "{}",
        gw.logs()
    );
    let marked: Vec<String> = gw
        .logs()
        .lines()
        .filter(|l| l.contains("upstream node marked unhealthy"))
        .map(str::to_string)
        .collect();
    assert!(
        marked[0].contains("upstream=/apisix/upstreams/verified")
            && marked[0].contains("TLS handshake failed"),
        "{marked:?}"
    );
    // Without verification the probes get through (and the node stays healthy).
    assert_eq!(
        up.wait_for_path("/unverified", Duration::from_secs(15))
            .as_deref(),
        Some("alice")
    );
    assert!(
        !gw.logs()
            .lines()
            .any(|l| l.contains("marked unhealthy") && l.contains("/apisix/upstreams/unverified")),
        "{}",
        gw.logs()
    );
    assert!(up
        .wait_for_path("/verified", Duration::from_millis(1))
        .is_none());
}

#[test]
fn grpcs_upstreams_present_the_client_certificate() {
    let c = certs();
    let up = MtlsUpstream::start_with(&c.server, &c.client_ca, true);
    let grpcs = |tls: Option<Value>| {
        let mut u = json!({"scheme": "grpcs", "nodes": {up.node(): 1}});
        if let Some(t) = tls {
            u["tls"] = t;
        }
        u
    };
    let routes = json!([
        {"id": "with", "uri": "/echo.Echo/With", "upstream": grpcs(Some(json!({"client_cert_id": "alice"})))},
        {"id": "without", "uri": "/echo.Echo/Without", "upstream": grpcs(None)},
    ]);
    let ssls = json!([{"id": "alice", "type": "client", "cert": c.alice.cert, "key": c.alice.key}]);
    let gw = Gateway::start(&(yaml_key("routes", routes) + &yaml_key("ssls", ssls)));
    let r = Req::new("POST", &gw.url("/echo.Echo/With"))
        .header("content-type", "application/grpc")
        .body(String::new())
        .send();
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.logs());
    assert_eq!(body(&r)["subject"], "alice");
    let r = Req::new("POST", &gw.url("/echo.Echo/Without"))
        .header("content-type", "application/grpc")
        .body(String::new())
        .send();
    assert_eq!(r.status, 502, "{}", r.text());
}

#[test]
fn a_client_certificate_changed_in_the_file_is_presented_after_the_reload() {
    let c = certs();
    let up = MtlsUpstream::start(&c.server, &c.client_ca);
    let config = |pair: &Pair| {
        let ups = json!([{"id": "1", "scheme": "https", "nodes": {up.node(): 1}, "tls": {"client_cert_id": "me"}}]);
        let routes = json!([{"id": "r", "uri": "/r", "upstream_id": "1"}]);
        let ssls = json!([{"id": "me", "type": "client", "cert": pair.cert, "key": pair.key}]);
        "listen: 127.0.0.1:0\nenable_control: false\nworkers: 1\n".to_string()
            + &yaml_key("upstreams", ups)
            + &yaml_key("routes", routes)
            + &yaml_key("ssls", ssls)
    };
    let gw = Gateway::start(&config(&c.alice));
    let r = get(&gw.url("/r"));
    assert_eq!(
        (r.status, body(&r)["subject"].clone()),
        (200, json!("alice")),
        "{}",
        gw.logs()
    );
    // An atomic save, as editors make it.
    let tmp = gw.config_dir().join("config.yaml.tmp");
    std::fs::write(&tmp, config(&c.bob)).expect("write config");
    std::fs::rename(&tmp, gw.config_path()).expect("rename config");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = get(&gw.url("/r"));
        assert_eq!(r.status, 200, "{}", r.text());
        if body(&r)["subject"] == "bob" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "bob never presented; log:\n{}",
            gw.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `ssl.ssl_trusted_certificate` (APISIX's `apisix.ssl.ssl_trusted_certificate`): an upstream
/// whose certificate a private CA signed fails `tls.verify: true` with the system roots alone
/// and passes once the CA's file is in the list; a file that is not a CA bundle is refused
/// with the field's path.
#[test]
fn a_private_ca_in_ssl_trusted_certificate_verifies_the_upstream() {
    let c = certs();
    let up = MtlsUpstream::start(&c.server, &c.client_ca);
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("private-ca.pem");
    std::fs::write(&ca, &c.server_ca).unwrap();
    let mut tls = inline(&c.alice);
    tls["verify"] = json!(true);
    let routes = json!([
        {"id": "verified", "uri": "/verified", "upstream": https_upstream(&up.node(), Some(tls))},
    ]);

    let system_only = Gateway::start(&yaml_key("routes", routes.clone()));
    let r = get(&system_only.url("/verified"));
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(
        system_only.wait_for_log("UnknownIssuer", Duration::from_secs(5)),
        "{}",
        system_only.logs()
    );

    let ssl = json!({"enable": false,
                     "ssl_trusted_certificate": format!("system, {}", ca.display())});
    let gw = Gateway::start(&(yaml_key("ssl", ssl) + &yaml_key("routes", routes)));
    let r = get(&gw.url("/verified"));
    assert_eq!(r.status, 200, "{}\n{}", r.text(), gw.logs());
    assert_eq!(body(&r)["subject"], "alice");

    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    for (setting, want) in [
        (
            junk.display().to_string(),
            format!(
                "ssl.ssl_trusted_certificate: {}: failed to parse cert",
                junk.display()
            ),
        ),
        (
            "system,/nonexistent/ca.pem".to_string(),
            "ssl.ssl_trusted_certificate: certificate path /nonexistent/ca.pem doesn't exist"
                .to_string(),
        ),
    ] {
        let (code, out) = check(&yaml_key(
            "ssl",
            json!({"enable": false, "ssl_trusted_certificate": setting}),
        ));
        assert_ne!(code, 0, "{out}");
        assert!(out.contains(&want), "want {want:?} in:\n{out}");
    }
}
