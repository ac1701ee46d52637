//! moongate's own families (`moongate_*`) from the parts of the gateway that keep them.

use std::sync::Arc;

use super::expose::{Family, Kind, Source, Value};
use crate::reload::Reloader;

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
