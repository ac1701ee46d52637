//! A DNS server on loopback for the tests: Debian's dnsmasq, answering names under
//! `moongate.test` from a hosts file the test rewrites, with a TTL of 1 s. A name under
//! `moongate.test` that the file does not list is NXDOMAIN (the domain is local to dnsmasq).

use std::net::{TcpListener, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use super::LogBuf;

pub struct Dnsmasq {
    child: Child,
    port: u16,
    hosts: PathBuf,
    logs: Arc<LogBuf>,
    /// How many times dnsmasq has read the hosts file (once at start, once per SIGHUP).
    reads: usize,
    _dir: tempfile::TempDir,
}

impl Dnsmasq {
    /// Starts dnsmasq with `records`: hosts-file lines, `IP NAME`.
    pub fn start(records: &str) -> Dnsmasq {
        let dir = tempfile::tempdir().expect("temp dir");
        let hosts = dir.path().join("hosts");
        std::fs::write(&hosts, records).expect("write hosts");
        // A port free for UDP and TCP; another process may take it before dnsmasq binds, so
        // a start that fails to bind is tried again on another port.
        for _ in 0..5 {
            let port = free_port();
            let mut child = Command::new("dnsmasq")
                .args([
                    "--no-daemon",
                    "--conf-file=/dev/null",
                    "--log-facility=-",
                    &format!("--port={port}"),
                    "--listen-address=127.0.0.1",
                    "--bind-interfaces",
                    "--no-resolv",
                    "--no-hosts",
                    &format!("--addn-hosts={}", hosts.display()),
                    "--local=/moongate.test/",
                    "--local-ttl=1",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start dnsmasq (Debian's dnsmasq package)");
            let logs = LogBuf::capture(child.stderr.take().expect("piped stderr"));
            let read = format!("read {}", hosts.display());
            if logs
                .wait_for(Duration::from_secs(10), |l| l.contains(&read).then_some(()))
                .is_some()
            {
                return Dnsmasq {
                    child,
                    port,
                    hosts,
                    logs,
                    reads: 1,
                    _dir: dir,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
            assert!(
                logs.text().contains("Address already in use"),
                "dnsmasq did not start; its log:\n{}",
                logs.text()
            );
        }
        panic!("dnsmasq found no free port in 5 tries");
    }

    /// `127.0.0.1:PORT`, as a `dns_resolver` entry.
    pub fn server(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Replaces the records and waits until dnsmasq has read them (SIGHUP).
    pub fn set(&mut self, records: &str) {
        std::fs::write(&self.hosts, records).expect("write hosts");
        // SAFETY: kill(2) on the child this value owns.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGHUP) };
        assert_eq!(rc, 0, "SIGHUP to dnsmasq");
        self.reads += 1;
        let read = format!("read {}", self.hosts.display());
        let mut seen = 0;
        let reread = self.logs.wait_for(Duration::from_secs(10), |l| {
            if l.contains(&read) {
                seen += 1;
            }
            (seen == self.reads).then_some(())
        });
        assert!(
            reread.is_some(),
            "dnsmasq did not reread its hosts file; its log:\n{}",
            self.logs.text()
        );
    }

    /// Stops the server: queries to it go unanswered from now on.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> u16 {
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        let port = udp.local_addr().expect("local addr").port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}
