//! Lua plugins: APISIX plugin modules run on LuaJIT, behind the same [`Plugin`] trait as the
//! native ones.
//!
//! A file `NAME.lua` in one of the node's `plugin_dirs` is a plugin named `NAME`. At snapshot
//! build time [`load_plugins`] reads each file, runs it once in a scratch VM to read the module
//! fields (`priority`, `version`, `schema`, which phases it defines), and keeps the source text:
//! a [`LuaPlugin`] is one immutable *version* of a plugin, with a process-unique `version_id`.
//! Worker threads compile that stored source into their own VM on first use (see `runtime.rs`),
//! so a file edited on disk changes nothing until the next snapshot is built from it.
//!
//! Failures are contained: a Lua error, a runaway loop (stopped by the per-call time budget, see
//! `watchdog.rs`) or an allocation past the VM's memory cap fails that plugin call (its request
//! gets 500, the error is logged with plugin, phase and traceback) and the VM keeps serving.

pub mod api;
mod apisix_runtime;
mod compress;
mod convert;
mod cosocket;
mod crypto;
pub mod embedded;
mod errors;
mod fast;
mod lfs;
mod metrics;
mod pack;
mod pipe;
mod pkey;
mod prelude;
mod re;
mod resources;
pub mod runtime;
mod semaphore;
pub mod shared_dict;
mod shell;
mod thread;
pub mod timer;
mod udp;
mod upstream;
mod watchdog;
mod xml;

use std::any::Any;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use mlua::{Table, Value};
use serde_json::Value as Json;

use crate::config::{ConfigError, ConfigErrors, LuaConfig, NodeConfig};
use crate::plugin::{
    BodyChunk, ConfScope, Ctx, Phase, PhaseCall, PhaseResult, PhaseSet, Plugin, PluginConf,
    PluginError, PluginKind, ResponseHead, Schema,
};
use crate::snapshot::Registry;

pub use runtime::LuaRuntime;

/// Memory held by the calling worker's Lua VM (None on a thread without one).
pub fn used_memory() -> Option<usize> {
    runtime::used_memory()
}
pub use watchdog::BUDGET_EXCEEDED;

/// Runtime settings shared by every plugin version loaded by one build.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How long one call may run Lua code (`lua.call_budget_ms`).
    pub call_budget: Duration,
    /// The VM's memory cap in bytes (`lua.memory_limit_mb`).
    pub memory_limit: usize,
    /// Where `require("apisix.plugins.NAME")` looks.
    pub plugin_dirs: Vec<PathBuf>,
    /// The plugins of this build that define `workflow_handler` (APISIX calls it when a plugin
    /// loads; the handler registers the plugin as a `workflow` action). A VM loading `workflow`
    /// loads these too, so their actions are known to its `check_schema`.
    pub workflow_plugins: Arc<std::sync::Mutex<Vec<std::sync::Weak<LuaPlugin>>>>,
    /// `lua.package_path`: searched before the system's patterns.
    pub package_path: Vec<String>,
    /// `lua.package_cpath`: searched before the system's C module patterns.
    pub package_cpath: Vec<String>,
    /// `lua.ffi_global_libraries`: loaded into the FFI global namespace of each VM.
    pub ffi_global_libraries: Vec<String>,
}

impl Settings {
    /// Settings from the node config's `lua` section.
    /// Also declares the config's `lua.shared_dicts` (dictionaries are process-wide).
    pub fn new(cfg: &LuaConfig, plugin_dirs: &[PathBuf]) -> Settings {
        shared_dict::configure(&cfg.shared_dicts);
        Settings {
            call_budget: Duration::from_millis(cfg.call_budget_ms.max(1)),
            memory_limit: cfg.memory_limit_mb.max(1).saturating_mul(1024 * 1024),
            plugin_dirs: plugin_dirs.to_vec(),
            workflow_plugins: Arc::default(),
            package_path: cfg.package_path.iter().map(|p| p.0.clone()).collect(),
            package_cpath: cfg.package_cpath.iter().map(|p| p.0.clone()).collect(),
            ffi_global_libraries: cfg.ffi_global_libraries.clone(),
        }
    }
}

static NEXT_VERSION: AtomicU64 = AtomicU64::new(1);
static NEXT_CONF: AtomicU64 = AtomicU64::new(1);
static WORKERS: AtomicUsize = AtomicUsize::new(0);

/// `ngx.worker.count()`.
pub(crate) fn worker_count() -> usize {
    match WORKERS.load(Ordering::Relaxed) {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        n => n,
    }
}

/// One version of a Lua plugin: what the module declared, and its source.
pub struct LuaPlugin {
    name: String,
    priority: i64,
    version: String,
    schema: Schema,
    /// The module's `metadata_schema`, if it has one.
    metadata_schema: Option<Schema>,
    /// The phases the module defines.
    lua_phases: PhaseSet,
    has_check_schema: bool,
    /// The module defines `workflow_handler`.
    workflow_handler: bool,
    /// The module's `type` is `"auth"`.
    auth: bool,
    path: PathBuf,
    source: Arc<str>,
    /// Unique per loaded version for the life of the process: VMs key their modules on it.
    version_id: u64,
    settings: Arc<Settings>,
    /// Dropped with this version; VMs hold a `Weak` to notice.
    live: Arc<()>,
}

impl Drop for LuaPlugin {
    fn drop(&mut self) {
        runtime::retire();
    }
}

impl std::fmt::Debug for LuaPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LuaPlugin")
            .field("name", &self.name)
            .field("priority", &self.priority)
            .field("path", &self.path)
            .field("version_id", &self.version_id)
            .finish()
    }
}

impl LuaPlugin {
    /// The file it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Process-unique id of this loaded version.
    pub fn version_id(&self) -> u64 {
        self.version_id
    }

    /// Loads one plugin file: runs the module in a scratch VM and reads its fields.
    /// Errors read `file:line: message` for syntax and runtime errors.
    pub fn load(path: &Path, settings: Arc<Settings>) -> Result<LuaPlugin, String> {
        let source = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        let name = plugin_name_of(path)
            .ok_or_else(|| format!("{}: the file name is not valid UTF-8", path.display()))?;
        Self::from_source(&name, path, source.into(), settings)
    }

    /// Like [`LuaPlugin::load`], from source text already read.
    pub fn from_source(
        name: &str,
        path: &Path,
        source: Arc<str>,
        settings: Arc<Settings>,
    ) -> Result<LuaPlugin, String> {
        let rt = LuaRuntime::new(&settings).map_err(|e| format!("cannot start a Lua VM: {e}"))?;
        let lua = rt.lua();
        let frame = runtime::Frame {
            plugin: name as *const str,
            ..runtime::Frame::NONE
        };
        let module: Table = rt
            .guarded(frame, || {
                let f = lua
                    .load(&*source)
                    .set_name(format!("@{}", path.display()))
                    .into_function()?;
                match f.call::<Value>(())? {
                    Value::Table(t) => Ok(t),
                    other => Err(mlua::Error::runtime(format!(
                        "the module returned {} instead of a table",
                        other.type_name()
                    ))),
                }
            })
            .map_err(|e| lua_load_error(path, &e))?;
        let priority = match module.get::<Value>("priority") {
            Ok(Value::Integer(i)) => i,
            Ok(Value::Number(n)) => n as i64,
            _ => {
                return Err(format!(
                    "{}: invalid plugin: missing or non-number \"priority\"",
                    path.display()
                ))
            }
        };
        let version = match module.get::<Value>("version") {
            Ok(Value::Integer(i)) => i.to_string(),
            Ok(Value::Number(n)) => convert::fmt_g14(n),
            Ok(Value::String(s)) => s.to_string_lossy(),
            _ => {
                return Err(format!(
                    "{}: invalid plugin: missing \"version\"",
                    path.display()
                ))
            }
        };
        let schema_json = match module.get::<Value>("schema") {
            Ok(Value::Table(t)) => convert::schema_to_json(lua, &t)
                .map_err(|e| format!("{}: invalid schema: {e}", path.display()))?,
            _ => {
                return Err(format!(
                    "{}: invalid plugin: \"schema\" must be a table",
                    path.display()
                ))
            }
        };
        if schema_json.pointer("/properties/_meta").is_some() {
            return Err(format!(
                "{}: invalid plugin: the schema must not define \"_meta\"",
                path.display()
            ));
        }
        let mut schema_json = schema_json;
        inject_meta(&mut schema_json);
        let schema = Schema::compile(&schema_json)
            .map_err(|e| format!("{}: invalid schema: {e}", path.display()))?;
        if let Ok(Value::String(declared)) = module.get::<Value>("name") {
            let declared = declared.to_string_lossy();
            if declared != name {
                tracing::warn!(
                    "{}: the module's name \"{declared}\" differs from its file name; it is enabled as \"{name}\" (as APISIX does)",
                    path.display()
                );
            }
        }
        let mut lua_phases = PhaseSet::empty();
        for phase in Phase::ALL {
            if matches!(module.get::<Value>(phase.as_str()), Ok(Value::Function(_))) {
                lua_phases = lua_phases.with(phase);
            }
        }
        let has_check_schema =
            matches!(module.get::<Value>("check_schema"), Ok(Value::Function(_)));
        let workflow_handler = matches!(
            module.get::<Value>("workflow_handler"),
            Ok(Value::Function(_))
        );
        let auth =
            matches!(module.get::<Value>("type"), Ok(Value::String(t)) if t.as_bytes() == b"auth");
        let metadata_schema = match module.get::<Value>("metadata_schema") {
            Ok(Value::Table(t)) => {
                let json = convert::schema_to_json(lua, &t)
                    .map_err(|e| format!("{}: invalid metadata_schema: {e}", path.display()))?;
                Some(
                    Schema::compile(&json)
                        .map_err(|e| format!("{}: invalid metadata_schema: {e}", path.display()))?,
                )
            }
            Ok(Value::Nil) | Err(_) => None,
            Ok(_) => {
                return Err(format!(
                    "{}: invalid plugin: \"metadata_schema\" must be a table",
                    path.display()
                ))
            }
        };
        Ok(LuaPlugin {
            name: name.to_string(),
            priority,
            version,
            schema,
            metadata_schema,
            lua_phases,
            has_check_schema,
            workflow_handler,
            auth,
            path: path.to_path_buf(),
            source,
            version_id: NEXT_VERSION.fetch_add(1, Ordering::Relaxed),
            settings,
            live: Arc::new(()),
        })
    }
}

/// Adds APISIX's common `_meta` property (`disable`, `error_response`, `priority`, `filter`,
/// `pre_function`) to a plugin's schema, as APISIX's plugin loader does, so confs carrying
/// `_meta` validate.
fn inject_meta(schema: &mut Json) {
    let Some(obj) = schema.as_object_mut() else {
        return;
    };
    let props = obj
        .entry("properties")
        .or_insert_with(|| Json::Object(Default::default()));
    if let Some(props) = props.as_object_mut() {
        props.insert(
            "_meta".to_string(),
            serde_json::json!({
                "type": "object",
                "properties": {
                    "disable": { "type": "boolean" },
                    "error_response": { "oneOf": [ { "type": "string" }, { "type": "object" } ] },
                    "priority": { "type": "integer" },
                    "filter": { "type": "array" },
                    "pre_function": { "type": "string" }
                }
            }),
        );
    }
}

/// `file:line: message` from a load failure (the traceback is dropped: it only shows the
/// loader).
fn lua_load_error(path: &Path, e: &mlua::Error) -> String {
    let msg = match e {
        mlua::Error::SyntaxError { message, .. } => message.clone(),
        mlua::Error::CallbackError { cause, .. } => return lua_load_error(path, cause),
        other => other.to_string(),
    };
    let first = msg.lines().next().unwrap_or("").trim().to_string();
    let first = first
        .strip_prefix("runtime error: ")
        .unwrap_or(&first)
        .to_string();
    let first = first
        .strip_prefix("syntax error: ")
        .unwrap_or(&first)
        .to_string();
    if first.starts_with(&path.display().to_string()) {
        first
    } else {
        format!("{}: {first}", path.display())
    }
}

/// What `check_conf` keeps for a Lua plugin's conf: an id that VMs key the conf table on, and
/// a liveness token they watch.
pub(crate) struct LuaConf {
    pub id: u64,
    pub live: Arc<()>,
}

impl Drop for LuaConf {
    fn drop(&mut self) {
        runtime::retire();
    }
}

#[async_trait(?Send)]
impl Plugin for LuaPlugin {
    fn name(&self) -> &str {
        &self.name
    }

    fn worker_start(&self) {
        runtime::warm(self);
    }

    fn source_digest(&self) -> Option<u64> {
        Some(crate::config::text_hash(&self.source))
    }

    fn priority(&self) -> i64 {
        self.priority
    }

    fn version(&self) -> &str {
        &self.version
    }

    fn kind(&self) -> PluginKind {
        PluginKind::Lua
    }

    fn is_auth(&self) -> bool {
        self.auth
    }

    fn schema(&self) -> &Schema {
        &self.schema
    }

    fn check_conf(
        &self,
        conf: &mut Json,
        scope: ConfScope,
    ) -> Result<Arc<dyn Any + Send + Sync>, String> {
        if scope == ConfScope::Route || !self.has_check_schema {
            self.schema.check(conf)?;
        }
        if self.has_check_schema {
            let schema_type = match scope {
                ConfScope::Route => None,
                ConfScope::Consumer => Some(1),
                ConfScope::Metadata => Some(2),
            };
            runtime::check_conf_lua(self, conf, schema_type)?;
        }
        Ok(Arc::new(LuaConf {
            id: NEXT_CONF.fetch_add(1, Ordering::Relaxed),
            live: Arc::new(()),
        }))
    }

    /// The module's phases, plus `header_filter` always: headers a request phase set with
    /// `ngx.header` (or `core.response.set_header`) are applied to the response there.
    fn metadata_schema(&self) -> Option<&Schema> {
        self.metadata_schema.as_ref()
    }

    /// As APISIX's Admin API: no `metadata_schema` accepts any object; otherwise the module's
    /// `check_schema(conf, core.schema.TYPE_METADATA)` when it has one, else the schema.
    fn check_metadata(&self, conf: &mut Json) -> Result<(), String> {
        let Some(schema) = &self.metadata_schema else {
            return Ok(());
        };
        if self.has_check_schema {
            runtime::check_conf_lua(self, conf, Some(2))
        } else {
            schema.check(conf)
        }
    }

    fn phases(&self) -> PhaseSet {
        self.lua_phases
    }

    fn start_phase<'a>(
        &'a self,
        phase: Phase,
        conf: &'a PluginConf,
        ctx: &'a mut Ctx,
    ) -> PhaseCall<'a> {
        match phase {
            Phase::Rewrite | Phase::Access | Phase::BeforeProxy => {
                runtime::start_request_phase(self, phase, conf, ctx)
            }
            _ => PhaseCall::Ready(Ok(crate::plugin::Flow::Continue)),
        }
    }

    async fn rewrite(&self, conf: &PluginConf, ctx: &mut Ctx) -> PhaseResult {
        runtime::request_phase(self, Phase::Rewrite, conf, ctx).await
    }

    async fn access(&self, conf: &PluginConf, ctx: &mut Ctx) -> PhaseResult {
        runtime::request_phase(self, Phase::Access, conf, ctx).await
    }

    async fn before_proxy(&self, conf: &PluginConf, ctx: &mut Ctx) -> PhaseResult {
        runtime::request_phase(self, Phase::BeforeProxy, conf, ctx).await
    }

    fn header_filter(
        &self,
        conf: &PluginConf,
        ctx: &mut Ctx,
        head: &mut ResponseHead,
    ) -> Result<(), PluginError> {
        runtime::header_filter(self, conf, ctx, head)
    }

    fn body_filter(
        &self,
        conf: &PluginConf,
        ctx: &mut Ctx,
        chunk: &mut BodyChunk,
    ) -> Result<(), PluginError> {
        runtime::body_filter(self, conf, ctx, chunk)
    }

    fn delayed_body_filter(
        &self,
        conf: &PluginConf,
        ctx: &mut Ctx,
        chunk: &mut BodyChunk,
    ) -> Result<(), PluginError> {
        runtime::delayed_body_filter(self, conf, ctx, chunk)
    }

    fn log(&self, conf: &PluginConf, ctx: &mut Ctx) {
        runtime::log(self, conf, ctx)
    }
}

/// Finds and loads every `NAME.lua` in `dirs` (the first directory wins for a name found twice).
/// A missing directory is skipped. Every bad file is reported, as `file:line: message`.
pub fn load_plugins(
    dirs: &[PathBuf],
    lua_cfg: &LuaConfig,
) -> Result<Vec<Arc<dyn Plugin>>, Vec<ConfigError>> {
    let loaded = load_filtered(dirs, lua_cfg, None, &HashSet::new());
    if loaded.errors.is_empty() {
        Ok(loaded.plugins)
    } else {
        Err(loaded.errors)
    }
}

/// What loading the plugin folders gave: the plugins that loaded and what did not.
struct Loaded {
    plugins: Vec<Arc<dyn Plugin>>,
    /// One per file that did not load (or folder that could not be read).
    errors: Vec<ConfigError>,
    /// The names of the plugins whose file did not load.
    broken: Vec<String>,
    /// Plugin files left out by the node's `plugins` list, by name.
    not_enabled: Vec<(String, PathBuf)>,
}

/// Loads the plugin files of `dirs`: only the `enabled` ones when there is a list, never one
/// named like a `native` plugin (the native plugin wins; the file is named in one warning and
/// not run, so it cannot fail the build).
fn load_filtered(
    dirs: &[PathBuf],
    lua_cfg: &LuaConfig,
    enabled: Option<&[String]>,
    native: &HashSet<String>,
) -> Loaded {
    let settings = Arc::new(Settings::new(lua_cfg, dirs));
    let mut seen: std::collections::HashMap<String, PathBuf> = std::collections::HashMap::new();
    let mut out = Loaded {
        plugins: Vec::new(),
        errors: Vec::new(),
        broken: Vec::new(),
        not_enabled: Vec::new(),
    };
    for dir in dirs {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::debug!("plugin dir {} does not exist", dir.display());
                continue;
            }
            Err(e) => {
                out.errors.push(ConfigError::new(
                    "plugin_dirs",
                    format!("cannot read {}: {e}", dir.display()),
                ));
                continue;
            }
        };
        for (path, packaged) in plugin_files(entries) {
            let Some(name) = plugin_name_of(&path) else {
                continue;
            };
            if native.contains(&name) {
                tracing::warn!(
                    "{} is not loaded: {name} is a native plugin, which takes precedence over a Lua file of the same name",
                    path.display()
                );
                continue;
            }
            if enabled.is_some_and(|list| !list.contains(&name)) {
                if !packaged {
                    out.not_enabled.push((name, path));
                }
                continue;
            }
            if let Some(first) = seen.get(&name) {
                tracing::warn!("{} is shadowed by {}", path.display(), first.display());
                continue;
            }
            match LuaPlugin::load(&path, settings.clone()) {
                Ok(p) => {
                    seen.insert(name.clone(), path.clone());
                    let p = Arc::new(p);
                    if p.workflow_handler {
                        if let Ok(mut list) = settings.workflow_plugins.lock() {
                            list.push(Arc::downgrade(&p));
                        }
                    }
                    out.plugins.push(p);
                }
                // A `NAME/init.lua` nobody asked for may be a plugin's helper module rather
                // than a plugin (APISIX's `limit-count/` beside `limit-count.lua` has one, and
                // `ext-plugin/init.lua` is shared by three plugins): not a plugin, not an error.
                Err(e) if packaged && enabled.is_none() => {
                    tracing::debug!("{} is not loaded as a plugin: {e}", path.display());
                }
                Err(e) => {
                    out.errors.push(ConfigError::new("", e));
                    seen.insert(name.clone(), path.clone());
                    out.broken.push(name);
                }
            }
        }
    }
    out
}

/// The plugin files of one folder, sorted: every `NAME.lua`, and `NAME/init.lua` for a `NAME`
/// with no `NAME.lua` (APISIX ships proxy-cache that way). The flag marks the second kind.
fn plugin_files(entries: std::fs::ReadDir) -> Vec<(PathBuf, bool)> {
    let mut files = Vec::new();
    let mut dirs = Vec::new();
    for path in entries.filter_map(|e| e.ok()).map(|e| e.path()) {
        if path.is_file() && path.extension().is_some_and(|x| x == "lua") {
            files.push(path);
        } else if path.is_dir() && path.join("init.lua").is_file() {
            dirs.push(path);
        }
    }
    let mut out: Vec<(PathBuf, bool)> = dirs
        .into_iter()
        .filter(|d| !d.with_extension("lua").is_file())
        .map(|d| (d.join("init.lua"), true))
        .collect();
    out.extend(files.into_iter().map(|f| (f, false)));
    out.sort();
    out
}

/// A plugin's name from its file: `NAME.lua`, or the folder of a `NAME/init.lua`.
pub fn plugin_name_of(path: &Path) -> Option<String> {
    let stem = path.file_stem()?.to_str()?;
    if stem == "init" {
        if let Some(dir) = path
            .parent()
            .and_then(|d| d.file_name())
            .and_then(|n| n.to_str())
        {
            return Some(dir.to_string());
        }
    }
    Some(stem.to_string())
}

/// Adds the node's Lua plugins to a registry (only the enabled ones when the node lists them).
/// A Lua file named like a plugin already in the registry (a native one) is not loaded: the
/// native plugin wins, and one warning names the file. Any file that does not load fails it.
pub fn add_to_registry(registry: &mut Registry, node: &NodeConfig) -> Result<(), ConfigErrors> {
    let errors = add_what_loads(registry, node);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ConfigErrors(errors))
    }
}

/// As [`add_to_registry`], but adds every plugin that loads and returns the problems of the
/// rest; their names go to `registry.broken` (`moongate check` reports everything in one pass).
pub fn add_what_loads(registry: &mut Registry, node: &NodeConfig) -> Vec<ConfigError> {
    if let Some(n) = node.workers {
        WORKERS.store(n, Ordering::Relaxed);
    }
    let native: HashSet<String> = registry.names().map(str::to_string).collect();
    let loaded = load_filtered(
        &node.plugin_dirs,
        &node.lua,
        node.plugins.as_deref(),
        &native,
    );
    registry.dirs = node.plugin_dirs.clone();
    registry.broken.extend(loaded.broken);
    for (name, file) in loaded.not_enabled {
        registry.not_enabled.entry(name).or_insert(Some(file));
    }
    for p in loaded.plugins {
        let path = node
            .plugin_dirs
            .iter()
            .flat_map(|d| {
                [
                    d.join(format!("{}.lua", p.name())),
                    d.join(p.name()).join("init.lua"),
                ]
            })
            .find(|f| f.is_file());
        if let Some(path) = path {
            registry.sources.insert(p.name().to_string(), path);
        }
        registry.insert(p);
    }
    loaded.errors
}

/// The module names a plugin's `require` finds without any file: the embedded `lua/` tree,
/// the native modules and LuaJIT's own libraries (for `moongate plugins import`).
pub fn provided_modules() -> mlua::Result<std::collections::HashSet<String>> {
    let settings = Settings::new(&LuaConfig::default(), &[]);
    let rt = LuaRuntime::new(&settings)?;
    let package: mlua::Table = rt.lua().globals().get("package")?;
    let mut names = std::collections::HashSet::new();
    for key in ["preload", "loaded"] {
        let t: mlua::Table = package.get(key)?;
        for pair in t.pairs::<String, Value>() {
            names.insert(pair?.0);
        }
    }
    Ok(names)
}

/// Where a module lives under a plugin folder, without `.lua`: `apisix.plugins.NAME.SUB` at
/// `NAME/SUB`, any other dotted name at its own path (`apisix/utils/log-util`). A name without
/// a dot is never looked for there (a plugin named like a library must not find itself).
pub fn folder_path(module: &str) -> Option<String> {
    match module.strip_prefix("apisix.plugins.") {
        Some(rest) => Some(rest.replace('.', "/")),
        None if module.contains('.') => Some(module.replace('.', "/")),
        None => None,
    }
}
