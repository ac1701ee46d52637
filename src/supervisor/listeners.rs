//! Listening sockets that outlive a serving process.
//!
//! A [`ListenerSet`] is every socket `moongate run` listens on, grouped by role (`http` for the
//! proxy, one socket per worker so each worker keeps its own accept queue; `admin` for the
//! Admin API) and by the address the config file wrote. The supervisor binds the set once and
//! hands it to each serving process it starts, as inherited file descriptors described in one
//! environment variable; the serving process takes its listeners from the set by role and
//! address, and binds what is not there itself (a process started with `--single-process`, or
//! an address added to the config file since start-up).

use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

use socket2::{Domain, Protocol, Socket, Type};

/// The environment variable that carries an inherited set to the serving process.
pub const ENV: &str = "MOONGATE_LISTENERS";

/// Listen backlog: connections queue here while a serving process restarts.
const BACKLOG: i32 = 4096;

/// How an address's sockets are bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// `count` sockets with `SO_REUSEPORT`: the kernel spreads connections over their queues.
    PerWorker(usize),
    /// One plain socket.
    Single,
}

impl Sharing {
    fn count(self) -> usize {
        match self {
            Sharing::PerWorker(n) => n.max(1),
            Sharing::Single => 1,
        }
    }
}

/// One configured address and the sockets bound for it.
#[derive(Debug)]
pub struct BoundListener {
    /// What the sockets serve: `http`, `admin` (and whatever later listeners add).
    pub role: String,
    /// The address as the config file wrote it (port 0 stays 0 here).
    pub configured: SocketAddr,
    /// The address actually bound (the chosen port when the config said 0).
    pub local: SocketAddr,
    /// Non-blocking listening sockets: one per worker, or one.
    pub sockets: Vec<StdListener>,
}

/// Why an address could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// Another process (or socket) listens there already.
    #[error("address already in use: {0}")]
    InUse(SocketAddr),
    #[error("cannot listen on {addr}: {err}")]
    Other { addr: SocketAddr, err: io::Error },
    #[error("bad {ENV} from the supervisor: {0}")]
    Inherited(String),
}

fn bind_error(addr: SocketAddr, err: io::Error) -> BindError {
    if err.kind() == io::ErrorKind::AddrInUse {
        BindError::InUse(addr)
    } else {
        BindError::Other { addr, err }
    }
}

/// The listening sockets of one `moongate run`.
#[derive(Debug, Default)]
pub struct ListenerSet {
    entries: Vec<BoundListener>,
}

impl ListenerSet {
    /// An empty set: everything taken from it is bound on the spot.
    pub fn new() -> ListenerSet {
        ListenerSet::default()
    }

    /// Binds `addr` for `role` and adds it to the set.
    pub fn bind(
        &mut self,
        role: &str,
        addr: SocketAddr,
        sharing: Sharing,
    ) -> Result<&BoundListener, BindError> {
        let entry = bind_new(role, addr, sharing)?;
        self.entries.push(entry);
        Ok(&self.entries[self.entries.len() - 1])
    }

    /// The listener for `role` on `addr`: the inherited one when the set holds it, else
    /// newly bound. An inherited `http` listener keeps the socket count it was bound with.
    pub fn take_or_bind(
        &mut self,
        role: &str,
        addr: SocketAddr,
        sharing: Sharing,
    ) -> Result<BoundListener, BindError> {
        match self
            .entries
            .iter()
            .position(|e| e.role == role && e.configured == addr)
        {
            Some(i) => Ok(self.entries.remove(i)),
            None => bind_new(role, addr, sharing),
        }
    }

    /// What is left after the serving process took its listeners: addresses the config file
    /// no longer lists.
    pub fn into_rest(self) -> Vec<BoundListener> {
        self.entries
    }

    /// Every entry, in the order bound.
    pub fn entries(&self) -> &[BoundListener] {
        &self.entries
    }

    /// Drops every socket: the supervisor stops accepting once it will not start another
    /// serving process, so new connections are refused rather than left queued.
    pub fn close(&mut self) {
        self.entries.clear();
    }

    /// Every file descriptor in the set (for the child to inherit).
    pub fn raw_fds(&self) -> Vec<RawFd> {
        self.entries
            .iter()
            .flat_map(|e| e.sockets.iter().map(|s| s.as_raw_fd()))
            .collect()
    }

    /// The set as [`ENV`] describes it: `role|configured|local|fd,fd;...`.
    pub fn to_env(&self) -> String {
        self.entries
            .iter()
            .map(|e| {
                let fds: Vec<String> = e
                    .sockets
                    .iter()
                    .map(|s| s.as_raw_fd().to_string())
                    .collect();
                format!("{}|{}|{}|{}", e.role, e.configured, e.local, fds.join(","))
            })
            .collect::<Vec<_>>()
            .join(";")
    }

    /// The set a supervisor handed to this process, read from (and removed from) [`ENV`]; an
    /// empty set when this process was not started by a supervisor.
    pub fn inherited() -> Result<ListenerSet, BindError> {
        let Ok(text) = std::env::var(ENV) else {
            return Ok(ListenerSet::new());
        };
        // Not for the plugins' child processes (`io.popen`).
        std::env::remove_var(ENV);
        // SAFETY: the supervisor opened these descriptors for this process and nothing else
        // in it owns them; `adopt` checks each is a listening socket before using it.
        unsafe { ListenerSet::from_env(&text) }
    }

    /// Parses [`ENV`] text and adopts its descriptors.
    ///
    /// # Safety
    /// Every descriptor named must be open in this process and owned by nobody else.
    unsafe fn from_env(text: &str) -> Result<ListenerSet, BindError> {
        let bad = |what: &str| BindError::Inherited(format!("{what} in {text:?}"));
        let mut entries = Vec::new();
        for item in text.split(';').filter(|s| !s.is_empty()) {
            let parts: Vec<&str> = item.split('|').collect();
            let [role, configured, local, fds] = parts[..] else {
                return Err(bad("an entry without four fields"));
            };
            let configured: SocketAddr = configured.parse().map_err(|_| bad("an address"))?;
            let local: SocketAddr = local.parse().map_err(|_| bad("an address"))?;
            let mut sockets = Vec::new();
            for fd in fds.split(',') {
                let fd: RawFd = fd.parse().map_err(|_| bad("a descriptor"))?;
                // SAFETY: the caller's contract.
                sockets.push(unsafe { adopt(fd) }.map_err(|e| bad(&e.to_string()))?);
            }
            entries.push(BoundListener {
                role: role.to_string(),
                configured,
                local,
                sockets,
            });
        }
        Ok(ListenerSet { entries })
    }
}

/// Takes ownership of an inherited descriptor, checks it is a listening TCP socket and marks
/// it close-on-exec again (it was cleared only so this process could inherit it).
///
/// # Safety
/// `fd` must be open and owned by nobody else in this process.
unsafe fn adopt(fd: RawFd) -> io::Result<StdListener> {
    // SAFETY: the caller's contract; from here on the socket owns (and closes) `fd`.
    let socket = unsafe { Socket::from_raw_fd(fd) };
    if !socket.is_listener()? {
        return Err(io::Error::other(format!(
            "descriptor {fd} is not listening"
        )));
    }
    socket.local_addr()?;
    socket.set_cloexec(true)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

fn bind_new(role: &str, addr: SocketAddr, sharing: Sharing) -> Result<BoundListener, BindError> {
    let sockets = match sharing {
        Sharing::Single => vec![bind_one(addr, false).map_err(|e| bind_error(addr, e))?],
        Sharing::PerWorker(_) => {
            // SO_REUSEPORT would let this process share a port another process (another
            // moongate with another config) listens on, splitting its traffic: a probe bind
            // without it fails when anyone listens there already.
            if addr.port() != 0 {
                probe(addr).map_err(|e| bind_error(addr, e))?;
            }
            let first = bind_one(addr, true).map_err(|e| bind_error(addr, e))?;
            let actual = first.local_addr().map_err(|e| bind_error(addr, e))?;
            let mut list = vec![first];
            for _ in 1..sharing.count() {
                list.push(bind_one(actual, true).map_err(|e| bind_error(actual, e))?);
            }
            list
        }
    };
    let local = sockets[0].local_addr().map_err(|e| bind_error(addr, e))?;
    Ok(BoundListener {
        role: role.to_string(),
        configured: addr,
        local,
        sockets,
    })
}

fn new_socket(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // SO_REUSEADDR only lets a restarted gateway bind next to its old connections in
    // TIME_WAIT; on Linux it never allows a second listener on the same address.
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    Ok(socket)
}

/// Binds (without listening) and closes again: fails with `AddrInUse` when any socket
/// listens on `addr`, SO_REUSEPORT or not.
fn probe(addr: SocketAddr) -> io::Result<()> {
    new_socket(addr)?.bind(&addr.into())
}

fn bind_one(addr: SocketAddr, reuse_port: bool) -> io::Result<StdListener> {
    let socket = new_socket(addr)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

impl fmt::Display for BoundListener {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{} {}", self.role, self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loopback() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    #[test]
    fn a_port_another_socket_listens_on_is_refused_even_with_reuseport() {
        let mut set = ListenerSet::new();
        let addr = set
            .bind("http", loopback(), Sharing::PerWorker(2))
            .expect("bind")
            .local;
        let mut other = ListenerSet::new();
        let err = other
            .bind("http", addr, Sharing::PerWorker(2))
            .expect_err("second bind");
        assert_eq!(err.to_string(), format!("address already in use: {addr}"));
    }

    #[test]
    fn port_zero_is_chosen_once_for_every_worker() {
        let mut set = ListenerSet::new();
        let entry = set
            .bind("http", loopback(), Sharing::PerWorker(3))
            .expect("bind");
        assert_eq!(entry.sockets.len(), 3);
        for s in &entry.sockets {
            assert_eq!(s.local_addr().expect("addr"), entry.local);
        }
        assert_eq!(entry.configured.port(), 0);
    }

    #[test]
    fn take_prefers_the_inherited_entry() {
        let mut set = ListenerSet::new();
        let local = set
            .bind("admin", loopback(), Sharing::Single)
            .expect("bind")
            .local;
        let taken = set
            .take_or_bind("admin", loopback(), Sharing::Single)
            .expect("take");
        assert_eq!(taken.local, local);
        assert!(set.entries().is_empty());
    }
}
