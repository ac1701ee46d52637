//! Light threads: `ngx.thread.spawn`, `ngx.thread.wait` and `ngx.thread.kill`.
//!
//! A light thread is a Lua coroutine the runtime schedules beside the *entry thread* (the runner
//! of a request phase call, or a timer's thread). [`Threads`] holds the light threads of one
//! entry thread's run; it is made on the first `spawn` and lives until the run ends.
//!
//! - `spawn` resumes the new thread at once, inside the caller's stretch of CPU budget, until it
//!   returns, fails or waits; a waiting thread's future is kept in its [`Light`].
//! - The run's driver (`runtime::wait_request_phase`, the timer's `run`) polls the entry
//!   thread's future and every waiting light's ([`Threads::poll_next`]); whichever is ready is
//!   resumed with its result, under a budget stretch of its own: waiting is not CPU time.
//! - A run ends when the entry thread *and* every light thread have ended, as an OpenResty
//!   handler does; it ends at once, aborting the light threads, when one of them calls
//!   `ngx.exit`, when the entry thread fails, or when a request phase function returns a status
//!   (APISIX's `core.response.exit`). Aborting drops the threads' futures: their sockets close
//!   and their timers and semaphore waits are cancelled.
//! - `wait` is a waiting function whose future looks at its targets' states. It registers no
//!   waker: a target ends only when the driver resumes it, and the driver polls every future
//!   again after each resume, so the wait sees the end in the next round.
//!
//! A light thread's failure is logged (`lua user thread aborted: ...`) and handed to a `wait`
//! as `false, err`; it does not stop the other threads.

use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};
use std::task::{Context, Poll};

use mlua::{Function, Lua, MultiValue, Table, Thread, Value};

use super::runtime::{self, Frame, LightStop, LuaRuntime, Pending};

/// Registry name of the function a light thread runs (see [`BODY_SRC`]).
const BODY: &str = "moongate.thread_body";
/// Registry name of the weak-keyed table of threads waited for or killed, so a late
/// `wait`/`kill` on one says "already waited or killed" after its entry was dropped.
const DEAD: &str = "moongate.dead_threads";

/// The body of a light thread: calls the function under `xpcall` so a failure keeps its error
/// value (what `wait` returns) and its traceback (what the log says), and returns the
/// runtime's done tag followed by `true, results...` or `false, err, traceback`.
const BODY_SRC: &str = r#"
local DONE, xpcall, traceback, tostring, message = ...
return function(f, ...)
    local trace
    local function handler(e)
        e = message(e, 2)
        trace = traceback(tostring(e), 2)
        return e
    end
    local function finish(ok, ...)
        if ok then return DONE, true, ... end
        return DONE, false, ..., trace
    end
    return finish(xpcall(f, handler, ...))
end
"#;

/// Light threads of one entry thread's run.
#[derive(Default)]
pub(crate) struct Threads {
    lights: RefCell<Vec<Light>>,
    next_id: Cell<u64>,
}

struct Light {
    id: u64,
    thread: Thread,
    /// The coroutine that spawned it: only that one may wait for or kill it.
    parent: *mut mlua::ffi::lua_State,
    state: State,
}

enum State {
    /// Parked on a waiting function's future.
    Waiting(Pending),
    /// Being resumed, or its future being polled, right now.
    Busy,
    /// Returned or failed; its `true, results...` or `false, err` wait for the parent
    /// (OpenResty's "zombie").
    Ended(MultiValue),
    /// Waited for or killed.
    Dead,
}

thread_local! {
    /// The light threads of the entry thread being resumed: outer None when no entry thread
    /// runs (spawning is disabled), inner None until the first spawn.
    static SCOPE: RefCell<Option<Option<Rc<Threads>>>> = const { RefCell::new(None) };
}

/// An entry thread's resume in progress: its light threads are reachable from Lua.
pub(crate) struct Scope {
    prev: Option<Option<Rc<Threads>>>,
    left: bool,
}

/// Makes `threads` (None: no light thread yet) the current run's for one resume of its entry
/// thread or of one of its light threads.
pub(crate) fn enter(threads: Option<Rc<Threads>>) -> Scope {
    let prev = SCOPE.with(|s| s.replace(Some(threads)));
    Scope { prev, left: false }
}

impl Scope {
    /// Ends the resume: the run's light threads (made by a spawn during it, if there were
    /// none before).
    pub(crate) fn leave(mut self) -> Option<Rc<Threads>> {
        self.left = true;
        let prev = self.prev.take();
        SCOPE.with(|s| s.replace(prev)).flatten()
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        if !self.left {
            let prev = self.prev.take();
            SCOPE.with(|s| *s.borrow_mut() = prev);
        }
    }
}

/// Whether any light thread of `threads` is still running.
pub(crate) fn live(threads: &Option<Rc<Threads>>) -> bool {
    threads.as_ref().is_some_and(|t| t.live())
}

fn disabled() -> mlua::Error {
    mlua::Error::runtime(format!(
        "API disabled in the context of {}",
        super::cosocket::context_name(runtime::frame().phase)
    ))
}

/// The current run's light threads, made on first use; an error outside an entry thread.
fn current_or_new() -> mlua::Result<Rc<Threads>> {
    SCOPE.with(|s| match &mut *s.borrow_mut() {
        None => Err(disabled()),
        Some(slot) => Ok(slot.get_or_insert_with(Default::default).clone()),
    })
}

/// The current run's light threads, if it has any; an error outside an entry thread.
fn current() -> mlua::Result<Option<Rc<Threads>>> {
    SCOPE.with(|s| match &*s.borrow() {
        None => Err(disabled()),
        Some(slot) => Ok(slot.clone()),
    })
}

impl Threads {
    fn live(&self) -> bool {
        self.lights
            .borrow()
            .iter()
            .any(|l| matches!(l.state, State::Waiting(_) | State::Busy))
    }

    /// Polls every waiting light thread's future, in the order they were spawned; the first
    /// ready one's id and result.
    pub(crate) fn poll_next(&self, cx: &mut Context<'_>) -> Poll<(u64, mlua::Result<MultiValue>)> {
        let mut i = 0;
        loop {
            // No borrow is held while a future is polled: a `wait` future looks at the list.
            let (id, mut fut) = {
                let mut lights = self.lights.borrow_mut();
                let Some(l) = lights.get_mut(i) else {
                    return Poll::Pending;
                };
                i += 1;
                if !matches!(l.state, State::Waiting(_)) {
                    continue;
                }
                let State::Waiting(fut) = std::mem::replace(&mut l.state, State::Busy) else {
                    continue;
                };
                (l.id, fut)
            };
            let r = fut.as_mut().poll(cx);
            match r {
                Poll::Ready(v) => return Poll::Ready((id, v)),
                Poll::Pending => self.set_state(id, State::Waiting(fut)),
            }
        }
    }

    fn set_state(&self, id: u64, state: State) {
        if let Some(l) = self.lights.borrow_mut().iter_mut().find(|l| l.id == id) {
            l.state = state;
        }
    }

    /// Resumes light thread `id` with `input` (its function and arguments the first time, a
    /// waiting function's result after) and records where it stopped. `armed`: the resume is a
    /// stretch of CPU budget of its own (false inside `spawn`, which runs in its caller's).
    pub(crate) fn resume(
        &self,
        rt: &LuaRuntime,
        id: u64,
        frame: Frame,
        input: MultiValue,
        armed: bool,
    ) {
        let thread = {
            let mut lights = self.lights.borrow_mut();
            let Some(l) = lights.iter_mut().find(|l| l.id == id) else {
                return;
            };
            l.state = State::Busy;
            l.thread.clone()
        };
        let state = match rt.resume_light(&thread, frame, input, armed) {
            Ok(LightStop::Wait(fut)) => State::Waiting(fut),
            Ok(LightStop::Done(mut values)) => {
                if matches!(values.front(), Some(Value::Boolean(false))) {
                    // false, err, traceback: the traceback is for the log only.
                    // No traceback (nil) for a memory error: the handler does not run for it.
                    let trace = values.get(2).filter(|v| !v.is_nil()).cloned();
                    values.truncate(2);
                    let text = match trace.as_ref().or(values.get(1)) {
                        Some(Value::String(s)) => s.to_string_lossy(),
                        Some(v) => v.to_string().unwrap_or_default(),
                        None => String::new(),
                    };
                    log_failure(&text);
                }
                State::Ended(values)
            }
            Err(e) => {
                let text = e.to_string();
                log_failure(&text);
                let msg = match &e {
                    mlua::Error::RuntimeError(m) => m.lines().next().unwrap_or("").to_string(),
                    other => super::errors::text(other, None),
                };
                let mut values = MultiValue::new();
                values.push_back(Value::Boolean(false));
                if let Ok(s) = rt.lua().create_string(&msg) {
                    values.push_back(Value::String(s));
                }
                State::Ended(values)
            }
        };
        self.set_state(id, state);
    }

    /// Moves the threads waited for or killed out of the list into the VM's weak table of
    /// dead threads, so a loop that spawns and waits does not grow the list.
    pub(crate) fn compact(&self, lua: &Lua) {
        let dead: Vec<Thread> = {
            let mut lights = self.lights.borrow_mut();
            if !lights.iter().any(|l| matches!(l.state, State::Dead)) {
                return;
            }
            let mut dead = Vec::new();
            lights.retain(|l| {
                let keep = !matches!(l.state, State::Dead);
                if !keep {
                    dead.push(l.thread.clone());
                }
                keep
            });
            dead
        };
        if let Ok(t) = lua.named_registry_value::<Table>(DEAD) {
            for th in dead {
                let _ = t.raw_set(th, true);
            }
        }
    }

    /// A light thread's results for a `wait` on `ids`: the first that ended.
    fn take_ended(&self, ids: &[u64]) -> Option<MultiValue> {
        let mut lights = self.lights.borrow_mut();
        for id in ids {
            let Some(l) = lights.iter_mut().find(|l| l.id == *id) else {
                continue;
            };
            if matches!(l.state, State::Ended(_)) {
                let State::Ended(v) = std::mem::replace(&mut l.state, State::Dead) else {
                    unreachable!("matched just above")
                };
                return Some(v);
            }
        }
        None
    }

    /// Whether any of `ids` can still end (a wait on none of them would never return).
    fn any_pending(&self, ids: &[u64]) -> bool {
        self.lights
            .borrow()
            .iter()
            .any(|l| ids.contains(&l.id) && matches!(l.state, State::Waiting(_) | State::Busy))
    }
}

fn log_failure(text: &str) {
    tracing::error!(
        target: "moongate::lua",
        plugin = %runtime::current_plugin(),
        "lua user thread aborted: {}",
        runtime::one_line(text)
    );
}

/// How a `wait`/`kill` argument relates to the current run.
enum Found {
    /// A light thread of this run (its id and state at the time).
    Light(u64, Kind),
    NotUser,
    /// Waited for or killed (and dropped from the list).
    Dead,
}

enum Kind {
    Running,
    Ended,
    Dead,
}

fn find(
    lua: &Lua,
    threads: &Option<Rc<Threads>>,
    t: &Thread,
    me: *mut mlua::ffi::lua_State,
) -> mlua::Result<(Found, bool)> {
    if let Some(ts) = threads {
        let lights = ts.lights.borrow();
        if let Some(l) = lights.iter().find(|l| l.thread == *t) {
            let kind = match l.state {
                State::Waiting(_) | State::Busy => Kind::Running,
                State::Ended(_) => Kind::Ended,
                State::Dead => Kind::Dead,
            };
            return Ok((Found::Light(l.id, kind), l.parent == me));
        }
    }
    let dead: Table = lua.named_registry_value(DEAD)?;
    if dead.raw_get::<Option<bool>>(t)?.unwrap_or(false) {
        return Ok((Found::Dead, true));
    }
    Ok((Found::NotUser, false))
}

fn thread_arg(v: &Value, i: usize, func: &str) -> mlua::Result<Thread> {
    match v {
        Value::Thread(t) => Ok(t.clone()),
        _ => Err(mlua::Error::runtime(format!(
            "bad argument #{i} to '{func}' (lua thread expected)"
        ))),
    }
}

fn fail(lua: &Lua, msg: &str) -> mlua::Result<MultiValue> {
    Ok(MultiValue::from_iter([
        Value::Nil,
        Value::String(lua.create_string(msg)?),
    ]))
}

/// `ngx.thread.spawn`'s Rust half: makes the thread, runs it until it stops, returns it and
/// whether it ended the request (`ngx.exit`), in which case the Lua half stops the caller too.
fn spawn(lua: &Lua, args: MultiValue) -> mlua::Result<(Thread, bool)> {
    let mut args = args.into_iter();
    let f = match args.next() {
        Some(Value::Function(f)) => f,
        _ => {
            return Err(mlua::Error::runtime(
                "bad argument #1 to 'spawn' (Lua function expected)",
            ))
        }
    };
    let threads = current_or_new()?;
    let rt = runtime::current_runtime().ok_or_else(disabled)?;
    let body: Function = lua.named_registry_value(BODY)?;
    let thread = lua.create_thread(body)?;
    let id = threads.next_id.get() + 1;
    threads.next_id.set(id);
    threads.lights.borrow_mut().push(Light {
        id,
        thread: thread.clone(),
        parent: lua.current_thread().state(),
        state: State::Busy,
    });
    let mut input = MultiValue::new();
    input.push_back(Value::Function(f));
    input.extend(args);
    threads.resume(&rt, id, runtime::frame(), input, false);
    let exited = runtime::with_ctx(|c| {
        c.data::<runtime::LuaRequest>()
            .is_some_and(|r| r.exit.is_some())
    })
    .unwrap_or(false);
    Ok((thread, exited))
}

fn kill(lua: &Lua, t: Value) -> mlua::Result<MultiValue> {
    let t = thread_arg(&t, 1, "kill")?;
    let threads = current()?;
    let me = lua.current_thread().state();
    let (found, is_parent) = find(lua, &threads, &t, me)?;
    let id = match found {
        Found::NotUser => return fail(lua, "not user thread"),
        Found::Dead => return fail(lua, "already waited or killed"),
        Found::Light(_, Kind::Dead) => return fail(lua, "already waited or killed"),
        Found::Light(..) if !is_parent => return fail(lua, "killer not parent"),
        Found::Light(id, Kind::Ended) => {
            if let Some(ts) = &threads {
                ts.set_state(id, State::Dead);
            }
            return fail(lua, "already terminated");
        }
        Found::Light(id, Kind::Running) => id,
    };
    if let Some(ts) = &threads {
        // Dropping the future cancels what the thread waited for (a socket operation closes
        // its connection, a sleep's timer goes).
        let old = {
            let mut lights = ts.lights.borrow_mut();
            lights
                .iter_mut()
                .find(|l| l.id == id)
                .map(|l| std::mem::replace(&mut l.state, State::Dead))
        };
        drop(old);
    }
    Ok(MultiValue::from_iter([Value::Integer(1)]))
}

/// `ngx.thread.wait`'s Rust half: checks the arguments now (errors raise at the caller), then
/// waits for the first of them to end.
fn wait(
    lua: &Lua,
    args: MultiValue,
) -> mlua::Result<std::pin::Pin<Box<dyn std::future::Future<Output = mlua::Result<MultiValue>>>>> {
    let threads = current()?;
    let me = lua.current_thread().state();
    let n = args.len();
    let mut ids = Vec::with_capacity(n);
    for (i, v) in args.iter().enumerate() {
        let t = thread_arg(v, i + 1, "wait")?;
        let (found, is_parent) = find(lua, &threads, &t, me)?;
        match found {
            Found::NotUser => {
                return Err(mlua::Error::runtime(
                    "attempt to wait on a coroutine that is not a user thread",
                ))
            }
            _ if !is_parent => {
                return Err(mlua::Error::runtime(
                    "only the parent coroutine can wait on the thread",
                ))
            }
            Found::Dead | Found::Light(_, Kind::Dead) => {
                // As OpenResty: a dead one is skipped, unless it is the last argument.
                if i + 1 == n {
                    let v = fail(lua, "already waited or killed")?;
                    return Ok(Box::pin(async move { Ok(v) }));
                }
            }
            Found::Light(id, Kind::Ended) => {
                let v = threads
                    .as_ref()
                    .and_then(|ts| ts.take_ended(&[id]))
                    .unwrap_or_default();
                return Ok(Box::pin(async move { Ok(v) }));
            }
            Found::Light(id, Kind::Running) => ids.push(id),
        }
    }
    if ids.is_empty() {
        return Err(mlua::Error::runtime(
            "bad argument #1 to 'wait' (lua thread expected)",
        ));
    }
    // Weak: the future may be a light thread's, kept in the very list it looks at.
    let weak: Weak<Threads> = threads.as_ref().map(Rc::downgrade).unwrap_or_default();
    let lua = lua.clone();
    Ok(Box::pin(async move {
        std::future::poll_fn(|_cx| {
            let Some(ts) = weak.upgrade() else {
                return Poll::Pending;
            };
            if let Some(v) = ts.take_ended(&ids) {
                return Poll::Ready(Ok(v));
            }
            if !ts.any_pending(&ids) {
                return Poll::Ready(fail(&lua, "already waited or killed"));
            }
            // Woken by no one: the driver polls again after every resume (see the module doc).
            Poll::Pending
        })
        .await
    }))
}

/// Installs `ngx.thread`.
pub(crate) fn install(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    let g = lua.globals();
    let debug: Table = g.get("debug")?;
    let body: Function = lua.load(BODY_SRC).set_name("=moongate.thread").call((
        Value::LightUserData(runtime::done_tag()),
        lua.named_registry_value::<Function>(super::errors::RAW_XPCALL)?,
        debug.get::<Function>("traceback")?,
        g.get::<Function>("tostring")?,
        lua.named_registry_value::<Function>(super::errors::MESSAGE)?,
    ))?;
    lua.set_named_registry_value(BODY, body)?;
    let dead = lua.create_table()?;
    let mt = lua.create_table()?;
    mt.set("__mode", "k")?;
    dead.set_metatable(Some(mt))?;
    lua.set_named_registry_value(DEAD, dead)?;

    let spawn_raw = lua.create_function(|lua, args: MultiValue| spawn(lua, args))?;
    // The spawned thread called ngx.exit: its caller stops where it is, never resumed.
    let halt = runtime::create_waiting_function(lua, |_, ()| async {
        std::future::pending::<()>().await;
        Ok(())
    })?;
    let spawn_fn: Function = lua
        .load(
            r#"local spawn, halt = ...
            return function(...)
                local t, exited = spawn(...)
                if exited then halt() end
                return t
            end"#,
        )
        .set_name("=moongate.thread_spawn")
        .call((spawn_raw, halt))?;
    let t = lua.create_table()?;
    t.set("spawn", spawn_fn)?;
    t.set(
        "wait",
        runtime::create_waiting_function(lua, |lua, args: MultiValue| {
            let fut = wait(&lua, args);
            async move { fut?.await }
        })?,
    )?;
    t.set("kill", lua.create_function(|lua, t: Value| kill(lua, t))?)?;
    ngx.set("thread", t)?;
    Ok(())
}
