//! The error log (`nginx_config.error_log`, `error_log_level`, `error_log_format`): to a file,
//! as text or JSON lines, at the configured level, reopened on SIGUSR1 in both processes.
//! These start the binary themselves: the usual harness reads the log on stderr, and here it
//! goes to a file.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// A running gateway whose log goes to a file.
struct FileLogged {
    child: Child,
    addr: SocketAddr,
}

impl Drop for FileLogged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `moongate run` on `dir/config.yaml` (with a listener and a route to a closed port
/// put first) and waits until its proxy port answers.
fn start(dir: &Path, yaml: &str) -> FileLogged {
    let port = closed_port();
    let dead = closed_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    std::fs::write(
        dir.join("config.yaml"),
        format!(
            "listen: {addr}\nenable_control: false\nworkers: 1\nroutes:\n  - id: dead\n    uri: /dead\n    upstream:\n      nodes:\n        \"127.0.0.1:{dead}\": 1\n{yaml}"
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_moongate"))
        .args(["run", "-c", "config.yaml"])
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start moongate");
    let gw = FileLogged { child, addr };
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "moongate did not listen on {addr}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    gw
}

/// Waits until `path` has a line that `pred` accepts; returns all its lines.
fn wait_line(path: &Path, pred: impl Fn(&str) -> bool) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.lines().any(&pred) {
            return text.lines().map(str::to_string).collect();
        }
        assert!(
            Instant::now() < deadline,
            "no such line in {}:\n{text}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn json_lines_to_a_file_reopened_on_sigusr1() {
    let tmp = tempfile::tempdir().unwrap();
    let gw = start(
        tmp.path(),
        "nginx_config:\n  error_log: logs/error.log\n  error_log_level: info\n  error_log_format: json\n",
    );
    let path = tmp.path().join("logs/error.log");
    let lines = wait_line(&path, |l| l.contains("listening on http://"));
    assert_eq!(get(&format!("http://{}/dead", gw.addr)).status, 502);
    let lines = wait_line(&path, |l| {
        l.contains("\"ERROR\"") && l.contains("127.0.0.1")
    })
    .into_iter()
    .chain(lines)
    .collect::<Vec<_>>();
    for l in &lines {
        let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert!(v["timestamp"].is_string(), "{l}");
        assert!(v["level"].is_string(), "{l}");
        assert!(v["message"].is_string(), "{l}");
        assert!(v["target"].as_str().unwrap().starts_with("moongate"), "{l}");
    }

    // logrotate renames the file; until the signal the old one is written.
    let rotated = tmp.path().join("logs/error.log.1");
    std::fs::rename(&path, &rotated).unwrap();
    // To the supervisor, which reopens its own and passes the signal on.
    // SAFETY: kill(2) on the gateway process this test started.
    assert_eq!(
        unsafe { libc::kill(gw.child.id() as libc::pid_t, libc::SIGUSR1) },
        0
    );
    let reopened = wait_line(&path, |l| l.contains("error log reopened"));
    assert!(
        reopened
            .iter()
            .all(|l| serde_json::from_str::<Value>(l).is_ok()),
        "{reopened:?}"
    );
    let before = std::fs::read_to_string(&rotated).unwrap();
    assert_eq!(get(&format!("http://{}/dead", gw.addr)).status, 502);
    wait_line(&path, |l| l.contains("\"ERROR\""));
    assert_eq!(std::fs::read_to_string(&rotated).unwrap(), before);
}

#[test]
fn text_lines_at_the_configured_level() {
    let tmp = tempfile::tempdir().unwrap();
    let gw = start(
        tmp.path(),
        "nginx_config:\n  error_log: logs/error.log\n  error_log_level: warn\n",
    );
    let path = tmp.path().join("logs/error.log");
    assert_eq!(get(&format!("http://{}/dead", gw.addr)).status, 502);
    let lines = wait_line(&path, |l| l.contains("ERROR"));
    // warn: no info lines (`listening on`), no colour codes in a file.
    assert!(
        lines
            .iter()
            .all(|l| !l.contains("listening on") && !l.contains('\u{1b}')),
        "{lines:?}"
    );
}

#[test]
fn bad_error_log_settings_are_refused_with_their_path() {
    let (code, out) = check("nginx_config:\n  error_log_level: loud\n");
    assert_eq!(code, 1);
    assert!(
        out.contains("nginx_config.error_log_level: unknown level \"loud\""),
        "{out}"
    );
    let (code, out) = check("nginx_config:\n  error_log_format: xml\n");
    assert_eq!(code, 1);
    assert!(out.contains("error_log_format"), "{out}");
}
