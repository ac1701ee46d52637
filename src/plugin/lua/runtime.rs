//! One LuaJIT VM per thread, the plugin modules and conf tables loaded in it, and the calls into
//! it from the plugin phases.
//!
//! Worker threads each get a [`LuaRuntime`] on their first Lua plugin call (like an nginx
//! worker's Lua VM). The thread that builds snapshots gets one too, used to run plugins'
//! `check_schema`. Nothing here is `Send`: a VM never leaves its thread.
//!
//! Request access from Lua: while a phase runs, a thread-local [`Frame`] points at the request's
//! `Ctx` (and, in the filter phases, at the response head or body chunk). Async phases are
//! polled many times, and other requests' coroutines run on the same VM in between, so the frame
//! is set around *each poll* of one request's call ([`RequestCall`]) and restored after. Every
//! `ngx`/`ctx` function reads the request through [`with_ctx`] and friends, which fail with a Lua
//! error when no request is running.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use mlua::{Function, Lua, LuaOptions, MultiValue, StdLib, Table, Value};

use super::convert::{self, Unsupported};
use super::watchdog::Budget;
use super::{api, LuaConf, LuaPlugin, Settings};
use crate::body::ResponseBody;
use crate::plugin::{
    BodyChunk, Ctx, Flow, LocalResponse, Phase, PhaseResult, PluginConf, PluginError, ResponseHead,
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
    pub ctx_table: Option<Table>,
    pub ngx_ctx: Option<Table>,
    /// `ngx.header` writes made before the response exists (rewrite/access/before_proxy).
    pub staged: HeaderMap,
    /// `ngx.status` set before the response exists.
    pub status: Option<u16>,
    /// `ngx.say`/`ngx.print` output.
    pub output: Vec<u8>,
    /// `ngx.exit(status)` was called.
    pub exit: Option<i64>,
}

/// The request's Lua state, created on first use.
pub(crate) fn lua_request(ctx: &mut Ctx) -> &mut LuaRequest {
    if ctx.data::<LuaRequest>().is_none() {
        ctx.set_data(LuaRequest::default());
    }
    ctx.data_mut::<LuaRequest>().expect("inserted just above")
}

/// What a phase call passes to the trampoline: the phase function, the plugin name, the conf
/// table and the ctx table.
type Call = (Function, mlua::String, Table, Table);

/// One plugin version loaded in a VM.
struct Module {
    live: Weak<()>,
    table: Table,
    funcs: [Option<Function>; 6],
    check_schema: Option<Function>,
    name: String,
    /// `name` as a Lua string, pushed on every call without re-interning.
    name_lua: mlua::String,
}

/// One conf table in a VM.
struct ConfEntry {
    live: Weak<()>,
    table: Table,
}

/// A thread's LuaJIT VM with the API installed and its caches.
pub struct LuaRuntime {
    lua: Lua,
    budget: Arc<Budget>,
    modules: RefCell<HashMap<u64, Module>>,
    confs: RefCell<HashMap<u64, ConfEntry>>,
    retired_seen: Cell<u64>,
    memory_limit: Cell<usize>,
    ctx_mt: Table,
    /// `function(f, name, conf, ctx) ctx._plugin_name = name return f(conf, ctx) end`: setting
    /// the field from Lua costs nanoseconds, from Rust a protected call (about a microsecond).
    trampoline: Function,
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
        let trampoline: Function = lua
            .load("return function(f, name, conf, ctx) ctx._plugin_name = name return f(conf, ctx) end")
            .set_name("=moongate.call")
            .eval()?;
        Ok(LuaRuntime {
            lua,
            budget,
            modules: RefCell::new(HashMap::new()),
            confs: RefCell::new(HashMap::new()),
            retired_seen: Cell::new(RETIRED.load(Ordering::Acquire)),
            memory_limit: Cell::new(limit),
            ctx_mt,
            trampoline,
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
        self.confs
            .borrow_mut()
            .retain(|_, c| c.live.strong_count() > 0);
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
        let table = self.guarded(fr, || {
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
            // APISIX names a plugin after its file.
            t.set("name", p.name.as_str())?;
            let loaded: Table = self.lua.globals().get::<Table>("package")?.get("loaded")?;
            loaded.set(format!("apisix.plugins.{}", p.name), &t)?;
            if let Some(init) = t.get::<Option<Function>>("init")? {
                init.call::<()>(())?;
            }
            Ok(t)
        })?;
        let mut funcs: [Option<Function>; 6] = Default::default();
        for (i, phase) in Phase::ALL.iter().enumerate() {
            funcs[i] = table.get::<Option<Function>>(phase.as_str()).ok().flatten();
        }
        let check_schema = table.get::<Option<Function>>("check_schema").ok().flatten();
        self.modules.borrow_mut().insert(
            p.version_id,
            Module {
                live: Arc::downgrade(&p.live),
                table,
                funcs,
                check_schema,
                name: p.name.clone(),
                name_lua: self.lua.create_string(&p.name)?,
            },
        );
        Ok(())
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
        if let Some(lc) = lc {
            self.confs.borrow_mut().insert(
                lc.id,
                ConfEntry {
                    live: Arc::downgrade(&lc.live),
                    table: t.clone(),
                },
            );
        }
        Ok(t)
    }

    /// The request's `ctx` table (APISIX's `api_ctx`), made on first use.
    pub(crate) fn ctx_table(&self, ctx: &mut Ctx) -> mlua::Result<Table> {
        if let Some(t) = ctx.data::<LuaRequest>().and_then(|r| r.ctx_table.clone()) {
            return Ok(t);
        }
        let t = self.lua.create_table()?;
        t.set_metatable(Some(self.ctx_mt.clone()))?;
        lua_request(ctx).ctx_table = Some(t.clone());
        Ok(t)
    }

    /// Everything a phase call needs: the function (None when the module has no such phase),
    /// the conf table and the ctx table.
    fn prepare(
        &self,
        p: &LuaPlugin,
        phase: Phase,
        conf: &PluginConf,
        ctx: &mut Ctx,
    ) -> mlua::Result<Option<Call>> {
        self.sweep();
        let Some(f) = self.func(p, phase)? else {
            return Ok(None);
        };
        let ctx_t = self.ctx_table(ctx)?;
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
        Ok(Some((f, name_lua, conf_t, ctx_t)))
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
pub(crate) fn one_line(s: &str) -> String {
    let s = s.strip_prefix("runtime error: ").unwrap_or(s);
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ")
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

/// How a request-phase call ended.
enum Outcome {
    Returned(mlua::Result<MultiValue>),
    Exit(i64),
}

/// One request's async phase call: sets the frame and the budget around each poll.
struct RequestCall<'a, F> {
    rt: &'a LuaRuntime,
    ctx: &'a mut Ctx,
    fut: Option<F>,
    phase: Phase,
    plugin: &'a str,
}

impl<F: Future<Output = mlua::Result<MultiValue>> + Unpin> Future for RequestCall<'_, F> {
    type Output = Outcome;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        let this = self.get_mut();
        let Some(fut) = this.fut.as_mut() else {
            return Poll::Ready(Outcome::Exit(0));
        };
        let fr = Frame {
            ctx: &mut *this.ctx as *mut Ctx,
            phase: Some(this.phase),
            plugin: this.plugin as *const str,
            ..Frame::NONE
        };
        let polled = {
            let _g = FrameGuard::set(fr);
            this.rt.budget.start();
            let r = Pin::new(fut).poll(cx);
            this.rt.budget.stop();
            r
        };
        match polled {
            Poll::Ready(r) => {
                this.fut = None;
                if let Err(e) = &r {
                    this.rt.after_error(e);
                }
                Poll::Ready(Outcome::Returned(r))
            }
            Poll::Pending => {
                let exit = this
                    .ctx
                    .data_mut::<LuaRequest>()
                    .and_then(|r| r.exit.take());
                match exit {
                    Some(status) => {
                        // Drop the suspended coroutine with the frame in place (mlua resumes
                        // it once to let it unwind).
                        let _g = FrameGuard::set(fr);
                        this.fut = None;
                        Poll::Ready(Outcome::Exit(status))
                    }
                    None => Poll::Pending,
                }
            }
        }
    }
}

/// rewrite / access / before_proxy.
pub(crate) async fn request_phase(
    p: &LuaPlugin,
    phase: Phase,
    conf: &PluginConf,
    ctx: &mut Ctx,
) -> PhaseResult {
    let rt = runtime(&p.settings).map_err(|e| plugin_error(p, phase, &e))?;
    let Some(args) = rt
        .prepare(p, phase, conf, ctx)
        .map_err(|e| plugin_error(p, phase, &e))?
    else {
        return Ok(Flow::Continue);
    };
    let fut = rt.trampoline.call_async::<MultiValue>(args);
    let outcome = RequestCall {
        rt: &rt,
        ctx: &mut *ctx,
        fut: Some(fut),
        phase,
        plugin: &p.name,
    }
    .await;
    match outcome {
        Outcome::Exit(status) => Ok(exit_flow(ctx, status)),
        Outcome::Returned(Err(e)) => Err(plugin_error(p, phase, &e)),
        Outcome::Returned(Ok(values)) => {
            let mut it = values.into_iter();
            let code = it.next().unwrap_or(Value::Nil);
            let body = it.next().unwrap_or(Value::Nil);
            let code = match code {
                Value::Integer(i) => Some(i),
                Value::Number(n) => Some(n as i64),
                _ => None,
            };
            match code {
                Some(code) => local_response(&rt, ctx, code, &body)
                    .map(Flow::Respond)
                    .map_err(|e| PluginError::new(&p.name, phase, e)),
                None if body != Value::Nil => local_response(&rt, ctx, 200, &body)
                    .map(Flow::Respond)
                    .map_err(|e| PluginError::new(&p.name, phase, e)),
                None => {
                    // Output without exit still ends the request, as in OpenResty once the
                    // response has started.
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
    let headers = std::mem::take(&mut req.staged);
    Flow::Respond(LocalResponse {
        status: code,
        headers,
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
    let req = lua_request(ctx);
    let mut headers = std::mem::take(&mut req.staged);
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
        body: if out.is_empty() {
            ResponseBody::Empty
        } else {
            ResponseBody::Full(Bytes::from(out))
        },
    })
}

/// header_filter: first the headers the request phases staged, then the module's function.
pub(crate) fn header_filter(
    p: &LuaPlugin,
    conf: &PluginConf,
    ctx: &mut Ctx,
    head: &mut ResponseHead,
) -> Result<(), PluginError> {
    if let Some(req) = ctx.data_mut::<LuaRequest>() {
        if !req.staged.is_empty() {
            let staged = std::mem::take(&mut req.staged);
            let mut last = None;
            for (k, v) in staged {
                match k {
                    Some(k) => {
                        head.headers.insert(k.clone(), v);
                        last = Some(k);
                    }
                    None => {
                        if let Some(k) = &last {
                            head.headers.append(k.clone(), v);
                        }
                    }
                }
            }
        }
    }
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
    rt.guarded(fr, || rt.trampoline.call::<()>(args))
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
