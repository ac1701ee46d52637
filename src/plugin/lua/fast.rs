//! C-API fast paths for the request functions plugins call on every request
//! (`ngx.req.set_header`, `ngx.req.get_method`, `ngx.req.get_headers`, `ngx.var`/`ctx.var`
//! reads, ...).
//!
//! A Rust function made with `Lua::create_function` costs about a thousand instructions per
//! call before it does anything: mlua checks and converts every argument into a reference of
//! its own and wraps the call for errors and panics. Each function here is a plain
//! `lua_CFunction` with the mlua function as its upvalue: it handles the common case itself
//! (the usual argument types, a request in place, valid names and values) and hands every other
//! case, errors included, to the mlua function with the same arguments, so what Lua sees
//! (results, error values and messages) is the mlua function's. An error raised there has one
//! more `[C]` line in its traceback, the fast function's.
//!
//! Rules every fast function keeps: the Rust work runs inside `catch_unwind` and calls no Lua
//! API (a Lua error must never unwind through `catch_unwind`, and a panic never through C);
//! a panic falls back to the mlua function, which redoes the call and reports the panic as mlua
//! does, so a fast function only takes the fast path for work it can redo. Lua API calls that
//! may raise (pushing a string may run out of memory) happen only where no Rust value that
//! needs dropping is live, so a Lua error leaks at most a scratch buffer.

use std::cell::{Cell, RefCell};
use std::ffi::c_int;
use std::mem::ManuallyDrop;
use std::panic::{catch_unwind, AssertUnwindSafe};

use http::header::{HeaderName, HeaderValue};
use mlua::ffi::{self, lua_State};
use mlua::{Function, Lua};

use super::api::{push_headers, FlatHeaders};
use super::runtime::with_ctx;

thread_local! {
    /// Bytes a fast function copies out of the request before pushing them as a Lua string:
    /// pushing may run the GC, whose finalizers may run Lua that changes the request, so no
    /// string is pushed straight from the request.
    static SCRATCH: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };

    /// Header names the fast functions made lately. A plugin sets the same few headers on every
    /// request, and `HeaderName::from_bytes` copies a non-standard name into an allocation of its
    /// own each time; a kept name is cloned instead (a reference count).
    static NAMES: RefCell<Vec<HeaderName>> = const { RefCell::new(Vec::new()) };
}

/// How many header names [`NAMES`] keeps.
const KEPT_NAMES: usize = 8;

/// `name` as a header name (None: not a valid one), from [`NAMES`] when it is there.
fn header_name(name: &[u8]) -> Option<HeaderName> {
    NAMES.with_borrow_mut(|names| {
        // A kept name is lowercase and valid: a name equal to it but for ASCII case parses to it.
        if let Some(n) = names
            .iter()
            .find(|n| n.as_str().as_bytes().eq_ignore_ascii_case(name))
        {
            return Some(n.clone());
        }
        let n = HeaderName::from_bytes(name).ok()?;
        if names.len() == KEPT_NAMES {
            names.remove(0);
        }
        names.push(n.clone());
        Some(n)
    })
}

/// `fast` as a Lua C function with `slow` (an mlua function with the same behaviour) as its
/// upvalue.
pub(crate) fn wrap(lua: &Lua, slow: Function, fast: ffi::lua_CFunction) -> mlua::Result<Function> {
    // SAFETY: runs in mlua's protected call with `slow` as its only argument, which
    // `lua_pushcclosure` pops and replaces by the closure: the one result.
    unsafe { lua.exec_raw(slow, |l| ffi::lua_pushcclosure(l, fast, 1)) }
}

/// Calls the upvalue (the mlua function) with the fast function's arguments and returns its
/// results.
///
/// # Safety
/// Only from a fast function made by [`wrap`], with its arguments untouched on the stack.
unsafe fn slow(l: *mut lua_State) -> c_int {
    let n = ffi::lua_gettop(l);
    if ffi::lua_checkstack(l, 1) == 0 {
        // Not reachable in practice (a C function gets LUA_MINSTACK slots); raise as Lua would.
        return ffi::luaL_error(l, c"stack overflow".as_ptr());
    }
    ffi::lua_pushvalue(l, ffi::lua_upvalueindex(1));
    ffi::lua_insert(l, 1);
    ffi::lua_call(l, n, ffi::LUA_MULTRET);
    ffi::lua_gettop(l)
}

/// The bytes of the string at `idx`.
///
/// # Safety
/// The value at `idx` must be a string (not a number: `lua_tolstring` would convert it in
/// place); the slice lives while the string stays on the stack.
unsafe fn str_arg<'a>(l: *mut lua_State, idx: c_int) -> &'a [u8] {
    let mut len = 0usize;
    let p = ffi::lua_tolstring(l, idx, &mut len);
    std::slice::from_raw_parts(p.cast::<u8>(), len)
}

/// Runs `f`, false if it panicked.
fn caught(f: impl FnOnce() -> bool) -> bool {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(false)
}

/// Pushes what `fill` writes into the scratch buffer as a Lua string, or nil when it returns
/// false; hands the call to the mlua function when `fill` panics or finds no request.
///
/// # Safety
/// From a fast function made by [`wrap`], arguments untouched.
unsafe fn push_filled(
    l: *mut lua_State,
    fill: impl FnOnce(&mut Vec<u8>) -> mlua::Result<bool>,
) -> c_int {
    // ManuallyDrop: nothing to drop if pushing raises (the buffer then leaks, once).
    let mut buf = ManuallyDrop::new(SCRATCH.take());
    buf.clear();
    let mut found = false;
    if !caught(|| match fill(&mut buf) {
        Ok(f) => {
            found = f;
            true
        }
        Err(_) => false,
    }) {
        SCRATCH.set(ManuallyDrop::into_inner(buf));
        return slow(l);
    }
    if found {
        ffi::lua_pushlstring(l, buf.as_ptr().cast(), buf.len());
    } else {
        ffi::lua_pushnil(l);
    }
    SCRATCH.set(ManuallyDrop::into_inner(buf));
    1
}

/// Whether the value at `idx` is a string, nil or absent.
unsafe fn string_or_nil(l: *mut lua_State, idx: c_int) -> bool {
    matches!(
        ffi::lua_type(l, idx),
        ffi::LUA_TSTRING | ffi::LUA_TNIL | ffi::LUA_TNONE
    )
}

/// `ngx.req.set_header(name, value)` / `add_header` / `clear_header` with a string name and a
/// string (or nil) value.
unsafe fn modify_header(l: *mut lua_State, add: bool, has_value: bool) -> c_int {
    if ffi::lua_type(l, 1) != ffi::LUA_TSTRING || (has_value && !string_or_nil(l, 2)) {
        return slow(l);
    }
    let name = str_arg(l, 1);
    let value = (has_value && ffi::lua_type(l, 2) == ffi::LUA_TSTRING).then(|| str_arg(l, 2));
    let done = caught(|| {
        let Some(name) = header_name(name) else {
            return false;
        };
        let value = match value.map(HeaderValue::from_bytes) {
            None => None,
            Some(Ok(v)) => Some(v),
            Some(Err(_)) => return false,
        };
        with_ctx(|c| match value {
            Some(v) if add => {
                c.headers.append(name, v);
            }
            // Replaces every value, where the first one was (as nginx does).
            Some(v) => {
                c.headers.insert(name, v);
            }
            None if add => {}
            None => {
                c.headers.remove(&name);
            }
        })
        .is_ok()
    });
    if done {
        0
    } else {
        slow(l)
    }
}

/// `ngx.req.set_header`.
pub(crate) unsafe extern "C-unwind" fn set_header(l: *mut lua_State) -> c_int {
    modify_header(l, false, true)
}

/// `ngx.req.add_header`.
pub(crate) unsafe extern "C-unwind" fn add_header(l: *mut lua_State) -> c_int {
    modify_header(l, true, true)
}

/// `ngx.req.clear_header`.
pub(crate) unsafe extern "C-unwind" fn clear_header(l: *mut lua_State) -> c_int {
    modify_header(l, false, false)
}

/// `ngx.req.get_method`.
pub(crate) unsafe extern "C-unwind" fn get_method(l: *mut lua_State) -> c_int {
    push_filled(l, |buf| {
        with_ctx(|c| {
            buf.extend_from_slice(c.method.as_str().as_bytes());
            true
        })
    })
}

/// `__moongate.var_get(name)`: `ngx.var.NAME` and `ctx.var.NAME` reads.
pub(crate) unsafe extern "C-unwind" fn var_get(l: *mut lua_State) -> c_int {
    if ffi::lua_type(l, 1) != ffi::LUA_TSTRING {
        return slow(l);
    }
    let Ok(name) = std::str::from_utf8(str_arg(l, 1)) else {
        return slow(l);
    };
    push_filled(l, |buf| {
        with_ctx(|c| match c.var(name) {
            Some(v) => {
                buf.extend_from_slice(v.as_bytes());
                true
            }
            None if name == "binary_remote_addr" => {
                buf.extend_from_slice(&c.binary_remote_addr());
                true
            }
            None => false,
        })
    })
}

/// `ngx.req.get_headers(max, raw)` with an integer (or no) `max` and a boolean (or no) `raw`:
/// the table is built on the caller's stack, without mlua's protected call.
pub(crate) unsafe extern "C-unwind" fn get_headers(l: *mut lua_State) -> c_int {
    let max = match ffi::lua_type(l, 1) {
        ffi::LUA_TNIL | ffi::LUA_TNONE => 100,
        ffi::LUA_TNUMBER => {
            let n = ffi::lua_tonumber(l, 1);
            if n.fract() != 0.0 || n.abs() > 9_007_199_254_740_992.0 {
                return slow(l);
            }
            n as i64
        }
        _ => return slow(l),
    };
    let raw = match ffi::lua_type(l, 2) {
        ffi::LUA_TNIL | ffi::LUA_TNONE => false,
        ffi::LUA_TBOOLEAN => ffi::lua_toboolean(l, 2) != 0,
        _ => return slow(l),
    };
    if ffi::lua_checkstack(l, 5) == 0 {
        return slow(l);
    }
    // ManuallyDrop: nothing to drop if building the table raises (the copy then leaks, once).
    let mut flat = ManuallyDrop::new(FlatHeaders::default());
    if !caught(|| with_ctx(|c| *flat = FlatHeaders::of(&c.headers)).is_ok()) {
        ManuallyDrop::drop(&mut flat);
        return slow(l);
    }
    let (take, truncated) = flat.take(max);
    push_headers(l, &flat, take, raw);
    match truncated {
        Some(t) => {
            ffi::lua_pushlstring(l, t.as_ptr().cast(), t.len());
        }
        None => ffi::lua_pushnil(l),
    }
    ManuallyDrop::drop(&mut flat);
    2
}
