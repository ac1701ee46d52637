//! Plugin chains: the plugins of one route (or of the global rules) in run order, and the
//! functions that run one phase over them.

use std::sync::Arc;

use super::{
    BodyChunk, Ctx, Flow, Phase, PhaseResult, PhaseSet, Plugin, PluginConf, PluginError,
    ResponseHead,
};

/// One enabled plugin with its conf.
#[derive(Clone)]
pub struct ChainEntry {
    pub plugin: Arc<dyn Plugin>,
    pub conf: Arc<PluginConf>,
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
        entries.sort_by(|a, b| {
            b.plugin
                .priority()
                .cmp(&a.plugin.priority())
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

/// Runs a request phase (rewrite, access, before_proxy) over each chain in turn. The first
/// plugin that answers ends the phase and the request.
pub async fn run_request_phase(phase: Phase, chains: &[&Chain], ctx: &mut Ctx) -> PhaseResult {
    for chain in chains {
        if !chain.has(phase) {
            continue;
        }
        for e in &chain.entries {
            if !e.plugin.phases().contains(phase) {
                continue;
            }
            let flow = match phase {
                Phase::Rewrite => e.plugin.rewrite(&e.conf, ctx).await?,
                Phase::Access => e.plugin.access(&e.conf, ctx).await?,
                Phase::BeforeProxy => e.plugin.before_proxy(&e.conf, ctx).await?,
                _ => unreachable!("{phase:?} is not a request phase"),
            };
            if let Flow::Respond(r) = flow {
                return Ok(Flow::Respond(r));
            }
        }
    }
    Ok(Flow::Continue)
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
            if e.plugin.phases().contains(Phase::HeaderFilter) {
                e.plugin.header_filter(&e.conf, ctx, head)?;
            }
        }
    }
    Ok(())
}

/// Runs `body_filter` over each chain for one chunk.
pub fn run_body_filter(
    chains: &[&Chain],
    ctx: &mut Ctx,
    chunk: &mut BodyChunk,
) -> Result<(), PluginError> {
    for chain in chains {
        if !chain.has(Phase::BodyFilter) {
            continue;
        }
        for e in &chain.entries {
            if e.plugin.phases().contains(Phase::BodyFilter) {
                e.plugin.body_filter(&e.conf, ctx, chunk)?;
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
            if e.plugin.phases().contains(Phase::Log) {
                e.plugin.log(&e.conf, ctx);
            }
        }
    }
}
