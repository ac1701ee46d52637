//! `require("ngx.semaphore")` and `require("ngx.process")` (lua-resty-core's modules).
//!
//! A semaphore lives in the worker's VM, as OpenResty's does: requests and timers of one worker
//! share it. `wait` is a waiting function (it parks the request or timer, outside the CPU
//! budget); `post` wakes waiters in the order they came.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use mlua::{AnyUserData, Lua, MultiValue, Table, UserData, Value};
use tokio::sync::Semaphore;

use super::runtime;

/// One semaphore: its resources and how many wait for one.
struct Sema {
    sem: Semaphore,
    waiting: Cell<i64>,
}

struct LuaSema(Rc<Sema>);

impl UserData for LuaSema {
    fn add_fields<F: mlua::UserDataFields<Self>>(fields: &mut F) {
        fields.add_meta_field_with("__index", |lua| {
            lua.named_registry_value::<Table>(SEMA_METHODS)
        });
    }
}

const SEMA_METHODS: &str = "moongate.semaphore_methods";

fn sema_of(ud: &AnyUserData) -> mlua::Result<Rc<Sema>> {
    ud.borrow::<LuaSema>().map(|s| s.0.clone())
}

fn count_arg(v: &Value, what: &str) -> mlua::Result<usize> {
    match v {
        Value::Nil => Ok(0),
        Value::Integer(n) if *n >= 0 => Ok(*n as usize),
        Value::Number(n) if *n >= 0.0 && n.is_finite() => Ok(*n as usize),
        _ => Err(mlua::Error::runtime(format!("bad argument ({what})"))),
    }
}

/// Waits decrement a counter of waiters, so `count()` is negative while threads wait, as in
/// lua-resty-core.
struct Waiting(Rc<Sema>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.waiting.set(self.0.waiting.get() - 1);
    }
}

fn semaphore_module(lua: &Lua) -> mlua::Result<Table> {
    let methods = lua.create_table()?;
    methods.set(
        "post",
        lua.create_function(|_, (ud, n): (AnyUserData, Value)| {
            let s = sema_of(&ud)?;
            let n = match n {
                Value::Nil => 1,
                v => count_arg(&v, "n must be a non-negative number")?,
            };
            s.sem.add_permits(n);
            Ok(true)
        })?,
    )?;
    methods.set(
        "count",
        lua.create_function(|_, ud: AnyUserData| {
            let s = sema_of(&ud)?;
            Ok(s.sem.available_permits() as i64 - s.waiting.get())
        })?,
    )?;
    methods.set(
        "wait",
        runtime::create_waiting_function(lua, |_, (ud, timeout): (AnyUserData, Value)| {
            let args = sema_of(&ud).and_then(|s| {
                let secs = match timeout {
                    Value::Nil => 0.0,
                    Value::Integer(n) if n >= 0 => n as f64,
                    Value::Number(n) if n >= 0.0 && n.is_finite() => n,
                    _ => {
                        return Err(mlua::Error::runtime(
                            "bad argument #1 to 'wait' (timeout must be a non-negative number)",
                        ))
                    }
                };
                Ok((s, secs))
            });
            async move {
                let (s, secs) = args?;
                let fail = |m: &'static str| Ok((Value::Nil, Some(m)));
                if let Ok(p) = s.sem.try_acquire() {
                    p.forget();
                    return Ok((Value::Boolean(true), None));
                }
                if secs == 0.0 {
                    return fail("timeout");
                }
                s.waiting.set(s.waiting.get() + 1);
                let _w = Waiting(s.clone());
                let acquired = match tokio::time::timeout(
                    Duration::from_secs_f64(secs),
                    s.sem.acquire(),
                )
                .await
                {
                    Ok(Ok(p)) => {
                        p.forget();
                        true
                    }
                    _ => false,
                };
                if acquired {
                    Ok((Value::Boolean(true), None))
                } else {
                    fail("timeout")
                }
            }
        })?,
    )?;
    lua.set_named_registry_value(SEMA_METHODS, methods)?;
    let m = lua.create_table()?;
    m.set("version", "0.1.17")?;
    m.set(
        "new",
        lua.create_function(|lua, n: Value| {
            let n = count_arg(&n, "n must be a non-negative number")?;
            lua.create_userdata(LuaSema(Rc::new(Sema {
                sem: Semaphore::new(n),
                waiting: Cell::new(0),
            })))
        })?,
    )?;
    Ok(m)
}

/// `ngx.process`: moongate's serving workers are nginx's workers; the master is the
/// supervisor process (`moongate run`), the parent of the serving process.
fn process_module(lua: &Lua) -> mlua::Result<Table> {
    let m = lua.create_table()?;
    m.set(
        "type",
        lua.create_function(|_, ()| {
            let worker = std::thread::current()
                .name()
                .is_some_and(|n| n.starts_with("moongate-worker-"));
            Ok(if worker { "worker" } else { "single" })
        })?,
    )?;
    m.set(
        "get_master_pid",
        lua.create_function(|_, ()| Ok(std::os::unix::process::parent_id()))?,
    )?;
    m.set(
        "enable_privileged_agent",
        lua.create_function(|lua, _: MultiValue| {
            Ok((
                Value::Nil,
                Value::String(lua.create_string("privileged agents are not supported")?),
            ))
        })?,
    )?;
    Ok(m)
}

pub(crate) fn install(lua: &Lua, preload: &Table) -> mlua::Result<()> {
    preload.set(
        "ngx.semaphore",
        lua.create_function(|lua, _: MultiValue| semaphore_module(lua))?,
    )?;
    preload.set(
        "ngx.process",
        lua.create_function(|lua, _: MultiValue| process_module(lua))?,
    )?;
    Ok(())
}
