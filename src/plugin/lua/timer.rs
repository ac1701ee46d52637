//! `ngx.timer.at`, `ngx.timer.every`, `ngx.timer.running_count`, `ngx.timer.pending_count` and
//! `ngx.worker.exiting`.
//!
//! A timer is a task on the worker's `LocalSet`: it sleeps, then runs the callback in a Lua
//! thread of its own on the worker's VM, with `premature` (false, or true when the worker is
//! shutting down) followed by the extra arguments, as OpenResty calls it. The callback runs
//! under the same CPU budget as a plugin call and may wait (`ngx.sleep`); an error is logged
//! and ends only that run. Timers exist in workers only: elsewhere (the thread that checks
//! schemas) `ngx.timer.at` returns nil and an error, as OpenResty's does where timers are off.
//!
//! The worker calls [`enable`] when it starts and [`shutdown`] when it stops: pending timers
//! then fire at once with `premature = true`, and the worker gives running ones until its
//! graceful-shutdown deadline to finish.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use mlua::{Function, Lua, MultiValue, Table, Value};
use tokio::sync::{watch, Notify};

use super::runtime::{self, Frame, Resume, Stop};
use super::thread;

/// OpenResty's default `lua_max_pending_timers`.
const MAX_PENDING: usize = 1024;
/// Registry name of the function a timer thread runs: calls the callback, returns done.
const BODY: &str = "moongate.timer_body";

struct State {
    exiting: watch::Sender<bool>,
    pending: Cell<usize>,
    running: Cell<usize>,
    /// Notified whenever a timer stops running.
    idle: Notify,
}

thread_local! {
    static STATE: RefCell<Option<Rc<State>>> = const { RefCell::new(None) };
    /// A timer callback is running (`ngx.get_phase()` says "timer").
    static IN_TIMER: Cell<bool> = const { Cell::new(false) };
}

/// Whether the Lua code running now is a timer's callback.
pub(crate) fn in_timer() -> bool {
    IN_TIMER.with(|c| c.get())
}

fn state() -> Option<Rc<State>> {
    STATE.with(|s| s.borrow().clone())
}

/// Turns timers on for this thread: call from inside the worker's `LocalSet`.
pub fn enable() {
    let (tx, _) = watch::channel(false);
    STATE.with(|s| {
        *s.borrow_mut() = Some(Rc::new(State {
            exiting: tx,
            pending: Cell::new(0),
            running: Cell::new(0),
            idle: Notify::new(),
        }))
    });
}

/// The worker is stopping: `ngx.worker.exiting()` turns true, new timers are refused and
/// pending ones fire now with `premature = true`.
pub fn shutdown() {
    if let Some(s) = state() {
        s.exiting.send_replace(true);
    }
}

/// Waits (until `deadline`) for the timers still running or about to run to finish.
pub async fn drain(deadline: tokio::time::Instant) {
    let Some(s) = state() else {
        return;
    };
    while s.running.get() + s.pending.get() > 0 {
        let notified = s.idle.notified();
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            tracing::warn!(
                running = s.running.get(),
                pending = s.pending.get(),
                "graceful shutdown deadline passed with Lua timers still running"
            );
            return;
        }
    }
}

/// `ngx.worker.exiting()`.
pub(crate) fn exiting() -> bool {
    state().is_some_and(|s| *s.exiting.borrow())
}

fn bad_arg(n: usize, func: &str, msg: &str) -> mlua::Error {
    mlua::Error::runtime(format!("bad argument #{n} to '{func}' ({msg})"))
}

fn delay_arg(v: &Value, func: &str) -> mlua::Result<f64> {
    let d = match v {
        Value::Integer(i) => *i as f64,
        Value::Number(n) => *n,
        _ => return Err(bad_arg(1, func, "number expected")),
    };
    if !d.is_finite() || d < 0.0 {
        return Err(mlua::Error::runtime("invalid delay"));
    }
    Ok(d)
}

/// Schedules one timer; `every` repeats it.
fn schedule(
    lua: &Lua,
    delay: f64,
    every: bool,
    callback: Function,
    args: MultiValue,
) -> mlua::Result<MultiValue> {
    let fail = |msg: &str| -> mlua::Result<MultiValue> {
        Ok(MultiValue::from_iter([
            Value::Nil,
            Value::String(lua.create_string(msg)?),
        ]))
    };
    let (Some(st), Some(rt)) = (state(), runtime::current_runtime()) else {
        return fail("timers are only available in worker threads");
    };
    if *st.exiting.borrow() {
        return fail("process exiting");
    }
    if st.pending.get() >= MAX_PENDING {
        return fail("too many pending timers");
    }
    let body: Function = lua.named_registry_value(BODY)?;
    let mut exiting = st.exiting.subscribe();
    st.pending.set(st.pending.get() + 1);
    tokio::task::spawn_local(async move {
        let period = Duration::from_secs_f64(delay);
        loop {
            let premature = *exiting.borrow_and_update()
                || tokio::select! {
                    _ = tokio::time::sleep(period) => false,
                    _ = exiting.wait_for(|e| *e) => true,
                };
            st.pending.set(st.pending.get() - 1);
            st.running.set(st.running.get() + 1);
            run(&rt, &body, &callback, premature, &args).await;
            st.running.set(st.running.get() - 1);
            st.idle.notify_waiters();
            if !every || premature {
                break;
            }
            if *exiting.borrow() {
                // Shut down while it ran: one last, premature, run as OpenResty does.
                st.pending.set(st.pending.get() + 1);
                continue;
            }
            st.pending.set(st.pending.get() + 1);
        }
    });
    Ok(MultiValue::from_iter([Value::Boolean(true)]))
}

/// Runs one call of a timer's callback in a fresh Lua thread, through its waits, until it and
/// the light threads it spawned have ended (an error in the callback aborts them).
async fn run(
    rt: &runtime::LuaRuntime,
    body: &Function,
    callback: &Function,
    premature: bool,
    args: &MultiValue,
) {
    let thread = match rt.lua().create_thread(body.clone()) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(target: "moongate::lua", "cannot start a Lua timer: {e}");
            return;
        }
    };
    let mut first = MultiValue::new();
    first.push_back(Value::Function(callback.clone()));
    first.push_back(Value::Boolean(premature));
    first.extend(args.iter().cloned());
    // The sockets this run makes (its light threads' too), closed when it ends.
    let mut sockets = super::cosocket::Owned::default();
    let mut threads: Option<Rc<thread::Threads>> = None;
    // The callback's thread: what it waits for, None once it returned.
    let mut entry: Option<runtime::Pending> = None;
    let mut input = Some(first);
    loop {
        if let Some(values) = input.take() {
            let stop = {
                let _in = InTimer::set();
                let _owned = super::cosocket::TimerOwnedGuard::set(&mut sockets);
                let scope = thread::enter(threads.take());
                let stop = rt.resume(&thread, Frame::NONE, Resume::Wake(values));
                threads = scope.leave();
                stop
            };
            match stop {
                Ok(Stop::Done(..)) => entry = None,
                Ok(Stop::Wait(fut)) => entry = Some(fut),
                Err(e) => {
                    tracing::error!(
                        target: "moongate::lua",
                        "lua timer callback failed: {}",
                        runtime::one_line(&e.to_string())
                    );
                    return;
                }
            }
        }
        if entry.is_none() && !thread::live(&threads) {
            return;
        }
        let event = {
            let ts = threads.as_deref();
            std::future::poll_fn(|cx| runtime::poll_round(cx, Frame::NONE, entry.as_mut(), ts))
                .await
        };
        match event {
            runtime::Event::Entry(woke) => match runtime::wake_values(rt.lua(), woke) {
                Ok(values) => {
                    entry = None;
                    input = Some(values);
                }
                Err(_) => return,
            },
            runtime::Event::Light(id, woke) => {
                let Ok(values) = runtime::wake_values(rt.lua(), woke) else {
                    return;
                };
                let Some(ts) = threads.clone() else {
                    continue;
                };
                let _in = InTimer::set();
                let _owned = super::cosocket::TimerOwnedGuard::set(&mut sockets);
                let scope = thread::enter(threads.take());
                ts.resume(rt, id, Frame::NONE, values, true);
                threads = scope.leave();
                ts.compact(rt.lua());
            }
        }
    }
}

/// Marks a timer's Lua code running (`ngx.get_phase()` says "timer") for a scope.
struct InTimer;

impl InTimer {
    fn set() -> InTimer {
        IN_TIMER.with(|c| c.set(true));
        InTimer
    }
}

impl Drop for InTimer {
    fn drop(&mut self) {
        IN_TIMER.with(|c| c.set(false));
    }
}

/// Installs `ngx.timer` and `ngx.worker.exiting` into `ngx` (after `ngx.worker` exists).
pub(crate) fn install(lua: &Lua, ngx: &Table) -> mlua::Result<()> {
    let body: Function = lua
        .load("local DONE = ... return function(f, ...) f(...) return DONE end")
        .set_name("=moongate.timer")
        .call(Value::LightUserData(runtime::done_tag()))?;
    lua.set_named_registry_value(BODY, body)?;
    let timer = lua.create_table()?;
    timer.set(
        "at",
        lua.create_function(|lua, (delay, callback, args): (Value, Value, MultiValue)| {
            let delay = delay_arg(&delay, "at")?;
            let Value::Function(f) = callback else {
                return Err(bad_arg(2, "at", "function expected"));
            };
            schedule(lua, delay, false, f, args)
        })?,
    )?;
    timer.set(
        "every",
        lua.create_function(|lua, (delay, callback, args): (Value, Value, MultiValue)| {
            let delay = delay_arg(&delay, "every")?;
            if delay == 0.0 {
                return Err(mlua::Error::runtime("delay cannot be zero"));
            }
            let Value::Function(f) = callback else {
                return Err(bad_arg(2, "every", "function expected"));
            };
            schedule(lua, delay, true, f, args)
        })?,
    )?;
    timer.set(
        "running_count",
        lua.create_function(|_, ()| Ok(state().map(|s| s.running.get()).unwrap_or(0)))?,
    )?;
    timer.set(
        "pending_count",
        lua.create_function(|_, ()| Ok(state().map(|s| s.pending.get()).unwrap_or(0)))?,
    )?;
    ngx.set("timer", timer)?;
    let worker: Table = ngx.get("worker")?;
    worker.set("exiting", lua.create_function(|_, ()| Ok(exiting()))?)?;
    Ok(())
}
