//! moongate: an API gateway with APISIX's plugin API on a Rust core.
//!
//! The crate is laid out as the request meets it: [`config`] (what the operator wrote),
//! [`snapshot`] (what a request reads, built and validated whole), [`host`] (the one request
//! host), [`router`], [`plugin`] (the interface every plugin implements), [`plugins`] (the
//! native ones), [`proxy`] (listeners, workers, the upstream client), [`startup`] (what `run`
//! and `check` both check before serving), [`reload`] (building snapshots), [`tls`] (TLS
//! termination: listeners, certificates by SNI), [`compress`] (gzip of responses a plugin asks
//! for), [`supervisor`] (the parent process that keeps
//! the listening sockets and restarts a crashed serving process) and [`testrunner`]
//! (`moongate test`, for plugin authors).

pub mod accesslog;
pub mod admin;
pub mod balancer;
pub mod body;
pub mod compress;
pub mod config;
pub mod control;
pub mod dns;
pub mod errorlog;
pub mod health;
pub mod host;
pub mod http1;
pub mod http2;
pub mod local_api;
pub mod metrics;
pub mod otel;
pub mod plugin;
pub mod plugins;
pub mod proxy;
pub mod reload;
pub mod router;
pub mod snapshot;
pub mod startup;
pub mod status;
pub mod store;
pub mod supervisor;
pub mod testrunner;
pub mod tls;
