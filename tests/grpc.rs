//! gRPC through moongate's HTTP/2 listener to a real gRPC server (PyPI `grpcio`, with stubs
//! generated from `tests/grpc/echo.proto` by `grpcio-tools` in the test): unary, server,
//! client and bidirectional streaming, status and trailing metadata, upstream timeouts.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use common::*;

/// The test's gRPC server process; killed when dropped.
struct GrpcServer {
    child: Child,
    port: u16,
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn grpc_dir() -> String {
    format!("{}/tests/grpc", env!("CARGO_MANIFEST_DIR"))
}

/// Generates the Python stubs into `out`.
fn generate_stubs(out: &Path) {
    let status = tool("python3")
        .args(["-m", "grpc_tools.protoc", "-I", &grpc_dir()])
        .arg(format!("--python_out={}", out.display()))
        .arg(format!("--grpc_python_out={}", out.display()))
        .arg("echo.proto")
        .status()
        .expect("run grpc_tools.protoc");
    assert!(
        status.success(),
        "protoc failed (is grpcio-tools installed?)"
    );
}

fn start_server(stubs: &Path) -> GrpcServer {
    let mut child = tool("python3")
        .arg(format!("{}/server.py", grpc_dir()))
        .arg(stubs)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the gRPC server");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(p) = line.strip_prefix("PORT ") {
                let _ = tx.send(p.trim().parse::<u16>().ok());
            }
        }
    });
    let port = rx
        .recv_timeout(Duration::from_secs(30))
        .ok()
        .flatten()
        .expect("the gRPC server printed its port");
    GrpcServer { child, port }
}

#[test]
fn grpc_calls_pass_through_with_status_and_trailers() {
    let stubs = tempfile::tempdir().expect("temp dir");
    generate_stubs(stubs.path());
    let server = start_server(stubs.path());
    let gw = Gateway::start(&format!(
        "listen:\n  - {{ip: 127.0.0.1, port: 0, enable_http2: true}}\nroutes:\n  - id: grpc\n    uri: /moongate.test.Echo/*\n    upstream:\n      scheme: grpc\n      timeout: {{connect: 2, send: 1, read: 1}}\n      nodes:\n        \"127.0.0.1:{}\": 1\n",
        server.port
    ));
    let out = tool("python3")
        .arg(format!("{}/client.py", grpc_dir()))
        .arg(stubs.path())
        .arg(gw.addr().to_string())
        .output()
        .expect("run the gRPC client");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client failed: {text}\n{}\ngateway log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        gw.logs()
    );
    let r: serde_json::Value = serde_json::from_str(&text).expect("client JSON");

    // Unary: the message both ways, the client's metadata and the forwarding headers at the
    // server, its trailing metadata back in the trailers with grpc-status OK.
    assert_eq!(
        r["unary"]["text"],
        "HELLO|x-forwarded-for=127.0.0.1|x-client=c1"
    );
    assert_eq!(r["unary"]["n"], 42);
    assert_eq!(r["unary"]["trailers"]["x-trailer"], "t-hello");
    assert_eq!(r["unary"]["code"], "OK");
    // An error status and message (grpc-status, grpc-message) reach the client.
    assert_eq!(r["fail"]["code"], "NOT_FOUND");
    assert_eq!(r["fail"]["details"], "no such thing: x");
    // Server streaming: every message in order, then the trailers.
    let texts = r["server_stream"]["texts"].as_array().expect("texts");
    assert_eq!(texts.len(), 50);
    assert_eq!(texts[49], "s-49");
    assert_eq!(r["server_stream"]["trailers"]["x-count"], "50");
    assert_eq!(r["server_stream"]["code"], "OK");
    // Client streaming and bidirectional streaming (200 messages of 100 kB each way).
    assert_eq!(r["client_stream"]["n"], 20);
    assert!(r["client_stream"]["text"]
        .as_str()
        .is_some_and(|t| t.starts_with("c0,c1,") && t.ends_with(",c19")));
    assert_eq!(r["bidi"]["count"], 200);
    assert_eq!(r["bidi"]["ok"], true);
    // A call slower than the upstream's send + read timeout: 504 from the gateway, which gRPC
    // clients see as UNAVAILABLE.
    assert_eq!(r["slow"]["code"], "UNAVAILABLE", "{}", r["slow"]);
    assert!(
        gw.wait_for_log("upstream request failed: timeout", Duration::from_secs(5)),
        "{}",
        gw.logs()
    );
    assert!(
        gw.wait_for_log(
            "POST /moongate.test.Echo/Unary 200 route=grpc",
            Duration::from_secs(5)
        ),
        "{}",
        gw.logs()
    );
}

#[test]
fn grpc_upstream_down_is_502() {
    let gw = Gateway::start(&format!(
        "listen:\n  - {{ip: 127.0.0.1, port: 0, enable_http2: true}}\nroutes:\n  - id: grpc\n    uri: /moongate.test.Echo/*\n    upstream:\n      scheme: grpc\n      nodes:\n        \"127.0.0.1:{}\": 1\n",
        closed_port()
    ));
    // curl speaks for the gRPC client here: the answer is a plain 502.
    let out = tool("curl")
        .args([
            "-s",
            "--http2-prior-knowledge",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            "content-type: application/grpc",
            "--data-binary",
            "",
            &gw.url("/moongate.test.Echo/Unary"),
        ])
        .output()
        .expect("run curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "502");
}
