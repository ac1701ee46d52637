//! WebSocket peers for the tests: a real echo server (PyPI `websockets`, started by the test),
//! a raw client that writes the opening handshake and frames by hand (RFC 6455), and the
//! `websockets` client run as a script.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use sha1::{Digest, Sha1};

/// The echo server: on a path with `bye` it sends `bye` and closes (1000); on one with `headers`
/// it first sends
/// the request headers it got as a JSON object; everything else echoes each message as it came
/// (text as text, binary as binary). Each finished connection prints `closed PATH CODE`.
const SERVER: &str = r#"
import asyncio, json, sys
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

async def handler(ws):
    path = ws.request.path
    try:
        if "bye" in path:
            await ws.send("bye")
            await ws.close(1000, "done")
            return
        if "headers" in path:
            await ws.send(json.dumps({k.lower(): v for k, v in ws.request.headers.raw_items()}))
        async for msg in ws:
            await ws.send(msg)
    except ConnectionClosed:
        pass
    finally:
        print("closed", path, ws.close_code, flush=True)

async def main():
    tls = None
    if len(sys.argv) == 3:  # CERT KEY: serve wss
        import ssl
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(sys.argv[1], sys.argv[2])
    async with serve(handler, "127.0.0.1", 0, max_size=None, ping_interval=None, ssl=tls) as server:
        print("port", server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Future()

asyncio.run(main())
"#;

/// A running `websockets` echo server on 127.0.0.1. Dropping it stops it.
pub struct WsServer {
    child: Child,
    port: u16,
    lines: Arc<(Mutex<Vec<String>>, Condvar)>,
}

impl WsServer {
    pub fn start() -> WsServer {
        WsServer::start_with(&[])
    }

    /// The same server over TLS (`wss`), with the certificate and key in these PEM files.
    pub fn start_tls(cert: &std::path::Path, key: &std::path::Path) -> WsServer {
        WsServer::start_with(&[cert.as_os_str(), key.as_os_str()])
    }

    fn start_with(args: &[&std::ffi::OsStr]) -> WsServer {
        let mut child = super::tool("python3")
            .args(["-u", "-c", SERVER])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the websockets server");
        let stdout = child.stdout.take().expect("piped stdout");
        let lines: Arc<(Mutex<Vec<String>>, Condvar)> = Arc::default();
        {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    lines.0.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                    lines.1.notify_all();
                }
            });
        }
        let mut server = WsServer {
            child,
            port: 0,
            lines,
        };
        let port = server
            .wait_line(Duration::from_secs(20), |l| {
                l.strip_prefix("port ")?.parse().ok()
            })
            .expect("the websockets server printed no port (is PyPI `websockets` installed?)");
        server.port = port;
        server
    }

    /// `127.0.0.1:PORT`, as a node key in a config.
    pub fn node(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Waits up to `timeout` for a line of its output that `f` accepts.
    pub fn wait_line<T>(
        &self,
        timeout: Duration,
        mut f: impl FnMut(&str) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.lines;
        let mut lines = lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(v) = lines.iter().find_map(|l| f(l)) {
                return Some(v);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            lines = cv
                .wait_timeout(lines, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The close code the server saw for the connection to `path` (`None` in its output when
    /// the connection ended without a close frame), waiting up to 20 s.
    pub fn closed(&self, path: &str) -> Option<String> {
        self.wait_line(Duration::from_secs(20), |l| {
            let rest = l.strip_prefix("closed ")?;
            let (p, code) = rest.split_once(' ')?;
            (p == path).then(|| code.to_string())
        })
    }
}

impl Drop for WsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Frame opcodes (RFC 6455 §5.2).
pub const TEXT: u8 = 0x1;
pub const BINARY: u8 = 0x2;
pub const CLOSE: u8 = 0x8;
pub const PING: u8 = 0x9;
pub const PONG: u8 = 0xA;

/// The key the raw client sends and the accept value RFC 6455 §4.2.2 derives from it.
pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

pub fn accept_for(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.as_bytes());
    h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// The opening handshake request for `path`, with `extra` header lines (each ending in CRLF).
pub fn handshake_request(addr: SocketAddr, path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// A client connection through the gateway, written by hand.
pub struct WsClient {
    pub stream: TcpStream,
    /// Bytes read past what was consumed so far.
    buf: Vec<u8>,
    /// Frame bytes sent and received so far.
    sent: u64,
    received: u64,
}

/// A response head as the raw client read it.
pub struct Head {
    pub status: u16,
    /// The whole head, lowercased, for `contains` checks.
    pub text: String,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.text.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name).then(|| v.trim())
        })
    }
}

impl WsClient {
    /// Connects to `addr` and sends `request` (usually [`handshake_request`]); returns the
    /// client and the response head.
    pub fn open(addr: SocketAddr, request: &str) -> (WsClient, Head) {
        let stream = TcpStream::connect(addr).expect("connect to the gateway");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("read timeout");
        let mut c = WsClient {
            stream,
            buf: Vec::new(),
            sent: 0,
            received: 0,
        };
        c.stream
            .write_all(request.as_bytes())
            .expect("send handshake");
        let head = c.read_head();
        (c, head)
    }

    /// Opens a tunnel to `path` and checks the `101`.
    pub fn connect(addr: SocketAddr, path: &str) -> WsClient {
        let (c, head) = WsClient::open(addr, &handshake_request(addr, path, ""));
        assert_eq!(head.status, 101, "{}", head.text);
        assert_eq!(
            head.header("sec-websocket-accept"),
            Some(accept_for(KEY).to_lowercase().as_str())
        );
        c
    }

    fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 16384];
        match self.stream.read(&mut chunk) {
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                n
            }
            Err(e) => panic!("reading from the gateway failed: {e}"),
        }
    }

    /// Reads a response head (and nothing past it).
    pub fn read_head(&mut self) -> Head {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head: Vec<u8> = self.buf.drain(..end + 4).collect();
                let text = String::from_utf8_lossy(&head).to_lowercase();
                let status = text
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                return Head { status, text };
            }
            assert!(
                self.fill() > 0,
                "connection closed before a response head: {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        }
    }

    /// Reads `n` bytes exactly (what is not a frame: a body, a raw upstream's bytes).
    pub fn read_exact(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(
                self.fill() > 0,
                "connection closed after {} of {n} bytes",
                self.buf.len()
            );
        }
        self.buf.drain(..n).collect()
    }

    /// Sends one masked frame with FIN set.
    pub fn send(&mut self, opcode: u8, payload: &[u8]) {
        let frame = client_frame(opcode, payload);
        self.stream.write_all(&frame).expect("send frame");
        self.sent += frame.len() as u64;
    }

    /// Reads one whole frame from the server: (opcode, payload). Fragmented messages are
    /// joined; interleaved control frames are returned as they come.
    pub fn recv(&mut self) -> (u8, Vec<u8>) {
        let mut message: Option<(u8, Vec<u8>)> = None;
        loop {
            let (fin, opcode, payload) = self.recv_frame();
            if opcode >= 0x8 {
                return (opcode, payload);
            }
            match (&mut message, opcode) {
                (None, op) => message = Some((op, payload)),
                (Some((_, data)), 0) => data.extend_from_slice(&payload),
                (Some(_), op) => panic!("a new message (opcode {op}) inside a fragmented one"),
            }
            if fin {
                return message.expect("set above");
            }
        }
    }

    fn recv_frame(&mut self) -> (bool, u8, Vec<u8>) {
        loop {
            if let Some((len, fin, opcode, payload)) = parse_server_frame(&self.buf) {
                self.buf.drain(..len);
                self.received += len as u64;
                return (fin, opcode, payload);
            }
            assert!(self.fill() > 0, "connection closed inside a frame");
        }
    }

    /// Frame bytes (sent, received) since the handshake.
    pub fn counts(&self) -> (u64, u64) {
        (self.sent, self.received)
    }

    /// Whether the gateway closed the connection (end of stream or reset, nothing more
    /// buffered), waiting up to the read timeout.
    pub fn closed(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut b = [0u8; 1];
        match self.stream.read(&mut b) {
            Ok(n) => n == 0,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }

    /// The close handshake started by the client: sends close 1000, expects the server's close
    /// frame echoing the code, then the end of the connection.
    pub fn close(mut self) {
        self.send(CLOSE, &1000u16.to_be_bytes());
        let (op, payload) = self.recv();
        assert_eq!(op, CLOSE);
        assert_eq!(&payload[..2], &1000u16.to_be_bytes());
        assert!(
            self.closed(),
            "the connection stays open after the close handshake"
        );
    }
}

/// A client frame: FIN, `opcode`, masked with a fixed key.
pub fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    let mut f = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= 0xffff => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// One unmasked server frame at the start of `buf`: (its length, fin, opcode, payload).
fn parse_server_frame(buf: &[u8]) -> Option<(usize, bool, u8, Vec<u8>)> {
    if buf.len() < 2 {
        return None;
    }
    let fin = buf[0] & 0x80 != 0;
    let opcode = buf[0] & 0x0f;
    assert_eq!(buf[1] & 0x80, 0, "a server frame must not be masked");
    let (len, at) = match buf[1] & 0x7f {
        126 => (
            u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let payload = buf.get(at..at + len)?.to_vec();
    Some((at + len, fin, opcode, payload))
}

/// Runs the `websockets` client against `url` with a script body that has `ws` connected;
/// returns its stdout (the script prints what the test checks). Panics on a failure.
pub fn python_client(url: &str, body: &str) -> String {
    let script = format!(
        "import sys\nfrom websockets.sync.client import connect\nwith connect({url:?}, max_size=None, open_timeout=20, close_timeout=20) as ws:\n{}",
        body.lines().map(|l| format!("    {l}\n")).collect::<String>()
    );
    let out = super::tool("python3")
        .args(["-c", &script])
        .output()
        .expect("run the websockets client");
    assert!(
        out.status.success(),
        "the websockets client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
