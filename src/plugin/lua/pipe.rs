//! `require("ngx.pipe")`: lua-resty-core's non-blocking child processes (APISIX's ext-plugin
//! starts its plugin runner with it). `spawn(args, opts)` runs `args` (an argument table, or a
//! string through `/bin/sh -c`) with `opts.merge_stderr`, `opts.environ` (the whole
//! environment, `{"K=V", ...}`), `opts.buffer_size` and the four timeouts (ms, default 10 s;
//! 0 waits without a limit). The process object has `pid`, `kill`, `wait`, `write`,
//! `shutdown`, `set_timeouts` and `stdout_read_line`/`_all`/`_bytes`/`_any` (and the `stderr_`
//! ones), answering as lua-resty-core does: data, or `nil, err[, partial]` with `err` one of
//! `closed`, `timeout`, `merged to stdout`, ... A read or wait makes the request or timer
//! wait, never the worker. A process whose object is collected is killed.
//!
//! The Lua object (`PIPE_SRC`) keeps the process's id; the processes live in this worker
//! thread's table (`PROCS`), and each operation takes the pipe it uses out of the table for
//! the time it waits.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::process::Stdio;
use std::time::Duration;

use mlua::{Lua, MultiValue, Table, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::runtime;

type Reader = Box<dyn AsyncRead + Unpin>;

/// One output pipe and what was read from it but not yet handed out.
struct Output {
    r: Reader,
    buf: Vec<u8>,
    eof: bool,
}

struct Proc {
    child: Option<tokio::process::Child>,
    stdin: Option<tokio::process::ChildStdin>,
    stdout: Option<Output>,
    stderr: Option<Output>,
    merged: bool,
    chunk: usize,
}

thread_local! {
    static PROCS: RefCell<HashMap<u64, Proc>> = RefCell::new(HashMap::new());
    static NEXT: Cell<u64> = const { Cell::new(1) };
}

fn os_text(e: &std::io::Error) -> String {
    let t = e.to_string();
    t.rfind(" (os error ")
        .map_or(t.clone(), |i| t[..i].to_string())
}

fn spawn(
    args: Value,
    merge: bool,
    environ: Option<Vec<String>>,
    chunk: usize,
) -> Result<(u64, u32), String> {
    let mut c = match args {
        Value::String(s) => {
            let mut c = tokio::process::Command::new("/bin/sh");
            c.arg("-c").arg(&*s.to_str().map_err(|e| e.to_string())?);
            c
        }
        Value::Table(t) => {
            let argv: Vec<String> = t
                .sequence_values::<String>()
                .collect::<mlua::Result<_>>()
                .map_err(|e| e.to_string())?;
            let Some(first) = argv.first() else {
                return Err("bad args arg: non-empty table expected".into());
            };
            let mut c = tokio::process::Command::new(first);
            c.args(&argv[1..]);
            c
        }
        other => {
            return Err(format!(
                "bad args arg: table expected, got {}",
                other.type_name()
            ))
        }
    };
    if let Some(env) = environ {
        c.env_clear();
        for kv in env {
            if let Some((k, v)) = kv.split_once('=') {
                c.env(k, v);
            }
        }
    }
    c.stdin(Stdio::piped()).kill_on_drop(true);
    let merged_reader = if merge {
        // One pipe for both: the child's stdout and stderr are two copies of its write end.
        let (w, r) = tokio::net::unix::pipe::pipe().map_err(|e| os_text(&e))?;
        let w: OwnedFd = w.into_blocking_fd().map_err(|e| os_text(&e))?;
        let w2 = w.try_clone().map_err(|e| os_text(&e))?;
        c.stdout(Stdio::from(w)).stderr(Stdio::from(w2));
        Some(r)
    } else {
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        None
    };
    let mut child = c.spawn().map_err(|e| os_text(&e))?;
    // The write ends given to the child are closed in `c` when it drops, so the read end sees
    // EOF when the child (and whatever it started) closes them.
    drop(c);
    let pid = child.id().unwrap_or(0);
    let out = |r: Reader| Output {
        r,
        buf: Vec::new(),
        eof: false,
    };
    let (stdout, stderr) = match merged_reader {
        Some(r) => (Some(out(Box::new(r))), None),
        None => (
            child.stdout.take().map(|o| out(Box::new(o) as Reader)),
            child.stderr.take().map(|e| out(Box::new(e) as Reader)),
        ),
    };
    let id = NEXT.with(|n| {
        let id = n.get();
        n.set(id + 1);
        id
    });
    let stdin = child.stdin.take();
    PROCS.with(|p| {
        p.borrow_mut().insert(
            id,
            Proc {
                child: Some(child),
                stdin,
                stdout,
                stderr,
                merged: merge,
                chunk: chunk.max(1),
            },
        )
    });
    Ok((id, pid))
}

/// How a read ends.
#[derive(Clone, Copy)]
enum Mode {
    Line,
    All,
    Bytes(usize),
    Any(usize),
}

/// What a read can hand out of `buf` now, if anything.
fn take_ready(o: &mut Output, mode: Mode) -> Option<Vec<u8>> {
    match mode {
        Mode::Line => {
            let i = o.buf.iter().position(|b| *b == b'\n')?;
            let mut line: Vec<u8> = o.buf.drain(..=i).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            Some(line)
        }
        Mode::All => o.eof.then(|| std::mem::take(&mut o.buf)),
        Mode::Bytes(n) => (o.buf.len() >= n).then(|| o.buf.drain(..n).collect()),
        Mode::Any(max) => (!o.buf.is_empty()).then(|| {
            let n = o.buf.len().min(max);
            o.buf.drain(..n).collect()
        }),
    }
}

enum ReadEnd {
    Data(Vec<u8>),
    /// err, partial data
    Fail(&'static str, Vec<u8>),
}

async fn read_until(o: &mut Output, mode: Mode, chunk: usize) -> ReadEnd {
    let mut tmp = vec![0u8; chunk];
    loop {
        if let Some(d) = take_ready(o, mode) {
            return ReadEnd::Data(d);
        }
        if o.eof {
            let partial = std::mem::take(&mut o.buf);
            return ReadEnd::Fail("closed", partial);
        }
        match o.r.read(&mut tmp).await {
            Ok(0) => o.eof = true,
            Ok(n) => o.buf.extend_from_slice(&tmp[..n]),
            Err(_) => o.eof = true,
        }
    }
}

fn timeout_of(ms: f64) -> Option<Duration> {
    (ms > 0.0).then(|| Duration::from_secs_f64(ms / 1000.0))
}

async fn read(
    id: u64,
    stderr: bool,
    mode: Mode,
    timeout_ms: f64,
) -> (Option<Vec<u8>>, Option<String>, Option<Vec<u8>>) {
    let taken = PROCS.with(|p| {
        let mut p = p.borrow_mut();
        let Some(proc_) = p.get_mut(&id) else {
            return Err("closed");
        };
        if stderr && proc_.merged {
            return Err("merged to stdout");
        }
        let slot = if stderr {
            &mut proc_.stderr
        } else {
            &mut proc_.stdout
        };
        match slot.take() {
            Some(o) => Ok((o, proc_.chunk)),
            None => Err(if stderr {
                "stderr busy reading or closed"
            } else {
                "stdout busy reading or closed"
            }),
        }
    });
    let (mut o, chunk) = match taken {
        Ok(t) => t,
        Err(e) => return (None, Some(e.to_string()), None),
    };
    let end = match timeout_of(timeout_ms) {
        Some(t) => tokio::time::timeout(t, read_until(&mut o, mode, chunk))
            .await
            .ok(),
        None => Some(read_until(&mut o, mode, chunk).await),
    };
    let result = match end {
        Some(ReadEnd::Data(d)) => (Some(d), None, None),
        Some(ReadEnd::Fail(e, partial)) => (None, Some(e.to_string()), Some(partial)),
        None => {
            // On a timeout what was read stays buffered for the next read, as in OpenResty.
            (None, Some("timeout".to_string()), Some(Vec::new()))
        }
    };
    PROCS.with(|p| {
        if let Some(proc_) = p.borrow_mut().get_mut(&id) {
            if stderr {
                proc_.stderr = Some(o);
            } else {
                proc_.stdout = Some(o);
            }
        }
    });
    result
}

async fn write(id: u64, data: Vec<u8>, timeout_ms: f64) -> (Option<usize>, Option<String>) {
    let taken = PROCS.with(|p| p.borrow_mut().get_mut(&id).and_then(|p| p.stdin.take()));
    let Some(mut w) = taken else {
        return (None, Some("closed".into()));
    };
    let work = w.write_all(&data);
    let r = match timeout_of(timeout_ms) {
        Some(t) => tokio::time::timeout(t, work).await.ok(),
        None => Some(work.await),
    };
    let out = match r {
        Some(Ok(())) => (Some(data.len()), None),
        Some(Err(_)) => (None, Some("closed".into())),
        None => (None, Some("timeout".into())),
    };
    if out.0.is_some() || out.1.as_deref() == Some("timeout") {
        PROCS.with(|p| {
            if let Some(proc_) = p.borrow_mut().get_mut(&id) {
                proc_.stdin = Some(w);
            }
        });
    }
    out
}

/// `ok, reason, status`, or `nil, err`.
async fn wait(id: u64, timeout_ms: f64) -> (Option<bool>, Option<String>, Option<i64>) {
    let taken = PROCS.with(|p| p.borrow_mut().get_mut(&id).and_then(|p| p.child.take()));
    let Some(mut child) = taken else {
        return (None, Some("exited".into()), None);
    };
    let r = match timeout_of(timeout_ms) {
        Some(t) => tokio::time::timeout(t, child.wait()).await.ok(),
        None => Some(child.wait().await),
    };
    match r {
        Some(Ok(st)) => {
            use std::os::unix::process::ExitStatusExt;
            let (reason, code) = match (st.code(), st.signal()) {
                (Some(c), _) => ("exit", c),
                (None, Some(s)) => ("signal", s),
                (None, None) => ("exit", -1),
            };
            (Some(st.success()), Some(reason.into()), Some(code as i64))
        }
        Some(Err(e)) => (None, Some(os_text(&e)), None),
        None => {
            PROCS.with(|p| {
                if let Some(proc_) = p.borrow_mut().get_mut(&id) {
                    proc_.child = Some(child);
                }
            });
            (None, Some("timeout".into()), None)
        }
    }
}

fn num(v: &Value) -> Option<f64> {
    match v {
        Value::Integer(n) => Some(*n as f64),
        Value::Number(n) => Some(*n),
        _ => None,
    }
}

fn bytes_or_nil(lua: &Lua, v: Option<Vec<u8>>) -> mlua::Result<Value> {
    match v {
        Some(b) => Ok(Value::String(lua.create_string(&b)?)),
        None => Ok(Value::Nil),
    }
}

/// The Lua half: the process object and its methods over the primitives in `P`.
const PIPE_SRC: &str = r#"
local P = ...
local setmetatable, type, tostring, error = setmetatable, type, tostring, error
local _M = { version = "0.1" }
local mt = {}
mt.__index = mt

local function ms(v, name)
    if v == nil then return nil end
    if type(v) ~= "number" or v < 0 then
        error("bad " .. name .. " arg: non-negative number expected", 3)
    end
    return v
end

function _M.spawn(args, opts)
    opts = opts or {}
    local environ = opts.environ
    local id, pid = P.spawn(args, opts.merge_stderr and true or false, environ,
                            opts.buffer_size or 4096)
    if not id then
        return nil, pid
    end
    local proc = setmetatable({
        _id = id, _pid = pid,
        write_timeout = ms(opts.write_timeout, "write_timeout") or 10000,
        stdout_read_timeout = ms(opts.stdout_read_timeout, "stdout_read_timeout") or 10000,
        stderr_read_timeout = ms(opts.stderr_read_timeout, "stderr_read_timeout") or 10000,
        wait_timeout = ms(opts.wait_timeout, "wait_timeout") or 10000,
        -- collected with the object: the process is killed and forgotten
        _gc = newproxy and newproxy(true) or nil,
    }, mt)
    if proc._gc then
        getmetatable(proc._gc).__gc = function() P.release(id) end
    end
    return proc
end

function mt:pid() return self._pid end

function mt:set_timeouts(w, o, e, wt)
    self.write_timeout = ms(w, "write_timeout") or self.write_timeout
    self.stdout_read_timeout = ms(o, "stdout_read_timeout") or self.stdout_read_timeout
    self.stderr_read_timeout = ms(e, "stderr_read_timeout") or self.stderr_read_timeout
    self.wait_timeout = ms(wt, "wait_timeout") or self.wait_timeout
end

function mt:kill(sig)
    if type(sig) ~= "number" then
        error("bad signal arg: number expected, got " .. type(sig), 2)
    end
    return P.kill(self._id, sig)
end

function mt:wait() return P.wait(self._id, self.wait_timeout) end

function mt:write(data)
    if type(data) == "table" then data = table.concat(data) end
    return P.write(self._id, tostring(data), self.write_timeout)
end

function mt:shutdown(direction)
    return P.shutdown(self._id, direction)
end

for _, which in ipairs({ "stdout", "stderr" }) do
    local is_err = which == "stderr"
    local key = which .. "_read_timeout"
    mt[which .. "_read_line"] = function(self)
        return P.read(self._id, is_err, "line", 0, self[key])
    end
    mt[which .. "_read_all"] = function(self)
        return P.read(self._id, is_err, "all", 0, self[key])
    end
    mt[which .. "_read_bytes"] = function(self, len)
        if type(len) ~= "number" or len < 0 then
            error("bad len argument", 2)
        end
        if len == 0 then return "" end
        return P.read(self._id, is_err, "bytes", len, self[key])
    end
    mt[which .. "_read_any"] = function(self, max)
        if type(max) ~= "number" or max <= 0 then
            error("bad max argument", 2)
        end
        return P.read(self._id, is_err, "any", max, self[key])
    end
end

return _M
"#;

fn primitives(lua: &Lua) -> mlua::Result<Table> {
    let p = lua.create_table()?;
    p.set(
        "spawn",
        lua.create_function(
            |lua, (args, merge, environ, chunk): (Value, bool, Option<Vec<String>>, Value)| {
                let chunk = num(&chunk).map_or(4096, |n| n.max(1.0) as usize);
                match spawn(args, merge, environ, chunk) {
                    Ok((id, pid)) => Ok((Value::Integer(id as i64), Value::Integer(pid as i64))),
                    Err(e) => Ok((Value::Nil, Value::String(lua.create_string(e)?))),
                }
            },
        )?,
    )?;
    p.set(
        "read",
        runtime::create_waiting_function(
            lua,
            |lua, (id, stderr, mode, n, timeout): (u64, bool, String, Value, Value)| async move {
                let n = num(&n).unwrap_or(0.0).max(0.0) as usize;
                let mode = match mode.as_str() {
                    "line" => Mode::Line,
                    "all" => Mode::All,
                    "bytes" => Mode::Bytes(n),
                    _ => Mode::Any(n.max(1)),
                };
                let (data, err, partial) =
                    read(id, stderr, mode, num(&timeout).unwrap_or(0.0)).await;
                Ok((
                    bytes_or_nil(&lua, data)?,
                    match err {
                        Some(e) => Value::String(lua.create_string(e)?),
                        None => Value::Nil,
                    },
                    bytes_or_nil(&lua, partial)?,
                ))
            },
        )?,
    )?;
    p.set(
        "write",
        runtime::create_waiting_function(
            lua,
            |_, (id, data, timeout): (u64, mlua::String, Value)| {
                let data = data.as_bytes().to_vec();
                async move { Ok(write(id, data, num(&timeout).unwrap_or(0.0)).await) }
            },
        )?,
    )?;
    p.set(
        "wait",
        runtime::create_waiting_function(lua, |_, (id, timeout): (u64, Value)| async move {
            Ok(wait(id, num(&timeout).unwrap_or(0.0)).await)
        })?,
    )?;
    p.set(
        "kill",
        lua.create_function(|lua, (id, sig): (u64, i32)| {
            let pid = PROCS.with(|p| {
                p.borrow()
                    .get(&id)
                    .and_then(|p| p.child.as_ref())
                    .and_then(|c| c.id())
            });
            let Some(pid) = pid else {
                return Ok((Value::Nil, Value::String(lua.create_string("exited")?)));
            };
            // SAFETY: kill(2) takes plain integers and touches no memory of ours.
            let rc = unsafe { libc::kill(pid as i32, sig) };
            if rc == 0 {
                Ok((Value::Boolean(true), Value::Nil))
            } else {
                let e = os_text(&std::io::Error::last_os_error());
                Ok((Value::Nil, Value::String(lua.create_string(e)?)))
            }
        })?,
    )?;
    p.set(
        "shutdown",
        lua.create_function(|lua, (id, which): (u64, String)| {
            let done = PROCS.with(|p| {
                let mut p = p.borrow_mut();
                let proc_ = p.get_mut(&id)?;
                match which.as_str() {
                    "stdin" => proc_.stdin.take().map(drop),
                    "stdout" => proc_.stdout.take().map(drop),
                    "stderr" if !proc_.merged => proc_.stderr.take().map(drop),
                    _ => None,
                }
            });
            match done {
                Some(()) => Ok((Value::Boolean(true), Value::Nil)),
                None => Ok((Value::Nil, Value::String(lua.create_string("closed")?))),
            }
        })?,
    )?;
    p.set(
        "release",
        lua.create_function(|_, id: u64| {
            // Dropping the child kills it (`kill_on_drop`); tokio reaps it.
            PROCS.with(|p| p.borrow_mut().remove(&id));
            Ok(())
        })?,
    )?;
    Ok(p)
}

/// Registers `ngx.pipe` in `package.preload`.
pub(crate) fn install(lua: &Lua, preload: &Table) -> mlua::Result<()> {
    preload.set(
        "ngx.pipe",
        lua.create_function(|lua, _: MultiValue| {
            let p = primitives(lua)?;
            lua.load(PIPE_SRC).set_name("=ngx.pipe").call::<Table>(p)
        })?,
    )
}
