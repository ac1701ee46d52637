//! Building snapshots from the config file and the plugin files.
//!
//! The same build serves start-up, `moongate check`, file-change reloads and Admin API writes:
//! read everything, validate everything, and hand back a whole snapshot or every problem found.

use std::path::Path;
use std::sync::Arc;

use crate::config::{self, ConfigErrors, Document, NodeConfig};
use crate::snapshot::{self, Registry, Snapshot};

/// The plugins a node offers: native ones plus the Lua files in `plugin_dirs`, narrowed to
/// the node's `plugins` list when it has one.
pub fn build_registry(node: &NodeConfig) -> Result<Registry, ConfigErrors> {
    let mut registry = Registry::new();
    for p in crate::plugins::native() {
        registry.insert(p);
    }
    if let Some(enabled) = &node.plugins {
        registry.retain_enabled(enabled)?;
    }
    Ok(registry)
}

/// Reads the config file and builds a snapshot from it.
pub fn build_from_file(path: &Path, generation: u64) -> Result<Snapshot, ConfigErrors> {
    let doc = config::load_file(path)?;
    build_from_document(doc, generation)
}

/// Builds a snapshot from a parsed document.
pub fn build_from_document(doc: Document, generation: u64) -> Result<Snapshot, ConfigErrors> {
    let registry = build_registry(&doc.node)?;
    snapshot::build(Arc::new(doc), Arc::new(registry), generation)
}
