//! APISIX's consumer merge: once an auth plugin identified a consumer, the consumer's plugins
//! (and its consumer group's) join the route's, as `plugin.merge_consumer_route` does.

use std::sync::Arc;

use crate::plugin::chain::{Chain, ChainEntry};
use crate::plugin::Ctx;
use crate::snapshot::RouteEntry;

/// Runs after the rewrite phase when `ctx.consumer` is set. Composes `conf_type`, `conf_id`
/// and `conf_version` as APISIX does (`route&consumer`, `ROUTE&USERNAME`, ...; with a group,
/// `&consumer_group` and its id), and, when the consumer or its group has plugins other than
/// auth ones, puts the merged set in `ctx.plugins`: the group's confs replace the route's by
/// name, the consumer's replace both, ordered by priority. Returns the plugins that came only
/// from the consumer or group, whose rewrite phase has not run yet (APISIX's
/// `rewrite_in_consumer`).
pub fn merge(ctx: &mut Ctx, route: &RouteEntry) -> Option<Chain> {
    let consumer = ctx.consumer.clone()?;
    let group = consumer.group.as_ref();
    let generation = route.consumers.generation;
    ctx.conf_type = match (ctx.conf_type, group.is_some()) {
        ("route", false) => "route&consumer",
        ("route", true) => "route&consumer&consumer_group",
        ("route&service", false) => "route&service&consumer",
        ("route&service", true) => "route&service&consumer&consumer_group",
        (other, _) => other,
    };
    ctx.conf_id = format!("{}&{}", ctx.conf_id, consumer.username).into();
    ctx.conf_version = format!("{}&{generation}", ctx.conf_version).into();
    if let Some(g) = group {
        ctx.conf_id = format!("{}&{}", ctx.conf_id, g.id).into();
        ctx.conf_version = format!("{}&{generation}", ctx.conf_version).into();
    }
    let group_entries = group.map(|g| g.entries.as_slice()).unwrap_or(&[]);
    if consumer.entries.is_empty() && group_entries.is_empty() {
        return None;
    }
    // A handful of plugins each: linear scans, no per-request sets.
    let own = |name: &str| consumer.entries.iter().any(|e| e.plugin.name() == name);
    let from_group =
        |name: &str| !own(name) && group_entries.iter().any(|e| e.plugin.name() == name);
    let mut merged: Vec<ChainEntry> = Vec::with_capacity(
        route.chain.entries.len() + group_entries.len() + consumer.entries.len(),
    );
    merged.extend(
        route
            .chain
            .entries
            .iter()
            .filter(|e| !own(e.plugin.name()) && !from_group(e.plugin.name()))
            .cloned(),
    );
    let mut added: Vec<ChainEntry> = Vec::new();
    for e in group_entries
        .iter()
        .filter(|e| !own(e.plugin.name()))
        .chain(consumer.entries.iter())
    {
        if route.chain.get(e.plugin.name()).is_none() {
            added.push(e.clone());
        }
        merged.push(e.clone());
    }
    ctx.plugins = Some(Arc::new(Chain::new(merged)));
    Some(Chain::new(added))
}
