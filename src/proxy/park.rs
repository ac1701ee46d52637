//! A worker's parked connections: HTTP/1.1 keep-alive connections (plain, or TLS with nothing
//! pending in rustls) that have waited for their next request for a while ([`PARK_AFTER`])
//! with nothing buffered.
//!
//! A connection served by a task holds the task (its future and tokio's header, over 1 KiB),
//! tokio's registration of the socket and its timer, for as long as it waits. A parked one is
//! a socket in this worker's own epoll set and a slot here (about 150 bytes, and a TLS
//! connection's rustls state): the task ends,
//! and one task per worker watches all parked sockets and their deadlines. When a parked
//! socket turns readable (the next request, or the client's close), a new task serves it from
//! where the old one stopped, with the same head deadline; when the deadline passes first, or
//! the worker shuts down, the socket is closed, as the waiting task would have closed it.
//!
//! nginx keeps an idle keep-alive connection as its `ngx_connection_t` and frees its buffers;
//! this is the same idea for a task-per-connection server. Parking costs a few system calls
//! (leaving tokio's epoll set for this one and back), which is why only connections idle for
//! [`PARK_AFTER`] are parked, never one between the requests of a busy client.

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::ActiveGuard;
use crate::http1::io::ConnIo;
use crate::metrics::store::ConnectionGuard;

/// How long a connection waits for its next request, with nothing buffered, before it is
/// parked.
pub const PARK_AFTER: Duration = Duration::from_secs(1);

/// Events taken from the epoll set per call.
const EVENTS: usize = 64;

/// How long after parking connections the allocator is asked to give freed memory back
/// ([`set_release`]): mimalloc returns freed pages to the OS 1 s after they are freed, but
/// only when it is called again, and a worker whose connections are all parked calls it
/// for nothing.
const RELEASE_AFTER: Duration = Duration::from_millis(1500);

static RELEASE: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Sets what asks the global allocator to return the memory it holds free to the OS (the
/// `moongate` binary sets mimalloc's `mi_collect`), called on a worker a while after it
/// parked connections (their tasks' memory is free then).
pub fn set_release(f: fn()) {
    let _ = RELEASE.set(f);
}

/// A parked connection.
pub struct Parked {
    pub tcp: std::net::TcpStream,
    /// The TLS state of a TLS connection.
    pub tls: Option<Box<rustls::ServerConnection>>,
    pub info: ParkedInfo,
}

/// What a parked connection keeps beside its socket.
pub struct ParkedInfo {
    pub remote: SocketAddr,
    pub local: SocketAddr,
    /// When the wait for the next request head ends (the header timeout).
    pub deadline: Instant,
    /// The connection still counts as open (graceful shutdown, `moongate_connections`).
    pub guards: (ActiveGuard, ConnectionGuard),
    /// What plugins see of a TLS connection.
    pub tls_info: Option<Rc<crate::tls::TlsInfo>>,
}

#[derive(Default)]
struct Slots {
    /// Parked connections by slot; a slot's generation tells its occupants apart (epoll events
    /// and deadlines name both).
    slots: Vec<(u32, Option<Parked>)>,
    free: Vec<u32>,
    /// (deadline, slot) of every occupied slot.
    deadlines: BTreeSet<(Instant, u32)>,
}

impl Slots {
    fn insert(&mut self, p: Parked) -> (u32, u32) {
        let deadline = p.info.deadline;
        let idx = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize].1 = Some(p);
                i
            }
            None => {
                self.slots.push((0, Some(p)));
                (self.slots.len() - 1) as u32
            }
        };
        self.deadlines.insert((deadline, idx));
        (idx, self.slots[idx as usize].0)
    }

    /// Takes the connection out of slot `idx` if it is still generation `gen`'s.
    fn take(&mut self, idx: u32, gen: u32) -> Option<Parked> {
        let slot = self.slots.get_mut(idx as usize)?;
        if slot.0 != gen {
            return None;
        }
        let p = slot.1.take()?;
        slot.0 = slot.0.wrapping_add(1);
        self.free.push(idx);
        self.deadlines.remove(&(p.info.deadline, idx));
        Some(p)
    }

    fn len(&self) -> usize {
        self.deadlines.len()
    }
}

/// Serves a connection taken out of the park again (a new task, see [`super::resume_http1`]).
pub type Resume = Box<dyn Fn(Parked)>;

/// A worker's parked connections and their watcher.
pub struct Park {
    epoll: AsyncFd<OwnedFd>,
    slots: RefCell<Slots>,
    /// Wakes the watcher for a deadline earlier than the one it sleeps to.
    sooner: Notify,
    /// The deadline the watcher sleeps to (None: none).
    sleeping_to: Cell<Option<Instant>>,
    /// The watcher has ended (shutdown): nothing is parked any more.
    closed: Cell<bool>,
    /// When the allocator is asked next to give memory back (None: no connection was parked
    /// since it last was).
    release_at: Cell<Option<Instant>>,
    /// A connection was parked since `release_at` was set.
    parked_since: Cell<bool>,
}

impl Park {
    /// A new, empty park; `watch` must then run on the worker for it to do anything.
    pub fn new() -> io::Result<Rc<Park>> {
        // SAFETY: epoll_create1 has no memory arguments; a non-negative result is a new fd
        // that nothing else owns.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is the new epoll fd, owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an `OwnedFd` keeps its fd open and the same until it is dropped with the
        // `AsyncFd`.
        let epoll = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(Rc::new(Park {
            epoll,
            slots: RefCell::new(Slots::default()),
            sooner: Notify::new(),
            sleeping_to: Cell::new(None),
            closed: Cell::new(false),
            release_at: Cell::new(None),
            parked_since: Cell::new(false),
        }))
    }

    /// Connections parked now.
    pub fn len(&self) -> usize {
        self.slots.borrow().len()
    }

    /// Parks a connection (the socket leaves tokio's registration for this epoll set). A
    /// socket that cannot be parked is closed, as the timeout would have closed it.
    pub fn put(&self, io: ConnIo, info: ParkedInfo) {
        if self.closed.get() {
            return;
        }
        let (tcp, tls) = match io {
            ConnIo::Tcp(tcp) => (tcp, None),
            ConnIo::Tls(stream) => {
                let (tcp, tls) = stream.into_parts();
                (tcp, Some(Box::new(tls)))
            }
        };
        let Ok(tcp) = tcp.into_std() else { return };
        let fd = tcp.as_raw_fd();
        let deadline = info.deadline;
        let (idx, gen) = self.slots.borrow_mut().insert(Parked { tcp, tls, info });
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
            u64: key(idx, gen),
        };
        // SAFETY: both fds are open (the epoll set's and the slot's socket), `ev` lives for the
        // call.
        let r = unsafe {
            libc::epoll_ctl(
                self.epoll.get_ref().as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                fd,
                &mut ev,
            )
        };
        if r != 0 {
            tracing::debug!("cannot park a connection: {}", io::Error::last_os_error());
            self.slots.borrow_mut().take(idx, gen);
            return;
        }
        self.parked_since.set(true);
        let arm_release = self.release_at.get().is_none() && RELEASE.get().is_some();
        if arm_release {
            self.release_at.set(Some(Instant::now() + RELEASE_AFTER));
        }
        if arm_release || self.sleeping_to.get().is_none_or(|t| deadline < t) {
            self.sooner.notify_one();
        }
    }

    /// Takes a connection out of the epoll set and the slots.
    fn unpark(&self, idx: u32, gen: u32) -> Option<Parked> {
        let p = self.slots.borrow_mut().take(idx, gen)?;
        // SAFETY: both fds are open; DEL takes no event.
        unsafe {
            libc::epoll_ctl(
                self.epoll.get_ref().as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                p.tcp.as_raw_fd(),
                std::ptr::null_mut(),
            );
        }
        Some(p)
    }

    /// Watches the parked connections until `shutdown` turns true, then closes them (idle at
    /// shutdown: closed, as a waiting connection is). A readable one goes to `resume`, one past
    /// its deadline is closed.
    pub async fn watch(self: Rc<Self>, mut shutdown: watch::Receiver<bool>, resume: Resume) {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; EVENTS];
        loop {
            if *shutdown.borrow_and_update() {
                break;
            }
            let next = self.slots.borrow().deadlines.first().map(|&(at, _)| at);
            self.sleeping_to.set(next);
            let release_at = self.release_at.get();
            tokio::select! {
                biased;
                guard = self.epoll.readable() => {
                    let Ok(mut guard) = guard else { break };
                    // SAFETY: `events` has room for EVENTS entries; a zero timeout never blocks.
                    let n = unsafe {
                        libc::epoll_wait(
                            self.epoll.get_ref().as_raw_fd(),
                            events.as_mut_ptr(),
                            EVENTS as i32,
                            0,
                        )
                    };
                    if n < EVENTS as i32 {
                        guard.clear_ready();
                    }
                    for ev in &events[..n.max(0) as usize] {
                        let (idx, gen) = (ev.u64 as u32, (ev.u64 >> 32) as u32);
                        if let Some(p) = self.unpark(idx, gen) {
                            resume(p);
                        }
                    }
                }
                _ = sleep_until(next) => {
                    // Past their deadline: closed (dropping the socket leaves the epoll set).
                    let now = Instant::now();
                    let mut slots = self.slots.borrow_mut();
                    while let Some(&(at, idx)) = slots.deadlines.first() {
                        if at > now {
                            break;
                        }
                        let gen = slots.slots[idx as usize].0;
                        drop(slots.take(idx, gen));
                    }
                }
                _ = sleep_until(release_at) => {
                    // Once more later when more were parked since: the pages they freed in
                    // the last second are not given back yet.
                    let again = self.parked_since.replace(false);
                    self.release_at.set(again.then(|| Instant::now() + RELEASE_AFTER));
                    if let Some(release) = RELEASE.get() {
                        release();
                    }
                }
                _ = self.sooner.notified() => {}
                r = shutdown.changed() => {
                    if r.is_err() {
                        break;
                    }
                }
            }
        }
        self.closed.set(true);
        self.sleeping_to.set(None);
        let all = std::mem::take(&mut *self.slots.borrow_mut());
        drop(all);
    }
}

fn key(idx: u32, gen: u32) -> u64 {
    u64::from(idx) | (u64::from(gen) << 32)
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
