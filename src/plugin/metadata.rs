//! Plugin metadata: one node-wide conf per plugin (APISIX's `/apisix/plugin_metadata/NAME`),
//! which plugins read with `require("apisix.plugin").plugin_metadata(name)`.
//!
//! Each snapshot holds the metadata it was built with (checked against the plugin's
//! `metadata_schema`, defaults filled). Publishing a snapshot also publishes its metadata here,
//! process-wide, so every worker's VM (and code outside a request, such as timers) reads the
//! current one without a restart.

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use serde_json::Value;

/// One plugin's metadata.
#[derive(Debug)]
pub struct MetadataEntry {
    /// The conf with schema defaults filled, and `id` (the plugin name), as APISIX's `value`.
    pub value: Value,
    /// APISIX's `modifiedIndex`: changes whenever the value changes (plugins key caches on
    /// it). A hash of the plugin name and the value, below 10^14 so a Lua number holds it
    /// exactly and `tostring` prints it as an integer.
    pub modified_index: u64,
}

impl MetadataEntry {
    pub fn new(name: &str, value: Value) -> Self {
        let text = serde_json::to_string(&value).unwrap_or_default();
        // FNV-1a: stable across processes and builds, so an unchanged value keeps its index.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes().chain([0]).chain(text.bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        MetadataEntry {
            value,
            modified_index: 1 + h % 99_999_999_999_999,
        }
    }
}

/// Every plugin's metadata in one snapshot, by plugin name.
#[derive(Debug, Default)]
pub struct PluginMetadata {
    pub entries: BTreeMap<String, Arc<MetadataEntry>>,
}

static CURRENT: ArcSwapOption<PluginMetadata> = ArcSwapOption::const_empty();

/// Makes `m` the metadata every plugin sees (called when a snapshot is published).
pub fn publish(m: Arc<PluginMetadata>) {
    CURRENT.store(Some(m));
}

/// The published metadata of plugin `name`.
pub fn get(name: &str) -> Option<Arc<MetadataEntry>> {
    CURRENT.load().as_ref()?.entries.get(name).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn index_follows_the_value() {
        let a = MetadataEntry::new("p", json!({"id": "p", "k": 1}));
        let b = MetadataEntry::new("p", json!({"id": "p", "k": 1}));
        let c = MetadataEntry::new("p", json!({"id": "p", "k": 2}));
        assert_eq!(a.modified_index, b.modified_index);
        assert_ne!(a.modified_index, c.modified_index);
        assert!(a.modified_index < 100_000_000_000_000);
    }
}
