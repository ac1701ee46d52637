//! The supervisor: a small parent process that owns the listening sockets and keeps a serving
//! process running on them, as nginx's master process keeps its workers.
//!
//! `moongate run` binds every listener ([`ListenerSet`]), then starts the serving process
//! (the same binary, `run` again, with the sockets inherited and described in
//! [`listeners::ENV`]). When the serving process dies by a signal (a segfault in a plugin's FFI
//! code, an abort, the OOM killer) the supervisor logs the cause and starts a new one at once
//! on the same sockets, so the ports never stop accepting: connections made in between wait in
//! the accept queues. Crashes in a row back off (0.1 s doubling up to 10 s) so a crash loop
//! does not spin; a process that served for [`STABLE`] starts the count over. SIGTERM, SIGINT,
//! SIGHUP and SIGUSR1 are passed on to the serving process; after SIGTERM/SIGINT the supervisor closes
//! its sockets (new connections are refused, not left queued), waits for the serving process
//! and exits with its status.
//!
//! The supervisor reads the config file once, for the addresses and the worker count; it
//! never builds a snapshot, loads a plugin or opens the store, so nothing a plugin does can
//! reach it. It is one thread: signals are blocked and taken with `sigtimedwait`, and the
//! serving process gets `PR_SET_PDEATHSIG` so it never outlives a supervisor killed with
//! SIGKILL.

pub mod listeners;

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

pub use listeners::{BindError, BoundListener, ListenerSet, Sharing};

/// The environment variable naming the descriptor a serving process writes one byte to once
/// it serves (so the supervisor can tell a failed start from a crash).
pub const READY_ENV: &str = "MOONGATE_READY_FD";

/// A serving process that ran this long before it died was not crash-looping.
pub const STABLE: Duration = Duration::from_secs(10);

/// Longest wait between restarts in a crash loop.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// What a serving process got from its supervisor.
pub struct Inherited {
    /// The listeners bound by the supervisor (empty without one).
    pub listeners: ListenerSet,
    ready: Option<OwnedFd>,
}

impl Inherited {
    /// Reads what a supervisor handed to this process, if one started it. Call it before any
    /// thread starts: it removes the variables from the environment.
    pub fn take() -> Result<Inherited, BindError> {
        let listeners = ListenerSet::inherited()?;
        let ready = std::env::var(READY_ENV).ok().and_then(|v| {
            std::env::remove_var(READY_ENV);
            let fd: RawFd = v.parse().ok()?;
            // SAFETY: the supervisor opened this pipe end for this process; nothing else here
            // owns it. Marked close-on-exec so plugin child processes do not hold it.
            unsafe {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                Some(OwnedFd::from_raw_fd(fd))
            }
        });
        Ok(Inherited { listeners, ready })
    }

    /// Whether a supervisor started this process.
    pub fn supervised(&self) -> bool {
        self.ready.is_some()
    }

    /// Tells the supervisor this process serves (a later death is a crash, not a failed
    /// start).
    pub fn ready(&mut self) {
        if let Some(fd) = self.ready.take() {
            // SAFETY: writes one byte from a live buffer to a descriptor we own.
            let _ = unsafe { libc::write(fd.as_raw_fd(), b"1".as_ptr().cast(), 1) };
        }
    }
}

/// How a serving process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    Exited(i32),
    Signaled { signal: i32, core: bool },
}

impl Ended {
    fn from_status(status: libc::c_int) -> Ended {
        if libc::WIFSIGNALED(status) {
            Ended::Signaled {
                signal: libc::WTERMSIG(status),
                core: libc::WCOREDUMP(status),
            }
        } else {
            Ended::Exited(libc::WEXITSTATUS(status))
        }
    }

    /// The supervisor's own exit code for it (128 + signal, as shells report).
    fn exit_code(self) -> u8 {
        match self {
            Ended::Exited(c) => u8::try_from(c).unwrap_or(1),
            Ended::Signaled { signal, .. } => u8::try_from(128 + signal).unwrap_or(255),
        }
    }

    fn describe(self) -> String {
        match self {
            Ended::Exited(c) => format!("exited with status {c}"),
            Ended::Signaled { signal, core } => format!(
                "was killed by signal {signal} ({}){}",
                signal_name(signal),
                if core { ", core dumped" } else { "" }
            ),
        }
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGSYS => "SIGSYS",
        libc::SIGTRAP => "SIGTRAP",
        _ => "?",
    }
}

/// The delay before the next start after `crashes` crashes in a row (the first is at once).
fn backoff(crashes: u32) -> Duration {
    if crashes <= 1 {
        return Duration::ZERO;
    }
    let ms = 100u64.saturating_mul(1u64 << (crashes - 2).min(16));
    Duration::from_millis(ms).min(MAX_BACKOFF)
}

/// One started serving process.
struct Serving {
    pid: libc::pid_t,
    started: Instant,
    /// The read end of its readiness pipe.
    ready: OwnedFd,
}

impl Serving {
    /// Whether it said it serves (non-blocking read of the pipe).
    fn was_ready(&self) -> bool {
        let mut b = [0u8; 1];
        // SAFETY: reads into a live one-byte buffer from a descriptor we own.
        let n = unsafe { libc::read(self.ready.as_raw_fd(), b.as_mut_ptr().cast(), 1) };
        n == 1
    }
}

/// Signals the supervisor takes itself (blocked, read with `sigtimedwait`).
fn signal_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [
            libc::SIGCHLD,
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGHUP,
            libc::SIGUSR1,
        ] {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Runs the supervisor: starts the serving process with `args` (after the program) on
/// `listeners` and keeps one running until told to stop. Returns the exit code for the
/// command.
pub fn run(mut listeners: ListenerSet, args: Vec<OsString>) -> ExitCode {
    let set = signal_set();
    // SAFETY: blocks these signals on this (the only) thread, so they wait for sigtimedwait.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    let program = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            tracing::error!("cannot find the moongate binary to start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut crashes: u32 = 0;
    let mut ever_ready = false;
    let mut stopping = false;
    let mut next_start: Option<Instant> = Some(Instant::now());
    let mut current: Option<Serving> = None;
    loop {
        if current.is_none() {
            if stopping {
                return ExitCode::SUCCESS;
            }
            if let Some(at) = next_start {
                if Instant::now() >= at {
                    match spawn(&program, &args, &listeners) {
                        Ok(s) => {
                            tracing::info!(pid = s.pid, "supervisor started the serving process");
                            current = Some(s);
                        }
                        Err(e) => {
                            tracing::error!("cannot start the serving process: {e}");
                            return ExitCode::FAILURE;
                        }
                    }
                    next_start = None;
                }
            }
        }
        let timeout = next_start.map(|at| at.saturating_duration_since(Instant::now()));
        let Some(signal) = wait_signal(&set, timeout) else {
            continue;
        };
        match signal {
            libc::SIGCHLD => {
                let Some(s) = &current else { continue };
                let Some(ended) = reap(s.pid) else { continue };
                let s = current.take().expect("checked above");
                let ready = s.was_ready();
                ever_ready |= ready;
                let ran = s.started.elapsed();
                if stopping {
                    return ExitCode::from(ended.exit_code());
                }
                if !ever_ready {
                    // The first start failed (a bad config, a store another process holds):
                    // the serving process said why; a supervisor that retried would hide it.
                    return ExitCode::from(ended.exit_code().max(1));
                }
                if ended == Ended::Exited(0) {
                    tracing::info!(pid = s.pid, "the serving process stopped; supervisor exits");
                    return ExitCode::SUCCESS;
                }
                crashes = if ready && ran >= STABLE {
                    1
                } else {
                    crashes + 1
                };
                let delay = backoff(crashes);
                tracing::error!(
                    pid = s.pid,
                    crashes_in_a_row = crashes,
                    "the serving process {} after {:.1}s{}; starting a new one on the same sockets {}",
                    ended.describe(),
                    ran.as_secs_f64(),
                    if ready { "" } else { " (before it served)" },
                    if delay.is_zero() {
                        "now".to_string()
                    } else {
                        format!("in {:.1}s", delay.as_secs_f64())
                    }
                );
                next_start = Some(Instant::now() + delay);
            }
            sig => {
                // SIGHUP (reload) and SIGUSR1 (reopen the logs) pass on; the supervisor
                // reopens its own error log file on SIGUSR1.
                if sig == libc::SIGUSR1 {
                    crate::errorlog::reopen();
                }
                if sig != libc::SIGHUP && sig != libc::SIGUSR1 {
                    stopping = true;
                    // No new serving process will take them: refuse new connections now
                    // instead of queueing them until we exit.
                    listeners.close();
                    next_start = None;
                }
                if let Some(s) = &current {
                    // SAFETY: kill(2) on our own child, not yet reaped.
                    unsafe {
                        libc::kill(s.pid, sig);
                    }
                }
            }
        }
    }
}

/// Waits for one of the blocked signals, at most `timeout` (forever when None).
fn wait_signal(set: &libc::sigset_t, timeout: Option<Duration>) -> Option<i32> {
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    // SAFETY: `set` is initialised; `info` is written by the call; `ts` lives across it.
    let sig = unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        match &ts {
            Some(ts) => libc::sigtimedwait(set, &mut info, ts),
            None => libc::sigwaitinfo(set, &mut info),
        }
    };
    (sig > 0).then_some(sig)
}

/// Reaps `pid` if it ended.
fn reap(pid: libc::pid_t) -> Option<Ended> {
    let mut status: libc::c_int = 0;
    // SAFETY: waitpid on our own child with a live status out-parameter.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    (r == pid).then(|| Ended::from_status(status))
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 fills the two-element array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just opened and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Starts a serving process that inherits `listeners` and a readiness pipe.
fn spawn(
    program: &std::path::Path,
    args: &[OsString],
    listeners: &ListenerSet,
) -> io::Result<Serving> {
    let (ready_r, ready_w) = pipe()?;
    let mut inherit = listeners.raw_fds();
    inherit.push(ready_w.as_raw_fd());
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env(listeners::ENV, listeners.to_env())
        .env(READY_ENV, ready_w.as_raw_fd().to_string());
    // SAFETY: the closure runs in the forked child before exec and calls only
    // async-signal-safe functions (fcntl, prctl, getppid, sigprocmask) on memory allocated
    // before the fork.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &inherit {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            // A supervisor killed with SIGKILL takes its serving process with it.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(io::Error::other("the supervisor is gone"));
            }
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    drop(ready_w);
    Ok(Serving {
        pid: child.id() as libc::pid_t,
        started: Instant::now(),
        ready: ready_r,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_restart_is_immediate_then_it_backs_off() {
        assert_eq!(backoff(1), Duration::ZERO);
        assert_eq!(backoff(2), Duration::from_millis(100));
        assert_eq!(backoff(3), Duration::from_millis(200));
        assert_eq!(backoff(60), MAX_BACKOFF);
    }

    #[test]
    fn a_segfault_is_described_with_its_name() {
        let e = Ended::Signaled {
            signal: libc::SIGSEGV,
            core: false,
        };
        assert_eq!(e.describe(), "was killed by signal 11 (SIGSEGV)");
        assert_eq!(e.exit_code(), 139);
    }
}
