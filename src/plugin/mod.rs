//! The plugin interface shared by native Rust plugins and Lua plugins.
//!
//! A plugin is one [`Plugin`] object per plugin *version* (a reload makes new objects), shared by
//! every worker. Its per-route configuration is a [`PluginConf`]: the JSON conf after schema
//! validation and default filling, plus whatever the plugin compiled from it at snapshot-build
//! time. The proxy calls the phases in APISIX's order (see [`chain`]).

pub mod chain;
pub mod ctx;
pub mod expr;
pub mod import;
pub mod local_conf;
pub mod lua;
pub mod metadata;
pub mod schema;

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use serde_json::Value;

pub use ctx::Ctx;
pub use schema::Schema;

use crate::body::ResponseBody;
use crate::http1::RawHead;

/// APISIX's phases, in the order a request meets them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    Rewrite,
    Access,
    BeforeProxy,
    HeaderFilter,
    BodyFilter,
    /// APISIX's `delayed_body_filter`: per chunk, after every plugin's `body_filter` (tracers
    /// finish their spans there, once the body filters have run).
    DelayedBodyFilter,
    Log,
}

impl Phase {
    pub const ALL: [Phase; 7] = [
        Phase::Rewrite,
        Phase::Access,
        Phase::BeforeProxy,
        Phase::HeaderFilter,
        Phase::BodyFilter,
        Phase::DelayedBodyFilter,
        Phase::Log,
    ];

    /// The phase's name as APISIX plugins spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Rewrite => "rewrite",
            Phase::Access => "access",
            Phase::BeforeProxy => "before_proxy",
            Phase::HeaderFilter => "header_filter",
            Phase::BodyFilter => "body_filter",
            Phase::DelayedBodyFilter => "delayed_body_filter",
            Phase::Log => "log",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// The set of phases a plugin implements; the chain skips the others without a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PhaseSet(u8);

impl PhaseSet {
    pub const fn empty() -> Self {
        PhaseSet(0)
    }
    pub fn with(self, p: Phase) -> Self {
        PhaseSet(self.0 | p.bit())
    }
    pub fn contains(self, p: Phase) -> bool {
        self.0 & p.bit() != 0
    }
    pub fn union(self, other: PhaseSet) -> Self {
        PhaseSet(self.0 | other.0)
    }
}

impl FromIterator<Phase> for PhaseSet {
    fn from_iter<I: IntoIterator<Item = Phase>>(iter: I) -> Self {
        iter.into_iter().fold(PhaseSet::empty(), PhaseSet::with)
    }
}

/// Where a plugin conf comes from; APISIX passes this to `check_schema` as `schema_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfScope {
    /// A route, service or global rule.
    Route,
    /// A consumer (APISIX's `core.schema.TYPE_CONSUMER`).
    Consumer,
    /// Plugin metadata (APISIX's `core.schema.TYPE_METADATA`).
    Metadata,
}

static NEXT_CONF_KEY: AtomicU64 = AtomicU64::new(1);

/// One plugin's configuration on one route (or service, or global rule), ready to run.
pub struct PluginConf {
    /// The conf after validation, with schema defaults filled in.
    pub value: Value,
    /// What the plugin compiled from `value` in [`Plugin::check_conf`] (native plugins keep
    /// their typed conf here, so the hot path never re-parses JSON).
    pub compiled: Arc<dyn Any + Send + Sync>,
    /// Unique per conf object for the life of the process: the Lua runtime keys its per-VM conf
    /// tables on it, so a plugin that caches data on its conf table keeps it across requests.
    pub key: u64,
    /// The key of the resource that holds this conf, in APISIX's layout
    /// (`/apisix/routes/ID`): Lua plugins see it as `conf._meta.parent.resource_key`.
    pub parent: Option<Arc<str>>,
}

impl PluginConf {
    pub fn new(value: Value, compiled: Arc<dyn Any + Send + Sync>) -> Self {
        PluginConf {
            value,
            compiled,
            key: NEXT_CONF_KEY.fetch_add(1, Ordering::Relaxed),
            parent: None,
        }
    }

    /// Records the resource that holds this conf.
    pub fn with_parent(mut self, parent: &str) -> Self {
        self.parent = Some(Arc::from(parent));
        self
    }

    /// The compiled conf as the plugin's own type.
    pub fn compiled<T: 'static>(&self) -> Option<&T> {
        self.compiled.downcast_ref::<T>()
    }
}

impl fmt::Debug for PluginConf {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.debug_struct("PluginConf")
            .field("value", &self.value)
            .field("key", &self.key)
            .finish()
    }
}

/// A response made by the gateway itself (a plugin ended the request, or an error).
pub struct LocalResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// A peer's header lines as received, sent after `headers` (a plugin that relays a peer's
    /// response may keep them unparsed when no plugin in effect sees response headers:
    /// [`Ctx::response_phases`]). Whatever needs them as headers turns them into `headers`
    /// first ([`LocalResponse::take_raw`]).
    pub raw: Option<RawHead>,
    pub body: ResponseBody,
}

impl LocalResponse {
    /// APISIX's `core.response.exit(code, body)`: a table body is sent as JSON with a trailing newline.
    pub fn json(status: StatusCode, body: &Value) -> Self {
        let mut text = serde_json::to_vec(body).unwrap_or_default();
        text.push(b'\n');
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        LocalResponse {
            status,
            headers,
            raw: None,
            body: ResponseBody::Full(Bytes::from(text)),
        }
    }

    /// A response with a plain body (or none when `body` is empty).
    pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Self {
        let body: Bytes = body.into();
        LocalResponse {
            status,
            headers: HeaderMap::new(),
            raw: None,
            body: if body.is_empty() {
                ResponseBody::Empty
            } else {
                ResponseBody::Full(body)
            },
        }
    }

    /// `{"error_msg": msg}` as APISIX answers its own errors.
    pub fn error(status: StatusCode, msg: &str) -> Self {
        Self::json(status, &serde_json::json!({ "error_msg": msg }))
    }

    /// Moves the kept header lines, if any, into `headers`.
    pub fn take_raw(&mut self) {
        if let Some(raw) = self.raw.take() {
            raw.into_headers(&mut self.headers);
        }
    }
}

impl fmt::Debug for LocalResponse {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.debug_struct("LocalResponse")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .finish()
    }
}

/// What a request phase tells the chain.
// `Respond` holds a response body inline (an upstream body owns its connection, a few hundred
// bytes): moving it costs less than a heap allocation per request would.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Flow {
    /// Go on with the next plugin, then the next phase.
    Continue,
    /// End the request with this response. The later plugins of this phase and the later request
    /// phases do not run, and the upstream is not contacted; `header_filter`, `body_filter` and
    /// `log` still run on this response, as in APISIX. Boxed: a phase result is moved through
    /// a few layers on every request, and almost always is `Continue`.
    Respond(Box<LocalResponse>),
}

impl Flow {
    /// End the request with `r`.
    pub fn respond(r: LocalResponse) -> Flow {
        Flow::Respond(Box::new(r))
    }
}

/// The response status and headers as `header_filter` sees and changes them.
#[derive(Debug, Clone)]
pub struct ResponseHead {
    pub status: StatusCode,
    pub headers: HeaderMap,
}

/// One piece of a response body as `body_filter` sees it: APISIX's `ngx.arg[1]` and `ngx.arg[2]`.
#[derive(Debug, Clone, Default)]
pub struct BodyChunk {
    pub data: Bytes,
    /// The last chunk. A plugin that sets this ends the body: later upstream data is dropped.
    pub eof: bool,
}

/// A plugin failed in a phase; its request gets 500 and the failure is logged.
#[derive(Debug, Clone, thiserror::Error)]
#[error("plugin {plugin} failed in {phase}: {message}")]
pub struct PluginError {
    pub plugin: String,
    pub phase: &'static str,
    pub message: String,
}

impl PluginError {
    pub fn new(plugin: &str, phase: Phase, message: impl Into<String>) -> Self {
        PluginError {
            plugin: plugin.to_string(),
            phase: phase.as_str(),
            message: message.into(),
        }
    }
}

/// Result of a request phase.
pub type PhaseResult = Result<Flow, PluginError>;

/// A request phase call as [`Plugin::start_phase`] hands it to the chain: finished already, or
/// the future to await because it waits for something.
pub enum PhaseCall<'a> {
    Ready(PhaseResult),
    Wait(Pin<Box<dyn Future<Output = PhaseResult> + 'a>>),
}

/// Is it a native Rust plugin or a Lua module?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginKind {
    Native,
    Lua,
}

/// One plugin, native or Lua. Every method but the identity ones has a default, so a plugin
/// implements only the phases it needs and declares them in [`Plugin::phases`].
///
/// Phases run on a worker thread; the request phases are async and may wait (a Lua `ngx.sleep`,
/// an HTTP call) without blocking the worker. The filter and log phases are synchronous, as in
/// OpenResty, where they may not yield either.
#[async_trait(?Send)]
pub trait Plugin: Send + Sync + 'static {
    /// The name routes use to enable it.
    fn name(&self) -> &str;

    /// Higher runs first in every phase; ties are broken by name.
    fn priority(&self) -> i64;

    /// The plugin's version string (APISIX's `version`).
    fn version(&self) -> &str {
        "0.1"
    }

    fn kind(&self) -> PluginKind {
        PluginKind::Native
    }

    /// For a plugin loaded from a file: a hash of the source it was loaded from, so reload can
    /// tell whether the file on disk is still what serves. None for native plugins.
    fn source_digest(&self) -> Option<u64> {
        None
    }

    /// An authentication plugin (APISIX's `type = "auth"`): it identifies consumers, so a
    /// consumer's conf of it is a credential, not a plugin to merge into the route.
    fn is_auth(&self) -> bool {
        false
    }

    /// The conf schema (JSON Schema), also served by the Admin API's `/plugins/{name}`.
    fn schema(&self) -> &Schema;

    /// Validates a conf, fills in schema defaults, and compiles what the phases need from it.
    /// Runs when a snapshot is built, never on the request path. The default validates against
    /// [`Plugin::schema`] and compiles nothing. Errors use APISIX's jsonschema wording.
    fn check_conf(
        &self,
        conf: &mut Value,
        scope: ConfScope,
    ) -> Result<Arc<dyn Any + Send + Sync>, String> {
        let _ = scope;
        self.schema().check(conf)?;
        Ok(Arc::new(()))
    }

    /// The schema of the plugin's metadata (APISIX's `metadata_schema`), if it declares one.
    fn metadata_schema(&self) -> Option<&Schema> {
        None
    }

    /// Validates plugin metadata (`/apisix/admin/plugin_metadata/NAME`) and fills in schema
    /// defaults. The default checks [`Plugin::metadata_schema`]; without one any object is
    /// accepted, as APISIX injects an empty object schema. Errors use APISIX's wording.
    fn check_metadata(&self, conf: &mut Value) -> Result<(), String> {
        match self.metadata_schema() {
            Some(s) => s.check(conf),
            None => Ok(()),
        }
    }

    /// Called on each worker when a configuration holding this plugin starts serving there,
    /// before its requests need it: APISIX loads every plugin in every worker at start, so a
    /// Lua plugin's module body and `init()` run then (its timers start, its variables are
    /// registered). The default does nothing.
    fn worker_start(&self) {}

    /// The phases this plugin implements.
    fn phases(&self) -> PhaseSet;

    /// APISIX's `rewrite`: runs first, before authentication-dependent work. May end the request.
    async fn rewrite(&self, conf: &PluginConf, ctx: &mut Ctx) -> PhaseResult {
        let _ = (conf, ctx);
        Ok(Flow::Continue)
    }

    /// APISIX's `access`: after every plugin's rewrite. May end the request.
    async fn access(&self, conf: &PluginConf, ctx: &mut Ctx) -> PhaseResult {
        let _ = (conf, ctx);
        Ok(Flow::Continue)
    }

    /// APISIX's `before_proxy`: the upstream node is picked; runs just before the upstream call.
    /// May end the request.
    async fn before_proxy(&self, conf: &PluginConf, ctx: &mut Ctx) -> PhaseResult {
        let _ = (conf, ctx);
        Ok(Flow::Continue)
    }

    /// Runs a request phase (rewrite, access, before_proxy) as far as it goes without waiting.
    /// The default hands over the phase method's future; a plugin whose calls usually finish
    /// at once (Lua) overrides it so that such a call costs no boxed future.
    fn start_phase<'a>(
        &'a self,
        phase: Phase,
        conf: &'a PluginConf,
        ctx: &'a mut Ctx,
    ) -> PhaseCall<'a> {
        PhaseCall::Wait(match phase {
            Phase::Rewrite => self.rewrite(conf, ctx),
            Phase::Access => self.access(conf, ctx),
            Phase::BeforeProxy => self.before_proxy(conf, ctx),
            _ => return PhaseCall::Ready(Ok(Flow::Continue)),
        })
    }

    /// APISIX's `header_filter`: the response status and headers, from the upstream or a local
    /// response, before they are sent. The returned error turns the response into a 500.
    fn header_filter(
        &self,
        conf: &PluginConf,
        ctx: &mut Ctx,
        head: &mut ResponseHead,
    ) -> Result<(), PluginError> {
        let _ = (conf, ctx, head);
        Ok(())
    }

    /// APISIX's `body_filter`: called once per body chunk, and once with `eof` set.
    fn body_filter(
        &self,
        conf: &PluginConf,
        ctx: &mut Ctx,
        chunk: &mut BodyChunk,
    ) -> Result<(), PluginError> {
        let _ = (conf, ctx, chunk);
        Ok(())
    }

    /// APISIX's `delayed_body_filter`: called per chunk like `body_filter`, after every
    /// plugin's `body_filter` has run on it.
    fn delayed_body_filter(
        &self,
        conf: &PluginConf,
        ctx: &mut Ctx,
        chunk: &mut BodyChunk,
    ) -> Result<(), PluginError> {
        let _ = (conf, ctx, chunk);
        Ok(())
    }

    /// APISIX's `log`: after the response has been sent; never delays it.
    fn log(&self, conf: &PluginConf, ctx: &mut Ctx) {
        let _ = (conf, ctx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_set() {
        let s: PhaseSet = [Phase::Access, Phase::Log].into_iter().collect();
        assert!(s.contains(Phase::Access));
        assert!(s.contains(Phase::Log));
        assert!(!s.contains(Phase::Rewrite));
    }

    #[test]
    fn json_exit_has_trailing_newline() {
        let r = LocalResponse::error(StatusCode::NOT_FOUND, "404 Route Not Found");
        match r.body {
            ResponseBody::Full(b) => {
                assert_eq!(&b[..], b"{\"error_msg\":\"404 Route Not Found\"}\n")
            }
            _ => panic!("expected a full body"),
        }
    }
}
