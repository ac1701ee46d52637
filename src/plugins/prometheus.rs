//! `prometheus`: APISIX's plugin of that name. Enabled on a route, a service or as a global
//! rule, its log phase records the request in `apisix_http_status`, `apisix_http_latency`
//! and `apisix_bandwidth` (`src/metrics/`); the export server serves them.
//!
//! ```yaml
//! global_rules:
//!   - id: 1
//!     plugins:
//!       prometheus: {prefer_name: true}
//! ```
//!
//! As in APISIX (`run_policy = "prefer_route"`), a request whose route has its own
//! `prometheus` conf is recorded once, with the route's conf, not also by the global rule.

use std::any::Any;
use std::sync::{Arc, OnceLock};

use serde_json::{json, Value};

use crate::plugin::{ConfScope, Ctx, Phase, PhaseSet, Plugin, PluginConf, Schema};

pub struct Prometheus;

/// The compiled conf.
#[derive(Debug)]
struct Conf {
    prefer_name: bool,
}

fn schema() -> &'static Schema {
    static S: OnceLock<Schema> = OnceLock::new();
    S.get_or_init(|| {
        Schema::compile(&json!({
            "type": "object",
            "properties": {
                "prefer_name": {"type": "boolean", "default": false}
            }
        }))
        .expect("the prometheus schema compiles")
    })
}

const NAME: &str = "prometheus";

/// Whether the plugins in effect for the request's route (its own, or merged with a
/// consumer's) include `prometheus`.
fn route_has_own(ctx: &Ctx) -> bool {
    let chain = match (&ctx.plugins, &ctx.route) {
        (Some(merged), _) => &**merged,
        (None, Some(r)) => &r.chain,
        (None, None) => return false,
    };
    chain.entries.iter().any(|e| e.plugin.name() == NAME)
}

impl Plugin for Prometheus {
    fn name(&self) -> &str {
        NAME
    }

    fn priority(&self) -> i64 {
        500
    }

    fn version(&self) -> &str {
        "0.2"
    }

    fn schema(&self) -> &Schema {
        schema()
    }

    fn check_conf(
        &self,
        conf: &mut Value,
        _scope: ConfScope,
    ) -> Result<Arc<dyn Any + Send + Sync>, String> {
        self.schema().check(conf)?;
        Ok(Arc::new(Conf {
            prefer_name: conf
                .get("prefer_name")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        }))
    }

    fn phases(&self) -> PhaseSet {
        PhaseSet::empty().with(Phase::Log)
    }

    fn log(&self, conf: &PluginConf, ctx: &mut Ctx) {
        let prefer_name = conf.compiled::<Conf>().is_some_and(|c| c.prefer_name);
        let global = conf
            .parent
            .as_deref()
            .is_some_and(|p| p.starts_with("/apisix/global_rules/"));
        if global && route_has_own(ctx) {
            return;
        }
        crate::metrics::http::resolve_registered(ctx);
        crate::metrics::http::record(ctx, prefer_name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_fills_the_default() {
        let mut c = json!({});
        Prometheus.check_conf(&mut c, ConfScope::Route).unwrap();
        assert_eq!(c, json!({"prefer_name": false}));
        let mut bad = json!({"prefer_name": 1});
        assert!(Prometheus.check_conf(&mut bad, ConfScope::Route).is_err());
    }
}
