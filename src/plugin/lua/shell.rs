//! `require("resty.signal")` and `require("resty.shell")`: OpenResty's libraries for sending
//! signals and running a command (APISIX's log-rotate sends USR1 with the first and compresses
//! rotated files with the second).
//!
//! `resty.signal`: `signum(name)` (the POSIX names without `SIG`, `NONE` = 0; a number is
//! returned as is; an unknown name is `nil, "unknown signal name"`), `kill(pid, sig)` (`true`, or
//! `nil` and the system's `strerror` text), `fork()` (`nil, "not privileged"`, as outside
//! OpenResty's privileged agent, which moongate does not have). The signal-mask and handler
//! functions are not provided: a handler would run inside the gateway's own signal handling.
//!
//! `resty.shell`: `run(cmd, stdin, timeout_ms, max_size)` runs `cmd` (a string, through
//! `/bin/sh -c`, or an argument table) without blocking the worker (the request or timer waits,
//! as with `ngx.pipe` in OpenResty) and answers lua-resty-shell's five values: `ok, stdout,
//! stderr, reason, status` (`true, out, err, "exit", 0`; `false, .., "exit", CODE`;
//! `false, .., "signal", NUM`), or `nil, stdout, stderr, "failed to wait for process: timeout"`
//! after `timeout` (default 10 s; the process is killed), `nil, .., "failed to read stdout: too
//! much data"` past `max_size` (default 128 KiB), `nil, nil, nil, "failed to spawn: ..."`.

use std::process::Stdio;
use std::time::Duration;

use mlua::{Lua, MultiValue, Table, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::runtime;

/// POSIX signal names as lua-resty-signal knows them, with Linux's numbers.
const SIGNALS: &[(&str, i32)] = &[
    ("NONE", 0),
    ("HUP", libc::SIGHUP),
    ("INT", libc::SIGINT),
    ("QUIT", libc::SIGQUIT),
    ("ILL", libc::SIGILL),
    ("TRAP", libc::SIGTRAP),
    ("ABRT", libc::SIGABRT),
    ("BUS", libc::SIGBUS),
    ("FPE", libc::SIGFPE),
    ("KILL", libc::SIGKILL),
    ("USR1", libc::SIGUSR1),
    ("SEGV", libc::SIGSEGV),
    ("USR2", libc::SIGUSR2),
    ("PIPE", libc::SIGPIPE),
    ("ALRM", libc::SIGALRM),
    ("TERM", libc::SIGTERM),
    ("CHLD", libc::SIGCHLD),
    ("CONT", libc::SIGCONT),
    ("STOP", libc::SIGSTOP),
    ("TSTP", libc::SIGTSTP),
    ("TTIN", libc::SIGTTIN),
    ("TTOU", libc::SIGTTOU),
    ("URG", libc::SIGURG),
    ("XCPU", libc::SIGXCPU),
    ("XFSZ", libc::SIGXFSZ),
    ("VTALRM", libc::SIGVTALRM),
    ("PROF", libc::SIGPROF),
    ("WINCH", libc::SIGWINCH),
    ("IO", libc::SIGIO),
    ("PWR", libc::SIGPWR),
    ("SYS", libc::SIGSYS),
];

/// A signal number from a name or a number; `Err` carries lua-resty-signal's message.
fn signum(v: &Value) -> Result<i32, &'static str> {
    match v {
        Value::Integer(n) => Ok(*n as i32),
        Value::Number(n) => Ok(*n as i32),
        Value::String(s) => {
            let name = s.to_str().map_err(|_| "unknown signal name")?;
            SIGNALS
                .iter()
                .find(|(n, _)| *n == &*name)
                .map(|(_, num)| *num)
                .ok_or("unknown signal name")
        }
        _ => Err("unknown signal name"),
    }
}

fn signal_module(lua: &Lua) -> mlua::Result<Table> {
    let m = lua.create_table()?;
    m.set("version", 0.02)?;
    m.set(
        "signum",
        lua.create_function(|lua, v: Value| match signum(&v) {
            Ok(n) => Ok((Value::Integer(n as i64), Value::Nil)),
            Err(e) => Ok((Value::Nil, Value::String(lua.create_string(e)?))),
        })?,
    )?;
    m.set(
        "kill",
        lua.create_function(|lua, (pid, sig): (Value, Value)| {
            let pid = match pid {
                Value::Integer(n) => n,
                Value::Number(n) => n as i64,
                _ => return Err(mlua::Error::runtime("assertion failed!")),
            };
            if sig.is_nil() {
                return Err(mlua::Error::runtime("assertion failed!"));
            }
            let sig = match signum(&sig) {
                Ok(n) => n,
                Err(e) => return Ok((Value::Nil, Value::String(lua.create_string(e)?))),
            };
            let Ok(pid) = i32::try_from(pid) else {
                return Ok((
                    Value::Nil,
                    Value::String(lua.create_string("No such process")?),
                ));
            };
            // SAFETY: kill(2) takes plain integers and touches no memory of ours.
            let rc = unsafe { libc::kill(pid, sig) };
            if rc == 0 {
                return Ok((Value::Boolean(true), Value::Nil));
            }
            let e = std::io::Error::last_os_error().to_string();
            let text = match e.rfind(" (os error ") {
                Some(i) => e[..i].to_string(),
                None => e,
            };
            Ok((Value::Nil, Value::String(lua.create_string(text)?)))
        })?,
    )?;
    m.set(
        "fork",
        lua.create_function(|_, _: MultiValue| Ok((Value::Nil, "not privileged")))?,
    )?;
    Ok(m)
}

/// Reads `r` to its end, keeping at most `max + 1` bytes; true when more than `max` came.
async fn read_limited<R: AsyncRead + Unpin>(mut r: R, max: usize) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return (out, false),
            Ok(n) => {
                let room = max + 1 - out.len().min(max + 1);
                out.extend_from_slice(&buf[..n.min(room)]);
                if out.len() > max {
                    return (out, true);
                }
            }
        }
    }
}

enum Cmd {
    Shell(String),
    Argv(Vec<String>),
}

fn command_arg(v: Value) -> mlua::Result<Cmd> {
    match v {
        Value::String(s) => Ok(Cmd::Shell(s.to_str()?.to_string())),
        Value::Table(t) => {
            let argv: Vec<String> = t.sequence_values::<String>().collect::<mlua::Result<_>>()?;
            if argv.is_empty() {
                return Err(mlua::Error::runtime(
                    "bad argument #1 to 'run' (empty command)",
                ));
            }
            Ok(Cmd::Argv(argv))
        }
        other => Err(mlua::Error::runtime(format!(
            "bad argument #1 to 'run' (string or table expected, got {})",
            other.type_name()
        ))),
    }
}

fn number_arg(v: &Value) -> Option<f64> {
    match v {
        Value::Integer(n) => Some(*n as f64),
        Value::Number(n) => Some(*n),
        _ => None,
    }
}

/// The five values of `shell.run`.
type RunResult = (Value, Value, Value, Value, Value);

async fn run(
    lua: Lua,
    cmd: Cmd,
    stdin: Vec<u8>,
    timeout: Duration,
    max: usize,
) -> mlua::Result<RunResult> {
    let s = |b: &[u8]| -> mlua::Result<Value> { Ok(Value::String(lua.create_string(b)?)) };
    let mut c = match &cmd {
        Cmd::Shell(line) => {
            let mut c = tokio::process::Command::new("/bin/sh");
            c.arg("-c").arg(line);
            c
        }
        Cmd::Argv(argv) => {
            let mut c = tokio::process::Command::new(&argv[0]);
            c.args(&argv[1..]);
            c
        }
    };
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = match c.spawn() {
        Ok(ch) => ch,
        Err(e) => {
            let e = e.to_string();
            let e = e
                .rfind(" (os error ")
                .map_or(e.clone(), |i| e[..i].to_string());
            return Ok((
                Value::Nil,
                Value::Nil,
                Value::Nil,
                s(format!("failed to spawn: {e}").as_bytes())?,
                Value::Nil,
            ));
        }
    };
    let mut pipe_in = child.stdin.take();
    let out = child.stdout.take();
    let err = child.stderr.take();
    let work = async {
        if let Some(mut w) = pipe_in.take() {
            if !stdin.is_empty() {
                // A command that does not read its input closes the pipe: not an error here.
                let _ = w.write_all(&stdin).await;
            }
            drop(w);
        }
        let read_out = async {
            match out {
                Some(o) => read_limited(o, max).await,
                None => (Vec::new(), false),
            }
        };
        let read_err = async {
            match err {
                Some(e) => read_limited(e, max).await,
                None => (Vec::new(), false),
            }
        };
        let ((o, o_big), (e, e_big)) = tokio::join!(read_out, read_err);
        (o, o_big, e, e_big)
    };
    let Ok((o, o_big, e, e_big)) = tokio::time::timeout(timeout, work).await else {
        let _ = child.start_kill();
        let _ = child.wait().await;
        return Ok((
            Value::Nil,
            s(b"")?,
            s(b"")?,
            s(b"failed to wait for process: timeout")?,
            Value::Nil,
        ));
    };
    if o_big || e_big {
        let _ = child.start_kill();
        let _ = child.wait().await;
        let which = if o_big { "stdout" } else { "stderr" };
        return Ok((
            Value::Nil,
            s(&o)?,
            s(&e)?,
            s(format!("failed to read {which}: too much data").as_bytes())?,
            Value::Nil,
        ));
    }
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(st)) => st,
        Ok(Err(err)) => {
            return Ok((
                Value::Nil,
                s(&o)?,
                s(&e)?,
                s(format!("failed to wait for process: {err}").as_bytes())?,
                Value::Nil,
            ))
        }
        Err(_) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Ok((
                Value::Nil,
                s(&o)?,
                s(&e)?,
                s(b"failed to wait for process: timeout")?,
                Value::Nil,
            ));
        }
    };
    use std::os::unix::process::ExitStatusExt;
    let (reason, code) = match (status.code(), status.signal()) {
        (Some(c), _) => ("exit", c),
        (None, Some(sig)) => ("signal", sig),
        (None, None) => ("exit", -1),
    };
    Ok((
        Value::Boolean(status.success()),
        s(&o)?,
        s(&e)?,
        s(reason.as_bytes())?,
        Value::Integer(code as i64),
    ))
}

fn shell_module(lua: &Lua) -> mlua::Result<Table> {
    let m = lua.create_table()?;
    m.set("version", 0.01)?;
    m.set(
        "run",
        runtime::create_waiting_function(
            lua,
            |lua, (cmd, stdin, timeout, max): (Value, Value, Value, Value)| {
                let args = command_arg(cmd).map(|cmd| {
                    let stdin = match stdin {
                        Value::String(s) => s.as_bytes().to_vec(),
                        _ => Vec::new(),
                    };
                    let ms = number_arg(&timeout)
                        .filter(|t| *t > 0.0)
                        .unwrap_or(10_000.0);
                    let max = number_arg(&max)
                        .filter(|m| *m >= 0.0)
                        .map_or(128 * 1024, |m| m as usize);
                    (cmd, stdin, Duration::from_secs_f64(ms / 1000.0), max)
                });
                async move {
                    let (cmd, stdin, timeout, max) = args?;
                    run(lua, cmd, stdin, timeout, max).await
                }
            },
        )?,
    )?;
    Ok(m)
}

/// Registers `resty.signal` and `resty.shell` in `package.preload`.
pub(crate) fn install(lua: &Lua, preload: &Table) -> mlua::Result<()> {
    preload.set(
        "resty.signal",
        lua.create_function(|lua, _: MultiValue| signal_module(lua))?,
    )?;
    preload.set(
        "resty.shell",
        lua.create_function(|lua, _: MultiValue| shell_module(lua))?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signum_knows_posix_names_and_refuses_others() {
        let lua = Lua::new();
        let name = |s: &str| Value::String(lua.create_string(s).unwrap());
        assert_eq!(signum(&name("USR1")), Ok(libc::SIGUSR1));
        assert_eq!(signum(&name("NONE")), Ok(0));
        assert_eq!(signum(&name("KILL")), Ok(9));
        assert_eq!(signum(&Value::Integer(15)), Ok(15));
        assert_eq!(signum(&name("SIGTERM")), Err("unknown signal name"));
    }

    #[test]
    fn kill_answers_as_lua_resty_signal() {
        let lua = Lua::new();
        let package: Table = lua.globals().get("package").unwrap();
        install(&lua, &package.get("preload").unwrap()).unwrap();
        let got: String = lua
            .load(
                r#"local signal = require("resty.signal")
                local me = assert(io.open("/proc/self/stat")):read("*l"):match("^(%d+)")
                local ok = signal.kill(tonumber(me), "NONE")
                local _, unknown = signal.kill(1, "NOPE")
                local _, gone = signal.kill(2147483000, 0)
                return tostring(ok) .. "|" .. unknown .. "|" .. gone .. "|" ..
                    signal.signum("HUP") .. "|" .. select(2, signal.fork())"#,
            )
            .eval()
            .unwrap();
        assert_eq!(
            got,
            "true|unknown signal name|No such process|1|not privileged"
        );
    }
}
