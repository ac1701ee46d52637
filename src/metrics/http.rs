//! Recording one request in APISIX's request metrics (`apisix_http_status`,
//! `apisix_http_latency`, `apisix_bandwidth`), as the `prometheus` plugin's log phase does.

use std::borrow::Cow;
use std::time::Duration;

use crate::plugin::ctx::strip_port;
use crate::plugin::Ctx;

use super::store;
use super::ExtraLabel;

/// Milliseconds, as APISIX's latency metrics count them.
fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// APISIX's `ctx.curr_req_matched._host`: the route's host pattern this request matched
/// (`""` for a route that takes any host).
pub fn matched_host<'a>(patterns: &'a [String], host: &str) -> &'a str {
    for p in patterns {
        let hit = match p.strip_prefix('*') {
            Some(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
            None => p == host,
        };
        if hit {
            return p;
        }
    }
    ""
}

/// The request's latencies in milliseconds: whole request, upstream (from the first
/// connection attempt to now, when an upstream answered) and the gateway's own (the rest),
/// as APISIX's `latency_details_in_ms`.
pub fn latencies(ctx: &Ctx) -> (f64, Option<f64>, f64) {
    let total = ms(ctx.start.elapsed());
    let upstream = match (ctx.upstream_start, ctx.upstream_status) {
        (Some(at), Some(_)) => Some(ms(at.elapsed()).min(total)),
        _ => None,
    };
    (total, upstream, total - upstream.unwrap_or(0.0))
}

/// nginx's `$request_length`, estimated from the request as plugins left it: request line,
/// header lines and the announced body length.
pub fn request_length(ctx: &Ctx) -> u64 {
    let mut n = ctx.method.as_str().len() + ctx.request_uri.len() + 12;
    for (k, v) in &ctx.headers {
        n += k.as_str().len() + v.len() + 4;
    }
    n as u64 + 2 + ctx.body.exact_len().unwrap_or(0)
}

fn extras<'a>(labels: &[ExtraLabel], ctx: &'a Ctx, out: &mut Vec<Cow<'a, str>>) {
    for l in labels {
        out.push(ctx.var(&l.var).unwrap_or(Cow::Borrowed("")));
    }
}

/// Computes the extra labels' variables that Lua plugins registered (`core.ctx.register_var`)
/// and keeps them in `ctx.vars`, where [`record`] reads them: they run Lua, which needs the
/// request mutably. Nothing to do without extra labels.
pub fn resolve_registered(ctx: &mut Ctx) {
    let settings = super::settings();
    let labels = settings
        .status_labels
        .iter()
        .chain(&settings.latency_labels)
        .chain(&settings.bandwidth_labels);
    for l in labels {
        if ctx.var(&l.var).is_none() {
            if let Some(v) = crate::plugin::lua::runtime::registered_var(ctx, &l.var) {
                ctx.vars.insert(l.var.clone(), v);
            }
        }
    }
}

/// Records `ctx` (at its log phase). `prefer_name`: label routes and services by name when
/// they have one.
pub fn record(ctx: &Ctx, prefer_name: bool) {
    let settings = super::settings();
    let route = ctx.route.as_deref();
    let route_label = match route {
        Some(r) if prefer_name => r.name.as_deref().unwrap_or(&r.id),
        Some(r) => &r.id,
        None => "",
    };
    let service_label = match route {
        Some(r) if prefer_name => r.service_name.as_deref().or(r.service_id.as_deref()),
        Some(r) => r.service_id.as_deref(),
        None => None,
    }
    .unwrap_or("");
    let matched_uri = ctx.matched.as_ref().map_or("", |m| &m.uri);
    let matched_host = route.map_or("", |r| matched_host(&r.hosts, &ctx.host));
    let consumer = ctx.consumer.as_deref().map_or("", |c| c.username.as_str());
    let node = ctx.upstream_addr.as_deref().map_or("", strip_port);
    let mut code_buf = itoa::Buffer::new();
    let code = code_buf.format(ctx.status);

    // Extra labels are the only part that may allocate (their values are request
    // variables); without them the label values are borrowed from ctx and the snapshot.
    let has_extras = !(settings.status_labels.is_empty()
        && settings.latency_labels.is_empty()
        && settings.bandwidth_labels.is_empty());
    let mut extra_values: Vec<Cow<str>> = Vec::new();
    if has_extras {
        extras(&settings.status_labels, ctx, &mut extra_values);
        extras(&settings.latency_labels, ctx, &mut extra_values);
        extras(&settings.bandwidth_labels, ctx, &mut extra_values);
    }
    let ns = settings.status_labels.len();

    {
        let base = [
            code,
            route_label,
            matched_uri,
            matched_host,
            service_label,
            consumer,
            node,
        ];
        let record = |values: &[&str]| {
            store::with_status(values, |s| s.count.add(1));
        };
        if ns == 0 {
            record(&base);
        } else {
            let mut v: Vec<&str> = base.to_vec();
            v.extend(extra_values[..ns].iter().map(|c| c.as_ref()));
            record(&v);
        }
    }

    let (total, upstream, own) = latencies(ctx);
    let ingress = request_length(ctx);
    let egress = ctx.bytes_sent;
    let bounds = &settings.buckets;
    let base = [route_label, service_label, consumer, node];
    let record = |values: &[&str]| {
        store::with_request(values, bounds.len(), |s| {
            s.latency[0].observe(bounds, total);
            if let Some(u) = upstream {
                s.latency[1].observe(bounds, u);
            }
            s.latency[2].observe(bounds, own);
            s.ingress.add(ingress);
            s.egress.add(egress);
        });
    };
    if extra_values.len() == ns {
        record(&base);
    } else {
        let mut v: Vec<&str> = base.to_vec();
        v.extend(extra_values[ns..].iter().map(|c| c.as_ref()));
        record(&v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_patterns() {
        let p = vec!["a.com".to_string(), "*.b.com".to_string()];
        assert_eq!(matched_host(&p, "a.com"), "a.com");
        assert_eq!(matched_host(&p, "x.b.com"), "*.b.com");
        assert_eq!(matched_host(&p, "b.com"), "");
        assert_eq!(matched_host(&[], "a.com"), "");
    }
}
