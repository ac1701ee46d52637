//! The access log: APISIX's `nginx_config.http.access_log`, `access_log_format` and
//! `access_log_format_escape`, one line per request written off the worker threads.
//!
//! A worker renders the request's line (the format is compiled once, when the node config
//! is read) into its own batch, as nginx's `access_log ... buffer=` does: a batch that reaches
//! `access_log_buffer` bytes goes to a bounded queue in one piece, and the one writer thread
//! writes it to the file (or stdout/stderr). The writer also takes every thread's partial
//! batch once a second ([`FLUSH_EVERY`]), before a reopen, and at shutdown, so a quiet worker's
//! lines wait at most that long. One hand-off per batch, not per line: the worker wakes the
//! writer about once per 16 KiB of lines instead of once per request. When the queue is full
//! the batch's lines are counted as dropped (`moongate_access_log_dropped_total`) and the
//! worker goes on: a slow disk never stalls requests. SIGUSR1 makes the writer reopen the
//! file, for logrotate, as nginx's USR1 does.

pub mod format;
pub mod time;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{ConfigError, NodeConfig};
use crate::plugin::Ctx;
pub use format::{Escape, Format};

/// APISIX's default `access_log_format` (`apisix/cli/config.lua`).
pub const DEFAULT_FORMAT: &str = "$remote_addr - $remote_user [$time_local] $http_host \"$request\" $status $body_bytes_sent $request_time \"$http_referer\" \"$http_user_agent\" $upstream_addr $upstream_status $upstream_response_time \"$upstream_scheme://$upstream_host$upstream_uri\" \"$apisix_request_id\"";

/// APISIX's default `access_log` path (relative to the config file's folder here).
pub const DEFAULT_PATH: &str = "logs/access.log";

/// `nginx_config`: the part of APISIX's nginx settings moongate has.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct NginxConfig {
    #[serde(default)]
    pub http: HttpConfig,
    /// The error log: a file path or `stderr` (default), see [`crate::errorlog`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_log: Option<String>,
    /// nginx's level names (`debug` ... `emerg`); `log_level` overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_log_level: Option<String>,
    /// `text` (default) or `json` lines (moongate's).
    #[serde(default)]
    pub error_log_format: crate::errorlog::ErrorLogFormat,
}

/// `nginx_config.http`: the access log.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// `false`: no access log at all.
    #[serde(default = "yes")]
    pub enable_access_log: bool,
    /// A file path, `off`, or `stdout`/`/dev/stdout`/`stderr`/`/dev/stderr`.
    #[serde(default)]
    pub access_log: Option<String>,
    /// nginx's `log_format` text, or a map of JSON keys to templates (JSON lines).
    #[serde(default)]
    pub access_log_format: Option<Value>,
    #[serde(default)]
    pub access_log_format_escape: Escape,
    /// Bytes the writer buffers before a write (APISIX's `access_log_buffer`).
    #[serde(default = "default_buffer")]
    pub access_log_buffer: usize,
    /// Lines the queue to the writer holds; more are dropped and counted.
    #[serde(default = "default_queue")]
    pub access_log_queue: usize,
}

fn yes() -> bool {
    true
}
fn default_buffer() -> usize {
    16384
}
fn default_queue() -> usize {
    8192
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            enable_access_log: true,
            access_log: None,
            access_log_format: None,
            access_log_format_escape: Escape::Default,
            access_log_buffer: default_buffer(),
            access_log_queue: default_queue(),
        }
    }
}

/// Where lines go.
#[derive(Debug, Clone, PartialEq)]
pub enum Destination {
    File(PathBuf),
    Stdout,
    Stderr,
}

/// What the node's access-log settings ask for.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// No access log.
    Off,
    /// moongate's summary line on stderr with the error log (target `moongate::access`): no
    /// `nginx_config.http` access-log setting is given.
    Summary,
    /// The formatted log.
    Formatted(Settings),
}

/// The formatted access log's settings, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub destination: Destination,
    pub format: Format,
    pub escape: Escape,
    pub buffer: usize,
    pub queue: usize,
}

const AT: &str = "nginx_config.http";

impl Mode {
    /// Reads the node's settings; a bad one is an error with its path.
    pub fn from_node(node: &NodeConfig) -> Result<Mode, ConfigError> {
        let h = &node.nginx_config.http;
        if !h.enable_access_log || h.access_log.as_deref() == Some("off") {
            return Ok(Mode::Off);
        }
        if h.access_log.is_none() && h.access_log_format.is_none() {
            return Ok(if node.access_log {
                Mode::Summary
            } else {
                Mode::Off
            });
        }
        let format = match &h.access_log_format {
            Some(v) => Format::compile(v, &format!("{AT}.access_log_format"))
                .map_err(|e| ConfigError::new("", e))?,
            None => Format::compile(&Value::String(DEFAULT_FORMAT.into()), "")
                .map_err(|e| ConfigError::new("", e))?,
        };
        let destination = match h.access_log.as_deref().unwrap_or(DEFAULT_PATH) {
            "" => {
                return Err(ConfigError::new(
                    format!("{AT}.access_log"),
                    "must be a path, off, stdout or stderr",
                ))
            }
            "stdout" | "/dev/stdout" => Destination::Stdout,
            "stderr" | "/dev/stderr" => Destination::Stderr,
            p => Destination::File(PathBuf::from(p)),
        };
        if h.access_log_queue == 0 {
            return Err(ConfigError::new(
                format!("{AT}.access_log_queue"),
                "must be at least 1",
            ));
        }
        Ok(Mode::Formatted(Settings {
            destination,
            format,
            escape: h.access_log_format_escape,
            buffer: h.access_log_buffer.max(1),
            queue: h.access_log_queue,
        }))
    }
}

/// Makes a relative `access_log` path relative to the config file's folder `base` (and fills
/// in APISIX's default path when only the format is given).
pub fn resolve_path(http: &mut HttpConfig, base: &Path) {
    if http.access_log.is_none() && http.access_log_format.is_some() {
        http.access_log = Some(DEFAULT_PATH.to_string());
    }
    let Some(p) = http.access_log.as_mut() else {
        return;
    };
    if matches!(
        p.as_str(),
        "off" | "stdout" | "stderr" | "/dev/stdout" | "/dev/stderr" | ""
    ) {
        return;
    }
    if Path::new(p.as_str()).is_relative() {
        *p = base.join(p.as_str()).to_string_lossy().into_owned();
    }
}

/// How long a line may wait in a thread's partial batch before the writer takes it.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// The running access log (the serving process has at most one).
pub struct AccessLog {
    format: Format,
    escape: Escape,
    /// A batch this large is handed to the writer (`access_log_buffer`).
    buffer: usize,
    tx: mpsc::SyncSender<writer::Msg>,
    shared: Arc<writer::Shared>,
}

thread_local! {
    /// This thread's batch, registered with the writer on the thread's first line.
    static BATCH: std::cell::OnceCell<Arc<std::sync::Mutex<writer::Batch>>> =
        const { std::cell::OnceCell::new() };
}

static LOG: OnceLock<AccessLog> = OnceLock::new();

/// The access log, when the formatted one was started.
pub fn get() -> Option<&'static AccessLog> {
    LOG.get()
}

/// Opens the destination and starts the writer thread. The error names the setting.
pub fn start(settings: Settings) -> Result<(), String> {
    let sink =
        writer::Sink::open(&settings.destination).map_err(|e| format!("{AT}.access_log: {e}"))?;
    let (tx, rx) = mpsc::sync_channel(settings.queue);
    let shared = Arc::new(writer::Shared::default());
    writer::spawn(
        rx,
        sink,
        settings.destination,
        settings.buffer,
        shared.clone(),
    )
    .map_err(|e| format!("cannot start the access log writer: {e}"))?;
    let log = AccessLog {
        format: settings.format,
        escape: settings.escape,
        buffer: settings.buffer.max(1),
        tx,
        shared,
    };
    LOG.set(log)
        .map_err(|_| "the access log was started twice".to_string())
}

impl AccessLog {
    /// Renders the request's line into this thread's batch; a full batch is queued for the
    /// writer, or dropped (its lines counted) when the queue is full.
    pub fn record(&self, ctx: &mut Ctx) {
        BATCH.with(|cell| {
            let slot = cell.get_or_init(|| self.shared.register());
            let mut b = writer::lock(slot);
            self.format.render(ctx, self.escape, &mut b.buf);
            b.buf.push(b'\n');
            b.lines += 1;
            if b.buf.len() < self.buffer {
                return;
            }
            let full = std::mem::replace(&mut *b, writer::Batch::with_capacity(self.buffer));
            drop(b);
            let lines = full.lines;
            if self.tx.try_send(writer::Msg::Batch(full)).is_err() {
                self.shared.dropped.fetch_add(lines, Ordering::Relaxed);
            }
        });
    }

    /// Lines dropped since start because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Asks the writer to reopen its file (SIGUSR1). Never blocks.
    pub fn reopen(&self) {
        self.shared.reopen.store(true, Ordering::Release);
        // A wake-up for an idle writer; a busy one sees the flag after its current line.
        let _ = self.tx.try_send(writer::Msg::Wake);
    }

    /// Writes out what is queued and buffered, waiting at most `timeout` (at shutdown).
    pub fn flush(&self, timeout: Duration) {
        let (ack_tx, ack_rx) = mpsc::sync_channel(1);
        let deadline = std::time::Instant::now() + timeout;
        let mut msg = writer::Msg::Flush(ack_tx);
        loop {
            match self.tx.try_send(msg) {
                Ok(()) => break,
                Err(mpsc::TrySendError::Full(m)) => {
                    if std::time::Instant::now() >= deadline {
                        return;
                    }
                    msg = m;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(mpsc::TrySendError::Disconnected(_)) => return,
            }
        }
        let _ = ack_rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()));
    }
}

/// `moongate_access_log_dropped_total` for the metrics export.
pub struct DroppedSource;

impl crate::metrics::expose::Source for DroppedSource {
    fn collect(&self, out: &mut Vec<crate::metrics::expose::Family>) {
        use crate::metrics::expose::{Family, Kind, Value};
        let Some(log) = get() else { return };
        let mut f = Family::new(
            "moongate_access_log_dropped_total",
            "Access-log lines dropped because the queue to the writer was full",
            Kind::Counter,
            &[],
        );
        f.push(Vec::new(), Value::Int(log.dropped()));
        out.push(f);
    }
}
