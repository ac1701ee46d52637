//! The Rust side of the Lua plugins' own metrics ([`crate::metrics::custom`]):
//! `__moongate.metrics_enabled()` and `__moongate.metric_register(kind, name, help, labels,
//! buckets)`, whose handle has `inc`, `set`, `observe`, `del` and `reset`. Each answers nil,
//! or the error message for the caller to log (lua/apisix/plugins/prometheus/exporter.lua
//! builds nginx-lua-prometheus' objects on them).

use std::sync::Arc;

use mlua::{Lua, MultiValue, Table, UserData, UserDataMethods, Value};

use crate::metrics::custom::{self, Metric};
use crate::metrics::expose::Kind;

struct Handle(Arc<Metric>);

/// Label values: the sequence part of `t`, each as Lua's `tostring` would write it, with
/// control characters left out (they have no place in an exposition line).
fn label_values(lua: &Lua, t: Option<Table>) -> mlua::Result<Vec<String>> {
    let Some(t) = t else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    for v in t.sequence_values::<Value>() {
        let v = v?;
        let s = match &v {
            Value::Boolean(b) => b.to_string(),
            _ => match lua.coerce_string(v)? {
                Some(s) => s.to_string_lossy(),
                None => return Err(mlua::Error::runtime("label values must be strings")),
            },
        };
        out.push(s.chars().filter(|c| !c.is_control()).collect());
    }
    Ok(out)
}

fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Integer(i) => Some(*i as f64),
        Value::Number(n) => Some(*n),
        _ => None,
    }
}

fn answer(r: Result<(), String>) -> Option<String> {
    r.err()
}

impl UserData for Handle {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("inc", |lua, h, (value, labels): (Value, Option<Table>)| {
            let value = match value {
                Value::Nil => 1.0,
                v => match number(&v) {
                    Some(n) => n,
                    None => return Ok(Some("Value should be a number".to_string())),
                },
            };
            Ok(answer(h.0.inc(value, label_values(lua, labels)?)))
        });
        methods.add_method("set", |lua, h, (value, labels): (Value, Option<Table>)| {
            let Some(value) = number(&value) else {
                return Ok(Some(format!("No value passed for {}", h.name())));
            };
            Ok(answer(h.0.set(value, label_values(lua, labels)?)))
        });
        methods.add_method(
            "observe",
            |lua, h, (value, labels): (Value, Option<Table>)| {
                let Some(value) = number(&value) else {
                    return Ok(Some(format!("No value passed for {}", h.name())));
                };
                Ok(answer(h.0.observe(value, label_values(lua, labels)?)))
            },
        );
        methods.add_method("del", |lua, h, labels: Option<Table>| {
            Ok(answer(h.0.del(label_values(lua, labels)?)))
        });
        methods.add_method("reset", |_, h, ()| {
            h.0.reset();
            Ok(())
        });
    }
}

impl Handle {
    fn name(&self) -> &str {
        self.0.name()
    }
}

pub(crate) fn install(lua: &Lua, mg: &Table) -> mlua::Result<()> {
    mg.set(
        "metrics_enabled",
        lua.create_function(|_, ()| Ok(crate::metrics::settings().export_addr.is_some()))?,
    )?;
    // metric_register(kind, name, help, label_names, buckets) -> handle | nil, err
    mg.set(
        "metric_register",
        lua.create_function(
            |lua,
             (kind, name, help, labels, buckets): (
                String,
                String,
                Option<String>,
                Option<Table>,
                Option<Table>,
            )| {
                let kind = match kind.as_str() {
                    "counter" => Kind::Counter,
                    "gauge" => Kind::Gauge,
                    _ => Kind::Histogram,
                };
                let labels = label_values(lua, labels)?;
                let buckets = match buckets {
                    Some(t) => {
                        let mut b = Vec::new();
                        for v in t.sequence_values::<Value>() {
                            match number(&v?) {
                                Some(n) => b.push(n),
                                None => {
                                    return Ok(MultiValue::from_iter([
                                        Value::Nil,
                                        Value::String(lua.create_string(
                                            "bucket boundaries should be numeric",
                                        )?),
                                    ]))
                                }
                            }
                        }
                        Some(b)
                    }
                    None => None,
                };
                match custom::register(kind, &name, help.as_deref().unwrap_or(""), labels, buckets)
                {
                    Ok(m) => Ok(MultiValue::from_iter([Value::UserData(
                        lua.create_userdata(Handle(m))?,
                    )])),
                    Err(e) => Ok(MultiValue::from_iter([
                        Value::Nil,
                        Value::String(lua.create_string(&e)?),
                    ])),
                }
            },
        )?,
    )?;
    Ok(())
}
