//! One LuaJIT VM per thread, the plugin modules and conf tables loaded in it, and the calls into
//! it from the plugin phases.
//!
//! Worker threads each get a [`LuaRuntime`] on their first Lua plugin call (like an nginx
//! worker's Lua VM). The thread that builds snapshots gets one too, used to run plugins'
//! `check_schema`. Nothing here is `Send`: a VM never leaves its thread.
//!
//! Request access from Lua: while a phase runs, a thread-local [`Frame`] points at the request's
//! `Ctx` (and, in the filter phases, at the response head or body chunk). The request phases
//! (rewrite, access, before_proxy) run in a runner thread (coroutine) that may wait: it is
//! resumed many times, and other requests' runners run on the same VM in between, so the frame
//! is set around *each resume* (and each poll of what it waits for, see [`request_phase`]) and
//! restored after. Every `ngx`/`ctx` function reads the request through [`with_ctx`] and
//! friends, which fail with a Lua error when no request is running.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::hash::BuildHasherDefault;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use mlua::{Function, LightUserData, Lua, LuaOptions, MultiValue, StdLib, Table, Thread, Value};

use super::convert::{self, Unsupported};
use super::thread;
use super::watchdog::Budget;
use super::{api, LuaConf, LuaPlugin, Settings};
use crate::body::{ClientBodyFault, ResponseBody};
use crate::plugin::ctx::IdHasher;
use crate::plugin::{
    BodyChunk, Ctx, Flow, LocalResponse, Phase, PhaseCall, PhaseResult, PluginConf, PluginError,
    ResponseHead,
};

/// Bumped whenever a plugin version or a conf dies: workers then sweep their caches.
static RETIRED: AtomicU64 = AtomicU64::new(0);

/// Records that a cached object (a plugin version, a conf) is gone.
pub(crate) fn retire() {
    RETIRED.fetch_add(1, Ordering::Release);
}

/// What Lua code running right now may touch.
#[derive(Clone, Copy)]
pub(crate) struct Frame {
    /// The request, or null outside a request (module load, `check_schema` at build time).
    pub ctx: *mut Ctx,
    /// The phase, or None while loading and checking.
    pub phase: Option<Phase>,
    /// The running plugin's name (for log lines); valid for the frame's life.
    pub plugin: *const str,
    /// header_filter only.
    pub head: *mut ResponseHead,
    /// body_filter only.
    pub chunk: *mut BodyChunk,
}

impl Frame {
    pub(crate) const NONE: Frame = Frame {
        ctx: std::ptr::null_mut(),
        phase: None,
        plugin: "" as *const str,
        head: std::ptr::null_mut(),
        chunk: std::ptr::null_mut(),
    };
}

thread_local! {
    static FRAME: Cell<Frame> = const { Cell::new(Frame::NONE) };
    static RUNTIME: RefCell<Option<Rc<LuaRuntime>>> = const { RefCell::new(None) };
    /// The runner thread being resumed (null when none): waiting functions may yield only
    /// from it.
    static RUNNER: Cell<*mut mlua::ffi::lua_State> = const { Cell::new(std::ptr::null_mut()) };
    /// The future a waiting function handed over during the current resume.
    static PENDING: RefCell<Option<Pending>> = const { RefCell::new(None) };
}

/// What a waiting API function waits for; its output is what the function returns to Lua.
pub(crate) type Pending = Pin<Box<dyn Future<Output = mlua::Result<MultiValue>>>>;

/// Light userdata a runner thread yields: its phase function returned (followed by its first
/// two values)...
static DONE_TAG: u8 = 1;
/// ...or a waiting function handed a [`Pending`] over and waits for its result.
static WAIT_TAG: u8 = 2;

fn tag(t: &'static u8) -> LightUserData {
    LightUserData(t as *const u8 as *mut std::ffi::c_void)
}

/// What a detached thread (a timer's, see `timer.rs`) returns when its function is done, so
/// [`LuaRuntime::resume`] reports [`Stop::Done`].
pub(crate) fn done_tag() -> LightUserData {
    tag(&DONE_TAG)
}

/// Idle runner threads kept per VM; more are made while many requests wait at once.
const MAX_IDLE_RUNNERS: usize = 64;

/// The phase-call trampoline and the body of runner threads.
///
/// `call` takes either a binding id and the ctx slot (the common case: the function, plugin
/// name and conf table were stored in `BOUND[id]` once per conf and phase, so a call pushes two
/// integers instead of four references), or the function, plugin name, conf table and ctx slot
/// (a conf without an id). It sets `ctx._plugin_name` (from Lua that costs
/// nanoseconds, from Rust a protected call) and calls the phase function.
///
/// The ctx table is passed as its slot in `CTXS` (see [`LuaRuntime::ctx_slot`]): usually the slot
/// holds an emptied table from an earlier request (see [`LuaRuntime::release_slot`]); otherwise
/// the first call of a request makes one here, in Lua, where it costs a table allocation; made
/// from Rust, every table is a protected call of its own while a memory limit is set.
///
/// A runner parks at a yield, runs the call it is resumed with, yields its first two results,
/// again. The call's arguments live in `call`'s frame only, so a parked runner keeps no
/// request's tables alive (only the last call's two results).
///
/// `release` empties a finished request's ctx table for the slot's next request.
const RUNNER_SRC: &str = r#"
local DONE, yield, BOUND, CTXS, CTX_MT, setmetatable, getmetatable, new_tab, clear_tab = ...
local function ctx_of(slot)
    local ctx = CTXS[slot]
    if ctx == nil then
        -- Room for _plugin_name, var and a few more fields without growing.
        ctx = setmetatable(new_tab(0, 8), CTX_MT)
        CTXS[slot] = ctx
    end
    return ctx
end
local function call(f, name, conf, slot)
    if conf == nil then
        local ctx = ctx_of(name)
        local b = BOUND[f]
        ctx._plugin_name = b[2]
        return b[1](b[3], ctx)
    end
    local ctx = ctx_of(slot)
    ctx._plugin_name = name
    return f(conf, ctx)
end
local function runner()
    local r1, r2
    while true do
        r1, r2 = call(yield(DONE, r1, r2))
    end
end
local function release(slot)
    local ctx = CTXS[slot]
    if ctx ~= nil then
        clear_tab(ctx)
        if getmetatable(ctx) ~= CTX_MT then
            setmetatable(ctx, CTX_MT)
        end
    end
end
return call, runner, release
"#;

/// Wraps a waiting function's Rust half: call it, yield to the runtime, return what it sends
/// back or raise its error (its message alone, with no position: OpenResty's C functions raise
/// theirs so).
const WAITING_SRC: &str = r#"
local start, yield, WAIT, error = ...
local function resumed(ok, ...)
    if ok then return ... end
    error((...), 0)
end
return function(...)
    start(...)
    return resumed(yield(WAIT))
end
"#;

/// The wrapper of a waiting function whose `start` may finish at once: it returns `true,
/// results...` or `false, message` when the operation completed without waiting, or the wait
/// tag when the thread must yield for it.
const IO_SRC: &str = r#"
local start, yield, WAIT, error = ...
local function resumed(ok, ...)
    if ok then return ... end
    error((...), 0)
end
local function now(first, ...)
    if first == WAIT then return yield(WAIT) end
    return first, ...
end
return function(...)
    return resumed(now(start(...)))
end
"#;

/// `coroutine.resume` and `coroutine.wrap` as OpenResty has them: a coroutine the plugin made
/// may call a waiting function (a cosocket, `ngx.sleep`). Its yield for the wait reaches the
/// wrapper, which yields the thread that resumed it for the same wait (up to the phase's
/// runner, or a light thread, which the runtime resumes when the wait ends) and hands the
/// result back down. Any other yield returns to the resumer as in plain Lua.
const COROUTINE_SRC: &str = r#"
local WAIT, raw_create, raw_resume, raw_yield, raw_status, error, message = ...
local function resumed(co, ok, first, ...)
    if not ok then return false, message(first, 0, co) end
    if first == WAIT and raw_status(co) == "suspended" then
        return resumed(co, raw_resume(co, raw_yield(WAIT)))
    end
    return ok, first, ...
end
local function resume(co, ...)
    return resumed(co, raw_resume(co, ...))
end
local function unwrap(ok, ...)
    if ok then return ... end
    error((...), 0)
end
local function wrap(f)
    local co = raw_create(f)
    return function(...)
        return unwrap(resume(co, ...))
    end
end
return resume, wrap
"#;

/// Replaces `coroutine.resume` and `coroutine.wrap` with [`COROUTINE_SRC`]'s (after the
/// runtime took the raw ones it needs).
pub(crate) fn install_coroutines(lua: &Lua) -> mlua::Result<()> {
    let co: Table = lua.globals().get("coroutine")?;
    let (resume, wrap): (Function, Function) = lua
        .load(COROUTINE_SRC)
        .set_name("=moongate.coroutine")
        .call((
            tag(&WAIT_TAG),
            co.get::<Function>("create")?,
            co.get::<Function>("resume")?,
            co.get::<Function>("yield")?,
            co.get::<Function>("status")?,
            lua.globals().get::<Function>("error")?,
            lua.named_registry_value::<Function>(super::errors::MESSAGE)?,
        ))?;
    co.set("resume", resume)?;
    co.set("wrap", wrap)?;
    Ok(())
}

/// Sets the runner for a resume; the previous one comes back on drop.
struct RunnerGuard(*mut mlua::ffi::lua_State);

impl RunnerGuard {
    fn set(l: *mut mlua::ffi::lua_State) -> RunnerGuard {
        RunnerGuard(RUNNER.with(|c| c.replace(l)))
    }
}

impl Drop for RunnerGuard {
    fn drop(&mut self) {
        RUNNER.with(|c| c.set(self.0));
    }
}

/// A Lua function that waits, like `create_async_function` but driven by the request runtime:
/// `func` runs at once (with the request's frame in place) and returns the future to wait
/// for; the runner thread yields, [`request_phase`] awaits the future outside the time budget
/// and resumes the thread with its output (or raises its error in Lua).
///
/// Only the rewrite, access and before_proxy phase functions (their light threads and the
/// coroutines they make) and timers can wait: elsewhere this raises an error.
pub(crate) fn create_waiting_function<A, F, FR, R>(lua: &Lua, func: F) -> mlua::Result<Function>
where
    A: mlua::FromLuaMulti + 'static,
    F: Fn(Lua, A) -> FR + 'static,
    FR: Future<Output = mlua::Result<R>> + 'static,
    R: mlua::IntoLuaMulti + 'static,
{
    let begin = waiting_start(func);
    let start = lua.create_function(move |lua, args: A| {
        let pending = begin(lua, args)?;
        PENDING.with(|p| *p.borrow_mut() = Some(pending));
        Ok(())
    })?;
    lua_half(lua, WAITING_SRC, "=moongate.wait", start)
}

/// A waiting function for socket I/O: like [`create_waiting_function`], but the future is
/// polled once at the call, and when that finishes it (a send the kernel takes at once, a
/// receive the buffer already holds, a connect served from the pool) the results are returned
/// without yielding, as lua-nginx-module's cosockets do. Saves the yield, the runtime's poll
/// and the resume per such call on the hot path.
pub(crate) fn create_io_function<A, F, FR, R>(lua: &Lua, func: F) -> mlua::Result<Function>
where
    A: mlua::FromLuaMulti + 'static,
    F: Fn(Lua, A) -> FR + 'static,
    FR: Future<Output = mlua::Result<R>> + 'static,
    R: mlua::IntoLuaMulti + 'static,
{
    let begin = waiting_start(func);
    let start = lua.create_function(move |lua, args: A| {
        let mut pending = begin(lua, args)?;
        // A waker that does nothing: the runtime polls the future again with its own waker
        // when this poll is pending, and tokio's I/O and timers keep the last waker they saw.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match pending.as_mut().poll(&mut cx) {
            Poll::Ready(woke) => wake_values(lua, woke),
            Poll::Pending => {
                PENDING.with(|p| *p.borrow_mut() = Some(pending));
                Ok(MultiValue::from_iter([Value::LightUserData(tag(
                    &WAIT_TAG,
                ))]))
            }
        }
    })?;
    lua_half(lua, IO_SRC, "=moongate.io", start)
}

/// The Lua half of a waiting function (`src`: [`WAITING_SRC`] or [`IO_SRC`]) around its Rust
/// `start`.
fn lua_half(lua: &Lua, src: &str, name: &str, start: Function) -> mlua::Result<Function> {
    let co: Table = lua.globals().get("coroutine")?;
    let error: Function = lua.globals().get("error")?;
    lua.load(src)
        .set_name(name)
        .call((start, co.get::<Function>("yield")?, tag(&WAIT_TAG), error))
}

/// The Rust half of a waiting function: checks that the caller may wait and makes the future.
fn waiting_start<A, F, FR, R>(func: F) -> impl Fn(&Lua, A) -> mlua::Result<Pending> + 'static
where
    A: mlua::FromLuaMulti + 'static,
    F: Fn(Lua, A) -> FR + 'static,
    FR: Future<Output = mlua::Result<R>> + 'static,
    R: mlua::IntoLuaMulti + 'static,
{
    move |lua, args: A| {
        let runner = RUNNER.with(|c| c.get());
        if runner.is_null() {
            return Err(mlua::Error::runtime(format!(
                "API disabled in the context of {}",
                super::cosocket::context_name(frame().phase)
            )));
        }
        // A coroutine the plugin made may wait too: `coroutine.resume` passes the wait up
        // (`COROUTINE_SRC`).
        let weak = lua.weak();
        let fut = func(lua.clone(), args);
        Ok(Box::pin(async move {
            let r = fut.await?;
            let lua = weak
                .try_upgrade()
                .ok_or_else(|| mlua::Error::runtime("the Lua VM is gone"))?;
            r.into_lua_multi(&lua)
        }))
    }
}

/// Sets the frame for a scope; the previous one comes back on drop (also on panic).
struct FrameGuard(Frame);

impl FrameGuard {
    fn set(f: Frame) -> FrameGuard {
        FrameGuard(FRAME.with(|c| c.replace(f)))
    }
}

impl Drop for FrameGuard {
    fn drop(&mut self) {
        FRAME.with(|c| c.set(self.0));
    }
}

pub(crate) fn frame() -> Frame {
    FRAME.with(|c| c.get())
}

/// The running plugin's name ("" outside a plugin call).
pub(crate) fn current_plugin() -> String {
    let f = frame();
    // SAFETY: `plugin` points at a `str` owned by the LuaPlugin whose call set the frame; the
    // frame is restored before that borrow ends.
    unsafe { (*f.plugin).to_string() }
}

/// Runs `f` on the current request.
///
/// SAFETY invariant: a frame's `ctx` is set only by code that holds the `&mut Ctx` of that
/// request for the whole time the frame is in place ([`RequestCall::poll`] and the sync phase
/// calls), and does not touch it itself meanwhile; the frame is restored before that borrow
/// ends. So the pointer is valid and this is the only live access. `f` must not call into Lua
/// (Lua code could reach `with_ctx` again and alias the `&mut`).
pub(crate) fn with_ctx<R>(f: impl FnOnce(&mut Ctx) -> R) -> mlua::Result<R> {
    let fr = frame();
    if fr.ctx.is_null() {
        return Err(mlua::Error::runtime(
            "API disabled in the current context: no request is being served",
        ));
    }
    // SAFETY: see the invariant above.
    Ok(f(unsafe { &mut *fr.ctx }))
}

/// Runs `f` on the response head (header_filter only).
pub(crate) fn with_head<R>(f: impl FnOnce(&mut ResponseHead) -> R) -> Option<R> {
    let fr = frame();
    if fr.head.is_null() {
        return None;
    }
    // SAFETY: as for `with_ctx`: the header_filter call holds `&mut ResponseHead` while the
    // frame is set.
    Some(f(unsafe { &mut *fr.head }))
}

/// Runs `f` on the body chunk (body_filter only).
pub(crate) fn with_chunk<R>(f: impl FnOnce(&mut BodyChunk) -> R) -> Option<R> {
    let fr = frame();
    if fr.chunk.is_null() {
        return None;
    }
    // SAFETY: as for `with_ctx`: the body_filter call holds `&mut BodyChunk` while the frame is
    // set.
    Some(f(unsafe { &mut *fr.chunk }))
}

/// The Lua side of one request: the `ctx` table that persists across its phases, `ngx.ctx`, and
/// what the request phases staged for a local response.
#[derive(Default)]
pub(crate) struct LuaRequest {
    /// Where the `ctx` table lives in the runtime's `CTXS` (0: none yet).
    slot: CtxSlot,
    pub ngx_ctx: Option<Table>,
    /// `ngx.status` set before the response exists.
    pub status: Option<u16>,
    /// `ngx.say`/`ngx.print` output.
    pub output: Vec<u8>,
    /// `ngx.exit(status)` was called.
    pub exit: Option<i64>,
    /// The client's body failed while a plugin read it (`ngx.req.read_body`): the request ends
    /// with the client's error (400, 413), as nginx finalizes it, whatever the plugin does.
    pub body_fault: Option<ClientBodyFault>,
    /// Its cosockets, closed when the request ends.
    pub sockets: super::cosocket::Owned,
}

/// A request's slot in its thread's runtime's `CTXS` table; the slot's table is emptied and the
/// slot freed when the request's Lua state is dropped.
#[derive(Default)]
struct CtxSlot(i64);

impl Drop for CtxSlot {
    fn drop(&mut self) {
        if self.0 == 0 {
            return;
        }
        // Requests never leave their thread: the slot is in this thread's runtime. At thread
        // exit the runtime may be gone already, and the VM with it.
        let rt = RUNTIME
            .try_with(|r| r.try_borrow().ok().and_then(|r| r.clone()))
            .ok()
            .flatten();
        if let Some(rt) = rt {
            rt.release_slot(self.0);
        }
    }
}

/// The request's Lua state, created on first use.
pub(crate) fn lua_request(ctx: &mut Ctx) -> &mut LuaRequest {
    if ctx.data::<LuaRequest>().is_none() {
        ctx.set_data(LuaRequest::default());
    }
    ctx.data_mut::<LuaRequest>().expect("inserted just above")
}

/// What a phase call passes to the trampoline (see [`RUNNER_SRC`]).
pub(crate) enum Call {
    /// A binding id and the ctx slot.
    Bound(i64, i64),
    /// The phase function, the plugin name, the conf table and the ctx slot.
    Full(Function, mlua::String, Table, i64),
}

/// Number of [`Phase`]s, for per-phase arrays.
const PHASES: usize = Phase::ALL.len();

type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

/// One plugin version loaded in a VM.
struct Module {
    live: Weak<()>,
    table: Table,
    funcs: [Option<Function>; PHASES],
    check_schema: Option<Function>,
    /// The module defines `api()` (endpoints APISIX's `public-api` serves).
    api: bool,
    name: String,
    /// `name` as a Lua string, pushed on every call without re-interning.
    name_lua: mlua::String,
}

/// One conf table in a VM, and the phase calls bound to it.
struct ConfEntry {
    live: Weak<()>,
    table: Table,
    /// The plugin version the bindings are for.
    version_id: u64,
    /// Per phase, the id of `BOUND[id] = {f, name, conf}` (0: not bound yet; the module has no
    /// such phase function is also 0, and costs a lookup in `prepare`'s slow path).
    bound: [i64; PHASES],
}

/// A thread's LuaJIT VM with the API installed and its caches.
pub struct LuaRuntime {
    lua: Lua,
    budget: Arc<Budget>,
    modules: RefCell<IdMap<Module>>,
    confs: RefCell<IdMap<ConfEntry>>,
    /// `BOUND`: binding id -> `{phase function, plugin name, conf table}`.
    bound: Table,
    /// Binding ids freed by [`LuaRuntime::sweep`], for reuse.
    free_ids: RefCell<Vec<i64>>,
    next_id: Cell<i64>,
    retired_seen: Cell<u64>,
    memory_limit: Cell<usize>,
    ctx_mt: Table,
    /// `CTXS`: ctx slot -> the request's `ctx` table (see [`LuaRuntime::ctx_slot`]).
    ctxs: Table,
    /// `CTXS`' registry reference, for emptying a slot with the C API.
    ctxs_ref: std::ffi::c_int,
    /// `release` of [`RUNNER_SRC`]'s registry reference (see [`LuaRuntime::release_slot`]).
    release_ref: std::ffi::c_int,
    /// The VM's main state.
    state: *mut mlua::ffi::lua_State,
    /// Ctx slots of finished requests, for reuse.
    free_slots: RefCell<Vec<i64>>,
    next_slot: Cell<i64>,
    /// `call` of [`RUNNER_SRC`], for the sync phases.
    trampoline: Function,
    /// The body of runner threads ([`RUNNER_SRC`]).
    runner_fn: Function,
    /// Runner threads parked between request-phase calls: reused, since making a thread
    /// costs more than the call itself.
    runners: RefCell<Vec<Thread>>,
}

impl Drop for LuaRuntime {
    fn drop(&mut self) {
        self.budget.detach();
    }
}

/// The standard libraries plugins get: everything, as in OpenResty (APISIX plugins use `ffi`,
/// `bit`, `jit` and `debug.getinfo`).
fn std_libs() -> StdLib {
    StdLib::ALL
}

impl LuaRuntime {
    /// A fresh VM with the API installed.
    pub fn new(settings: &Settings) -> mlua::Result<LuaRuntime> {
        // SAFETY: `unsafe_new_with` only lifts mlua's refusal to load `ffi`/`debug` and C
        // modules; plugins are operator-installed code, trusted like nginx's Lua.
        let lua = unsafe { Lua::unsafe_new_with(std_libs(), LuaOptions::new()) };
        let limit = settings.memory_limit;
        if let Err(e) = lua.set_memory_limit(limit) {
            tracing::warn!("the Lua memory limit is not available: {e}");
        }
        let mut state: *mut mlua::ffi::lua_State = std::ptr::null_mut();
        // SAFETY: only reads the main state pointer.
        unsafe {
            lua.exec_raw::<()>((), |l| state = l)?;
        }
        let budget = Budget::register(state, settings.call_budget);
        api::install(&lua, settings)?;
        let mg: Table = lua.globals().get("__moongate")?;
        let ctx_mt: Table = mg.get("CTX_MT")?;
        let co: Table = lua.globals().get("coroutine")?;
        let bound = lua.create_table()?;
        let ctxs = lua.create_table()?;
        let setmetatable: Function = lua.globals().get("setmetatable")?;
        let getmetatable: Function = lua.globals().get("getmetatable")?;
        // LuaJIT's table.new (a table with its parts pre-sized) and table.clear (empties a
        // table, keeping its parts' sizes).
        let (new_tab, clear_tab): (Function, Function) = lua
            .load("return require('table.new'), require('table.clear')")
            .set_name("=moongate.table_new")
            .eval()?;
        let (trampoline, runner_fn, release): (Function, Function, Function) =
            lua.load(RUNNER_SRC).set_name("=moongate.call").call((
                tag(&DONE_TAG),
                co.get::<Function>("yield")?,
                &bound,
                &ctxs,
                &ctx_mt,
                setmetatable,
                getmetatable,
                new_tab,
                clear_tab,
            ))?;
        let (mut ctxs_ref, mut release_ref) = (0, 0);
        // SAFETY: runs in a protected call with `ctxs` and `release` as its arguments; each
        // `luaL_ref` pops the top one (the registry keeps it), leaving the stack as it found it.
        unsafe {
            lua.exec_raw::<()>((&ctxs, &release), |l| {
                release_ref = mlua::ffi::luaL_ref(l, mlua::ffi::LUA_REGISTRYINDEX);
                ctxs_ref = mlua::ffi::luaL_ref(l, mlua::ffi::LUA_REGISTRYINDEX);
            })?;
        }
        Ok(LuaRuntime {
            lua,
            budget,
            modules: RefCell::new(IdMap::default()),
            confs: RefCell::new(IdMap::default()),
            bound,
            free_ids: RefCell::new(Vec::new()),
            next_id: Cell::new(1),
            retired_seen: Cell::new(RETIRED.load(Ordering::Acquire)),
            memory_limit: Cell::new(limit),
            ctx_mt,
            ctxs,
            ctxs_ref,
            release_ref,
            state,
            free_slots: RefCell::new(Vec::new()),
            next_slot: Cell::new(1),
            trampoline,
            runner_fn,
            runners: RefCell::new(Vec::new()),
        })
    }

    /// The VM.
    pub fn lua(&self) -> &Lua {
        &self.lua
    }

    /// Arms and disarms the time budget once: what every Lua call (and every resume of an
    /// async one) pays for the watchdog. For benches.
    #[doc(hidden)]
    pub fn budget_cycle(&self) {
        self.budget.start();
        self.budget.stop();
    }

    /// Runs `f` with the time budget armed, as plugin calls do. For benches and tests.
    #[doc(hidden)]
    pub fn with_budget<R>(&self, f: impl FnOnce(&Lua) -> mlua::Result<R>) -> mlua::Result<R> {
        self.guarded(Frame::NONE, || f(&self.lua))
    }

    /// Runs a sync Lua call under the time budget, with `frame` in place.
    pub(crate) fn guarded<R>(
        &self,
        frame: Frame,
        f: impl FnOnce() -> mlua::Result<R>,
    ) -> mlua::Result<R> {
        let _g = FrameGuard::set(frame);
        self.budget.start();
        let r = f();
        self.budget.stop();
        if let Err(e) = &r {
            self.after_error(e);
        }
        r
    }

    fn after_error(&self, e: &mlua::Error) {
        if is_memory_error(e) {
            crate::metrics::runtime::LUA_MEMORY_STOPS
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // The VM is fine; give the memory back before the next request.
            let _ = self.lua.gc_collect();
            let _ = self.lua.gc_collect();
        }
    }

    /// Drops modules and conf tables whose plugin version or conf is gone, if anything retired
    /// since the last look (one atomic load otherwise).
    fn sweep(&self) {
        let now = RETIRED.load(Ordering::Acquire);
        if now == self.retired_seen.get() {
            return;
        }
        self.retired_seen.set(now);
        let dead: Vec<Module> = {
            let mut mods = self.modules.borrow_mut();
            let ids: Vec<u64> = mods
                .iter()
                .filter(|(_, m)| m.live.strong_count() == 0)
                .map(|(k, _)| *k)
                .collect();
            ids.into_iter().filter_map(|k| mods.remove(&k)).collect()
        };
        for m in dead {
            if let Ok(Some(destroy)) = m.table.get::<Option<Function>>("destroy") {
                let name: &str = &m.name;
                let fr = Frame {
                    plugin: name as *const str,
                    ..Frame::NONE
                };
                if let Err(e) = self.guarded(fr, || destroy.call::<()>(())) {
                    tracing::warn!(plugin = %m.name, "destroy() failed: {}", one_line(&e.to_string()));
                }
            }
            // Let a later require() load the current version.
            if let Ok(loaded) = self
                .lua
                .globals()
                .get::<Table>("package")
                .and_then(|p| p.get::<Table>("loaded"))
            {
                let key = format!("apisix.plugins.{}", m.name);
                if let Ok(Value::Table(t)) = loaded.raw_get::<Value>(key.as_str()) {
                    if t == m.table {
                        let _ = loaded.raw_set(key.as_str(), Value::Nil);
                    }
                }
            }
        }
        let mut freed = Vec::new();
        {
            let mods = self.modules.borrow();
            self.confs.borrow_mut().retain(|_, c| {
                let keep = c.live.strong_count() > 0 && mods.contains_key(&c.version_id);
                if !keep {
                    freed.extend(c.bound.iter().copied().filter(|&id| id != 0));
                }
                keep
            });
        }
        for id in &freed {
            let _ = self.bound.raw_set(*id, Value::Nil);
        }
        self.free_ids.borrow_mut().extend(freed);
    }

    /// Stores `{f, name, conf}` in `BOUND` under a fresh id.
    fn bind(&self, f: Function, name: mlua::String, conf: Table) -> mlua::Result<i64> {
        let id = match self.free_ids.borrow_mut().pop() {
            Some(id) => id,
            None => {
                let id = self.next_id.get();
                self.next_id.set(id + 1);
                id
            }
        };
        let b = self.lua.create_table()?;
        b.raw_set(1, f)?;
        b.raw_set(2, name)?;
        b.raw_set(3, conf)?;
        self.bound.raw_set(id, b)?;
        Ok(id)
    }

    /// The plugin version's module, loading it (and calling `init()`) on first use.
    fn module(&self, p: &LuaPlugin) -> mlua::Result<()> {
        if self.modules.borrow().contains_key(&p.version_id) {
            return Ok(());
        }
        // A reload may change the `lua` settings: the next version loaded applies them.
        if self.memory_limit.get() != p.settings.memory_limit {
            let _ = self.lua.set_memory_limit(p.settings.memory_limit);
            self.memory_limit.set(p.settings.memory_limit);
        }
        self.budget.set_limit(p.settings.call_budget);
        let name: &str = &p.name;
        let fr = Frame {
            plugin: name as *const str,
            ..Frame::NONE
        };
        let key = format!("apisix.plugins.{}", p.name);
        let loaded: Table = self.lua.globals().get::<Table>("package")?.get("loaded")?;
        // Another module may have required this plugin's file as a library before it is used
        // as a plugin (`limit-count` requires `apisix.plugins.workflow`): the same source
        // gives the same table, so what was registered in it stays.
        let required = match loaded.raw_get::<Value>(key.as_str())? {
            Value::Table(t) => {
                let src: Option<mlua::String> =
                    api::searched_table(&self.lua)?.raw_get(key.as_str())?;
                src.filter(|s| s.as_bytes() == p.source.as_bytes())
                    .map(|_| t)
            }
            _ => None,
        };
        let fresh = required.is_none();
        let table = self.guarded(fr, || {
            let t = match required {
                Some(t) => t,
                None => {
                    let chunk = self
                        .lua
                        .load(&*p.source)
                        .set_name(format!("@{}", p.path.display()))
                        .into_function()?;
                    let v: Value = chunk.call(())?;
                    let Value::Table(t) = v else {
                        return Err(mlua::Error::runtime(format!(
                            "{} did not return a module table",
                            p.path.display()
                        )));
                    };
                    t
                }
            };
            // APISIX names a plugin after its file.
            t.set("name", p.name.as_str())?;
            loaded.set(key.as_str(), &t)?;
            // APISIX's loader order: `init()`, then `workflow_handler()`.
            if let Some(init) = t.get::<Option<Function>>("init")? {
                init.call::<()>(())?;
            }
            if let Some(h) = t.get::<Option<Function>>("workflow_handler")? {
                h.call::<()>(())?;
            }
            Ok(t)
        })?;
        let mut funcs: [Option<Function>; PHASES] = Default::default();
        for (i, phase) in Phase::ALL.iter().enumerate() {
            funcs[i] = table.get::<Option<Function>>(phase.as_str()).ok().flatten();
        }
        let check_schema = table.get::<Option<Function>>("check_schema").ok().flatten();
        let api = matches!(table.get::<Value>("api"), Ok(Value::Function(_)));
        self.modules.borrow_mut().insert(
            p.version_id,
            Module {
                live: Arc::downgrade(&p.live),
                table,
                funcs,
                check_schema,
                api,
                name: p.name.clone(),
                name_lua: self.lua.create_string(&p.name)?,
            },
        );
        if p.name == "workflow" {
            self.load_workflow_actions(p, fresh)?;
        }
        Ok(())
    }

    /// Loads the build's plugins that register `workflow` actions, so `workflow`'s
    /// `check_schema` knows them as APISIX's (which loads every plugin at start) does. When
    /// `workflow` was just evaluated anew, a handler plugin loaded earlier registered itself
    /// in an older `workflow` table: it is evaluated again to register in this one.
    fn load_workflow_actions(&self, workflow: &LuaPlugin, fresh: bool) -> mlua::Result<()> {
        let handlers: Vec<Arc<LuaPlugin>> = match workflow.settings.workflow_plugins.lock() {
            Ok(list) => list.iter().filter_map(std::sync::Weak::upgrade).collect(),
            Err(_) => return Ok(()),
        };
        for q in handlers {
            if fresh {
                self.modules.borrow_mut().remove(&q.version_id);
            }
            self.module(&q)?;
        }
        Ok(())
    }

    /// The modules of this VM's live plugin versions that define `api()`, the newest version
    /// of each name, by name; and a key that changes whenever that set changes (a plugin
    /// added, removed or reloaded), for the caller's cache of the routes they declare.
    /// Every plugin of a published configuration is loaded in each worker when it starts
    /// serving there ([`warm`]), so these are the configuration's plugins with an API.
    pub(crate) fn api_modules(&self) -> (Vec<Table>, String) {
        let mods = self.modules.borrow();
        let mut newest: std::collections::BTreeMap<&str, (u64, &Module)> = Default::default();
        for (id, m) in mods.iter() {
            if !m.api || m.live.strong_count() == 0 {
                continue;
            }
            let e = newest.entry(m.name.as_str()).or_insert((*id, m));
            if *id > e.0 {
                *e = (*id, m);
            }
        }
        let key = newest
            .values()
            .map(|(id, _)| id.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let tables = newest.values().map(|(_, m)| m.table.clone()).collect();
        (tables, key)
    }

    fn func(&self, p: &LuaPlugin, phase: Phase) -> mlua::Result<Option<Function>> {
        self.module(p)?;
        let mods = self.modules.borrow();
        let idx = Phase::ALL.iter().position(|x| *x == phase).unwrap_or(0);
        Ok(mods.get(&p.version_id).and_then(|m| m.funcs[idx].clone()))
    }

    /// Runs the module's `check_schema(conf, schema_type)`; `Ok(Err(msg))` when it refuses.
    pub(crate) fn check_schema(
        &self,
        p: &LuaPlugin,
        conf: &Table,
        schema_type: Option<i64>,
        frame: Frame,
    ) -> mlua::Result<Result<(), String>> {
        self.module(p)?;
        let f = {
            let mods = self.modules.borrow();
            mods.get(&p.version_id).and_then(|m| m.check_schema.clone())
        };
        let Some(f) = f else { return Ok(Ok(())) };
        let (ok, err): (Value, Value) = self.guarded(frame, || f.call((conf, schema_type)))?;
        if matches!(ok, Value::Nil | Value::Boolean(false)) {
            let msg = match err {
                Value::String(s) => s.to_string_lossy(),
                Value::Nil => "check_schema failed".to_string(),
                other => other
                    .to_string()
                    .unwrap_or_else(|_| "check_schema failed".into()),
            };
            return Ok(Err(msg));
        }
        Ok(Ok(()))
    }

    /// The conf table of `conf` in this VM: made on first use from the checked JSON (and run
    /// through the module's `check_schema`, as APISIX does in every worker, so plugins that
    /// cache data on their conf find it there), then kept while the conf lives.
    fn conf_table(&self, p: &LuaPlugin, conf: &PluginConf, frame: Frame) -> mlua::Result<Table> {
        let lc = conf.compiled::<LuaConf>();
        if let Some(lc) = lc {
            if let Some(e) = self.confs.borrow().get(&lc.id) {
                return Ok(e.table.clone());
            }
        }
        let t = match convert::json_to_lua(&self.lua, &conf.value)? {
            Value::Table(t) => t,
            _ => self.lua.create_table()?,
        };
        if let Ok(Err(msg)) = self.check_schema(p, &t, None, frame) {
            tracing::warn!(plugin = %p.name, "check_schema refused a conf the snapshot accepted: {msg}");
        }
        if let Some(parent) = &conf.parent {
            convert::set_meta_parent(&self.lua, &t, parent, conf.key)?;
        }
        if let Some(lc) = lc {
            self.confs.borrow_mut().insert(
                lc.id,
                ConfEntry {
                    live: Arc::downgrade(&lc.live),
                    table: t.clone(),
                    version_id: p.version_id,
                    bound: [0; PHASES],
                },
            );
        }
        Ok(t)
    }

    /// The request's slot in `CTXS`, where its `ctx` table (APISIX's `api_ctx`) lives once made:
    /// a phase call passes the slot, and the trampoline makes the table on the request's first
    /// call. Pure Rust: safe inside [`with_ctx`].
    pub(crate) fn ctx_slot(&self, ctx: &mut Ctx) -> i64 {
        let req = lua_request(ctx);
        if req.slot.0 == 0 {
            req.slot.0 = self.free_slots.borrow_mut().pop().unwrap_or_else(|| {
                let s = self.next_slot.get();
                self.next_slot.set(s + 1);
                s
            });
        }
        req.slot.0
    }

    /// The `ctx` table in `slot`, made if the request has none yet.
    pub(crate) fn ctx_table(&self, slot: i64) -> mlua::Result<Table> {
        if let Some(t) = self.ctxs.raw_get::<Option<Table>>(slot)? {
            return Ok(t);
        }
        let t = self.lua.create_table()?;
        t.set_metatable(Some(self.ctx_mt.clone()))?;
        self.ctxs.raw_set(slot, &t)?;
        Ok(t)
    }

    /// Frees a finished request's slot for reuse, and its ctx table with it: Lua's `release`
    /// empties the table (`table.clear`) and resets its metatable, and it stays in the slot, so
    /// the slot's next request finds a table ready instead of allocating one, and the collector
    /// has nothing to reclaim. APISIX does the same with its `api_ctx` (the tablepool, at the end
    /// of the log phase). Should `release` fail (a plugin protected the metatable it gave the
    /// table), the table leaves the slot and is the collector's.
    fn release_slot(&self, slot: i64) {
        // SAFETY: on the main state's top, outside any Lua call of this VM (a request's Lua
        // state is dropped with its Ctx, never from Lua): pushes at most three values and pops
        // them. `lua_checkstack` grows the stack in a protected call; `release` runs in one
        // (`lua_pcall`, its error popped); it allocates nothing, so neither does the fallback:
        // `CTXS[slot] = nil` on a key that exists.
        unsafe {
            use mlua::ffi;
            let l = self.state;
            if ffi::lua_checkstack(l, 3) == 0 {
                return;
            }
            ffi::lua_rawgeti(l, ffi::LUA_REGISTRYINDEX, self.release_ref as _);
            ffi::lua_pushinteger(l, slot as _);
            if ffi::lua_pcall(l, 1, 0, 0) != 0 {
                ffi::lua_pop(l, 1);
                ffi::lua_rawgeti(l, ffi::LUA_REGISTRYINDEX, self.ctxs_ref as _);
                ffi::lua_rawgeti(l, -1, slot as _);
                let present = ffi::lua_type(l, -1) != ffi::LUA_TNIL;
                ffi::lua_pop(l, 1);
                if present {
                    ffi::lua_pushnil(l);
                    ffi::lua_rawseti(l, -2, slot as _);
                }
                ffi::lua_pop(l, 1);
            }
        }
        self.free_slots.borrow_mut().push(slot);
    }

    /// Everything a phase call needs (None when the module has no such phase function): after
    /// the first call for a conf and phase, one id lookup and the ctx table.
    fn prepare(
        &self,
        p: &LuaPlugin,
        phase: Phase,
        conf: &PluginConf,
        ctx: &mut Ctx,
    ) -> mlua::Result<Option<Call>> {
        self.sweep();
        let idx = phase as usize;
        let lc = conf.compiled::<LuaConf>();
        if let Some(lc) = lc {
            let id = match self.confs.borrow().get(&lc.id) {
                Some(e) if e.version_id == p.version_id => e.bound[idx],
                _ => 0,
            };
            if id != 0 {
                return Ok(Some(Call::Bound(id, self.ctx_slot(ctx))));
            }
        }
        let Some(f) = self.func(p, phase)? else {
            return Ok(None);
        };
        let slot = self.ctx_slot(ctx);
        let name: &str = &p.name;
        let fr = Frame {
            ctx: ctx as *mut Ctx,
            phase: Some(phase),
            plugin: name as *const str,
            ..Frame::NONE
        };
        let conf_t = self.conf_table(p, conf, fr)?;
        let name_lua = self
            .modules
            .borrow()
            .get(&p.version_id)
            .map(|m| m.name_lua.clone())
            .ok_or_else(|| mlua::Error::runtime("the plugin module is not loaded"))?;
        if let Some(lc) = lc {
            let stale = match self.confs.borrow().get(&lc.id) {
                Some(e) if e.version_id == p.version_id => None,
                Some(e) => Some(e.bound),
                None => None,
            };
            if let Some(old) = stale {
                // A conf met with another version of its plugin: rebind every phase.
                for id in old.into_iter().filter(|&id| id != 0) {
                    self.bound.raw_set(id, Value::Nil)?;
                    self.free_ids.borrow_mut().push(id);
                }
                if let Some(e) = self.confs.borrow_mut().get_mut(&lc.id) {
                    e.version_id = p.version_id;
                    e.bound = [0; PHASES];
                }
            }
            if self.confs.borrow().contains_key(&lc.id) {
                let id = self.bind(f, name_lua, conf_t)?;
                if let Some(e) = self.confs.borrow_mut().get_mut(&lc.id) {
                    e.bound[idx] = id;
                }
                return Ok(Some(Call::Bound(id, slot)));
            }
        }
        Ok(Some(Call::Full(f, name_lua, conf_t, slot)))
    }
}

fn is_memory_error(e: &mlua::Error) -> bool {
    match e {
        mlua::Error::MemoryError(_) => true,
        mlua::Error::CallbackError { cause, .. } => is_memory_error(cause),
        _ => e.to_string().contains("not enough memory"),
    }
}

/// Lua error text on one line (tracebacks joined with " | "), so one failure is one log line.
/// The runner's own traceback frames (`moongate.call:N: in ...`) are left out: they are the
/// same in every traceback and say nothing about the plugin.
pub(crate) fn one_line(s: &str) -> String {
    let s = s.strip_prefix("runtime error: ").unwrap_or(s);
    let mut in_traceback = false;
    s.lines()
        .map(str::trim)
        .filter(|l| {
            in_traceback |= *l == "stack traceback:";
            let runner_frame = in_traceback && l.starts_with("moongate.call:");
            !l.is_empty() && !runner_frame
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

/// This thread's runtime if it has one (for `ngx.timer`, called from Lua running in it).
/// Memory held by this thread's VM, if it has one.
pub(crate) fn used_memory() -> Option<usize> {
    RUNTIME.with(|r| r.borrow().as_ref().map(|rt| rt.lua.used_memory()))
}

pub(crate) fn current_runtime() -> Option<Rc<LuaRuntime>> {
    RUNTIME.with(|r| r.borrow().clone())
}

/// Loads `p`'s module (and runs its `init()`) in this worker's VM now, as a worker starting
/// with the configuration does; a failure is logged and left for the first request to meet.
pub(crate) fn warm(p: &LuaPlugin) {
    let loaded = runtime(&p.settings).and_then(|rt| rt.module(p));
    if let Err(e) = loaded {
        tracing::error!(plugin = %p.name, "failed to load plugin: {}", one_line(&e.to_string()));
    }
}

/// This thread's runtime, created on first use.
pub(crate) fn runtime(settings: &Settings) -> mlua::Result<Rc<LuaRuntime>> {
    RUNTIME.with(|r| {
        if let Some(rt) = r.borrow().as_ref() {
            return Ok(rt.clone());
        }
        let rt = Rc::new(LuaRuntime::new(settings)?);
        *r.borrow_mut() = Some(rt.clone());
        Ok(rt)
    })
}

fn plugin_error(p: &LuaPlugin, phase: Phase, e: &mlua::Error) -> PluginError {
    PluginError::new(&p.name, phase, one_line(&e.to_string()))
}

/// What resuming a runner thread passes in: a new phase call, or a waiting function's result.
pub(crate) enum Resume {
    Call(Call),
    /// `(true, results...)` or `(false, message)`.
    Wake(MultiValue),
}

/// Where a resume stopped.
pub(crate) enum Stop {
    /// The phase function returned (its first two values).
    Done(Value, Value),
    /// A waiting API function yielded; the future it handed over decides what comes next.
    Wait(Pending),
}

impl LuaRuntime {
    /// An idle runner thread, or a new one parked at its first yield.
    fn runner(&self) -> mlua::Result<Thread> {
        if let Some(t) = self.runners.borrow_mut().pop() {
            return Ok(t);
        }
        let t = self.lua.create_thread(self.runner_fn.clone())?;
        t.resume::<()>(())?;
        Ok(t)
    }

    /// Keeps a runner that finished its call cleanly for the next one.
    fn recycle(&self, t: Thread) {
        let mut idle = self.runners.borrow_mut();
        if idle.len() < MAX_IDLE_RUNNERS {
            idle.push(t);
        }
    }

    /// Resumes `runner` until it yields, with the frame set and the budget armed.
    pub(crate) fn resume(
        &self,
        runner: &Thread,
        frame: Frame,
        input: Resume,
    ) -> mlua::Result<Stop> {
        let r = {
            let _g = FrameGuard::set(frame);
            let _r = RunnerGuard::set(runner.state());
            self.budget.start();
            let r = match input {
                Resume::Call(Call::Bound(id, slot)) => self.resume_bound(runner, id, slot),
                Resume::Call(Call::Full(f, name, conf, slot)) => {
                    runner.resume::<(Value, Value, Value)>((f, name, conf, slot))
                }
                Resume::Wake(values) => runner.resume::<(Value, Value, Value)>(values),
            };
            self.budget.stop();
            r
        };
        // Taken whatever happened, so a future never outlives the resume that made it unless
        // the runtime awaits it.
        let pending = PENDING.with(|p| p.borrow_mut().take());
        match r {
            Err(e) => {
                self.after_error(&e);
                Err(e)
            }
            Ok((Value::LightUserData(t), a, b)) if t == tag(&DONE_TAG) => Ok(Stop::Done(a, b)),
            Ok((Value::LightUserData(t), _, _)) if t == tag(&WAIT_TAG) => match pending {
                Some(fut) => Ok(Stop::Wait(fut)),
                None => Err(mlua::Error::runtime(
                    "a waiting function yielded without handing over what it waits for",
                )),
            },
            // A bare coroutine.yield in the phase function itself: there is no coroutine of
            // the plugin's to yield to.
            Ok(_) => Err(mlua::Error::runtime(
                "attempt to yield from outside a coroutine",
            )),
        }
    }
}

/// Where a light thread's resume stopped (see `thread.rs`).
pub(crate) enum LightStop {
    /// Its function returned or failed: `true, results...` or `false, err, traceback`.
    Done(MultiValue),
    /// A waiting API function yielded; the future it handed over decides what comes next.
    Wait(Pending),
}

impl LuaRuntime {
    /// Resumes a light thread until it yields, with the frame set; `armed`: under a budget
    /// stretch of its own (false when `spawn` runs it inside its caller's stretch: a nested
    /// stretch would end the caller's).
    pub(crate) fn resume_light(
        &self,
        thread: &Thread,
        frame: Frame,
        input: MultiValue,
        armed: bool,
    ) -> mlua::Result<LightStop> {
        let r = {
            let _g = FrameGuard::set(frame);
            let _r = RunnerGuard::set(thread.state());
            if armed {
                self.budget.start();
            }
            let r = thread.resume::<MultiValue>(input);
            if armed {
                self.budget.stop();
            }
            r
        };
        let pending = PENDING.with(|p| p.borrow_mut().take());
        let mut values = match r {
            Err(e) => {
                self.after_error(&e);
                return Err(e);
            }
            Ok(v) => v,
        };
        match values.pop_front() {
            Some(Value::LightUserData(t))
                if t == tag(&DONE_TAG) && thread.status() == mlua::ThreadStatus::Finished =>
            {
                // The thread's body catches its errors (`false, err`): a memory stop counts
                // and gives the memory back here, as `after_error` does for other calls.
                if let (Some(Value::Boolean(false)), Some(Value::String(err))) =
                    (values.front(), values.get(1))
                {
                    if err.as_bytes() == b"not enough memory" {
                        self.after_error(&mlua::Error::MemoryError(String::new()));
                    }
                }
                Ok(LightStop::Done(values))
            }
            Some(Value::LightUserData(t)) if t == tag(&WAIT_TAG) => match pending {
                Some(fut) => Ok(LightStop::Wait(fut)),
                None => Err(mlua::Error::runtime(
                    "a waiting function yielded without handing over what it waits for",
                )),
            },
            _ => Err(mlua::Error::runtime(
                "attempt to yield from outside a coroutine",
            )),
        }
    }
}

impl LuaRuntime {
    /// `runner.resume((id, slot))` through the C API: what a request phase call costs most of the
    /// time is mlua's handling of arguments and results (references made and dropped for two
    /// integers and three results that are a tag and two nils). The common outcome (the phase
    /// function returned nothing) costs no mlua call; any other outcome is converted by mlua, and
    /// an error becomes the same `mlua::Error` that `Thread::resume` makes (a Rust callback's
    /// error as raised, otherwise the message with the runner's traceback).
    fn resume_bound(
        &self,
        runner: &Thread,
        id: i64,
        slot: i64,
    ) -> mlua::Result<(Value, Value, Value)> {
        use mlua::ffi;
        let t = runner.state();
        // SAFETY: `t` is a runner parked at its yield with an empty stack (mlua leaves a thread's
        // stack empty after each resume, and so does this function on every path); otherwise
        // mlua's resume handles it. Nothing here raises a Lua error outside a protected call:
        // `lua_checkstack` grows the stack in a protected call, pushing integers and reading
        // values does not allocate, `lua_resume` returns its error, and the conversions run in
        // `exec_raw`'s protected call.
        unsafe {
            if ffi::lua_status(t) != ffi::LUA_YIELD
                || ffi::lua_gettop(t) != 0
                || ffi::lua_checkstack(t, 2) == 0
            {
                return runner.resume((id, slot));
            }
            ffi::lua_pushinteger(t, id as _);
            ffi::lua_pushinteger(t, slot as _);
            let mut nres: std::ffi::c_int = 0;
            let ret = ffi::lua_resume(t, self.state, 2, &mut nres);
            if ret != ffi::LUA_OK && ret != ffi::LUA_YIELD {
                return Err(self.thread_error(t, ret));
            }
            let done = tag(&DONE_TAG).0;
            if ret == ffi::LUA_YIELD
                && nres == 3
                && ffi::lua_type(t, -3) == ffi::LUA_TLIGHTUSERDATA
                && ffi::lua_touserdata(t, -3) == done
                && ffi::lua_type(t, -2) == ffi::LUA_TNIL
                && ffi::lua_type(t, -1) == ffi::LUA_TNIL
            {
                ffi::lua_settop(t, 0);
                return Ok((Value::LightUserData(tag(&DONE_TAG)), Value::Nil, Value::Nil));
            }
            // The first three results (as many as the caller looks at), converted by mlua.
            let k = nres.clamp(0, 3);
            ffi::lua_settop(t, k);
            let r = self
                .lua
                .exec_raw::<(Value, Value, Value)>((), |l| ffi::lua_xmove(t, l, k));
            ffi::lua_settop(t, 0);
            r
        }
    }

    /// The error a runner died with, as mlua's `Thread::resume` reports it; empties the
    /// runner's stack.
    ///
    /// # Safety
    /// `t` is a runner whose `lua_resume` just returned the error code `ret`, its error value on
    /// top of its stack.
    unsafe fn thread_error(
        &self,
        t: *mut mlua::ffi::lua_State,
        ret: std::ffi::c_int,
    ) -> mlua::Error {
        use mlua::ffi;
        let e = self.thread_error_value(t, ret);
        ffi::lua_settop(t, 0);
        e
    }

    unsafe fn thread_error_value(
        &self,
        t: *mut mlua::ffi::lua_State,
        ret: std::ffi::c_int,
    ) -> mlua::Error {
        use mlua::ffi;
        let mem = ret == ffi::LUA_ERRMEM;
        // A memory error is reported as its message alone; any other value that is not a Rust
        // callback's error (those are userdata) gets the runner's traceback.
        let traced = !mem && ffi::lua_type(t, -1) != ffi::LUA_TUSERDATA;
        // The closures run in exec_raw's protected call: they move the error value over and
        // push its text and the traceback.
        let first = self.lua.exec_raw::<(Value, Value)>((), |l| {
            ffi::lua_xmove(t, l, 1);
            if traced {
                with_traceback(l, t);
            }
        });
        let text = match first {
            Err(e) => return e,
            Ok((Value::Error(e), _)) => return *e,
            Ok((_, Value::String(s))) | Ok((Value::String(s), Value::Nil)) => s.to_string_lossy(),
            // A userdata that is not a Rust error: its `__tostring` and the traceback, as mlua.
            Ok((Value::UserData(ud), _)) if !mem => {
                match self
                    .lua
                    .exec_raw::<(Value, Value)>(ud, |l| with_traceback(l, t))
                {
                    Ok((_, Value::String(s))) => s.to_string_lossy(),
                    Ok((_, v)) => v.to_string().unwrap_or_default(),
                    Err(e) => return e,
                }
            }
            Ok((v, _)) => v.to_string().unwrap_or_default(),
        };
        if mem {
            mlua::Error::MemoryError(text)
        } else {
            mlua::Error::RuntimeError(text)
        }
    }
}

/// Pushes `tostring` of the value on top of `l` followed by `t`'s traceback, then removes the
/// `tostring` (as mlua's handler for a dead thread's error does).
///
/// # Safety
/// In a protected call on `l`, a value on top.
unsafe fn with_traceback(l: *mut mlua::ffi::lua_State, t: *mut mlua::ffi::lua_State) {
    use mlua::ffi;
    let s = ffi::luaL_tolstring(l, -1, std::ptr::null_mut());
    if ffi::lua_checkstack(l, ffi::LUA_TRACEBACK_STACK) != 0 {
        ffi::luaL_traceback(l, t, s, 0);
        ffi::lua_remove(l, -2);
    }
}

/// rewrite / access / before_proxy, as an async call (tests and direct callers; the chain uses
/// [`start_request_phase`]).
pub(crate) async fn request_phase(
    p: &LuaPlugin,
    phase: Phase,
    conf: &PluginConf,
    ctx: &mut Ctx,
) -> PhaseResult {
    match start_request_phase(p, phase, conf, ctx) {
        PhaseCall::Ready(r) => r,
        PhaseCall::Wait(f) => f.await,
    }
}

/// rewrite / access / before_proxy.
///
/// The phase function runs in a runner thread resumed synchronously: a call that does not wait
/// (and spawns no light thread that waits) finishes here, with no future at all. A waiting API
/// function yields [`WAIT_TAG`] after handing its future over ([`create_waiting_function`]);
/// only then is a future boxed, which awaits what the function waits for (frame set, budget
/// not armed) and resumes the runner with the result, until the phase function returns and
/// its light threads (`thread.rs`) have ended.
pub(crate) fn start_request_phase<'a>(
    p: &'a LuaPlugin,
    phase: Phase,
    conf: &'a PluginConf,
    ctx: &'a mut Ctx,
) -> PhaseCall<'a> {
    let first = (|| {
        let rt = runtime(&p.settings)?;
        let Some(args) = rt.prepare(p, phase, conf, ctx)? else {
            return Ok(None);
        };
        let runner = rt.runner()?;
        let scope = thread::enter(None);
        let stop = rt.resume(&runner, request_frame(p, phase, ctx), Resume::Call(args));
        let threads = scope.leave();
        Ok(Some((rt, runner, stop?, threads)))
    })();
    match first {
        Err(e) => PhaseCall::Ready(Err(plugin_error(p, phase, &e))),
        Ok(None) => PhaseCall::Ready(Ok(Flow::Continue)),
        Ok(Some((rt, runner, Stop::Done(code, body), threads))) => {
            rt.recycle(runner);
            if ends_request(&code, &body) || !thread::live(&threads) {
                // Light threads still running when the request ends are aborted (dropped).
                return PhaseCall::Ready(finish_request_phase(p, phase, &rt, ctx, code, body));
            }
            let entry = Entry::Done(code, body);
            PhaseCall::Wait(Box::pin(wait_request_phase(
                p, phase, ctx, rt, entry, threads,
            )))
        }
        Ok(Some((rt, runner, Stop::Wait(fut), threads))) => match take_exit(ctx) {
            Some(flow) => PhaseCall::Ready(Ok(flow)),
            None => {
                let entry = Entry::Waiting(runner, fut);
                PhaseCall::Wait(Box::pin(wait_request_phase(
                    p, phase, ctx, rt, entry, threads,
                )))
            }
        },
    }
}

fn request_frame(p: &LuaPlugin, phase: Phase, ctx: &mut Ctx) -> Frame {
    let name: &str = &p.name;
    Frame {
        ctx: ctx as *mut Ctx,
        phase: Some(phase),
        plugin: name as *const str,
        ..Frame::NONE
    }
}

/// `ngx.exit` called before a wait: the suspended runner is dropped, never resumed, so no
/// pcall in the plugin can catch the exit.
fn take_exit(ctx: &mut Ctx) -> Option<Flow> {
    let status = ctx.data_mut::<LuaRequest>().and_then(|r| r.exit.take())?;
    Some(exit_flow(ctx, status))
}

/// A phase function's `return code, body` that ends the request (APISIX's
/// `core.response.exit`, which in OpenResty aborts the light threads too).
fn ends_request(code: &Value, body: &Value) -> bool {
    matches!(code, Value::Integer(_) | Value::Number(_)) || *body != Value::Nil
}

/// What a waiting call's result hands back to the coroutine that yielded for it:
/// `true, results...` when it succeeded, `false, message` when it failed.
pub(crate) fn wake_values(lua: &Lua, woke: mlua::Result<MultiValue>) -> mlua::Result<MultiValue> {
    match woke {
        Ok(mut values) => {
            values.push_front(Value::Boolean(true));
            Ok(values)
        }
        Err(e) => {
            let msg = super::errors::text(&e, None);
            let mut values = MultiValue::new();
            values.push_back(Value::Boolean(false));
            values.push_back(Value::String(lua.create_string(&msg)?));
            Ok(values)
        }
    }
}

/// A request phase's entry thread: waiting, or returned (with its first two values) while
/// light threads still run.
enum Entry {
    Waiting(Thread, Pending),
    Done(Value, Value),
}

/// What ended a wait of a run: the entry thread's future or a light thread's.
pub(crate) enum Event {
    Entry(mlua::Result<MultiValue>),
    Light(u64, mlua::Result<MultiValue>),
}

/// Polls the entry thread's future (if it waits) and the light threads' (if any), the entry's
/// first; with `frame` in place on each poll (a future may touch the request when it
/// completes, e.g. `ngx.req.read_body` puts the body back), without the time budget: waiting
/// is not running.
pub(crate) fn poll_round(
    cx: &mut Context<'_>,
    frame: Frame,
    entry: Option<&mut Pending>,
    threads: Option<&thread::Threads>,
) -> Poll<Event> {
    let _g = FrameGuard::set(frame);
    if let Some(f) = entry {
        if let Poll::Ready(r) = f.as_mut().poll(cx) {
            return Poll::Ready(Event::Entry(r));
        }
    }
    match threads {
        Some(t) => t.poll_next(cx).map(|(id, r)| Event::Light(id, r)),
        None => Poll::Pending,
    }
}

/// The rest of a request phase that waits: await, resume the thread whose wait ended, until
/// the phase function has returned and every light thread has ended (or one ended the
/// request).
async fn wait_request_phase(
    p: &LuaPlugin,
    phase: Phase,
    ctx: &mut Ctx,
    rt: Rc<LuaRuntime>,
    mut entry: Entry,
    mut threads: Option<Rc<thread::Threads>>,
) -> PhaseResult {
    loop {
        if !thread::live(&threads) {
            if let Entry::Done(code, body) = entry {
                return finish_request_phase(p, phase, &rt, ctx, code, body);
            }
        }
        let event = {
            let frame = request_frame(p, phase, ctx);
            let mut fut = match &mut entry {
                Entry::Waiting(_, f) => Some(f),
                Entry::Done(..) => None,
            };
            let ts = threads.as_deref();
            std::future::poll_fn(|cx| poll_round(cx, frame, fut.as_deref_mut(), ts)).await
        };
        if let Some(fault) = ctx
            .data_mut::<LuaRequest>()
            .and_then(|r| r.body_fault.take())
        {
            // Not resumed: no pcall in the plugin can go on with a body that is not there.
            let text = fault.status().canonical_reason().unwrap_or("Bad Request");
            let text = format!("{} {text}", fault.status().as_u16());
            return Ok(Flow::respond(LocalResponse::error(fault.status(), &text)));
        }
        match event {
            Event::Entry(woke) => {
                let values = wake_values(&rt.lua, woke).map_err(|e| plugin_error(p, phase, &e))?;
                let Entry::Waiting(runner, _) =
                    std::mem::replace(&mut entry, Entry::Done(Value::Nil, Value::Nil))
                else {
                    unreachable!("only a waiting entry thread has a future")
                };
                let scope = thread::enter(threads.take());
                let stop = rt.resume(&runner, request_frame(p, phase, ctx), Resume::Wake(values));
                threads = scope.leave();
                // On an error the runner is dead (or stuck in a yield it cannot leave): dropped,
                // and the light threads with it.
                match stop.map_err(|e| plugin_error(p, phase, &e))? {
                    Stop::Done(code, body) => {
                        rt.recycle(runner);
                        if ends_request(&code, &body) {
                            return finish_request_phase(p, phase, &rt, ctx, code, body);
                        }
                        entry = Entry::Done(code, body);
                    }
                    Stop::Wait(next) => {
                        if let Some(flow) = take_exit(ctx) {
                            return Ok(flow);
                        }
                        entry = Entry::Waiting(runner, next);
                    }
                }
            }
            Event::Light(id, woke) => {
                let values = wake_values(&rt.lua, woke).map_err(|e| plugin_error(p, phase, &e))?;
                let Some(ts) = threads.clone() else {
                    continue;
                };
                let scope = thread::enter(threads.take());
                ts.resume(&rt, id, request_frame(p, phase, ctx), values, true);
                threads = scope.leave();
                if let Some(flow) = take_exit(ctx) {
                    return Ok(flow);
                }
            }
        }
        if let Some(ts) = &threads {
            ts.compact(&rt.lua);
        }
    }
}

/// What a request phase function's `return code, body` means for the request.
fn finish_request_phase(
    p: &LuaPlugin,
    phase: Phase,
    rt: &LuaRuntime,
    ctx: &mut Ctx,
    code: Value,
    body: Value,
) -> PhaseResult {
    let code = match code {
        Value::Integer(i) => Some(i),
        Value::Number(n) => Some(n as i64),
        _ => None,
    };
    match code {
        Some(code) => local_response(rt, ctx, code, &body)
            .map(Flow::respond)
            .map_err(|e| PluginError::new(&p.name, phase, e)),
        None if body != Value::Nil => local_response(rt, ctx, 200, &body)
            .map(Flow::respond)
            .map_err(|e| PluginError::new(&p.name, phase, e)),
        None => {
            // Output without exit still ends the request, as in OpenResty once the response
            // has started.
            let has_output = ctx
                .data::<LuaRequest>()
                .is_some_and(|r| !r.output.is_empty());
            if has_output {
                Ok(exit_flow(ctx, 200))
            } else {
                Ok(Flow::Continue)
            }
        }
    }
}

/// `ngx.exit(status)`: ends the request with the status and whatever `ngx.say` wrote.
fn exit_flow(ctx: &mut Ctx, status: i64) -> Flow {
    let req = lua_request(ctx);
    if status == 0 && req.output.is_empty() {
        // ngx.exit(ngx.OK): this phase handler ends, the request goes on.
        return Flow::Continue;
    }
    let status = if status == 0 {
        req.status.map(i64::from).unwrap_or(200)
    } else {
        status
    };
    let code = StatusCode::from_u16(u16::try_from(status).unwrap_or(500))
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = std::mem::take(&mut req.output);
    let headers = std::mem::take(&mut ctx.staged_headers);
    Flow::respond(LocalResponse {
        status: code,
        headers,
        raw: None,
        body: if body.is_empty() {
            ResponseBody::Empty
        } else {
            ResponseBody::Full(Bytes::from(body))
        },
    })
}

/// APISIX's `core.response.exit(code, body)` for a phase's `return code, body`.
fn local_response(
    rt: &LuaRuntime,
    ctx: &mut Ctx,
    code: i64,
    body: &Value,
) -> Result<LocalResponse, String> {
    let status = StatusCode::from_u16(u16::try_from(code).unwrap_or(0))
        .map_err(|_| format!("invalid status code {code} returned"))?;
    let mut headers = std::mem::take(&mut ctx.staged_headers);
    let req = lua_request(ctx);
    let mut out = std::mem::take(&mut req.output);
    match body {
        Value::Nil => {}
        Value::String(s) => out.extend_from_slice(&s.as_bytes()),
        Value::Table(_) => {
            let text = convert::encode(rt.lua(), body)?;
            out.extend_from_slice(text.as_bytes());
            out.push(b'\n');
            if !headers.contains_key(http::header::CONTENT_TYPE) {
                headers.insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
            }
        }
        other => {
            let s = other.to_string().map_err(|e| e.to_string())?;
            out.extend_from_slice(s.as_bytes());
        }
    }
    Ok(LocalResponse {
        status,
        headers,
        raw: None,
        body: if out.is_empty() {
            ResponseBody::Empty
        } else {
            ResponseBody::Full(Bytes::from(out))
        },
    })
}

/// header_filter: the module's function (the headers the request phases staged were applied by
/// the proxy before).
pub(crate) fn header_filter(
    p: &LuaPlugin,
    conf: &PluginConf,
    ctx: &mut Ctx,
    head: &mut ResponseHead,
) -> Result<(), PluginError> {
    if !p.lua_phases.contains(Phase::HeaderFilter) {
        return Ok(());
    }
    sync_phase(
        p,
        Phase::HeaderFilter,
        conf,
        ctx,
        head as *mut _,
        std::ptr::null_mut(),
    )
}

/// body_filter.
pub(crate) fn body_filter(
    p: &LuaPlugin,
    conf: &PluginConf,
    ctx: &mut Ctx,
    chunk: &mut BodyChunk,
) -> Result<(), PluginError> {
    sync_phase(
        p,
        Phase::BodyFilter,
        conf,
        ctx,
        std::ptr::null_mut(),
        chunk as *mut _,
    )
}

pub(crate) fn delayed_body_filter(
    p: &LuaPlugin,
    conf: &PluginConf,
    ctx: &mut Ctx,
    chunk: &mut BodyChunk,
) -> Result<(), PluginError> {
    sync_phase(
        p,
        Phase::DelayedBodyFilter,
        conf,
        ctx,
        std::ptr::null_mut(),
        chunk as *mut _,
    )
}

/// log: failures are logged, never answered.
pub(crate) fn log(p: &LuaPlugin, conf: &PluginConf, ctx: &mut Ctx) {
    if let Err(e) = sync_phase(
        p,
        Phase::Log,
        conf,
        ctx,
        std::ptr::null_mut(),
        std::ptr::null_mut(),
    ) {
        tracing::error!(plugin = %e.plugin, phase = e.phase, "{}", e.message);
    }
}

fn sync_phase(
    p: &LuaPlugin,
    phase: Phase,
    conf: &PluginConf,
    ctx: &mut Ctx,
    head: *mut ResponseHead,
    chunk: *mut BodyChunk,
) -> Result<(), PluginError> {
    let rt = runtime(&p.settings).map_err(|e| plugin_error(p, phase, &e))?;
    let Some(args) = rt
        .prepare(p, phase, conf, ctx)
        .map_err(|e| plugin_error(p, phase, &e))?
    else {
        return Ok(());
    };
    let name: &str = &p.name;
    let fr = Frame {
        ctx: ctx as *mut Ctx,
        phase: Some(phase),
        plugin: name as *const str,
        head,
        chunk,
    };
    rt.guarded(fr, || match args {
        Call::Bound(id, slot) => rt.trampoline.call::<()>((id, slot)),
        Call::Full(f, name, conf, slot) => rt.trampoline.call::<()>((f, name, conf, slot)),
    })
    .map_err(|e| plugin_error(p, phase, &e))
}

/// check_conf's Lua half, on the snapshot-building thread: `check_schema(conf, schema_type)` on
/// a table made from `conf`; the table (with the defaults it filled in) is written back.
pub(crate) fn check_conf_lua(
    p: &LuaPlugin,
    conf: &mut serde_json::Value,
    schema_type: Option<i64>,
) -> Result<(), String> {
    let rt = runtime(&p.settings).map_err(|e| one_line(&e.to_string()))?;
    rt.sweep();
    let lua = rt.lua();
    let t = match convert::json_to_lua(lua, conf).map_err(|e| e.to_string())? {
        Value::Table(t) => t,
        _ => return Err("wrong type: expected object".into()),
    };
    let name: &str = &p.name;
    let fr = Frame {
        plugin: name as *const str,
        ..Frame::NONE
    };
    match rt.check_schema(p, &t, schema_type, fr) {
        Ok(Ok(())) => {}
        Ok(Err(msg)) => return Err(msg),
        Err(e) => return Err(one_line(&e.to_string())),
    }
    *conf = convert::lua_to_json(lua, &Value::Table(t), Unsupported::Skip)?;
    Ok(())
}

/// How long a plugin call may run (for the docs and benches).
pub fn call_budget(settings: &Settings) -> Duration {
    settings.call_budget
}

/// Looks a variable up in `apisix.core.ctx`'s registry (`core.ctx.register_var`) and computes
/// it for the request (the getter gets the request's `ctx` table); nil when the module was
/// never loaded or nothing registered the name.
const REGISTERED_VAR_SRC: &str = r#"
local name, ctx = ...
local m = package.loaded["apisix.core.ctx"]
local reg = m and m.registered_var and m.registered_var[name]
if not reg then return nil end
local v = reg.getter(ctx)
if v == nil then return nil end
return tostring(v)
"#;
const REGISTERED_VAR_KEY: &str = "moongate.registered_var";

/// A variable a Lua plugin registered (`core.ctx.register_var`), computed on this thread's VM
/// for the request; None when the thread has no VM, nothing registered `name`, or the getter
/// failed (logged).
pub fn registered_var(ctx: &mut Ctx, name: &str) -> Option<String> {
    let rt = current_runtime()?;
    let lookup = match rt
        .lua
        .named_registry_value::<Option<Function>>(REGISTERED_VAR_KEY)
    {
        Ok(Some(f)) => f,
        _ => {
            let f = rt
                .lua
                .load(REGISTERED_VAR_SRC)
                .set_name("=moongate.registered_var")
                .into_function()
                .ok()?;
            rt.lua
                .set_named_registry_value(REGISTERED_VAR_KEY, &f)
                .ok()?;
            f
        }
    };
    let slot = rt.ctx_slot(ctx);
    let fr = Frame {
        ctx: ctx as *mut Ctx,
        phase: Some(Phase::Log),
        plugin: "" as *const str,
        head: std::ptr::null_mut(),
        chunk: std::ptr::null_mut(),
    };
    let r = rt.guarded(fr, || {
        let t = rt.ctx_table(slot)?;
        lookup.call::<Option<String>>((name, t))
    });
    match r {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(
                "registered variable {name} failed: {}",
                one_line(&e.to_string())
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::path::Path;

    use http::{Method, Version};

    use super::*;
    use crate::body::RequestBody;
    use crate::config::LuaConfig;
    use crate::plugin::{ConfScope, Plugin};

    fn ctx() -> Ctx {
        Ctx::new(
            Method::GET,
            "/t".into(),
            None,
            "/t".into(),
            Version::HTTP_11,
            http::HeaderMap::new(),
            RequestBody::Empty,
            SocketAddr::from(([127, 0, 0, 1], 40000)),
            SocketAddr::from(([127, 0, 0, 1], 9080)),
            "http",
        )
    }

    fn plugin(access: &str) -> (LuaPlugin, PluginConf) {
        let src = format!(
            "return {{ version = 0.1, priority = 1, schema = {{ type = \"object\" }},\n\
             access = function(conf, ctx)\n{access}\nend,\n\
             header_filter = function(conf, ctx) ngx.sleep(0) end }}"
        );
        let settings = Arc::new(Settings::new(&LuaConfig::default(), &[]));
        let p = LuaPlugin::from_source("t", Path::new("t.lua"), src.into(), settings)
            .expect("plugin loads");
        let mut conf = serde_json::json!({});
        let compiled = p
            .check_conf(&mut conf, ConfScope::Route)
            .expect("conf checks");
        (p, PluginConf::new(conf, compiled))
    }

    fn access(p: &LuaPlugin, conf: &PluginConf, ctx: &mut Ctx) -> PhaseResult {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("tokio runtime");
        rt.block_on(p.access(conf, ctx))
    }

    /// Status and body of a local response.
    fn response(r: PhaseResult) -> (u16, String) {
        match r {
            Ok(Flow::Respond(resp)) => {
                let body = match resp.body {
                    ResponseBody::Full(b) => String::from_utf8_lossy(&b).into_owned(),
                    _ => String::new(),
                };
                (resp.status.as_u16(), body)
            }
            Ok(Flow::Continue) => (0, String::new()),
            Err(e) => panic!("the call failed: {}", e.message),
        }
    }

    #[test]
    fn sleep_resumes_with_the_request_and_the_runner_is_reused() {
        let (p, conf) = plugin(
            "ngx.sleep(0.001)\n\
             local ok = pcall(ngx.sleep, 0)\n\
             return 201, ctx.var.uri .. tostring(ok)",
        );
        for _ in 0..3 {
            let mut c = ctx();
            assert_eq!(response(access(&p, &conf, &mut c)), (201, "/ttrue".into()));
        }
    }

    #[test]
    fn a_fixed_variable_set_through_ctx_var_is_kept_for_the_request_only() {
        // APISIX's data-mask sets ctx.var.request_uri for the loggers after it; ngx.var
        // keeps OpenResty's error.
        let (p, conf) = plugin(
            "ctx.var.request_uri = \"/masked\"\n\
             local ok, err = pcall(function() ngx.var.request_uri = \"/x\" end)\n\
             return 200, ctx.var.request_uri .. \"|\" .. ngx.var.request_uri .. \"|\" .. tostring(ok) .. \"|\" .. tostring(err)",
        );
        let mut c = ctx();
        let (status, body) = response(access(&p, &conf, &mut c));
        assert_eq!(status, 200);
        assert!(
            body.starts_with("/masked|/t|false|") && body.contains("not changeable"),
            "{body}"
        );
        assert_eq!(c.request_uri, "/t");
    }

    #[test]
    fn exit_is_not_caught_by_pcall() {
        let (p, conf) = plugin(
            "pcall(function() ngx.say(\"bye\") ngx.exit(403) end)\n\
             ngx.say(\"not reached\")",
        );
        let mut c = ctx();
        assert_eq!(response(access(&p, &conf, &mut c)), (403, "bye\n".into()));
        // The next request gets a fresh runner and runs normally.
        let mut c = ctx();
        assert_eq!(response(access(&p, &conf, &mut c)), (403, "bye\n".into()));
    }

    #[test]
    fn errors_carry_a_traceback_and_the_next_call_works() {
        let (p, conf) = plugin("if ctx.var.uri == \"/t\" then error(\"boom\") end");
        let mut c = ctx();
        let Err(e) = access(&p, &conf, &mut c) else {
            panic!("the call should fail")
        };
        assert!(e.message.contains("boom"), "{}", e.message);
        assert!(e.message.contains("stack traceback"), "{}", e.message);
        // The plugin's frames are there, the runner's are not.
        assert!(e.message.contains("t.lua:3: in upvalue"), "{}", e.message);
        assert!(!e.message.contains("moongate.call"), "{}", e.message);
        let mut c = ctx();
        c.uri = "/other".into();
        assert_eq!(response(access(&p, &conf, &mut c)), (0, String::new()));
    }

    #[test]
    fn one_line_drops_only_the_runners_traceback_frames() {
        let text = "runtime error: moongate.call:30: plugin call exceeded its time budget\n\
                    stack traceback:\n\
                    \tp.lua:3: in upvalue 'call'\n\
                    \tmoongate.call:26: in function <moongate.call:23>\n";
        assert_eq!(
            one_line(text),
            "moongate.call:30: plugin call exceeded its time budget | stack traceback: | \
             p.lua:3: in upvalue 'call'"
        );
    }

    #[test]
    fn coroutines_the_plugin_makes_may_wait() {
        let (p, conf) = plugin(
            "local co = coroutine.create(function(a)\n\
                 local b = coroutine.yield(a + 1)\n\
                 ngx.sleep(0)\n\
                 return 'slept ' .. b\n\
             end)\n\
             local _, first = coroutine.resume(co, 1)\n\
             local ok, second = coroutine.resume(co, 5)\n\
             local w = coroutine.wrap(function()\n\
                 ngx.sleep(0) coroutine.yield('w1') return 'w2'\n\
             end)\n\
             local _, err = pcall(coroutine.wrap(function() error('inner', 0) end))\n\
             return 200, table.concat({ first, second, tostring(ok), w(), w(), err,\n\
                 coroutine.status(co) }, ' ')",
        );
        let mut c = ctx();
        let (status, body) = response(access(&p, &conf, &mut c));
        assert_eq!(status, 200);
        assert_eq!(body, "2 slept 5 true w1 w2 inner dead");

        let mut c = ctx();
        let mut head = crate::plugin::ResponseHead {
            status: StatusCode::OK,
            headers: http::HeaderMap::new(),
        };
        let Err(e) = header_filter(&p, &conf, &mut c, &mut head) else {
            panic!("the call should fail")
        };
        assert!(
            e.message
                .contains("API disabled in the context of header_filter"),
            "{}",
            e.message
        );
    }

    #[test]
    fn get_headers_groups_repeats_and_truncates() {
        let (p, conf) = plugin(
            "local h, err = ngx.req.get_headers()\n\
             local raw = ngx.req.get_headers(0, true)\n\
             local cut, cut_err = ngx.req.get_headers(2)\n\
             return 200, table.concat({ h[\"x-a\"][1], h[\"x-a\"][2], h.X_B, tostring(raw.X_B),\n\
               tostring(err), tostring(cut[\"x-a\"][2]), tostring(cut[\"x-b\"]),\n\
               tostring(cut_err) }, \",\")",
        );
        let mut c = ctx();
        c.headers.append("x-a", HeaderValue::from_static("1"));
        c.headers.append("x-b", HeaderValue::from_static("two"));
        c.headers.append("x-a", HeaderValue::from_static("3"));
        assert_eq!(
            response(access(&p, &conf, &mut c)),
            (200, "1,3,two,nil,nil,3,nil,truncated".into())
        );
    }

    #[test]
    fn the_ctx_table_lasts_one_request_and_is_api_ctx() {
        let (p, conf) = plugin(
            "local seen = ctx.mark\n\
             ctx.mark = ctx.var.uri\n\
             return 200, tostring(seen) .. \",\" .. tostring(ngx.ctx.api_ctx == ctx)",
        );
        for _ in 0..3 {
            let mut c = ctx();
            assert_eq!(
                response(access(&p, &conf, &mut c)),
                (200, "nil,true".into())
            );
            // A second call of the same request sees the same table.
            assert_eq!(response(access(&p, &conf, &mut c)), (200, "/t,true".into()));
        }
        // Requests alive at once get tables of their own.
        let mut a = ctx();
        let mut b = ctx();
        assert_eq!(
            response(access(&p, &conf, &mut a)),
            (200, "nil,true".into())
        );
        assert_eq!(
            response(access(&p, &conf, &mut b)),
            (200, "nil,true".into())
        );
    }

    #[test]
    fn fast_request_functions_match_their_mlua_versions() {
        let (p, conf) = plugin(
            "local out = {}\n\
             local function add(v) out[#out + 1] = tostring(v) end\n\
             ngx.req.set_header(\"X-A\", \"1\")\n\
             ngx.req.add_header(\"X-A\", \"2\")\n\
             ngx.req.set_header(\"X-N\", 5)\n\
             ngx.req.set_header(\"X-T\", { \"a\", \"b\" })\n\
             ngx.req.add_header(\"X-T\", nil)\n\
             ngx.req.set_header(\"X-Gone\", \"x\")\n\
             ngx.req.set_header(\"X-Gone\", nil)\n\
             ngx.req.set_header(\"X-Gone2\", \"x\")\n\
             ngx.req.clear_header(\"x-gone2\")\n\
             local h = ngx.req.get_headers()\n\
             add(h[\"x-a\"][1]) add(h[\"x-a\"][2]) add(h[\"x-n\"]) add(h[\"x-t\"][2])\n\
             add(h[\"x-gone\"]) add(h[\"x-gone2\"])\n\
             add(ngx.req.get_method()) add(ctx.var.uri) add(ngx.var.http_x_a) add(ngx.var.nope)\n\
             add(select(\"#\", ngx.req.get_headers())) add(h.X_A ~= nil)\n\
             add(getmetatable(ngx.req.get_headers(0, true)) == nil)\n\
             add(select(2, ngx.req.get_headers(1))) add(ngx.req.get_headers(1.0, false)[\"x-a\"] ~= nil)\n\
             local ok, e = pcall(ngx.req.set_header, \"bad name\", \"v\")\n\
             add(ok) add(tostring(e):find(\"invalid header name \\\"bad name\\\"\", 1, true) ~= nil)\n\
             ok, e = pcall(ngx.req.set_header, \"X-B\", \"a\\nb\")\n\
             add(ok) add(tostring(e):find(\"contains control characters\", 1, true) ~= nil)\n\
             ok, e = pcall(ngx.req.set_header, {}, \"v\")\n\
             add(ok)\n\
             ok, e = pcall(__moongate.var_get, {})\n\
             add(ok)\n\
             return 200, table.concat(out, \",\")",
        );
        let mut c = ctx();
        assert_eq!(
            response(access(&p, &conf, &mut c)),
            (
                200,
                "1,2,5,b,nil,nil,GET,/t,1, 2,nil,2,true,true,truncated,true,false,true,false,true,false,false".into()
            )
        );
        assert_eq!(c.headers.get_all("x-a").iter().count(), 2);
        assert!(c.headers.get("x-gone").is_none());
    }

    #[test]
    fn fast_request_functions_outside_a_request_raise_the_mlua_error() {
        let (p, _) = plugin("");
        let rt = runtime(&p.settings).expect("runtime");
        for f in [
            "ngx.req.set_header('X-A', '1')",
            "ngx.req.get_method()",
            "__moongate.var_get('uri')",
        ] {
            let e = rt
                .with_budget(|lua| lua.load(f).exec())
                .expect_err("no request");
            assert!(
                e.to_string().contains("no request is being served"),
                "{f}: {e}"
            );
        }
    }

    #[test]
    fn a_rust_error_and_a_thrown_table_fail_the_call_with_their_text() {
        let (p, conf) = plugin("ngx.req.set_header(\"bad name\", \"v\")");
        let mut c = ctx();
        let Err(e) = access(&p, &conf, &mut c) else {
            panic!("the call should fail")
        };
        assert!(
            e.message.contains("invalid header name \"bad name\""),
            "{}",
            e.message
        );
        let (p, conf) =
            plugin("error(setmetatable({}, { __tostring = function() return \"tbl\" end }))");
        let Err(e) = access(&p, &conf, &mut c) else {
            panic!("the call should fail")
        };
        assert!(e.message.starts_with("tbl"), "{}", e.message);
        assert!(e.message.contains("stack traceback"), "{}", e.message);
    }

    #[test]
    fn a_bare_yield_in_a_phase_fails_the_call() {
        let (p, conf) = plugin("coroutine.yield(1)");
        let mut c = ctx();
        let Err(e) = access(&p, &conf, &mut c) else {
            panic!("the call should fail")
        };
        assert!(e.message.contains("attempt to yield"), "{}", e.message);
    }
}
