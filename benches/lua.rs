//! CPU cost of Lua plugins through the `Plugin` trait: one trivial hook call per phase, the
//! first Lua call of a request (which makes the request's `ctx` table), and the watchdog's
//! per-call cost.
//!
//! Run: `cargo bench --bench lua -- --warm-up-time 1 --measurement-time 3`

use std::future::Future;
use std::hint::black_box;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, Method, StatusCode, Version};
use moongate::body::RequestBody;
use moongate::config::LuaConfig;
use moongate::plugin::lua::{LuaPlugin, LuaRuntime, Settings};
use moongate::plugin::{
    BodyChunk, ConfScope, Ctx, Phase, PhaseCall, Plugin, PluginConf, ResponseHead,
};
use serde_json::json;

const SOURCE: &str = r#"
return {
    version = 0.1,
    priority = 1,
    schema = { type = "object", properties = { v = { type = "string", default = "x" } } },
    rewrite = function(conf, ctx) end,
    access = function(conf, ctx) end,
    header_filter = function(conf, ctx) end,
    body_filter = function(conf, ctx) end,
    log = function(conf, ctx) end,
}
"#;

/// A plugin-like access hook: reads a conf field, a request variable and sets a header.
const REALISTIC: &str = r#"
return {
    version = 0.1,
    priority = 1,
    schema = { type = "object", properties = { v = { type = "string", default = "x" } } },
    access = function(conf, ctx)
        if ctx.var.uri ~= "/" then
            ngx.req.set_header("X-Bench", conf.v)
        end
    end,
}
"#;

fn ctx() -> Ctx {
    let mut headers = HeaderMap::new();
    headers.insert("host", "bench.local".parse().expect("header"));
    Ctx::new(
        Method::GET,
        "/bench".into(),
        Some("a=1".into()),
        "/bench?a=1".into(),
        Version::HTTP_11,
        headers,
        RequestBody::Empty,
        SocketAddr::from(([127, 0, 0, 1], 40000)),
        SocketAddr::from(([127, 0, 0, 1], 9080)),
        "http",
    )
}

/// Polls a future that completes without waiting (the hooks here never yield).
fn run<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    match f.as_mut().poll(&mut cx) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the hook yielded"),
    }
}

/// A request phase as the chain runs it ([`Plugin::start_phase`]); these hooks never wait.
fn start(p: &LuaPlugin, phase: Phase, conf: &PluginConf, cx: &mut Ctx) -> bool {
    match p.start_phase(phase, conf, cx) {
        PhaseCall::Ready(r) => r.is_ok(),
        PhaseCall::Wait(_) => panic!("the hook yielded"),
    }
}

/// Light threads: access spawns one that returns at once (the call stays synchronous: no
/// thread is left running); rewrite spawns one and waits for it (the wait is a waiting
/// function, so the call goes through the boxed future, ready at its first poll).
const THREADS: &str = r#"
local spawn, wait = ngx.thread.spawn, ngx.thread.wait
local function one() return 1 end
return {
    version = 0.1,
    priority = 1,
    schema = { type = "object" },
    access = function(conf, ctx) spawn(one) end,
    rewrite = function(conf, ctx) wait(spawn(one)) end,
}
"#;

fn plugin(src: &str) -> (LuaPlugin, PluginConf) {
    let settings = Arc::new(Settings::new(&LuaConfig::default(), &[]));
    let p = LuaPlugin::from_source("bench", Path::new("bench.lua"), src.into(), settings)
        .expect("plugin loads");
    let mut conf = json!({});
    let compiled = p
        .check_conf(&mut conf, ConfScope::Route)
        .expect("conf checks");
    (p, PluginConf::new(conf, compiled))
}

fn phases(c: &mut Criterion) {
    let (p, conf) = plugin(SOURCE);
    let mut cx = ctx();
    // First call loads the module into this thread's VM and makes the ctx table.
    run(p.access(&conf, &mut cx)).expect("access");

    c.bench_function("lua access (trivial hook, per call)", |b| {
        b.iter(|| black_box(start(&p, Phase::Access, &conf, &mut cx)))
    });
    c.bench_function("lua rewrite (trivial hook, per call)", |b| {
        b.iter(|| black_box(start(&p, Phase::Rewrite, &conf, &mut cx)))
    });
    c.bench_function("lua access through the async method (boxed future)", |b| {
        b.iter(|| black_box(run(p.access(&conf, &mut cx)).is_ok()))
    });
    let mut head = ResponseHead {
        status: StatusCode::OK,
        headers: HeaderMap::new(),
    };
    c.bench_function("lua header_filter (trivial hook, per call)", |b| {
        b.iter(|| black_box(p.header_filter(&conf, &mut cx, &mut head).is_ok()))
    });
    let mut chunk = BodyChunk {
        data: Bytes::from_static(b"hello"),
        eof: false,
    };
    c.bench_function("lua body_filter (trivial hook, per chunk)", |b| {
        b.iter(|| black_box(p.body_filter(&conf, &mut cx, &mut chunk).is_ok()))
    });
    c.bench_function("lua log (trivial hook, per call)", |b| {
        b.iter(|| p.log(&conf, &mut cx))
    });
    c.bench_function(
        "lua access, first Lua call of a request (ctx table made)",
        |b| {
            b.iter(|| {
                let mut fresh = ctx();
                black_box(start(&p, Phase::Access, &conf, &mut fresh))
            })
        },
    );
    c.bench_function(
        "request context alone (Ctx::new + drop, for reference)",
        |b| b.iter(|| black_box(ctx())),
    );

    let (real, real_conf) = plugin(REALISTIC);
    run(real.access(&real_conf, &mut cx)).expect("access");
    c.bench_function("lua access (ctx.var read + ngx.req.set_header)", |b| {
        b.iter(|| black_box(start(&real, Phase::Access, &real_conf, &mut cx)))
    });

    let (th, th_conf) = plugin(THREADS);
    run(th.access(&th_conf, &mut cx)).expect("access");
    c.bench_function(
        "lua access spawning a light thread that ends at once",
        |b| b.iter(|| black_box(start(&th, Phase::Access, &th_conf, &mut cx))),
    );
    c.bench_function("lua rewrite: ngx.thread.wait(ngx.thread.spawn(f))", |b| {
        b.iter(|| black_box(run(th.rewrite(&th_conf, &mut cx)).is_ok()))
    });
}

fn watchdog(c: &mut Criterion) {
    let settings = Settings::new(&LuaConfig::default(), &[]);
    let rt = LuaRuntime::new(&settings).expect("vm");
    c.bench_function(
        "watchdog: arm + disarm the budget (per call / resume)",
        |b| b.iter(|| rt.budget_cycle()),
    );
    // A JIT-compiled loop with the budget armed but no hook set: CHECKHOOK's per-iteration
    // check is one predictable branch, so this should match a plain LuaJIT build.
    let f: mlua::Function = rt
        .lua()
        .load("return function(n) local s = 0 for i = 1, n do s = s + i % 7 end return s end")
        .eval()
        .expect("loop");
    // Baselines on this machine: a bare mlua call with two table arguments, sync and async.
    let noop: mlua::Function = rt
        .lua()
        .load("return function(a, b) end")
        .eval()
        .expect("noop");
    let t1 = rt.lua().create_table().expect("table");
    let t2 = rt.lua().create_table().expect("table");
    c.bench_function("baseline: bare mlua Function::call(t, t)", |b| {
        b.iter(|| black_box(noop.call::<()>((&t1, &t2)).is_ok()))
    });
    c.bench_function(
        "baseline: bare mlua Function::call_async(t, t), one poll",
        |b| b.iter(|| black_box(run(noop.call_async::<()>((&t1, &t2))).is_ok())),
    );
    c.bench_function(
        "JIT loop of 1e6 iterations, budget armed, hook unset",
        |b| b.iter(|| black_box(rt.with_budget(|_| f.call::<f64>(1_000_000)).expect("loop"))),
    );
    c.bench_function("JIT loop of 1e6 iterations, no budget", |b| {
        b.iter(|| black_box(f.call::<f64>(1_000_000).expect("loop")))
    });
}

criterion_group!(benches, phases, watchdog);
criterion_main!(benches);
