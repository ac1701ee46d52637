//! CPU cost of the request pipeline around the plugins: running every phase of a chain of
//! 0/1/5/20 native no-op plugins (what the chain runner itself costs per request), and handing
//! request headers to Lua (`ngx.req.get_headers()`, `core.request.header`).
//!
//! Not measured here because other benches do: router lookup at 10k routes (benches/router.rs),
//! one Lua hook call and the first Lua call of a request (benches/lua.rs), the openfunction
//! round trip (benches/openfunction.rs). BENCHMARKS.md quotes all of them.
//!
//! Run: `cargo bench --bench pipeline -- --warm-up-time 1 --measurement-time 3`

use std::future::Future;
use std::hint::black_box;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};

use async_trait::async_trait;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version};
use moongate::body::RequestBody;
use moongate::config::LuaConfig;
use moongate::plugin::chain::{self, Chain, ChainEntry};
use moongate::plugin::lua::{LuaPlugin, Settings};
use moongate::plugin::{
    ConfScope, Ctx, Phase, PhaseCall, PhaseResult, PhaseSet, Plugin, PluginConf, ResponseHead,
    Schema,
};
use serde_json::json;

/// A native plugin that implements every phase a request goes through and does nothing in
/// them: what is left is the chain runner's own cost (dispatch, the boxed async call).
struct Noop(String);

fn empty_schema() -> &'static Schema {
    static S: OnceLock<Schema> = OnceLock::new();
    S.get_or_init(|| Schema::compile(&json!({"type": "object"})).expect("schema"))
}

#[async_trait(?Send)]
impl Plugin for Noop {
    fn name(&self) -> &str {
        &self.0
    }
    fn priority(&self) -> i64 {
        0
    }
    fn schema(&self) -> &Schema {
        empty_schema()
    }
    fn phases(&self) -> PhaseSet {
        [
            Phase::Rewrite,
            Phase::Access,
            Phase::BeforeProxy,
            Phase::HeaderFilter,
            Phase::Log,
        ]
        .into_iter()
        .collect()
    }
    async fn access(&self, _conf: &PluginConf, ctx: &mut Ctx) -> PhaseResult {
        black_box(&ctx.uri);
        Ok(moongate::plugin::Flow::Continue)
    }
}

fn chain_of(n: usize) -> Chain {
    Chain::new(
        (0..n)
            .map(|i| {
                ChainEntry::new(
                    Arc::new(Noop(format!("noop-{i:02}"))),
                    Arc::new(PluginConf::new(json!({}), Arc::new(()))),
                )
                .expect("no filter")
            })
            .collect(),
    )
}

/// A request head like a browser's or curl's through a CDN: `extra` headers beyond Host.
fn ctx(extra: usize) -> Ctx {
    let mut headers = HeaderMap::new();
    headers.insert("host", HeaderValue::from_static("bench.local"));
    let common = [
        ("user-agent", "Mozilla/5.0 (X11; Linux x86_64) bench"),
        ("accept", "text/html,application/xhtml+xml,*/*;q=0.8"),
        ("accept-encoding", "gzip, deflate, br"),
        ("accept-language", "en-US,en;q=0.5"),
        ("cookie", "session=abcdef0123456789; theme=dark"),
        ("x-forwarded-for", "203.0.113.7"),
        ("x-request-id", "5f0c6a1e-8d2b-4a4f-9c1e-2b7d9e3f4a10"),
        ("referer", "https://bench.local/index.html"),
        ("cache-control", "no-cache"),
        ("connection", "keep-alive"),
        ("authorization", "Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig"),
    ];
    for (i, (k, v)) in common.iter().cycle().take(extra).enumerate() {
        if i < common.len() {
            headers.insert(*k, HeaderValue::from_static(v));
        } else {
            let name = HeaderName::from_bytes(format!("x-extra-{i}").as_bytes()).expect("name");
            headers.insert(name, HeaderValue::from_static(v));
        }
    }
    Ctx::new(
        Method::GET,
        "/bench".into(),
        None,
        "/bench".into(),
        Version::HTTP_11,
        headers,
        RequestBody::Empty,
        SocketAddr::from(([127, 0, 0, 1], 40000)),
        SocketAddr::from(([127, 0, 0, 1], 9080)),
        "http",
    )
}

/// Polls a future that completes without waiting (nothing here yields).
fn run<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    match f.as_mut().poll(&mut cx) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the phase yielded"),
    }
}

/// A request phase as the chain runs it; nothing here waits.
fn start(p: &LuaPlugin, phase: Phase, conf: &PluginConf, cx: &mut Ctx) -> bool {
    match p.start_phase(phase, conf, cx) {
        PhaseCall::Ready(r) => r.is_ok(),
        PhaseCall::Wait(_) => panic!("the phase yielded"),
    }
}

/// Every phase a proxied request runs (rewrite, access, before_proxy, header_filter, log) over
/// the global rules (empty) and the route's chain, as the handler calls them.
fn all_phases(global: &Chain, route: &Chain, cx: &mut Ctx, head: &mut ResponseHead) -> bool {
    let chains = [global, route];
    let mut ok = true;
    for phase in [Phase::Rewrite, Phase::Access, Phase::BeforeProxy] {
        ok &= run(chain::run_request_phase(phase, &chains, cx)).is_ok();
    }
    ok &= chain::run_header_filter(&chains, cx, head).is_ok();
    chain::run_log(&chains, cx);
    ok
}

fn chains(c: &mut Criterion) {
    let global = Chain::default();
    let mut head = ResponseHead {
        status: StatusCode::OK,
        headers: HeaderMap::new(),
    };
    let mut g = c.benchmark_group("chain_all_phases");
    for n in [0, 1, 5, 20] {
        let route = chain_of(n);
        let mut cx = ctx(3);
        g.bench_function(format!("{n}_plugins"), |b| {
            b.iter(|| black_box(all_phases(&global, &route, &mut cx, &mut head)))
        });
    }
    g.finish();
}

const HEADERS_PLUGIN: &str = r#"
local core = require("apisix.core")
return {
    version = 0.1,
    priority = 1,
    schema = { type = "object" },
    access = function(conf, ctx)
        local h = ngx.req.get_headers()
        if h["user-agent"] == nil then error("no user-agent") end
    end,
    rewrite = function(conf, ctx)
        if core.request.header(ctx, "user-agent") == nil then error("no user-agent") end
    end,
}
"#;

fn lua_headers(c: &mut Criterion) {
    let settings = Arc::new(Settings::new(&LuaConfig::default(), &[]));
    let p = LuaPlugin::from_source(
        "bench-headers",
        Path::new("bench-headers.lua"),
        HEADERS_PLUGIN.into(),
        settings,
    )
    .expect("plugin loads");
    let mut value = json!({});
    let compiled = p
        .check_conf(&mut value, ConfScope::Route)
        .expect("conf checks");
    let conf = PluginConf::new(value, compiled);

    let mut g = c.benchmark_group("lua_request_headers");
    for n in [3, 11, 30] {
        let mut cx = ctx(n);
        // The first call loads the module into this thread's VM and makes the ctx table.
        run(p.access(&conf, &mut cx)).expect("access");
        g.bench_function(format!("ngx.req.get_headers/{}_headers", n + 1), |b| {
            b.iter(|| black_box(start(&p, Phase::Access, &conf, &mut cx)))
        });
        g.bench_function(format!("core.request.header/{}_headers", n + 1), |b| {
            b.iter(|| black_box(start(&p, Phase::Rewrite, &conf, &mut cx)))
        });
    }
    g.finish();
}

criterion_group!(benches, chains, lua_headers);
criterion_main!(benches);
