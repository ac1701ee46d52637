//! moongate's own families (`moongate_*`) from the parts of the gateway that keep them.

use std::sync::Arc;

use super::expose::{Family, Kind, Source, Value};
use crate::reload::Reloader;
use crate::snapshot::Gateway;
use crate::store::ResourceStore;

/// The configuration's state: generation in force, reloads and refused reloads.
pub struct ConfigSource(pub Arc<Reloader>);

impl Source for ConfigSource {
    fn collect(&self, out: &mut Vec<Family>) {
        let status = self.0.status();
        let serving = self.0.gateway().load().generation;
        let mut f = Family::new(
            "moongate_config_generation",
            "The configuration generation being served",
            Kind::Gauge,
            &[],
        );
        f.push(Vec::new(), Value::Int(serving));
        out.push(f);
        let mut f = Family::new(
            "moongate_config_reloads_total",
            "Rebuilds of the configuration that were published",
            Kind::Counter,
            &[],
        );
        f.push(Vec::new(), Value::Int(status.reloads));
        out.push(f);
        let mut f = Family::new(
            "moongate_config_reloads_refused_total",
            "Rebuilds of the configuration that failed validation (the previous generation kept serving)",
            Kind::Counter,
            &[],
        );
        f.push(Vec::new(), Value::Int(status.failures));
        out.push(f);
    }
}

/// APISIX's config-server families on etcd: `apisix_etcd_reachable` (1 while the watch is
/// connected) and `apisix_etcd_modify_indexes{key}` (the newest modification per kind, their
/// maximum as `max_modify_index`, and the revision this node's copy is at as `x_etcd_index`).
pub struct EtcdSource(pub Arc<dyn ResourceStore>);

impl Source for EtcdSource {
    fn collect(&self, out: &mut Vec<Family>) {
        let Some(status) = self.0.status() else {
            return;
        };
        if status["provider"] != "etcd" {
            return;
        }
        let p = &super::settings().prefix;
        let mut f = Family::new(
            format!("{p}etcd_reachable"),
            "Config server etcd reachable from APISIX, 0 is unreachable",
            Kind::Gauge,
            &[],
        );
        let up = status["connected"].as_bool() == Some(true);
        f.push(Vec::new(), Value::Int(u64::from(up)));
        out.push(f);
        let mut f = Family::new(
            format!("{p}etcd_modify_indexes"),
            "Etcd modify index for APISIX keys",
            Kind::Gauge,
            &["key"],
        );
        if let Some(m) = status["modify_indexes"].as_object() {
            for (key, v) in m {
                f.push(vec![key.clone()], Value::Int(v.as_u64().unwrap_or(0)));
            }
        }
        out.push(f);
    }
}

/// APISIX's `apisix_upstream_status{name, ip, port}`: each health-checked node of the
/// configuration being served, 1 while healthy (or `mostly_healthy`), 0 otherwise. `name` is
/// the checker's resource key, as the control API's `/v1/healthcheck` names it.
pub struct UpstreamStatusSource(pub Arc<Gateway>);

impl Source for UpstreamStatusSource {
    fn collect(&self, out: &mut Vec<Family>) {
        let p = &super::settings().prefix;
        let mut f = Family::new(
            format!("{p}upstream_status"),
            "Upstream status from health check",
            Kind::Gauge,
            &["name", "ip", "port"],
        );
        let snap = self.0.load();
        for h in snap.health.iter() {
            for n in &h.nodes {
                let healthy = matches!(n.status(), "healthy" | "mostly_healthy");
                f.push(
                    vec![h.key.to_string(), n.host.clone(), n.port.to_string()],
                    Value::Int(u64::from(healthy)),
                );
            }
        }
        out.push(f);
    }
}
