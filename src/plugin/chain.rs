//! Plugin chains: the plugins of one route (or of the global rules) in run order, and the
//! functions that run one phase over them.

use std::sync::Arc;

use serde_json::Value;

use super::expr::Expr;
use super::{
    BodyChunk, Ctx, Flow, LocalResponse, Phase, PhaseCall, PhaseResult, PhaseSet, Plugin,
    PluginConf, PluginError, ResponseHead,
};

/// One enabled plugin with its conf.
#[derive(Clone)]
pub struct ChainEntry {
    pub plugin: Arc<dyn Plugin>,
    pub conf: Arc<PluginConf>,
    /// The conf's `_meta.filter`, compiled: the plugin runs only for requests it matches.
    pub filter: Option<Arc<Expr>>,
}

impl ChainEntry {
    /// An entry for a checked conf; compiles its `_meta.filter` (the error is lua-resty-expr's
    /// wording, for the `_meta.filter` path).
    pub fn new(plugin: Arc<dyn Plugin>, conf: Arc<PluginConf>) -> Result<Self, String> {
        let filter = match conf.value.pointer("/_meta/filter") {
            None | Some(Value::Null) => None,
            Some(f) => Some(Arc::new(Expr::compile(f)?)),
        };
        Ok(ChainEntry {
            plugin,
            conf,
            filter,
        })
    }

    /// APISIX's `meta_filter`: true when the plugin runs for this request. The first answer
    /// for a conf is kept for the rest of the request, so every phase agrees (as APISIX caches
    /// it in `ctx`), even when a plugin changes a variable in between.
    #[inline]
    fn runs(&self, ctx: &mut Ctx) -> bool {
        match &self.filter {
            None => true,
            Some(f) => filter_matches(f, self.conf.key, ctx),
        }
    }
}

/// Per-request answers of `_meta.filter`, by conf key.
#[derive(Default)]
struct FilterMemo(Vec<(u64, bool)>);

fn filter_matches(f: &Expr, key: u64, ctx: &mut Ctx) -> bool {
    if let Some(&(_, hit)) = ctx
        .data::<FilterMemo>()
        .and_then(|m| m.0.iter().find(|(k, _)| *k == key))
    {
        return hit;
    }
    let hit = f.eval(&|name: &str| ctx.var(name));
    match ctx.data_mut::<FilterMemo>() {
        Some(m) => m.0.push((key, hit)),
        None => ctx.set_data(FilterMemo(vec![(key, hit)])),
    }
    hit
}

/// Plugins in run order: descending priority, ties by name; the same order in every phase.
#[derive(Clone, Default)]
pub struct Chain {
    pub entries: Vec<ChainEntry>,
    /// Union of the entries' phases, so a phase no plugin implements costs one bit test.
    pub phases: PhaseSet,
}

impl Chain {
    pub fn new(mut entries: Vec<ChainEntry>) -> Self {
        // APISIX's `_meta`: `disable: true` takes the plugin out of every phase, and
        // `priority` overrides the plugin's own for this conf.
        entries.retain(|e| e.conf.value.pointer("/_meta/disable") != Some(&Value::Bool(true)));
        let prio = |e: &ChainEntry| {
            e.conf
                .value
                .pointer("/_meta/priority")
                .and_then(Value::as_i64)
                .unwrap_or_else(|| e.plugin.priority())
        };
        entries.sort_by(|a, b| {
            prio(b)
                .cmp(&prio(a))
                .then_with(|| a.plugin.name().cmp(b.plugin.name()))
        });
        let phases = entries
            .iter()
            .fold(PhaseSet::empty(), |s, e| s.union(e.plugin.phases()));
        Chain { entries, phases }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn has(&self, phase: Phase) -> bool {
        self.phases.contains(phase)
    }

    pub fn get(&self, name: &str) -> Option<&ChainEntry> {
        self.entries.iter().find(|e| e.plugin.name() == name)
    }
}

/// The phases that see a response's headers.
pub const RESPONSE_PHASES: &[Phase] = &[
    Phase::HeaderFilter,
    Phase::BodyFilter,
    Phase::DelayedBodyFilter,
    Phase::Log,
];

/// The phases that see the response body.
pub const BODY_PHASES: &[Phase] = &[Phase::BodyFilter, Phase::DelayedBodyFilter];

/// Whether any of `chains` has a plugin in any of `phases` (a phase none has can be skipped
/// without making its future).
pub fn any_has(chains: &[&Chain], phases: &[Phase]) -> bool {
    chains.iter().any(|c| phases.iter().any(|&p| c.has(p)))
}

/// Whether a Lua plugin in the chains has a log phase: one that may read the request body
/// there (`ngx.req.get_body_data()`), so the proxy keeps a copy of a streamed body.
pub fn lua_logs(chains: &[&Chain]) -> bool {
    chains.iter().filter(|c| c.has(Phase::Log)).any(|c| {
        c.entries.iter().any(|e| {
            e.plugin.kind() == super::PluginKind::Lua && e.plugin.phases().contains(Phase::Log)
        })
    })
}

/// Runs a request phase (rewrite, access, before_proxy) over each chain in turn. The first
/// plugin that answers ends the phase and the request.
pub async fn run_request_phase(phase: Phase, chains: &[&Chain], ctx: &mut Ctx) -> PhaseResult {
    for chain in chains {
        if !chain.has(phase) {
            continue;
        }
        for e in &chain.entries {
            if !e.plugin.phases().contains(phase) || !e.runs(ctx) {
                continue;
            }
            let flow = match e.plugin.start_phase(phase, &e.conf, ctx) {
                PhaseCall::Ready(r) => r?,
                PhaseCall::Wait(f) => f.await?,
            };
            if let Flow::Respond(mut r) = flow {
                // APISIX's `_meta.error_response` replaces the body of any >= 400 answer.
                if r.status.as_u16() >= 400 {
                    if let Some(er) = e.conf.value.pointer("/_meta/error_response") {
                        *r = error_response(*r, er);
                    }
                }
                return Ok(Flow::Respond(r));
            }
        }
    }
    Ok(Flow::Continue)
}

/// The answer with its body replaced by `_meta.error_response` (a string as it is, anything
/// else as JSON with a trailing newline, as `core.response.exit` sends it).
fn error_response(mut r: LocalResponse, er: &Value) -> LocalResponse {
    r.take_raw();
    match er {
        Value::String(s) => {
            let mut headers = r.headers;
            headers.remove(http::header::CONTENT_LENGTH);
            headers.remove(http::header::CONTENT_TYPE);
            LocalResponse {
                status: r.status,
                headers,
                raw: None,
                body: crate::body::ResponseBody::Full(bytes::Bytes::from(s.clone())),
            }
        }
        other => {
            let mut j = LocalResponse::json(r.status, other);
            for (k, v) in r.headers.iter() {
                if k != http::header::CONTENT_LENGTH && k != http::header::CONTENT_TYPE {
                    j.headers.append(k.clone(), v.clone());
                }
            }
            j
        }
    }
}

/// Runs `header_filter` over each chain.
pub fn run_header_filter(
    chains: &[&Chain],
    ctx: &mut Ctx,
    head: &mut ResponseHead,
) -> Result<(), PluginError> {
    for chain in chains {
        if !chain.has(Phase::HeaderFilter) {
            continue;
        }
        for e in &chain.entries {
            if e.plugin.phases().contains(Phase::HeaderFilter) && e.runs(ctx) {
                e.plugin.header_filter(&e.conf, ctx, head)?;
            }
        }
    }
    Ok(())
}

/// Runs `body_filter` over each chain for one chunk, then `delayed_body_filter` over each
/// chain, as APISIX's body filter phase does.
pub fn run_body_filter(
    chains: &[&Chain],
    ctx: &mut Ctx,
    chunk: &mut BodyChunk,
) -> Result<(), PluginError> {
    for phase in [Phase::BodyFilter, Phase::DelayedBodyFilter] {
        for chain in chains {
            if !chain.has(phase) {
                continue;
            }
            for e in &chain.entries {
                if e.plugin.phases().contains(phase) && e.runs(ctx) {
                    if phase == Phase::BodyFilter {
                        e.plugin.body_filter(&e.conf, ctx, chunk)?;
                    } else {
                        e.plugin.delayed_body_filter(&e.conf, ctx, chunk)?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Runs `log` over each chain.
pub fn run_log(chains: &[&Chain], ctx: &mut Ctx) {
    for chain in chains {
        if !chain.has(Phase::Log) {
            continue;
        }
        for e in &chain.entries {
            if e.plugin.phases().contains(Phase::Log) && e.runs(ctx) {
                e.plugin.log(&e.conf, ctx);
            }
        }
    }
}
