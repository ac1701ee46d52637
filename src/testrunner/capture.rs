//! The gateway's log, kept in memory while tests run: a case's log lines are checked
//! (`expect.log`) and shown when it fails, instead of going to stderr.
//!
//! The usual `tracing_subscriber` formatter writes each event through a writer of ours that
//! appends the line here. The access-log line (`moongate::access`) is written after the log
//! phase, so counting those lines tells when a request is completely done.

use std::io::Write;
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// The target of the access-log line (`src/proxy/handler.rs`).
const ACCESS_TARGET: &str = "moongate::access";

#[derive(Default)]
struct Lines {
    /// Each line, and whether it is an access-log line.
    lines: Vec<(bool, String)>,
    /// Access-log lines written so far (requests completely served).
    served: u64,
}

/// Every log line since start, and the count of served requests.
#[derive(Default)]
pub struct Capture {
    state: Mutex<Lines>,
    changed: Condvar,
}

/// A position in the log: what came after it is read with [`Capture::since`].
#[derive(Debug, Clone, Copy)]
pub struct Mark {
    line: usize,
    served: u64,
}

impl Capture {
    fn lock(&self) -> std::sync::MutexGuard<'_, Lines> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, line: String, access: bool) {
        let mut s = self.lock();
        if access {
            s.served += 1;
        }
        s.lines.push((access, line));
        self.changed.notify_all();
    }

    /// Where the log is now.
    pub fn mark(&self) -> Mark {
        let s = self.lock();
        Mark {
            line: s.lines.len(),
            served: s.served,
        }
    }

    /// Waits until `n` more requests than at `mark` have been completely served (log phase
    /// done), or `timeout` passed; says whether they were.
    pub fn wait_served(&self, mark: Mark, n: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        while s.served < mark.served + n {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            s = self
                .changed
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// The lines logged since `mark`, without the access-log lines.
    pub fn since(&self, mark: Mark) -> Vec<String> {
        let s = self.lock();
        s.lines
            .get(mark.line..)
            .unwrap_or_default()
            .iter()
            .filter(|(access, _)| !access)
            .map(|(_, l)| l.clone())
            .collect()
    }
}

/// The process's capture, installed as the log subscriber on first use.
pub fn install() -> &'static Capture {
    static CAPTURE: OnceLock<&'static Capture> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let capture: &'static Capture = Box::leak(Box::default());
        // Plugin debug lines too, so `expect.log` can look for `core.log.debug` output.
        let filter = match std::env::var("RUST_LOG") {
            Ok(v) if !v.is_empty() => EnvFilter::new(v),
            _ => EnvFilter::new("info,moongate::lua=debug"),
        };
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .without_time()
            .with_ansi(false)
            .with_writer(CaptureWriter(capture))
            .try_init();
        capture
    })
}

#[derive(Clone, Copy)]
struct CaptureWriter(&'static Capture);

/// One event's text, appended to the capture when the formatter is done with it.
pub struct EventWriter {
    capture: &'static Capture,
    buf: Vec<u8>,
    access: bool,
}

impl Write for EventWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let text = String::from_utf8_lossy(&self.buf);
        let line = text.trim_end().to_string();
        self.capture.push(line, self.access);
    }
}

impl<'a> MakeWriter<'a> for CaptureWriter {
    type Writer = EventWriter;

    fn make_writer(&'a self) -> EventWriter {
        EventWriter {
            capture: self.0,
            buf: Vec::new(),
            access: false,
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> EventWriter {
        EventWriter {
            capture: self.0,
            buf: Vec::new(),
            access: meta.target() == ACCESS_TARGET,
        }
    }
}
