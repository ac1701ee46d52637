//! Start-up: everything `moongate run` checks before it serves, and all that `moongate check`
//! does, so the two refuse exactly the same configs with the same lines.
//!
//! [`prepare`] reads the config file, checks the node settings (the Admin API key among them),
//! loads the plugins and builds the first snapshot. It reports every problem it can find in
//! one pass: a resource or node setting that does not parse is reported and left out, and the
//! rest is still built, so a typo in one route does not hide an unknown plugin in another.
//! Problems that only follow from something already reported (a reference to an upstream
//! that did not parse, a route naming a plugin whose file did not load) are not reported
//! again. Problems come in file order, each with its path as the file has it
//! (`routes[2].plugins.x`), then those of the plugin files.
//!
//! What `run` does after this (bind the listeners, open the Admin API's store or etcd) needs
//! the machine as it is at that moment, so `check` stops here; docs/configuration.md says so.

use std::path::Path;
use std::sync::Arc;

use crate::config::{self, ConfigError, ConfigErrors, Document, NodeConfig, Partial};
use crate::snapshot::{self, Registry, Snapshot};

/// Reads the config file at `path` and builds the first snapshot from it (generation 1), or
/// returns every problem found, in file order.
pub fn prepare(path: &Path) -> Result<Snapshot, ConfigErrors> {
    build(read(path)?)
}

/// Reads and parses the config file as far as it parses: an `Err` only for a file that cannot
/// be read or is not YAML/JSON. (`run` reads the log level from it before [`build`] logs.)
pub fn read(path: &Path) -> Result<Partial, ConfigErrors> {
    config::load_partial(path)
}

/// Checks and builds what [`read`] gave: the first snapshot, or every problem found (those of
/// the parse among them), in file order.
pub fn build(partial: Partial) -> Result<Snapshot, ConfigErrors> {
    // First: every TLS client config made from here on (etcd's, upstreams', plugins') takes
    // its roots from it. A bad setting is reported by `node_problems`.
    let _ = crate::tls::trust::init(&partial.doc.node);
    let mut found = Found::default();
    for e in &partial.errors {
        found.config(e.clone());
    }
    for e in node_problems(&partial.doc.node) {
        found.config(e);
    }
    // Without the plugin folders nothing can be said about the plugins the resources name.
    if partial.unparsed_node.iter().any(|k| k == "plugin_dirs") {
        return Err(found.into_errors(&partial));
    }
    // Plugins ask at load whether metrics are served (`exporter.get_prometheus()`), in
    // `check` as in `run`.
    if let Ok(s) = crate::metrics::Settings::from_node(&partial.doc.node) {
        crate::metrics::init(s);
    }
    let mut registry = Registry::new();
    for p in crate::plugins::native() {
        registry.insert(p);
    }
    for e in crate::plugin::lua::add_what_loads(&mut registry, &partial.doc.node) {
        if e.path.is_empty() {
            found.plugin_file(e);
        } else {
            found.config(e);
        }
    }
    if let Some(enabled) = &partial.doc.node.plugins {
        if let Err(errors) = registry.retain_enabled(enabled) {
            for e in errors.0 {
                found.config(e);
            }
        }
    }
    let doc = Arc::new(partial.doc.clone());
    // `partial` stays for the paths and the unparsed ids.
    match snapshot::build(doc.clone(), Arc::new(registry), 1) {
        Ok(snap) if found.is_empty() => Ok(snap),
        Ok(_) => Err(found.into_errors(&partial)),
        Err(errors) => {
            for e in errors.0 {
                if !follows_from_unparsed(&partial, &doc, &e.path) {
                    found.config(ConfigError::new(partial.text_path(&e.path), e.message));
                }
            }
            Err(found.into_errors(&partial))
        }
    }
}

/// The node settings `run` refuses beyond their types: the Admin API key, the `etcd`
/// section (what can be checked without contacting etcd) and the metrics settings
/// (`plugin_attr.prometheus`). The supervisor checks them before it binds anything.
pub fn node_problems(node: &NodeConfig) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    if let Some(admin) = &node.admin {
        let env = std::env::var(crate::admin::KEY_ENV).ok();
        if let Err(e) = crate::admin::resolve_key(admin, env) {
            let why = match e {
                crate::admin::AdminError::Key(why) => why,
                other => other.to_string(),
            };
            errors.push(ConfigError::new("admin.key", why));
        }
    }
    if node.config_provider == config::ConfigProvider::Etcd {
        match &node.etcd {
            None => errors.push(ConfigError::new(
                "config_provider",
                "is etcd, but the config file has no `etcd` section",
            )),
            Some(etcd) => {
                if let Err(e) = crate::store::etcd::check_conf(etcd) {
                    errors.push(ConfigError::new("etcd", e.0));
                }
            }
        }
    }
    if let Err(e) = crate::tls::trust::check(node) {
        errors.push(e);
    }
    if let Err(e) = crate::accesslog::Mode::from_node(node) {
        errors.push(e);
    }
    if let Err(e) = crate::errorlog::Settings::from_node(node) {
        errors.push(e);
    }
    if let Err(e) = crate::metrics::Settings::from_node(node) {
        errors.push(e);
    }
    if let Some(v) = node.plugin_attr.get("opentelemetry") {
        if let Err(e) = crate::otel::Settings::from_value(v, "plugin_attr.opentelemetry") {
            errors.push(e);
        }
    }
    errors
}

/// Whether a build problem at `path` (a path into `doc`) is a reference to a resource that
/// did not parse, which is reported already.
fn follows_from_unparsed(partial: &Partial, doc: &Document, path: &str) -> bool {
    let Some((list, rest)) = path.split_once('[') else {
        return false;
    };
    let Some((index, field)) = rest.split_once(']') else {
        return false;
    };
    let Ok(i) = index.parse::<usize>() else {
        return false;
    };
    let names = |list: &str, id: Option<&str>| id.is_some_and(|id| partial.unparsed(list, id));
    match (list, field) {
        ("routes", ".upstream_id") => names(
            "upstreams",
            doc.routes
                .get(i)
                .and_then(|r| r.upstream_id.as_ref())
                .map(|id| id.0.as_str()),
        ),
        ("routes", ".service_id") => names(
            "services",
            doc.routes
                .get(i)
                .and_then(|r| r.service_id.as_ref())
                .map(|id| id.0.as_str()),
        ),
        ("services", ".upstream_id") => names(
            "upstreams",
            doc.services
                .get(i)
                .and_then(|s| s.upstream_id.as_ref())
                .map(|id| id.0.as_str()),
        ),
        ("consumers", ".group_id") => names(
            "consumer_groups",
            doc.consumers
                .get(i)
                .and_then(|c| c.group_id.as_ref())
                .map(|id| id.0.as_str()),
        ),
        ("credentials", ".id") => doc.credentials.get(i).is_some_and(|cr| {
            let user = cr.split_id().0;
            partial.unparsed("consumers", user)
                && !doc.consumers.iter().any(|c| c.username.0 == user)
        }),
        _ => false,
    }
}

/// The problems found so far, each with where it sorts.
#[derive(Default)]
struct Found(Vec<(bool, ConfigError)>);

impl Found {
    /// A problem in the config file (its path as the file has it).
    fn config(&mut self, e: ConfigError) {
        self.0.push((false, e));
    }

    /// A problem in a plugin file (`file:line: message`).
    fn plugin_file(&mut self, e: ConfigError) {
        self.0.push((true, e));
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The problems in file order: the config file's by the place of their top-level key and
    /// list index, then the plugin files'; otherwise in the order they were found.
    fn into_errors(self, partial: &Partial) -> ConfigErrors {
        let mut all = self.0;
        all.sort_by_key(|(other_file, e)| {
            let key = config::top_key(&e.path);
            let at = partial.keys.iter().position(|k| k == key);
            let index = e.path[key.len()..]
                .strip_prefix('[')
                .and_then(|r| r.split_once(']'))
                .and_then(|(i, _)| i.parse::<usize>().ok());
            (*other_file, at.unwrap_or(usize::MAX), index)
        });
        ConfigErrors(all.into_iter().map(|(_, e)| e).collect())
    }
}
