//! The writer thread: the workers' batches from the queue, and once a second their partial
//! ones, into a buffered file, flushed when the queue runs empty; reopened on request
//! (SIGUSR1).

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::Destination;

/// Lines a thread rendered and not yet handed over.
#[derive(Default)]
pub(super) struct Batch {
    pub buf: Vec<u8>,
    pub lines: u64,
}

impl Batch {
    pub(super) fn with_capacity(bytes: usize) -> Batch {
        Batch {
            // Room for the line that crosses the size, so it needs no regrowth.
            buf: Vec::with_capacity(bytes + 512),
            lines: 0,
        }
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the queue carries.
pub(super) enum Msg {
    Batch(Batch),
    /// Look at the flags (a reopen was asked for).
    Wake,
    /// Write everything out, then answer.
    Flush(mpsc::SyncSender<()>),
}

/// State shared by the workers, the signal handler and the writer.
#[derive(Default)]
pub(super) struct Shared {
    pub dropped: AtomicU64,
    pub reopen: AtomicBool,
    /// Every thread's batch, for the writer to take partial ones from.
    batches: Mutex<Vec<Arc<Mutex<Batch>>>>,
}

impl Shared {
    /// A batch for a thread that logs its first line.
    pub(super) fn register(&self) -> Arc<Mutex<Batch>> {
        let b = Arc::new(Mutex::new(Batch::default()));
        lock(&self.batches).push(b.clone());
        b
    }
}

/// The open destination.
pub(super) enum Sink {
    File(File),
    Stdout,
    Stderr,
}

impl Sink {
    /// Opens a file for appending (creating it and its folder), or takes stdout/stderr.
    pub(super) fn open(d: &Destination) -> io::Result<Sink> {
        match d {
            Destination::Stdout => Ok(Sink::Stdout),
            Destination::Stderr => Ok(Sink::Stderr),
            Destination::File(p) => {
                if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                    if !dir.exists() {
                        std::fs::create_dir_all(dir).map_err(|e| {
                            io::Error::new(
                                e.kind(),
                                format!("cannot create {}: {e}", dir.display()),
                            )
                        })?;
                    }
                }
                OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(p)
                    .map(Sink::File)
                    .map_err(|e| {
                        io::Error::new(e.kind(), format!("cannot open {}: {e}", p.display()))
                    })
            }
        }
    }
}

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Sink::File(f) => f.write(b),
            Sink::Stdout => io::stdout().write(b),
            Sink::Stderr => io::stderr().write(b),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::File(f) => f.flush(),
            Sink::Stdout => io::stdout().flush(),
            Sink::Stderr => io::stderr().flush(),
        }
    }
}

pub(super) fn spawn(
    rx: mpsc::Receiver<Msg>,
    sink: Sink,
    dest: Destination,
    buffer: usize,
    shared: Arc<Shared>,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name("moongate-accesslog".into())
        .spawn(move || {
            Writer {
                out: BufWriter::with_capacity(buffer, sink),
                dest,
                shared,
                failing: false,
                reported_drops: 0,
                last_report: None,
            }
            .run(rx)
        })
        .map(|_| ())
}

struct Writer {
    out: BufWriter<Sink>,
    dest: Destination,
    shared: Arc<Shared>,
    /// A write failed and has been logged; logged again once writes work.
    failing: bool,
    reported_drops: u64,
    last_report: Option<Instant>,
}

/// How often dropped lines are reported on the error log, at most.
const DROP_REPORT: Duration = Duration::from_secs(10);

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        let mut swept = Instant::now();
        loop {
            let wait = super::FLUSH_EVERY.saturating_sub(swept.elapsed());
            let msg = match rx.recv_timeout(wait) {
                Ok(m) => Some(m),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.sweep();
                    self.flush();
                    return;
                }
            };
            if let Some(m) = msg {
                self.handle(m);
                // Whatever else is queued goes into the same buffer, then one flush.
                while let Ok(m) = rx.try_recv() {
                    self.handle(m);
                }
            }
            let reopen = self.shared.reopen.swap(false, Ordering::AcqRel);
            // Lines logged before the signal belong in the file being rotated away.
            if reopen || swept.elapsed() >= super::FLUSH_EVERY {
                self.sweep();
                swept = Instant::now();
            }
            self.flush();
            if reopen {
                self.reopen();
            }
            self.report_drops();
        }
    }

    /// Writes every thread's partial batch.
    fn sweep(&mut self) {
        let batches: Vec<Arc<Mutex<Batch>>> = lock(&self.shared.batches).clone();
        for b in batches {
            let taken = {
                let mut g = lock(&b);
                if g.buf.is_empty() {
                    continue;
                }
                std::mem::take(&mut *g)
            };
            let r = self.out.write_all(&taken.buf);
            self.result(r);
        }
    }

    fn handle(&mut self, m: Msg) {
        match m {
            Msg::Batch(b) => {
                let r = self.out.write_all(&b.buf);
                self.result(r);
            }
            Msg::Wake => {}
            Msg::Flush(ack) => {
                self.sweep();
                self.flush();
                let _ = ack.try_send(());
            }
        }
    }

    fn flush(&mut self) {
        let r = self.out.flush();
        self.result(r);
    }

    fn result(&mut self, r: io::Result<()>) {
        match r {
            Ok(()) if self.failing => {
                self.failing = false;
                tracing::info!("access log: writing again");
            }
            Ok(()) => {}
            Err(e) if !self.failing => {
                self.failing = true;
                tracing::error!("access log: write failed: {e}");
            }
            Err(_) => {}
        }
    }

    fn reopen(&mut self) {
        let Destination::File(path) = &self.dest else {
            return;
        };
        match Sink::open(&self.dest) {
            Ok(sink) => {
                *self.out.get_mut() = sink;
                tracing::info!("access log reopened: {}", path.display());
            }
            Err(e) => tracing::error!("access log: reopen failed, still writing the old file: {e}"),
        }
    }

    fn report_drops(&mut self) {
        let dropped = self.shared.dropped.load(Ordering::Relaxed);
        if dropped == self.reported_drops
            || self.last_report.is_some_and(|t| t.elapsed() < DROP_REPORT)
        {
            return;
        }
        tracing::warn!(
            "access log: {} line(s) dropped, the queue to the writer was full ({dropped} since start)",
            dropped - self.reported_drops
        );
        self.reported_drops = dropped;
        self.last_report = Some(Instant::now());
    }
}
