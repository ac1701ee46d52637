//! moongate's runtime figures for the scrape: each worker's Lua VM memory and upstream
//! connections, Lua calls stopped by the time budget or the memory cap, upstream connections
//! made, openfunction calls by outcome, and opentelemetry spans by outcome.
//!
//! Workers publish into relaxed atomics: a counter where the event happens (one add, no lock),
//! the gauges once a second from a small task on each worker (the VM and the pool are the
//! worker's own and cannot be read from the thread that serves the scrape). A gauge is so up
//! to a second old.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::expose::{Family, Kind, Source, Value};

/// One worker's gauges.
#[derive(Default)]
pub struct WorkerFigures {
    lua_memory: AtomicU64,
    upstream_idle: AtomicU64,
    upstream_active: AtomicU64,
}

static WORKERS: Mutex<Vec<(usize, Arc<WorkerFigures>)>> = Mutex::new(Vec::new());

/// Lua calls the watchdog stopped for running past `lua.call_budget_ms`.
pub static LUA_BUDGET_STOPS: AtomicU64 = AtomicU64::new(0);
/// Lua calls that failed on the VM's memory cap (`lua.memory_limit`).
pub static LUA_MEMORY_STOPS: AtomicU64 = AtomicU64::new(0);
/// HTTP/1.1 upstream connections made (the rest of the requests reused pooled ones).
pub static UPSTREAM_CREATED: AtomicU64 = AtomicU64::new(0);

/// How an openfunction call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenFunctionOutcome {
    /// The function answered below 400.
    Ok,
    /// The function answered 400 or above (passed on to the client).
    FunctionError,
    /// The call failed (connect, timeout, a bad answer): the client got 503.
    Failed,
    /// The request body could not be read: the client got 400.
    BadRequest,
}

const OUTCOMES: [(OpenFunctionOutcome, &str); 4] = [
    (OpenFunctionOutcome::Ok, "ok"),
    (OpenFunctionOutcome::FunctionError, "function_error"),
    (OpenFunctionOutcome::Failed, "failed"),
    (OpenFunctionOutcome::BadRequest, "bad_request"),
];

static OPENFUNCTION: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

/// Counts one openfunction call.
pub fn openfunction(outcome: OpenFunctionOutcome) {
    OPENFUNCTION[outcome as usize].fetch_add(1, Relaxed);
}

/// How often a worker publishes its gauges.
const TICK: Duration = Duration::from_secs(1);

/// Publishes this worker's gauges until the worker stops (spawned on the worker's `LocalSet`).
pub async fn follow(worker: usize) {
    let figures = Arc::new(WorkerFigures::default());
    {
        let mut w = WORKERS.lock().unwrap_or_else(|e| e.into_inner());
        w.retain(|(id, _)| *id != worker);
        w.push((worker, figures.clone()));
    }
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let lua = crate::plugin::lua::used_memory().unwrap_or(0);
        figures.lua_memory.store(lua as u64, Relaxed);
        let (idle, active) = crate::proxy::client::worker_client().connection_counts();
        figures.upstream_idle.store(idle, Relaxed);
        figures.upstream_active.store(active, Relaxed);
    }
}

/// The families above, for the export endpoint.
pub struct RuntimeSource;

impl Source for RuntimeSource {
    fn collect(&self, out: &mut Vec<Family>) {
        let workers: Vec<(usize, Arc<WorkerFigures>)> =
            WORKERS.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut mem = Family::new(
            "moongate_lua_memory_bytes",
            "Memory held by each worker's Lua VM",
            Kind::Gauge,
            &["worker"],
        );
        let mut conns = Family::new(
            "moongate_upstream_connections",
            "Each worker's HTTP/1.1 upstream connections: idle in the pool, or carrying a request",
            Kind::Gauge,
            &["worker", "state"],
        );
        for (id, f) in &workers {
            let w = id.to_string();
            mem.push(vec![w.clone()], Value::Int(f.lua_memory.load(Relaxed)));
            conns.push(
                vec![w.clone(), "idle".into()],
                Value::Int(f.upstream_idle.load(Relaxed)),
            );
            conns.push(
                vec![w, "active".into()],
                Value::Int(f.upstream_active.load(Relaxed)),
            );
        }
        out.push(mem);
        out.push(conns);
        let mut created = Family::new(
            "moongate_upstream_connections_created_total",
            "HTTP/1.1 upstream connections made (requests beyond these reused pooled ones)",
            Kind::Counter,
            &[],
        );
        created.push(Vec::new(), Value::Int(UPSTREAM_CREATED.load(Relaxed)));
        out.push(created);
        let mut stopped = Family::new(
            "moongate_lua_calls_stopped_total",
            "Lua plugin calls stopped: by the time budget (lua.call_budget_ms) or the VM's memory cap (lua.memory_limit)",
            Kind::Counter,
            &["reason"],
        );
        stopped.push(
            vec!["time_budget".into()],
            Value::Int(LUA_BUDGET_STOPS.load(Relaxed)),
        );
        stopped.push(
            vec!["memory_cap".into()],
            Value::Int(LUA_MEMORY_STOPS.load(Relaxed)),
        );
        out.push(stopped);
        let mut calls = Family::new(
            "moongate_openfunction_calls_total",
            "openfunction calls by outcome",
            Kind::Counter,
            &["outcome"],
        );
        for (o, name) in OUTCOMES {
            calls.push(
                vec![name.into()],
                Value::Int(OPENFUNCTION[o as usize].load(Relaxed)),
            );
        }
        out.push(calls);
        let mut spans = Family::new(
            "moongate_otel_spans_total",
            "opentelemetry spans: accepted by the collector, dropped on a full queue, or in a failed export",
            Kind::Counter,
            &["outcome"],
        );
        use crate::otel::export::{SPANS_DROPPED, SPANS_EXPORTED, SPANS_FAILED};
        for (name, n) in [
            ("exported", &SPANS_EXPORTED),
            ("dropped", &SPANS_DROPPED),
            ("failed", &SPANS_FAILED),
        ] {
            spans.push(vec![name.into()], Value::Int(n.load(Relaxed)));
        }
        out.push(spans);
    }
}
