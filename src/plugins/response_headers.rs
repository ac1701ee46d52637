//! `response-headers`: sets, adds or removes response headers; values may name request
//! variables (`$remote_addr`, `$route_id`, `$http_x_id`, ...), resolved per request.
//!
//! A small native plugin on the shared plugin interface, for users and as a model for native
//! plugins. Its conf shape follows the `headers` part of APISIX's `response-rewrite`.
//!
//! ```yaml
//! plugins:
//!   response-headers:
//!     set: {X-Route: "$route_id"}
//!     add: {Set-Cookie: "a=1"}
//!     remove: [Server-Timing]
//! ```

use std::any::Any;
use std::sync::{Arc, OnceLock};

use http::header::{HeaderName, HeaderValue};
use serde_json::{json, Value};

use crate::plugin::{
    ConfScope, Ctx, Phase, PhaseSet, Plugin, PluginConf, PluginError, ResponseHead, Schema,
};

pub struct ResponseHeaders;

/// A header value: literal text and `$var` references, split once when the conf is checked.
#[derive(Debug, Clone)]
enum Part {
    Text(String),
    Var(String),
}

#[derive(Debug)]
struct Compiled {
    set: Vec<(HeaderName, Vec<Part>)>,
    add: Vec<(HeaderName, Vec<Part>)>,
    remove: Vec<HeaderName>,
}

fn schema() -> &'static Schema {
    static S: OnceLock<Schema> = OnceLock::new();
    S.get_or_init(|| {
        let headers = json!({
            "type": "object",
            "minProperties": 1,
            "patternProperties": {"^[^:]+$": {"type": "string"}}
        });
        Schema::compile(&json!({
            "type": "object",
            "properties": {
                "set": headers,
                "add": headers,
                "remove": {"type": "array", "minItems": 1, "items": {"type": "string"}}
            },
            "anyOf": [{"required": ["set"]}, {"required": ["add"]}, {"required": ["remove"]}]
        }))
        .expect("the response-headers schema compiles")
    })
}

/// Splits `a $b c` into text and variable parts. `$name` runs over `[A-Za-z0-9_]`.
fn parse_value(v: &str) -> Vec<Part> {
    let mut parts = Vec::new();
    let mut text = String::new();
    let mut chars = v.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c == '$' {
            let start = i + 1;
            let mut end = start;
            while let Some(&(j, d)) = chars.peek() {
                if d.is_ascii_alphanumeric() || d == '_' {
                    end = j + d.len_utf8();
                    chars.next();
                } else {
                    break;
                }
            }
            if end > start {
                if !text.is_empty() {
                    parts.push(Part::Text(std::mem::take(&mut text)));
                }
                parts.push(Part::Var(v[start..end].to_string()));
                continue;
            }
        }
        text.push(c);
    }
    if !text.is_empty() {
        parts.push(Part::Text(text));
    }
    parts
}

fn compile_map(conf: &Value, key: &str) -> Result<Vec<(HeaderName, Vec<Part>)>, String> {
    let mut out = Vec::new();
    if let Some(map) = conf.get(key).and_then(Value::as_object) {
        for (name, value) in map {
            let h = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("invalid header name \"{name}\" in {key}"))?;
            let v = value.as_str().unwrap_or_default();
            out.push((h, parse_value(v)));
        }
    }
    Ok(out)
}

fn render(parts: &[Part], ctx: &Ctx) -> Option<HeaderValue> {
    if let [Part::Text(t)] = parts {
        return HeaderValue::from_str(t).ok();
    }
    let mut s = String::new();
    for p in parts {
        match p {
            Part::Text(t) => s.push_str(t),
            Part::Var(v) => {
                if let Some(val) = ctx.var(v) {
                    s.push_str(&val);
                }
            }
        }
    }
    HeaderValue::from_str(&s).ok()
}

impl Plugin for ResponseHeaders {
    fn name(&self) -> &str {
        "response-headers"
    }

    fn priority(&self) -> i64 {
        // Just below APISIX's response-rewrite (899).
        898
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
        let remove = conf
            .get("remove")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|v| {
                        let n = v.as_str().unwrap_or_default();
                        HeaderName::from_bytes(n.as_bytes())
                            .map_err(|_| format!("invalid header name \"{n}\" in remove"))
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?
            .unwrap_or_default();
        Ok(Arc::new(Compiled {
            set: compile_map(conf, "set")?,
            add: compile_map(conf, "add")?,
            remove,
        }))
    }

    fn phases(&self) -> PhaseSet {
        PhaseSet::empty().with(Phase::HeaderFilter)
    }

    fn header_filter(
        &self,
        conf: &PluginConf,
        ctx: &mut Ctx,
        head: &mut ResponseHead,
    ) -> Result<(), PluginError> {
        let c = conf.compiled::<Compiled>().ok_or_else(|| {
            PluginError::new(self.name(), Phase::HeaderFilter, "conf was not compiled")
        })?;
        for name in &c.remove {
            head.headers.remove(name);
        }
        for (name, parts) in &c.set {
            match render(parts, ctx) {
                Some(v) => {
                    head.headers.insert(name.clone(), v);
                }
                None => {
                    tracing::warn!(plugin = "response-headers", header = %name, "value is not a valid header value; skipped")
                }
            }
        }
        for (name, parts) in &c.add {
            if let Some(v) = render(parts, ctx) {
                head.headers.append(name.clone(), v);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_vars() {
        let p = parse_value("id=$route_id; ip=$remote_addr$");
        assert_eq!(p.len(), 5);
        assert!(matches!(&p[1], Part::Var(v) if v == "route_id"));
        assert!(matches!(&p[4], Part::Text(t) if t == "$"));
    }

    #[test]
    fn conf_is_checked() {
        let mut bad = json!({"set": {"X-A": 1}});
        assert!(ResponseHeaders
            .check_conf(&mut bad, ConfScope::Route)
            .is_err());
        let mut empty = json!({});
        assert!(ResponseHeaders
            .check_conf(&mut empty, ConfScope::Route)
            .is_err());
        let mut ok = json!({"set": {"X-A": "$route_id"}, "remove": ["server"]});
        assert!(ResponseHeaders
            .check_conf(&mut ok, ConfScope::Route)
            .is_ok());
    }
}
