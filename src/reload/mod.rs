//! Building snapshots from the config file and the plugin files, and rebuilding them when
//! something changes.
//!
//! The same build serves start-up, `moongate check`, file-change reloads, the reload API and
//! Admin API writes: read everything, validate everything, and hand back a whole snapshot or
//! every problem found. [`Reloader`] serialises rebuilds and publishes a snapshot only when its
//! build succeeded; a failed build leaves the running snapshot in place and is kept for the
//! status endpoint.

mod watch;

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::config::{self, ConfigError, ConfigErrors, Document, NodeConfig};
use crate::snapshot::{self, Gateway, Registry, Snapshot};

pub use watch::{watch_dirs, watch_files, Burst};

/// The plugins a node offers: native ones plus the Lua files in `plugin_dirs`, narrowed to
/// the node's `plugins` list when it has one.
pub fn build_registry(node: &NodeConfig) -> Result<Registry, ConfigErrors> {
    let mut registry = Registry::new();
    for p in crate::plugins::native() {
        registry.insert(p);
    }
    crate::plugin::lua::add_to_registry(&mut registry, node)?;
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

/// Resources that live outside the config file (the Admin API's store). They are merged into
/// every build: see docs/architecture.md for which source wins.
pub trait ResourceOverlay: Send + Sync {
    /// Adds the overlay's resources to `doc` (already holding the file's), or says why not.
    fn apply(&self, doc: &mut Document) -> Result<(), ConfigErrors>;
}

/// What the status endpoint reports.
#[derive(Debug, Clone, Default)]
pub struct ReloadStatus {
    pub generation: u64,
    pub built_at: Option<SystemTime>,
    pub trigger: String,
    /// The files the current generation was built from.
    pub files: Vec<PathBuf>,
    pub last_failure: Option<Failure>,
    pub reloads: u64,
    pub failures: u64,
}

#[derive(Debug, Clone)]
pub struct Failure {
    pub at: SystemTime,
    pub trigger: String,
    pub errors: Vec<String>,
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl ReloadStatus {
    pub fn to_json(&self) -> Value {
        json!({
            "generation": self.generation,
            "built_at": self.built_at.map(unix),
            "trigger": self.trigger,
            "files": self.files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
            "reloads": self.reloads,
            "failures": self.failures,
            "last_failure": self.last_failure.as_ref().map(|f| json!({
                "at": unix(f.at),
                "trigger": f.trigger,
                "errors": f.errors,
            })),
        })
    }
}

/// Rebuilds and publishes snapshots, one build at a time.
pub struct Reloader {
    gw: Arc<Gateway>,
    config_path: PathBuf,
    /// Node settings the process started with: listeners and workers are not reloadable.
    started_node: NodeConfig,
    overlay: Mutex<Option<Arc<dyn ResourceOverlay>>>,
    state: Mutex<State>,
    /// The config file's text and the document parsed from it, kept once a
    /// [`Reloader::try_build`] (an Admin API or etcd write) has run: each such write builds
    /// twice (to validate, then to publish) while the file stays as it was, and with
    /// thousands of routes in the file parsing its YAML was most of a write's time. A node
    /// whose only source is its config file never keeps it, so it does not hold the file's
    /// resources twice in memory.
    parsed: Mutex<Option<(String, Document)>>,
}

struct State {
    status: ReloadStatus,
    /// Fingerprint of the inputs of the current generation: an unchanged set of files is not
    /// rebuilt (editors touch files without changing them).
    fingerprint: u64,
}

/// The outcome of a rebuild request.
#[derive(Debug)]
pub enum Rebuilt {
    /// A new generation is serving.
    Published(u64),
    /// Nothing changed; the current generation stays.
    Unchanged(u64),
}

impl Reloader {
    /// Wraps a gateway whose first snapshot was built from `config_path`.
    pub fn new(gw: Arc<Gateway>, config_path: PathBuf, started_node: NodeConfig) -> Self {
        let snap = gw.load_full();
        let files = input_files(&config_path, &snap.doc.node, &snap.registry);
        let fingerprint = fingerprint(&snap.doc, &snap.registry, &files);
        Reloader {
            gw,
            config_path,
            started_node,
            overlay: Mutex::new(None),
            parsed: Mutex::new(None),
            state: Mutex::new(State {
                status: ReloadStatus {
                    generation: snap.generation,
                    built_at: Some(snap.built_at),
                    trigger: "start".to_string(),
                    files,
                    ..Default::default()
                },
                fingerprint,
            }),
        }
    }

    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gw
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Sets the source of resources kept outside the config file.
    pub fn set_overlay(&self, overlay: Arc<dyn ResourceOverlay>) {
        *self.overlay.lock().unwrap_or_else(|e| e.into_inner()) = Some(overlay);
    }

    pub fn status(&self) -> ReloadStatus {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .status
            .clone()
    }

    /// Builds a snapshot from the files (and overlay) as they are now, without publishing it:
    /// what an Admin API write uses to validate before it stores anything. `edit` may change
    /// the document first.
    pub fn try_build(
        &self,
        edit: impl FnOnce(&mut Document) -> Result<(), ConfigErrors>,
    ) -> Result<Snapshot, ConfigErrors> {
        let mut doc = self.read_document(true)?;
        edit(&mut doc)?;
        build_from_document(doc, 0)
    }

    /// The files' document with the overlay applied; `keep` keeps the parsed file for the
    /// next builds.
    fn read_document(&self, keep: bool) -> Result<Document, ConfigErrors> {
        let mut doc = self.file_document(keep)?;
        let overlay = self
            .overlay
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(o) = overlay {
            o.apply(&mut doc)?;
        }
        Ok(doc)
    }

    /// The config file's document: a copy of the kept one when the file's text is the same,
    /// else parsed (and kept with `keep`, or when one was kept before).
    fn file_document(&self, keep: bool) -> Result<Document, ConfigErrors> {
        let text = config::read_text(&self.config_path)?;
        let mut parsed = self.parsed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((seen, doc)) = parsed.as_ref() {
            if *seen == text {
                return Ok(doc.clone());
            }
        }
        let doc = config::document_from_text(&self.config_path, &text)?;
        if keep || parsed.is_some() {
            *parsed = Some((text, doc.clone()));
        }
        Ok(doc)
    }

    /// Rebuilds from the files (and overlay) and publishes the result. `force` rebuilds even
    /// when no input file changed (the reload API, Admin API writes).
    pub fn rebuild(&self, trigger: &str, force: bool) -> Result<Rebuilt, ConfigErrors> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let result = self.read_document(false).and_then(|doc| {
            self.warn_unreloadable(&doc.node);
            let registry = build_registry(&doc.node)?;
            let files = input_files(&self.config_path, &doc.node, &registry);
            let fp = fingerprint(&doc, &registry, &files);
            if !force && fp == state.fingerprint {
                return Ok(None);
            }
            let generation = self.gw.next_generation();
            let snap = snapshot::build(Arc::new(doc), Arc::new(registry), generation)?;
            Ok(Some((snap, files, fp)))
        });
        match result {
            Ok(None) => Ok(Rebuilt::Unchanged(state.status.generation)),
            Ok(Some((snap, files, fp))) => {
                let generation = snap.generation;
                let built_at = snap.built_at;
                let old = self.gw.publish(snap);
                tracing::info!(
                    generation,
                    previous = old.generation,
                    trigger,
                    "new configuration generation is serving"
                );
                state.fingerprint = fp;
                state.status.generation = generation;
                state.status.built_at = Some(built_at);
                state.status.trigger = trigger.to_string();
                state.status.files = files;
                state.status.reloads += 1;
                state.status.last_failure = None;
                Ok(Rebuilt::Published(generation))
            }
            Err(errors) => {
                for e in &errors.0 {
                    tracing::error!(
                        trigger,
                        "reload refused, generation {} keeps serving: {e}",
                        state.status.generation
                    );
                }
                self.gw.record_failure(trigger, &errors);
                state.status.failures += 1;
                state.status.last_failure = Some(Failure {
                    at: SystemTime::now(),
                    trigger: trigger.to_string(),
                    errors: errors.0.iter().map(|e| e.to_string()).collect(),
                });
                Err(errors)
            }
        }
    }

    /// Whether the files on disk differ from what the serving generation was built from: the
    /// config text, each Lua plugin's source, the set of input files. Reads files only (no
    /// build), for the check once the watchers are armed.
    pub fn disk_differs(&self) -> bool {
        let snap = self.gw.load_full();
        let built_files = self.status().files;
        let config_differs = std::fs::read_to_string(&self.config_path)
            .map(|t| config::text_hash(&t) != snap.doc.source_hash)
            .unwrap_or(true);
        let plugin_differs = snap.registry.sources.iter().any(|(name, path)| {
            let digest = snap.registry.get(name).and_then(|p| p.source_digest());
            let on_disk = std::fs::read_to_string(path)
                .ok()
                .map(|t| config::text_hash(&t));
            digest.is_some() && digest != on_disk
        });
        config_differs
            || plugin_differs
            || input_files(&self.config_path, &snap.doc.node, &snap.registry) != built_files
    }

    fn warn_unreloadable(&self, node: &NodeConfig) {
        let old = &self.started_node;
        for (name, changed) in [
            ("listen", node.listen != old.listen),
            ("workers", node.workers != old.workers),
            ("admin", node.admin != old.admin),
            ("proxy", node.proxy != old.proxy),
            ("lua", node.lua != old.lua),
            ("data_dir", node.data_dir != old.data_dir),
            (
                "config_provider",
                node.config_provider != old.config_provider,
            ),
            ("etcd", node.etcd != old.etcd),
            ("access_log", node.access_log != old.access_log),
            ("status", node.status != old.status),
            ("nginx_config", node.nginx_config != old.nginx_config),
            ("dns_resolver", node.dns_resolver != old.dns_resolver),
            (
                "resolver_timeout",
                node.resolver_timeout != old.resolver_timeout,
            ),
            (
                "dns_resolver_valid",
                node.dns_resolver_valid != old.dns_resolver_valid,
            ),
            (
                "enable_resolv_search_opt",
                node.enable_resolv_search_opt != old.enable_resolv_search_opt,
            ),
            (
                "ssl.listen",
                node.ssl.as_ref().map(|s| s.listeners()) != old.ssl.as_ref().map(|s| s.listeners()),
            ),
        ] {
            if changed {
                tracing::warn!(
                    setting = name,
                    "node setting changed in the config file; it takes effect at the next restart"
                );
            }
        }
    }
}

/// The files a build reads: the config file and every `.lua` file in the plugin folders.
fn input_files(config_path: &Path, node: &NodeConfig, registry: &Registry) -> Vec<PathBuf> {
    let mut files = vec![config_path.to_path_buf()];
    files.extend(registry.sources.values().cloned());
    for dir in &node.plugin_dirs {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "lua") && !files.contains(&p) {
                    files.push(p);
                }
            }
        }
    }
    files.sort();
    files
}

/// What a build was made from: the config text it parsed, the source of each plugin loaded
/// from a file, and (read now) the other `.lua` files in the plugin folders, which plugins may
/// `require`. Hashing what the build used rather than the files on disk afterwards means a
/// save that lands while a build runs is never taken for the version that serves.
fn fingerprint(doc: &Document, registry: &Registry, files: &[PathBuf]) -> u64 {
    let mut h = DefaultHasher::new();
    doc.path.hash(&mut h);
    doc.source_hash.hash(&mut h);
    for p in registry.iter() {
        if let Some(d) = p.source_digest() {
            (p.name(), d).hash(&mut h);
        }
    }
    let sources: Vec<&PathBuf> = registry.sources.values().collect();
    for f in files {
        f.hash(&mut h);
        if Some(f) == doc.path.as_ref() || sources.contains(&f) {
            continue;
        }
        match std::fs::read(f) {
            Ok(bytes) => bytes.hash(&mut h),
            Err(_) => 0u8.hash(&mut h),
        }
    }
    h.finish()
}

/// A build error about a file, as `file:line: message` when the line is known.
pub fn file_error(path: &Path, message: impl Into<String>) -> ConfigError {
    ConfigError::new(path.display().to_string(), message)
}
