//! The snapshot: everything a request reads, built whole and validated off the request path,
//! then published atomically.
//!
//! A [`Snapshot`] is immutable. [`Gateway`] holds the current one behind an `ArcSwap`; a request
//! loads it once and keeps that `Arc` until it is done, so a swap never changes a request midway.
//! Building checks every cross-reference and every plugin conf; any problem fails the whole
//! build with a list of [`ConfigError`]s and nothing is swapped.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use serde_json::{Map, Value};

use crate::balancer::Balancer;
use crate::config::{
    wire, ConfigError, ConfigErrors, Document, PassHost, Route, Timeout, Upstream,
};
use crate::health::UpstreamHealth;
use crate::plugin::chain::{Chain, ChainEntry};
use crate::plugin::metadata::{MetadataEntry, PluginMetadata};
use crate::plugin::{ConfScope, Plugin, PluginConf};
use crate::proxy::client::{host_port, Target};
use crate::router::{RouteSpec, Router};
use crate::tls::{Alpn, CertTable, ClientIdentity, Keyring};

/// The plugins available to a snapshot, by name.
#[derive(Clone, Default)]
pub struct Registry {
    plugins: BTreeMap<String, Arc<dyn Plugin>>,
    /// Where each Lua plugin came from (for status and error messages).
    pub sources: BTreeMap<String, PathBuf>,
    /// The folders Lua plugins were looked for in (`plugin_dirs`), for the message about an
    /// unknown plugin.
    pub dirs: Vec<PathBuf>,
    /// Plugins whose file did not load: that file's error says what is wrong, so a conf
    /// naming one is not reported as an unknown plugin too.
    pub broken: BTreeSet<String>,
    /// Plugins left out by the node's `plugins` list, with their file (None: native).
    pub not_enabled: BTreeMap<String, Option<PathBuf>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, plugin: Arc<dyn Plugin>) {
        self.plugins.insert(plugin.name().to_string(), plugin);
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Plugin>> {
        self.plugins.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.plugins.keys().map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Plugin>> {
        self.plugins.values()
    }

    /// Keeps only the named plugins (the node's `plugins` list); unknown names are errors
    /// (the registry is narrowed either way).
    pub fn retain_enabled(&mut self, enabled: &[String]) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        for (i, name) in enabled.iter().enumerate() {
            if !self.plugins.contains_key(name) {
                if let Some(why) = self.unknown_plugin(name) {
                    errors.push(ConfigError::new(format!("plugins[{i}]"), why));
                }
            }
        }
        let keep: HashSet<&String> = enabled.iter().collect();
        let left_out: Vec<String> = self
            .plugins
            .keys()
            .filter(|k| !keep.contains(k))
            .cloned()
            .collect();
        for name in left_out {
            self.plugins.remove(&name);
            let file = self.sources.remove(&name);
            self.not_enabled.insert(name, file);
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// What to say about a conf naming `name`, a plugin this registry does not have; None when
    /// its file failed to load (that error is reported with the file).
    pub fn unknown_plugin(&self, name: &str) -> Option<String> {
        if self.broken.contains(name) {
            return None;
        }
        Some(match self.not_enabled.get(name) {
            Some(Some(file)) => format!(
                "unknown plugin [{name}]: {} is not enabled: add {name} to the node's plugins list",
                file.display()
            ),
            Some(None) => format!(
                "unknown plugin [{name}]: the native plugin is not enabled: add {name} to the node's plugins list"
            ),
            None => {
                let dirs = if self.dirs.is_empty() {
                    "none".to_string()
                } else {
                    self.dirs
                        .iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                format!(
                    "unknown plugin [{name}]: it is not a native plugin and there is no {name}.lua \
                     or {name}/init.lua in plugin_dirs ({dirs}); APISIX's bundled plugin files run \
                     unmodified: `moongate plugins import /path/to/apisix {name} --to DIR` stages \
                     one with what it requires (see \"APISIX's bundled Lua plugins, unmodified\" \
                     in docs/compatibility.md)"
                )
            }
        })
    }
}

/// An upstream ready to serve: its config and its balancer state.
pub struct UpstreamEntry {
    pub id: Option<String>,
    pub config: Upstream,
    /// Per node (same order as `config.nodes`): where to connect and its `host:port`, made once
    /// here rather than on every request.
    pub targets: Vec<NodeTarget>,
    /// Node selection (`src/balancer/`): built once here, shared by all workers.
    pub balancer: Balancer,
    /// Node health, when the upstream has `checks` (shared with its checker and every worker).
    pub health: Option<Arc<UpstreamHealth>>,
}

/// One node of an upstream, ready to connect to.
pub struct NodeTarget {
    pub target: Target,
    /// `host:port` (IPv6 in brackets), for `ctx.var.upstream_addr` and logs.
    pub addr: Arc<str>,
}

impl UpstreamEntry {
    /// `key`: the owning resource in APISIX's layout (`/apisix/upstreams/1`, or the route or
    /// service of an inline upstream), which keys its health and load state. `client_cert`:
    /// what its `tls` resolved to ([`crate::tls::upstream_identity`]), presented by https and
    /// grpcs connections to its nodes and by its https health checks.
    pub fn new(
        id: Option<String>,
        config: Upstream,
        key: &str,
        client_cert: Option<Arc<ClientIdentity>>,
    ) -> Self {
        let health = crate::health::registry().state_for(key, &config, client_cert.as_ref());
        let tls = config.scheme.is_tls();
        let verify = config.tls.as_ref().is_some_and(|t| t.verify);
        // Only TLS connections present it (APISIX ignores it for http and grpc).
        let client_cert = client_cert.filter(|_| tls);
        if let Some(c) = &client_cert {
            // Made now, off the request path, rather than by the first connection.
            let alpn = if config.scheme.is_http2() {
                Alpn::Http2
            } else {
                Alpn::Http1
            };
            c.config(verify, alpn);
        }
        let targets: Vec<NodeTarget> = config
            .nodes
            .0
            .iter()
            .map(|n| {
                let port = n.port.unwrap_or(config.scheme.default_port());
                NodeTarget {
                    target: Target {
                        tls,
                        host: n.host.as_str().into(),
                        port,
                        verify,
                        client_cert: client_cert.clone(),
                    },
                    addr: host_port(&n.host, port).into(),
                }
            })
            .collect();
        let addrs: Vec<&str> = targets.iter().map(|t| &*t.addr).collect();
        // Nodes by host name: kept resolved from now on, skipped while they do not resolve.
        let names = targets
            .iter()
            .map(|t| crate::dns::node_name(&t.target.host, key, &t.addr))
            .collect();
        let balancer = Balancer::new(&config, key, &addrs).with_names(names);
        UpstreamEntry {
            id,
            config,
            targets,
            balancer,
            health,
        }
    }

    /// How many tries a request may make: the first and its retries (APISIX: `retries`,
    /// default nodes - 1), at most the nodes with a weight, except that a single node may be
    /// tried again as often as `retries` says (as APISIX does).
    pub fn attempts(&self) -> usize {
        let live = self.balancer.live();
        let retries = match self.config.retries {
            Some(r) => r as usize,
            None => live.saturating_sub(1),
        };
        if live <= 1 {
            retries + 1
        } else {
            (retries + 1).min(live)
        }
    }
}

/// What an upstream's `tls.client_cert_id` and inline `tls.client_key` are resolved with: the
/// snapshot's certificates and the node's keyring.
pub struct UpstreamCerts<'a> {
    pub table: &'a CertTable,
    pub keyring: &'a Keyring,
}

impl UpstreamCerts<'_> {
    /// The upstream at `path` ready to serve, its client certificate resolved. A bad
    /// certificate (or a `client_cert_id` naming no client certificate) is an error at its
    /// field; the entry is still made (without one), so what refers to the upstream does not
    /// report it missing as well.
    pub fn entry(
        &self,
        path: &str,
        id: Option<String>,
        u: &Upstream,
        key: &str,
        errors: &mut Vec<ConfigError>,
    ) -> Arc<UpstreamEntry> {
        let client_cert =
            match crate::tls::upstream_identity(path, u.tls.as_ref(), self.table, self.keyring) {
                Ok(c) => c,
                Err(e) => {
                    errors.push(e);
                    None
                }
            };
        Arc::new(UpstreamEntry::new(id, u.clone(), key, client_cert))
    }
}

/// A route ready to serve.
pub struct RouteEntry {
    pub id: String,
    pub name: Option<String>,
    pub service_id: Option<String>,
    /// The name of the route's service, if it has one (metrics' `prefer_name`).
    pub service_name: Option<String>,
    /// The host patterns the route matches (its own or its service's), lower-cased; empty
    /// for any host. Metrics name the one that matched (`matched_host`).
    pub hosts: Vec<String>,
    /// The route's plugins, with its service's merged in (the route's conf wins by name).
    pub chain: Chain,
    pub upstream: Option<Arc<UpstreamEntry>>,
    /// The route's own `timeout`; when set it replaces the upstream's (as in APISIX).
    pub timeout: Option<Timeout>,
    /// `enable_websocket` in effect (the route's, else its service's): an upgrade to
    /// WebSocket is forwarded and tunnelled.
    pub enable_websocket: bool,
    pub conf_type: &'static str,
    pub conf_id: Arc<str>,
    pub conf_version: Arc<str>,
    /// The snapshot's consumers (shared by every route of it), for auth plugins.
    pub consumers: Arc<Consumers>,
    /// The snapshot's upstreams by id (shared by every route of it), for a plugin that picks
    /// one (`apisix.upstream.get_by_id`).
    pub upstreams: Arc<HashMap<String, Arc<UpstreamEntry>>>,
}

/// One consumer as auth plugins see it: its fields and its plugin confs, each checked with the
/// plugin's consumer schema (defaults filled in).
pub struct ConsumerEntry {
    pub username: String,
    pub desc: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub group_id: Option<String>,
    pub plugins: Map<String, Value>,
    /// Its plugins other than auth ones, compiled: what it merges into a route's plugins once
    /// an auth plugin identified it (APISIX's `merge_consumer_route`).
    pub entries: Vec<ChainEntry>,
    /// The consumer group `group_id` names.
    pub group: Option<Arc<GroupEntry>>,
}

/// A consumer group: plugins merged for each of its consumers, below the consumer's own.
pub struct GroupEntry {
    pub id: String,
    pub plugins: Map<String, Value>,
    pub entries: Vec<ChainEntry>,
}

/// One way to be recognised by an auth plugin: a consumer's own conf of the plugin, or one of
/// its credentials (`credential_id` set).
pub struct AuthEntry {
    pub consumer: Arc<ConsumerEntry>,
    pub credential_id: Option<String>,
    /// The plugin's conf (the credential).
    pub conf: Value,
}

/// A snapshot's consumers, indexed by the auth plugins they configure (in their own plugins or
/// in credentials), so an auth plugin asks for its own consumers only (APISIX's
/// `consumer.plugin(name)`). Lua keys them on the credential.
#[derive(Default)]
pub struct Consumers {
    /// The snapshot generation they belong to: Lua caches its indexes per generation.
    pub generation: u64,
    pub all: Vec<Arc<ConsumerEntry>>,
    pub by_name: HashMap<String, Arc<ConsumerEntry>>,
    pub by_plugin: HashMap<String, Vec<AuthEntry>>,
    pub groups: HashMap<String, Arc<GroupEntry>>,
}

impl Consumers {
    /// The consumer named `username`.
    pub fn get(&self, username: &str) -> Option<&Arc<ConsumerEntry>> {
        self.by_name.get(username)
    }
}

/// Everything a request reads.
pub struct Snapshot {
    pub generation: u64,
    pub built_at: SystemTime,
    pub router: Router,
    /// Enabled routes, in the order given to the router.
    pub routes: Vec<Arc<RouteEntry>>,
    /// The global rules' plugins merged into one chain.
    pub global: Chain,
    pub registry: Arc<Registry>,
    pub consumers: Arc<Consumers>,
    /// Plugin metadata by plugin name (published process-wide with the snapshot).
    pub plugin_metadata: Arc<PluginMetadata>,
    /// Certificates by server name (`ssls`), read by each TLS handshake.
    pub tls: Arc<crate::tls::CertTable>,
    /// The resources it was built from.
    pub doc: Arc<Document>,
    /// The health state of every upstream with `checks` (their checkers run while this
    /// snapshot is the published one).
    pub health: Vec<Arc<UpstreamHealth>>,
    /// Upstreams by id, for a plugin that picks one per request (`ctx.upstream_id`).
    pub upstreams: Arc<HashMap<String, Arc<UpstreamEntry>>>,
}

impl Snapshot {
    /// An empty snapshot (no routes): what a node serves before its first successful build.
    pub fn empty() -> Self {
        Snapshot {
            generation: 0,
            built_at: SystemTime::now(),
            router: Router::new(&[]).expect("an empty router always builds"),
            routes: Vec::new(),
            global: Chain::default(),
            registry: Arc::new(Registry::new()),
            consumers: Arc::new(Consumers::default()),
            plugin_metadata: Arc::new(PluginMetadata::default()),
            tls: Arc::new(crate::tls::CertTable::default()),
            doc: Arc::new(Document::default()),
            health: Vec::new(),
            upstreams: Arc::new(HashMap::new()),
        }
    }
}

/// Builds a snapshot from resources and a plugin registry, checking everything.
pub fn build(
    doc: Arc<Document>,
    registry: Arc<Registry>,
    generation: u64,
) -> Result<Snapshot, ConfigErrors> {
    let mut errors = Vec::new();
    let conf_version: Arc<str> = generation.to_string().into();

    // Certificates first: upstreams present `type: client` ones (`tls.client_cert_id`).
    let keyring = doc.node.keyring();
    let tls = Arc::new(crate::tls::CertTable::build(
        &doc.ssls,
        doc.node.ssl.as_ref(),
        &keyring,
        &mut errors,
    ));
    let certs = UpstreamCerts {
        table: &tls,
        keyring: &keyring,
    };

    // Upstreams by id.
    let mut upstreams: HashMap<String, Arc<UpstreamEntry>> = HashMap::new();
    for (i, u) in doc.upstreams.iter().enumerate() {
        let path = format!("upstreams[{i}]");
        let Some(id) = &u.id else {
            errors.push(ConfigError::new(format!("{path}.id"), "an id is required"));
            continue;
        };
        if let Err(e) = check_upstream(&path, u) {
            errors.push(e);
            continue;
        }
        if upstreams
            .insert(
                id.0.clone(),
                certs.entry(
                    &path,
                    Some(id.0.clone()),
                    u,
                    &format!("/apisix/upstreams/{id}"),
                    &mut errors,
                ),
            )
            .is_some()
        {
            errors.push(ConfigError::new(
                format!("{path}.id"),
                format!("duplicate id \"{id}\""),
            ));
        }
    }
    let upstreams = Arc::new(upstreams);

    // Services by id, with their plugin confs checked once here (whether or not a route uses
    // the service) and shared by the routes that name it.
    struct ServiceEntry {
        plugins: Vec<ChainEntry>,
        upstream: Option<Arc<UpstreamEntry>>,
        hosts: Option<Vec<String>>,
        enable_websocket: Option<bool>,
        name: Option<String>,
    }
    let mut services: HashMap<String, ServiceEntry> = HashMap::new();
    for (i, s) in doc.services.iter().enumerate() {
        let path = format!("services[{i}]");
        let Some(id) = &s.id else {
            errors.push(ConfigError::new(format!("{path}.id"), "an id is required"));
            continue;
        };
        let upstream = resolve_upstream(
            &certs,
            &path,
            &format!("/apisix/services/{id}"),
            s.upstream.as_ref(),
            s.upstream_id.as_ref().map(|i| i.0.as_str()),
            &upstreams,
            &mut errors,
        );
        let plugins = s
            .plugins
            .iter()
            .filter_map(|(name, conf)| {
                make_entry(
                    &registry,
                    &format!("{path}.plugins"),
                    &format!("/apisix/services/{id}"),
                    name,
                    conf,
                    &mut errors,
                )
            })
            .collect();
        if services
            .insert(
                id.0.clone(),
                ServiceEntry {
                    plugins,
                    upstream,
                    hosts: s
                        .hosts
                        .as_ref()
                        .map(|hs| route_hosts(&format!("{path}.hosts"), hs, true, &mut errors)),
                    enable_websocket: s.enable_websocket,
                    name: s.name.clone(),
                },
            )
            .is_some()
        {
            errors.push(ConfigError::new(
                format!("{path}.id"),
                format!("duplicate id \"{id}\""),
            ));
        }
    }

    // Global rules: one merged chain. A plugin named by two rules is an error (APISIX drops it
    // with an error log; refusing the config is the safer choice).
    let mut global_entries = Vec::new();
    let mut global_seen: HashMap<String, usize> = HashMap::new();
    let mut global_ids = HashSet::new();
    for (i, g) in doc.global_rules.iter().enumerate() {
        let path = format!("global_rules[{i}]");
        match &g.id {
            None => errors.push(ConfigError::new(format!("{path}.id"), "an id is required")),
            Some(id) if !global_ids.insert(id.0.clone()) => errors.push(ConfigError::new(
                format!("{path}.id"),
                format!("duplicate id \"{id}\""),
            )),
            Some(_) => {}
        }
        for (name, conf) in &g.plugins {
            if let Some(other) = global_seen.insert(name.clone(), i) {
                errors.push(ConfigError::new(
                    format!("{path}.plugins.{name}"),
                    format!("plugin \"{name}\" is already enabled by global_rules[{other}]"),
                ));
                continue;
            }
            let parent = match &g.id {
                Some(id) => format!("/apisix/global_rules/{id}"),
                None => format!("/apisix/global_rules/{i}"),
            };
            if let Some(e) = make_entry(
                &registry,
                &format!("{path}.plugins"),
                &parent,
                name,
                conf,
                &mut errors,
            ) {
                global_entries.push(e);
            }
        }
    }
    let global = Chain::new(global_entries);

    let consumers = Arc::new(build_consumers(&doc, &registry, generation, &mut errors));
    let plugin_metadata = Arc::new(build_plugin_metadata(&doc, &registry, &mut errors));

    // Routes.
    let mut routes = Vec::new();
    let mut specs = Vec::new();
    let mut route_ids = HashSet::new();
    for (i, r) in doc.routes.iter().enumerate() {
        let path = format!("routes[{i}]");
        let before = errors.len();
        let Some(id) = &r.id else {
            errors.push(ConfigError::new(format!("{path}.id"), "an id is required"));
            continue;
        };
        if !route_ids.insert(id.0.clone()) {
            errors.push(ConfigError::new(
                format!("{path}.id"),
                format!("duplicate id \"{id}\""),
            ));
        }
        let uris = match (&r.uri, &r.uris) {
            (Some(u), None) => vec![u.clone()],
            (None, Some(us)) if !us.is_empty() => us.clone(),
            (Some(_), Some(_)) => {
                errors.push(ConfigError::new(
                    path.clone(),
                    "set either \"uri\" or \"uris\", not both",
                ));
                continue;
            }
            _ => {
                errors.push(ConfigError::new(
                    path.clone(),
                    "\"uri\" or \"uris\" is required",
                ));
                continue;
            }
        };
        if r.host.is_some() && r.hosts.is_some() {
            errors.push(ConfigError::new(
                path.clone(),
                "set either \"host\" or \"hosts\", not both",
            ));
            continue;
        }
        if r.status > 1 {
            errors.push(ConfigError::new(
                format!("{path}.status"),
                "expected 0 or 1",
            ));
        }
        check_wire_fields(&path, r, &mut errors);
        let service = match &r.service_id {
            Some(sid) => match services.get(&sid.0) {
                Some(s) => Some(s),
                None => {
                    errors.push(ConfigError::new(
                        format!("{path}.service_id"),
                        format!("service \"{sid}\" not found"),
                    ));
                    continue;
                }
            },
            None => None,
        };
        let mut upstream = resolve_upstream(
            &certs,
            &path,
            &format!("/apisix/routes/{id}"),
            r.upstream.as_ref(),
            r.upstream_id.as_ref().map(|i| i.0.as_str()),
            &upstreams,
            &mut errors,
        );
        if upstream.is_none() && r.upstream.is_none() && r.upstream_id.is_none() {
            upstream = service.and_then(|s| s.upstream.clone());
        }
        if r.plugins.is_empty()
            && upstream.is_none()
            && service.is_none()
            && r.upstream.is_none()
            && r.upstream_id.is_none()
        {
            errors.push(ConfigError::new(
                path.clone(),
                "a route needs \"upstream\", \"upstream_id\", \"service_id\" or \"plugins\"",
            ));
        }
        // The service's plugins, then the route's own replace them by name (APISIX's merge).
        let mut entries: Vec<ChainEntry> = service
            .map(|s| {
                s.plugins
                    .iter()
                    .filter(|e| !r.plugins.contains_key(e.plugin.name()))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        for (name, conf) in &r.plugins {
            if let Some(e) = make_entry(
                &registry,
                &format!("{path}.plugins"),
                &format!("/apisix/routes/{id}"),
                name,
                conf,
                &mut errors,
            ) {
                entries.push(e);
            }
        }
        let hosts: Vec<String> = match (&r.host, &r.hosts) {
            (Some(h), _) => route_hosts(
                &format!("{path}.host"),
                std::slice::from_ref(h),
                false,
                &mut errors,
            ),
            (_, Some(hs)) => route_hosts(&format!("{path}.hosts"), hs, true, &mut errors),
            _ => service.and_then(|s| s.hosts.clone()).unwrap_or_default(),
        };
        if errors.len() > before {
            continue;
        }
        if r.status == 0 {
            continue;
        }
        let matched_hosts = hosts.clone();
        specs.push(RouteSpec {
            id: id.0.clone(),
            uris,
            methods: r
                .methods
                .as_ref()
                .map(|ms| ms.iter().map(|m| m.as_str().to_string()).collect())
                .unwrap_or_default(),
            hosts,
            priority: r.priority,
        });
        let (conf_type, conf_id) = match &r.service_id {
            Some(sid) => ("route&service", format!("{id}&{sid}")),
            None => ("route", id.0.clone()),
        };
        routes.push(Arc::new(RouteEntry {
            id: id.0.clone(),
            name: r.name.clone(),
            service_id: r.service_id.as_ref().map(|s| s.0.clone()),
            service_name: service.and_then(|s| s.name.clone()),
            hosts: matched_hosts,
            chain: Chain::new(entries),
            upstream,
            timeout: r.timeout,
            // The route's own setting, else its service's (APISIX's `http_access_phase`).
            enable_websocket: r
                .enable_websocket
                .or(service.and_then(|s| s.enable_websocket))
                .unwrap_or(false),
            conf_type,
            conf_id: conf_id.into(),
            conf_version: conf_version.clone(),
            consumers: consumers.clone(),
            upstreams: upstreams.clone(),
        }));
    }

    let router = match Router::new(&specs) {
        Ok(r) => Some(r),
        Err(e) => {
            errors.push(ConfigError::new("routes", e.to_string()));
            None
        }
    };
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    // Every health state, once (an upstream shared by routes has one).
    let mut health: BTreeMap<Arc<str>, Arc<UpstreamHealth>> = BTreeMap::new();
    let entries = upstreams
        .values()
        .chain(services.values().filter_map(|s| s.upstream.as_ref()))
        .chain(routes.iter().filter_map(|r| r.upstream.as_ref()));
    for h in entries.filter_map(|u| u.health.as_ref()) {
        health.entry(h.key.clone()).or_insert_with(|| h.clone());
    }
    Ok(Snapshot {
        generation,
        built_at: SystemTime::now(),
        router: router.expect("router built when there are no errors"),
        routes,
        global,
        registry,
        consumers,
        plugin_metadata,
        tls,
        doc,
        health: health.into_values().collect(),
        upstreams,
    })
}

/// Checks a plugin conf of a consumer, group or credential; the compiled entry, or None with
/// the problem in `errors`.
fn consumer_plugin(
    registry: &Registry,
    at: String,
    name: &str,
    conf: &Value,
    scope: ConfScope,
    errors: &mut Vec<ConfigError>,
) -> Option<(Value, ChainEntry)> {
    let Some(plugin) = registry.get(name) else {
        errors.extend(
            registry
                .unknown_plugin(name)
                .map(|why| ConfigError::new(at, why)),
        );
        return None;
    };
    let mut conf = conf.clone();
    if !conf.is_object() {
        errors.push(ConfigError::new(
            at,
            format!(
                "failed to check the configuration of plugin {name} err: wrong type: expected object, got {}",
                json_type(&conf)
            ),
        ));
        return None;
    }
    match check_plugin_conf(plugin.as_ref(), &mut conf, scope) {
        Ok(compiled) => {
            let entry = ChainEntry::new(
                plugin.clone(),
                Arc::new(PluginConf::new(conf.clone(), compiled)),
            );
            match entry {
                Ok(entry) => Some((conf, entry)),
                Err(e) => {
                    errors.push(ConfigError::new(
                        format!("{at}._meta.filter"),
                        format!("failed to validate the 'vars' expression: {e}"),
                    ));
                    None
                }
            }
        }
        Err(e) => {
            errors.push(ConfigError::new(
                at,
                format!("failed to check the configuration of plugin {name} err: {e}"),
            ));
            None
        }
    }
}

/// Checks every consumer group, consumer (unique username, each plugin conf against the
/// plugin's consumer schema, `group_id` known) and credential, and indexes them by auth plugin.
fn build_consumers(
    doc: &Document,
    registry: &Registry,
    generation: u64,
    errors: &mut Vec<ConfigError>,
) -> Consumers {
    let mut out = Consumers {
        generation,
        ..Consumers::default()
    };
    // Groups: their plugins are checked as a route's are (APISIX's `plugin_checker`).
    for (i, g) in doc.consumer_groups.iter().enumerate() {
        let path = format!("consumer_groups[{i}]");
        let Some(id) = &g.id else {
            errors.push(ConfigError::new(format!("{path}.id"), "an id is required"));
            continue;
        };
        if out.groups.contains_key(&id.0) {
            errors.push(ConfigError::new(
                format!("{path}.id"),
                format!("duplicate id \"{id}\""),
            ));
            continue;
        }
        let mut plugins = Map::new();
        let mut entries = Vec::new();
        for (name, conf) in &g.plugins {
            let at = format!("{path}.plugins.{name}");
            if let Some((conf, entry)) =
                consumer_plugin(registry, at, name, conf, ConfScope::Route, errors)
            {
                plugins.insert(name.clone(), conf);
                // An auth plugin's conf has nothing to add to a recognised consumer (APISIX
                // skips its rewrite in the consumer pass).
                if !entry.plugin.is_auth() {
                    entries.push(entry);
                }
            }
        }
        out.groups.insert(
            id.0.clone(),
            Arc::new(GroupEntry {
                id: id.0.clone(),
                plugins,
                entries,
            }),
        );
    }
    let mut auth_of: HashMap<String, Vec<(String, Value)>> = HashMap::new();
    for (i, c) in doc.consumers.iter().enumerate() {
        let path = format!("consumers[{i}]");
        if out.by_name.contains_key(&c.username.0) {
            errors.push(ConfigError::new(
                format!("{path}.username"),
                format!("duplicate username \"{}\"", c.username),
            ));
            continue;
        }
        let group = match &c.group_id {
            None => None,
            Some(g) => match out.groups.get(&g.0) {
                Some(g) => Some(g.clone()),
                None => {
                    errors.push(ConfigError::new(
                        format!("{path}.group_id"),
                        format!("consumer group \"{g}\" not found"),
                    ));
                    continue;
                }
            },
        };
        let mut plugins = Map::new();
        let mut entries = Vec::new();
        let mut auth = Vec::new();
        for (name, conf) in &c.plugins {
            let at = format!("{path}.plugins.{name}");
            if let Some((conf, entry)) =
                consumer_plugin(registry, at, name, conf, ConfScope::Consumer, errors)
            {
                if entry.plugin.is_auth() {
                    auth.push((name.clone(), conf.clone()));
                } else {
                    entries.push(entry);
                }
                plugins.insert(name.clone(), conf);
            }
        }
        let entry = Arc::new(ConsumerEntry {
            username: c.username.0.clone(),
            desc: c.desc.clone(),
            labels: c.labels.clone().unwrap_or_default(),
            group_id: c.group_id.as_ref().map(|g| g.0.clone()),
            plugins,
            entries,
            group,
        });
        out.by_name.insert(entry.username.clone(), entry.clone());
        out.all.push(entry.clone());
        auth_of.insert(entry.username.clone(), auth);
    }
    // Credentials: one auth plugin conf each, for a consumer that exists.
    let mut creds: BTreeMap<String, Vec<(String, String, Value)>> = BTreeMap::new();
    let mut cred_ids = HashSet::new();
    for (i, cr) in doc.credentials.iter().enumerate() {
        let path = format!("credentials[{i}]");
        let (user, cid) = cr.split_id();
        if !cred_ids.insert(cr.id.clone()) {
            errors.push(ConfigError::new(
                format!("{path}.id"),
                format!("duplicate credential id \"{}\"", cr.id),
            ));
            continue;
        }
        if !out.by_name.contains_key(user) {
            errors.push(ConfigError::new(
                format!("{path}.id"),
                format!("credential \"{}\": consumer \"{user}\" not found", cr.id),
            ));
            continue;
        }
        if cr.plugins.len() > 1 {
            errors.push(ConfigError::new(
                path.clone(),
                "invalid configuration: property \"plugins\" validation failed: expect object to have at most 1 properties",
            ));
            continue;
        }
        for (name, conf) in &cr.plugins {
            let at = format!("{path}.plugins.{name}");
            if registry.get(name).is_some_and(|p| !p.is_auth()) {
                errors.push(ConfigError::new(
                    at,
                    "only supports auth type plugins in consumer credential",
                ));
                continue;
            }
            if let Some((conf, _)) =
                consumer_plugin(registry, at, name, conf, ConfScope::Consumer, errors)
            {
                creds.entry(user.to_string()).or_default().push((
                    cid.to_string(),
                    name.clone(),
                    conf,
                ));
            }
        }
    }
    // APISIX's order (etcd's key order): each consumer, then its credentials by id; a later
    // duplicate credential value wins in the plugins' indexes, as there.
    for list in creds.values_mut() {
        list.sort_by(|a, b| a.0.cmp(&b.0));
    }
    let mut order: Vec<&Arc<ConsumerEntry>> = out.all.iter().collect();
    order.sort_by(|a, b| a.username.cmp(&b.username));
    for consumer in order {
        if let Some(auth) = auth_of.remove(&consumer.username) {
            for (name, conf) in auth {
                out.by_plugin
                    .entry(name.clone())
                    .or_default()
                    .push(AuthEntry {
                        consumer: consumer.clone(),
                        credential_id: None,
                        conf,
                    });
            }
        }
        for (cid, name, conf) in creds.remove(&consumer.username).unwrap_or_default() {
            out.by_plugin.entry(name).or_default().push(AuthEntry {
                consumer: consumer.clone(),
                credential_id: Some(cid),
                conf,
            });
        }
    }
    out
}

/// Checks every plugin metadata entry against its plugin's metadata schema (defaults filled).
/// An entry for a plugin that is not enabled is an error, as is one plugin named twice.
fn build_plugin_metadata(
    doc: &Document,
    registry: &Registry,
    errors: &mut Vec<ConfigError>,
) -> PluginMetadata {
    let mut out = PluginMetadata::default();
    for (i, m) in doc.plugin_metadata.iter().enumerate() {
        let path = format!("plugin_metadata[{i}]");
        let name = m.id.0.as_str();
        let Some(plugin) = registry.get(name) else {
            if let Some(why) = registry.unknown_plugin(name) {
                errors.push(ConfigError::new(format!("{path}.id"), why));
            }
            continue;
        };
        if out.entries.contains_key(name) {
            errors.push(ConfigError::new(
                format!("{path}.id"),
                format!("duplicate id \"{name}\""),
            ));
            continue;
        }
        // The stored timestamps are not part of the conf the schema sees.
        let mut conf = m.conf.clone();
        conf.remove("create_time");
        conf.remove("update_time");
        let mut conf = Value::Object(conf);
        if let Err(e) =
            wire::check_plugin_conf(name, &conf).and_then(|()| plugin.check_metadata(&mut conf))
        {
            errors.push(ConfigError::new(
                path,
                format!("invalid configuration: {e}"),
            ));
            continue;
        }
        if let Value::Object(o) = &mut conf {
            o.insert("id".into(), Value::String(name.to_string()));
        }
        out.entries
            .insert(name.to_string(), Arc::new(MetadataEntry::new(name, conf)));
    }
    out
}

fn resolve_upstream(
    certs: &UpstreamCerts<'_>,
    path: &str,
    key: &str,
    inline: Option<&Upstream>,
    id: Option<&str>,
    upstreams: &HashMap<String, Arc<UpstreamEntry>>,
    errors: &mut Vec<ConfigError>,
) -> Option<Arc<UpstreamEntry>> {
    match (inline, id) {
        (Some(_), Some(_)) => {
            errors.push(ConfigError::new(
                path,
                "set either \"upstream\" or \"upstream_id\", not both",
            ));
            None
        }
        (Some(u), None) => match check_upstream(&format!("{path}.upstream"), u) {
            Ok(()) => Some(certs.entry(&format!("{path}.upstream"), None, u, key, errors)),
            Err(e) => {
                errors.push(e);
                None
            }
        },
        (None, Some(id)) => match upstreams.get(id) {
            Some(u) => Some(u.clone()),
            None => {
                errors.push(ConfigError::new(
                    format!("{path}.upstream_id"),
                    format!("upstream \"{id}\" not found"),
                ));
                None
            }
        },
        (None, None) => None,
    }
}

/// Checks an upstream's fields beyond their types; `path` is where the upstream is.
// `!(v > 0.0)` on purpose: NaN must be refused too.
#[allow(clippy::neg_cmp_op_on_partial_ord)]
pub fn check_upstream(path: &str, u: &Upstream) -> Result<(), ConfigError> {
    let whole = |msg: String| ConfigError::new(path, msg);
    if u.pass_host == PassHost::Rewrite && u.upstream_host.as_deref().unwrap_or("").is_empty() {
        return Err(whole(
            "pass_host \"rewrite\" needs \"upstream_host\"".into(),
        ));
    }
    if let Some(t) = &u.tls {
        crate::tls::check_upstream_tls(path, t)?;
    }
    if let Some(h) = &u.upstream_host {
        wire::check_field(h).map_err(|e| ConfigError::new(format!("{path}.upstream_host"), e))?;
    }
    for (i, n) in u.nodes.0.iter().enumerate() {
        wire::check_field(&n.host)
            .map_err(|e| ConfigError::new(format!("{path}.nodes[{i}].host"), e))?;
    }
    if let Some(t) = &u.timeout {
        for (name, v) in [("connect", t.connect), ("send", t.send), ("read", t.read)] {
            if !(v > 0.0) {
                return Err(whole(format!("timeout.{name} must be greater than 0")));
            }
        }
    }
    if let Some(p) = &u.keepalive_pool {
        if !(p.idle_timeout >= 0.0) {
            return Err(whole(
                "keepalive_pool.idle_timeout must not be negative".into(),
            ));
        }
    }
    if let Some(c) = &u.checks {
        c.validate().map_err(whole)?;
    }
    if let Some(t) = u.retry_timeout {
        if !(t >= 0.0) {
            return Err(whole("retry_timeout must not be negative".into()));
        }
    }
    crate::balancer::check(u).map_err(|e| ConfigError::new(format!("{path}.key"), e))?;
    Ok(())
}

/// Checks a route's request targets (`uri`, `uris`), which can never hold CR, LF or NUL.
fn check_wire_fields(path: &str, r: &Route, errors: &mut Vec<ConfigError>) {
    let uris = r.uri.iter().map(|u| (format!("{path}.uri"), u));
    let list = r.uris.iter().flatten().enumerate();
    let uris = uris.chain(list.map(|(j, u)| (format!("{path}.uris[{j}]"), u)));
    for (at, value) in uris {
        if let Err(e) = wire::check_field(value) {
            errors.push(ConfigError::new(at, e));
        }
    }
}

/// A route's or service's `hosts` in the form request hosts take (`host::normalize_route_host`):
/// `Internal.Example.` protects `Host: internal.example`. One that can never match is an error
/// at `FIELD[i]` (at `FIELD` for a route's single `host`, `list` false).
fn route_hosts(
    field: &str,
    hosts: &[String],
    list: bool,
    errors: &mut Vec<ConfigError>,
) -> Vec<String> {
    let mut out = Vec::with_capacity(hosts.len());
    for (j, h) in hosts.iter().enumerate() {
        match crate::host::normalize_route_host(h) {
            Ok(normal) => out.push(normal),
            Err(e) => {
                let at = if list {
                    format!("{field}[{j}]")
                } else {
                    field.to_string()
                };
                errors.push(ConfigError::new(at, format!("invalid host {h:?}: {e}")));
            }
        }
    }
    out
}

/// A plugin's own check of a conf, after the gateway's: no header, request target or host the
/// plugin sends on may hold CR, LF or NUL (`config::wire`). Every plugin conf (route, service,
/// global rule, consumer, Admin API check) goes through here.
pub fn check_plugin_conf(
    plugin: &dyn Plugin,
    conf: &mut Value,
    scope: ConfScope,
) -> Result<Arc<dyn std::any::Any + Send + Sync>, String> {
    wire::check_plugin_conf(plugin.name(), conf)?;
    plugin.check_conf(conf, scope)
}

/// Validates one plugin conf and makes its chain entry, or records why not.
/// `parent` is the owning resource's key in APISIX's layout (`/apisix/routes/ID`): plugins read
/// it as `conf._meta.parent.resource_key`.
fn make_entry(
    registry: &Registry,
    path: &str,
    parent: &str,
    name: &str,
    conf: &Value,
    errors: &mut Vec<ConfigError>,
) -> Option<ChainEntry> {
    let Some(plugin) = registry.get(name) else {
        if let Some(why) = registry.unknown_plugin(name) {
            errors.push(ConfigError::new(format!("{path}.{name}"), why));
        }
        return None;
    };
    let mut conf = conf.clone();
    if !conf.is_object() {
        errors.push(ConfigError::new(
            format!("{path}.{name}"),
            format!(
                "failed to check the configuration of plugin {name} err: wrong type: expected object, got {}",
                json_type(&conf)
            ),
        ));
        return None;
    }
    match check_plugin_conf(plugin.as_ref(), &mut conf, ConfScope::Route) {
        Ok(compiled) => {
            match ChainEntry::new(
                plugin.clone(),
                Arc::new(PluginConf::new(conf, compiled).with_parent(parent)),
            ) {
                Ok(e) => Some(e),
                Err(e) => {
                    // APISIX's check of `_meta.filter` (lua-resty-expr's `new`).
                    errors.push(ConfigError::new(
                        format!("{path}.{name}._meta.filter"),
                        format!("failed to validate the 'vars' expression: {e}"),
                    ));
                    None
                }
            }
        }
        Err(e) => {
            errors.push(ConfigError::new(
                format!("{path}.{name}"),
                format!("failed to check the configuration of plugin {name} err: {e}"),
            ));
            None
        }
    }
}

/// The JSON type name as APISIX's messages spell it.
pub fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// A failed build, kept for the status endpoint and logs.
#[derive(Debug, Clone)]
pub struct FailedBuild {
    pub at: SystemTime,
    pub trigger: String,
    pub errors: Vec<String>,
}

/// The process-wide gateway state: the current snapshot and its history.
pub struct Gateway {
    current: ArcSwap<Snapshot>,
    next_generation: AtomicU64,
    pub last_failure: Mutex<Option<FailedBuild>>,
    /// The generation in force, for whoever follows publications (the workers' readiness).
    published: tokio::sync::watch::Sender<u64>,
}

/// The resources of the published snapshot and its generation, for code that has no request
/// at hand (plugins' timers reading `apisix.http.service`).
static PUBLISHED_DOC: arc_swap::ArcSwapOption<(u64, Arc<Document>)> =
    arc_swap::ArcSwapOption::const_empty();

/// The published snapshot's resources and generation.
pub fn published_doc() -> Option<Arc<(u64, Arc<Document>)>> {
    PUBLISHED_DOC.load_full()
}

impl Gateway {
    pub fn new(initial: Snapshot) -> Self {
        let next = initial.generation + 1;
        let initial_generation = initial.generation;
        crate::plugin::metadata::publish(initial.plugin_metadata.clone());
        crate::plugin::local_conf::publish(&initial.doc.node);
        crate::health::registry().publish(&initial.health);
        PUBLISHED_DOC.store(Some(Arc::new((initial.generation, initial.doc.clone()))));
        Gateway {
            current: ArcSwap::from_pointee(initial),
            next_generation: AtomicU64::new(next),
            last_failure: Mutex::new(None),
            published: tokio::sync::watch::Sender::new(initial_generation),
        }
    }

    /// The snapshot in force now. Cheap: no lock, no allocation.
    pub fn load(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.current.load()
    }

    pub fn load_full(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// The generation number the next published snapshot takes. A build that fails uses no
    /// number: only [`Gateway::publish`] moves it on, so generations never skip. (Builds are
    /// serialised by the `Reloader`, so two builds never hold the same number.)
    pub fn next_generation(&self) -> u64 {
        self.next_generation.load(Ordering::Relaxed)
    }

    /// Publishes a fully built snapshot; returns the one it replaced.
    pub fn publish(&self, snapshot: Snapshot) -> Arc<Snapshot> {
        self.next_generation
            .fetch_max(snapshot.generation + 1, Ordering::Relaxed);
        *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) = None;
        crate::plugin::metadata::publish(snapshot.plugin_metadata.clone());
        crate::plugin::local_conf::publish(&snapshot.doc.node);
        crate::health::registry().publish(&snapshot.health);
        PUBLISHED_DOC.store(Some(Arc::new((snapshot.generation, snapshot.doc.clone()))));
        let generation = snapshot.generation;
        let old = self.current.swap(Arc::new(snapshot));
        self.published.send_replace(generation);
        old
    }

    /// Follows publications: the receiver sees each new generation (after its snapshot is in
    /// force).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.published.subscribe()
    }

    pub fn record_failure(&self, trigger: &str, errors: &ConfigErrors) {
        *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(FailedBuild {
            at: SystemTime::now(),
            trigger: trigger.to_string(),
            errors: errors.0.iter().map(|e| e.to_string()).collect(),
        });
    }
}

/// Resource JSON with APISIX's shape for a plugin map (used by listings).
pub fn plugins_json(map: &Map<String, Value>) -> Value {
    Value::Object(map.clone())
}

#[cfg(test)]
mod build_tests {
    use super::*;

    fn registry() -> Arc<Registry> {
        let mut r = Registry::new();
        for p in crate::plugins::native() {
            r.insert(p);
        }
        Arc::new(r)
    }

    #[test]
    fn an_unused_service_with_a_bad_plugin_conf_is_refused() {
        let doc = crate::config::parse_document(
            "services:\n  - id: s1\n    plugins:\n      response-headers: {set: {X-A: 1}}\n",
        )
        .expect("parses");
        let errors = build(Arc::new(doc), registry(), 1).err().expect("refused");
        assert_eq!(errors.0.len(), 1);
        assert_eq!(errors.0[0].path, "services[0].plugins.response-headers");
        assert!(errors.0[0]
            .message
            .starts_with("failed to check the configuration of plugin response-headers err: "));
    }

    #[test]
    fn a_route_overrides_its_service_plugin_by_name() {
        let doc = crate::config::parse_document(
            "services:\n  - id: s1\n    plugins:\n      response-headers: {set: {X-From: service}}\nroutes:\n  - id: r1\n    uri: /a\n    service_id: s1\n    plugins:\n      response-headers: {set: {X-From: route}}\n    upstream: {nodes: {\"127.0.0.1:1\": 1}}\n",
        )
        .expect("parses");
        let snap = build(Arc::new(doc), registry(), 1).expect("builds");
        let entries = &snap.routes[0].chain.entries;
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].conf.value["set"]["X-From"], "route");
        assert_eq!(snap.routes[0].conf_type, "route&service");
    }
}
