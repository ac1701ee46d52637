//! `ngx.socket.udp()`: OpenResty's non-blocking UDP (and datagram unix socket) client:
//! `setpeername`, `send`, `receive(size?)`, `settimeout`, `close`.
//!
//! A socket is a userdata over an `Rc` of its state; `setpeername`, `send` and `receive` are
//! waiting functions (the name is resolved by the gateway's resolver, a receive waits for a
//! datagram) whose futures hold the datagram socket for the operation. UDP sockets are never
//! pooled; a request's (or timer run's) are closed when it ends, as TCP cosockets are.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::rc::{Rc, Weak};
use std::time::Duration;

use mlua::{AnyUserData, IntoLuaMulti, Lua, MultiValue, Table, UserData, Value};

use super::cosocket::{self, OwnedSocket, DEFAULT_TIMEOUT};
use super::runtime;

/// Registry name of the UDP socket methods table.
const METHODS: &str = "moongate.udp_methods";
/// OpenResty's receive buffer: a datagram is read into at most this many bytes.
const MAX_RECEIVE: usize = 8192;

/// A connected datagram socket.
enum Dgram {
    Udp(tokio::net::UdpSocket),
    Unix(tokio::net::UnixDatagram),
}

impl Dgram {
    async fn send(&self, data: &[u8]) -> io::Result<usize> {
        match self {
            Dgram::Udp(s) => s.send(data).await,
            Dgram::Unix(s) => s.send(data).await,
        }
    }

    async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Dgram::Udp(s) => s.recv(buf).await,
            Dgram::Unix(s) => s.recv(buf).await,
        }
    }
}

struct UdpState {
    /// The connected socket (None before `setpeername` and after `close`).
    dgram: Option<Rc<Dgram>>,
    read_timeout: Duration,
}

impl OwnedSocket for RefCell<UdpState> {
    fn close_owned(&self) {
        if let Ok(mut s) = self.try_borrow_mut() {
            s.dgram = None;
        }
    }
}

type Udp = Rc<RefCell<UdpState>>;

struct UdpSock(Udp);

impl UserData for UdpSock {
    fn add_fields<F: mlua::UserDataFields<Self>>(fields: &mut F) {
        fields.add_meta_field_with("__index", |lua| lua.named_registry_value::<Table>(METHODS));
    }

    fn add_methods<M: mlua::UserDataMethods<Self>>(methods: &mut M) {
        methods.add_meta_method("__tostring", |_, s, ()| {
            Ok(format!("udp socket: {:p}", Rc::as_ptr(&s.0)))
        });
    }
}

fn udp_of(ud: &AnyUserData) -> mlua::Result<Udp> {
    ud.borrow::<UdpSock>().map(|s| s.0.clone())
}

/// `1`, a datagram, or `nil, err`.
enum Reply {
    One,
    Data(Vec<u8>),
    Fail(String),
}

impl IntoLuaMulti for Reply {
    fn into_lua_multi(self, lua: &Lua) -> mlua::Result<MultiValue> {
        Ok(match self {
            Reply::One => MultiValue::from_iter([Value::Integer(1)]),
            Reply::Data(d) => MultiValue::from_iter([Value::String(lua.create_string(&d)?)]),
            Reply::Fail(msg) => {
                MultiValue::from_iter([Value::Nil, Value::String(lua.create_string(msg)?)])
            }
        })
    }
}

/// Where `setpeername` points the socket.
enum Peer {
    Addr(String, u16),
    Unix(String),
}

fn peer_args(host: mlua::String, port: Option<Value>) -> mlua::Result<Peer> {
    let host = host.to_str()?.to_string();
    if let Some(path) = host.strip_prefix("unix:") {
        return Ok(Peer::Unix(path.to_string()));
    }
    let port = match port {
        Some(Value::Integer(p)) => p,
        Some(Value::Number(p)) => p as i64,
        Some(Value::String(s)) => s
            .to_str()
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
            .ok_or_else(|| {
                mlua::Error::runtime(
                    "bad argument #2 to 'setpeername' (number expected, got string)",
                )
            })?,
        _ => {
            return Err(mlua::Error::runtime(
                "bad argument #2 to 'setpeername' (number expected, got no value)",
            ))
        }
    };
    let port = u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| mlua::Error::runtime(format!("bad port number: {port}")))?;
    Ok(Peer::Addr(host, port))
}

/// Resolves (the gateway's resolver and cache) and connects a new datagram socket.
async fn open(peer: &Peer) -> Result<Dgram, String> {
    match peer {
        Peer::Unix(path) => {
            let s = tokio::net::UnixDatagram::unbound().map_err(|e| cosocket::io_text(&e))?;
            s.connect(path).map_err(|e| cosocket::io_text(&e))?;
            Ok(Dgram::Unix(s))
        }
        Peer::Addr(host, port) => {
            let addr: Option<SocketAddr> = match crate::dns::resolve(host).await {
                Ok(r) => r.socket_addrs(*port).next(),
                Err(e) => {
                    tracing::debug!("udp cosocket: failed to resolve {host}: {e}");
                    None
                }
            };
            let Some(addr) = addr else {
                return Err(format!("{host} could not be resolved (3: Host not found)"));
            };
            let local: SocketAddr = if addr.is_ipv4() {
                ([0, 0, 0, 0], 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let s = tokio::net::UdpSocket::bind(local)
                .await
                .map_err(|e| cosocket::io_text(&e))?;
            s.connect(addr).await.map_err(|e| cosocket::io_text(&e))?;
            Ok(Dgram::Udp(s))
        }
    }
}

async fn setpeername(udp: Udp, peer: Peer) -> Reply {
    // A socket pointed elsewhere before is closed first, as in OpenResty.
    udp.borrow_mut().dgram = None;
    match open(&peer).await {
        Ok(d) => {
            udp.borrow_mut().dgram = Some(Rc::new(d));
            Reply::One
        }
        Err(e) => Reply::Fail(e),
    }
}

fn dgram(udp: &Udp) -> Option<Rc<Dgram>> {
    udp.borrow().dgram.clone()
}

async fn send(udp: Udp, data: Vec<u8>) -> Reply {
    let Some(d) = dgram(&udp) else {
        return Reply::Fail("closed".into());
    };
    match d.send(&data).await {
        Ok(_) => Reply::One,
        Err(e) => Reply::Fail(cosocket::io_text(&e)),
    }
}

async fn receive(udp: Udp, size: usize) -> Reply {
    let Some(d) = dgram(&udp) else {
        return Reply::Fail("closed".into());
    };
    let timeout = udp.borrow().read_timeout;
    let mut buf = vec![0u8; size];
    match tokio::time::timeout(timeout, d.recv(&mut buf)).await {
        Err(_) => Reply::Fail("timeout".into()),
        Ok(Ok(n)) => {
            buf.truncate(n);
            Reply::Data(buf)
        }
        Ok(Err(e)) => Reply::Fail(cosocket::io_text(&e)),
    }
}

/// `receive`'s size: the datagram buffer, at most 8192 bytes (OpenResty's rule).
fn size_arg(v: &Value) -> mlua::Result<usize> {
    let n = match v {
        Value::Nil => return Ok(MAX_RECEIVE),
        Value::Integer(n) => *n as f64,
        Value::Number(n) => *n,
        Value::String(s) => s
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<f64>().ok())
            .unwrap_or(-1.0),
        other => {
            return Err(mlua::Error::runtime(format!(
                "bad argument #2 to 'receive' (number expected, got {})",
                other.type_name()
            )))
        }
    };
    // NaN, zero and negative sizes are refused alike.
    if n.is_nan() || n < 1.0 {
        return Err(mlua::Error::runtime(
            "bad argument #2 to 'receive' (bad size argument)",
        ));
    }
    Ok((n as usize).min(MAX_RECEIVE))
}

fn new_socket(lua: &Lua) -> mlua::Result<AnyUserData> {
    cosocket::check_context()?;
    let udp: Udp = Rc::new(RefCell::new(UdpState {
        dgram: None,
        read_timeout: DEFAULT_TIMEOUT,
    }));
    let weak: Weak<RefCell<UdpState>> = Rc::downgrade(&udp);
    cosocket::own(weak)?;
    lua.create_userdata(UdpSock(udp))
}

/// Installs `ngx.socket.udp` into the `ngx.socket` table.
pub(crate) fn install(lua: &Lua, socket: &Table) -> mlua::Result<()> {
    let m = lua.create_table()?;
    m.set(
        "setpeername",
        runtime::create_io_function(
            lua,
            |_, (ud, host, port): (AnyUserData, mlua::String, Option<Value>)| {
                let args = udp_of(&ud).and_then(|u| Ok((u, peer_args(host, port)?)));
                async move {
                    let (udp, peer) = args?;
                    Ok(setpeername(udp, peer).await)
                }
            },
        )?,
    )?;
    m.set(
        "send",
        runtime::create_io_function(lua, |_, (ud, data): (AnyUserData, Value)| {
            let args = udp_of(&ud).and_then(|u| {
                let mut out = Vec::new();
                cosocket::flatten(&data, &mut out, 0)?;
                Ok((u, out))
            });
            async move {
                let (udp, data) = args?;
                Ok(send(udp, data).await)
            }
        })?,
    )?;
    m.set(
        "receive",
        runtime::create_io_function(lua, |_, (ud, size): (AnyUserData, Value)| {
            let args = udp_of(&ud).and_then(|u| Ok((u, size_arg(&size)?)));
            async move {
                let (udp, size) = args?;
                Ok(receive(udp, size).await)
            }
        })?,
    )?;
    m.set(
        "settimeout",
        lua.create_function(|_, (ud, ms): (AnyUserData, Value)| {
            udp_of(&ud)?.borrow_mut().read_timeout = cosocket::timeout_arg(&ms);
            Ok(())
        })?,
    )?;
    m.set(
        "close",
        lua.create_function(|lua, ud: AnyUserData| {
            let udp = udp_of(&ud)?;
            let closed = udp.borrow_mut().dgram.take();
            match closed {
                Some(_) => Reply::One,
                None => Reply::Fail("closed".into()),
            }
            .into_lua_multi(lua)
        })?,
    )?;
    lua.set_named_registry_value(METHODS, &m)?;
    socket.set("udp", lua.create_function(|lua, ()| new_socket(lua))?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receive_sizes_are_capped_as_openresty_caps_them() {
        assert_eq!(size_arg(&Value::Nil).unwrap(), 8192);
        assert_eq!(size_arg(&Value::Integer(4)).unwrap(), 4);
        assert_eq!(size_arg(&Value::Integer(100_000)).unwrap(), 8192);
        assert!(size_arg(&Value::Integer(0)).is_err());
        assert!(size_arg(&Value::Boolean(true)).is_err());
    }
}
