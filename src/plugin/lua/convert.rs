//! Moving values between Lua tables and JSON, with lua-cjson's conventions as APISIX uses them:
//! an empty table is an object unless it carries the array metatable, a table whose keys are
//! exactly `1..n` is an array, `ngx.null` is JSON null, and decoded arrays get the array
//! metatable so they encode back as arrays.

use mlua::{LightUserData, Lua, Table, Value};
use serde_json::{Map, Number, Value as Json};

/// The registry name of the array metatable (`core.json.array_mt`, `cjson.array_mt`).
pub const ARRAY_MT: &str = "moongate.array_mt";

/// How deep nested tables may go before conversion gives up (a self-referencing table).
const MAX_DEPTH: usize = 1000;

/// `ngx.null` / `cjson.null`: the NULL light userdata.
pub fn null() -> Value {
    Value::LightUserData(LightUserData(std::ptr::null_mut()))
}

/// The VM's array metatable.
pub fn array_mt(lua: &Lua) -> mlua::Result<Table> {
    lua.named_registry_value(ARRAY_MT)
}

fn is_null(v: &Value) -> bool {
    matches!(v, Value::LightUserData(p) if p.0.is_null())
}

/// Gives a conf table APISIX's `_meta.parent` (`{resource_key, resource_version}`) the way
/// APISIX does: through `_meta`'s metatable, so encoding the conf does not show it.
pub fn set_meta_parent(
    lua: &Lua,
    conf: &Table,
    resource_key: &str,
    version: u64,
) -> mlua::Result<()> {
    let meta = match conf.raw_get::<Value>("_meta")? {
        Value::Table(t) => t,
        _ => {
            let t = lua.create_table()?;
            conf.raw_set("_meta", &t)?;
            t
        }
    };
    let parent = lua.create_table()?;
    parent.set("resource_key", resource_key)?;
    parent.set("resource_version", version.to_string())?;
    let index = lua.create_table()?;
    index.set("parent", parent)?;
    let mt = lua.create_table()?;
    mt.set("__index", index)?;
    meta.set_metatable(Some(mt))?;
    Ok(())
}

/// JSON → Lua. Arrays carry the array metatable; null becomes `ngx.null`.
pub fn json_to_lua(lua: &Lua, v: &Json) -> mlua::Result<Value> {
    let mt = array_mt(lua)?;
    to_lua(lua, v, &mt)
}

fn to_lua(lua: &Lua, v: &Json, mt: &Table) -> mlua::Result<Value> {
    Ok(match v {
        Json::Null => null(),
        Json::Bool(b) => Value::Boolean(*b),
        Json::Number(n) => match n.as_i64() {
            Some(i) => Value::Integer(i),
            None => Value::Number(n.as_f64().unwrap_or(0.0)),
        },
        Json::String(s) => Value::String(lua.create_string(s)?),
        Json::Array(items) => {
            let t = lua.create_table_with_capacity(items.len(), 0)?;
            for (i, item) in items.iter().enumerate() {
                t.raw_set(i + 1, to_lua(lua, item, mt)?)?;
            }
            t.set_metatable(Some(mt.clone()))?;
            Value::Table(t)
        }
        Json::Object(map) => {
            let t = lua.create_table_with_capacity(0, map.len())?;
            for (k, item) in map {
                t.raw_set(k.as_str(), to_lua(lua, item, mt)?)?;
            }
            Value::Table(t)
        }
    })
}

/// What to do with values JSON cannot hold (functions, userdata, threads).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Unsupported {
    /// Fail, as `cjson.encode` does.
    Error,
    /// Leave the entry out (used when reading back a conf table a plugin may have decorated
    /// with functions or cached objects).
    Skip,
}

/// Lua → JSON with cjson's rules.
pub fn lua_to_json(lua: &Lua, v: &Value, unsupported: Unsupported) -> Result<Json, String> {
    let mt = array_mt(lua).map_err(|e| e.to_string())?;
    to_json(v, &mt, unsupported, 0)?
        .ok_or_else(|| format!("Cannot serialise {}: type not supported", v.type_name()))
}

/// Decides whether a table is a JSON array: it carries the array metatable, or it is non-empty
/// and its keys are exactly `1..n`. Returns the length when it is.
fn array_len(t: &Table, mt: &Table) -> Option<usize> {
    if let Some(m) = t.metatable() {
        if m == *mt {
            return Some(t.raw_len());
        }
    }
    let n = t.raw_len();
    if n == 0 {
        return None;
    }
    // Count all keys: an array has exactly n of them.
    let mut count = 0usize;
    let mut ok = true;
    let _ = t.for_each::<Value, Value>(|k, _| {
        count += 1;
        if !matches!(k, Value::Integer(_) | Value::Number(_)) {
            ok = false;
        }
        Ok(())
    });
    (ok && count == n).then_some(n)
}

fn number(f: f64) -> Result<Json, String> {
    if f.is_finite() && f.fract() == 0.0 && f.abs() < 9.007_199_254_740_992e15 {
        return Ok(Json::Number(Number::from(f as i64)));
    }
    Number::from_f64(f)
        .map(Json::Number)
        .ok_or_else(|| "Cannot serialise number: must not be NaN or Infinity".to_string())
}

fn to_json(
    v: &Value,
    mt: &Table,
    unsupported: Unsupported,
    depth: usize,
) -> Result<Option<Json>, String> {
    if depth > MAX_DEPTH {
        return Err("Cannot serialise, excessive nesting (1001)".into());
    }
    Ok(Some(match v {
        Value::Nil => Json::Null,
        Value::Boolean(b) => Json::Bool(*b),
        Value::Integer(i) => Json::Number(Number::from(*i)),
        Value::Number(f) => number(*f)?,
        Value::String(s) => Json::String(s.to_string_lossy()),
        v if is_null(v) => Json::Null,
        Value::Table(t) => {
            if let Some(n) = array_len(t, mt) {
                let mut out = Vec::with_capacity(n);
                for i in 1..=n {
                    let item: Value = t.raw_get(i).map_err(|e| e.to_string())?;
                    match to_json(&item, mt, unsupported, depth + 1)? {
                        Some(j) => out.push(j),
                        None => out.push(Json::Null),
                    }
                }
                Json::Array(out)
            } else {
                let mut map = Map::new();
                let mut err = None;
                let _ = t.for_each::<Value, Value>(|k, item| {
                    let key = match &k {
                        Value::String(s) => s.to_string_lossy(),
                        Value::Integer(i) => i.to_string(),
                        Value::Number(f) => fmt_g14(*f),
                        _ if unsupported == Unsupported::Skip => return Ok(()),
                        _ => {
                            err = Some("table key must be a number or string".to_string());
                            return Err(mlua::Error::runtime("stop"));
                        }
                    };
                    match to_json(&item, mt, unsupported, depth + 1) {
                        Ok(Some(j)) => {
                            map.insert(key, j);
                            Ok(())
                        }
                        Ok(None) => Ok(()),
                        Err(e) => {
                            err = Some(e);
                            Err(mlua::Error::runtime("stop"))
                        }
                    }
                });
                if let Some(e) = err {
                    return Err(e);
                }
                Json::Object(map)
            }
        }
        other => {
            return match unsupported {
                Unsupported::Skip => Ok(None),
                Unsupported::Error => Err(format!(
                    "Cannot serialise {}: type not supported",
                    other.type_name()
                )),
            }
        }
    }))
}

/// cjson's `encode`: compact JSON text, `/` escaped as `\/`, numbers as `%.14g`.
pub fn encode(lua: &Lua, v: &Value) -> Result<String, String> {
    let mt = array_mt(lua).map_err(|e| e.to_string())?;
    let mut out = String::with_capacity(64);
    write_value(&mut out, v, &mt, 0)?;
    Ok(out)
}

fn write_value(out: &mut String, v: &Value, mt: &Table, depth: usize) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err("Cannot serialise, excessive nesting (1001)".into());
    }
    match v {
        Value::Nil => out.push_str("null"),
        v if is_null(v) => out.push_str("null"),
        Value::Boolean(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Integer(i) => out.push_str(&i.to_string()),
        Value::Number(f) => {
            if !f.is_finite() {
                return Err("Cannot serialise number: must not be NaN or Infinity".into());
            }
            out.push_str(&fmt_g14(*f));
        }
        Value::String(s) => write_string(out, &s.as_bytes()),
        Value::Table(t) => {
            if let Some(n) = array_len(t, mt) {
                out.push('[');
                for i in 1..=n {
                    if i > 1 {
                        out.push(',');
                    }
                    let item: Value = t.raw_get(i).map_err(|e| e.to_string())?;
                    write_value(out, &item, mt, depth + 1)?;
                }
                out.push(']');
            } else {
                out.push('{');
                let mut first = true;
                let mut err = None;
                let _ = t.for_each::<Value, Value>(|k, item| {
                    if !first {
                        out.push(',');
                    }
                    first = false;
                    match &k {
                        Value::String(s) => write_string(out, &s.as_bytes()),
                        Value::Integer(i) => write_string(out, i.to_string().as_bytes()),
                        Value::Number(f) => write_string(out, fmt_g14(*f).as_bytes()),
                        _ => {
                            err = Some("table key must be a number or string".to_string());
                            return Err(mlua::Error::runtime("stop"));
                        }
                    }
                    out.push(':');
                    if let Err(e) = write_value(out, &item, mt, depth + 1) {
                        err = Some(e);
                        return Err(mlua::Error::runtime("stop"));
                    }
                    Ok(())
                });
                if let Some(e) = err {
                    return Err(e);
                }
                out.push('}');
            }
        }
        other => {
            return Err(format!(
                "Cannot serialise {}: type not supported",
                other.type_name()
            ))
        }
    }
    Ok(())
}

fn write_string(out: &mut String, bytes: &[u8]) {
    out.push('"');
    // Invalid UTF-8 is passed through lossily: Lua strings are bytes, JSON text is UTF-8.
    let s = String::from_utf8_lossy(bytes);
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '/' => out.push_str("\\/"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// C's `%.14g`, which is how lua-cjson (and Lua's `tostring`) prints numbers.
pub fn fmt_g14(f: f64) -> String {
    if f == 0.0 {
        return if f.is_sign_negative() {
            "-0".into()
        } else {
            "0".into()
        };
    }
    if !f.is_finite() {
        return if f.is_nan() {
            "nan".into()
        } else if f > 0.0 {
            "inf".into()
        } else {
            "-inf".into()
        };
    }
    let sci = format!("{:.13e}", f);
    let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-4..14).contains(&exp) {
        let decimals = (13 - exp).max(0) as usize;
        let s = format!("{:.*}", decimals, f);
        strip_zeros(&s)
    } else {
        let m = strip_zeros(mant);
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{m}e{sign}{:02}", exp.abs())
    }
}

fn strip_zeros(s: &str) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s.to_string()
    }
}

/// Keys whose value is an array in JSON Schema: an empty Lua table under them is `[]`.
const ARRAY_KEYS: &[&str] = &[
    "required", "enum", "anyOf", "oneOf", "allOf", "type", "examples",
];

/// A Lua `schema` table → JSON Schema. Empty tables become `[]` or `{}` as the key they sit
/// under implies (`required = {}` is `[]`, `properties = {}` is `{}`); an empty `default` follows
/// its sibling `type`.
pub fn schema_to_json(lua: &Lua, schema: &Table) -> Result<Json, String> {
    let mt = array_mt(lua).map_err(|e| e.to_string())?;
    schema_node(&Value::Table(schema.clone()), None, None, &mt, 0)
}

fn schema_node(
    v: &Value,
    key: Option<&str>,
    sibling_type: Option<&str>,
    mt: &Table,
    depth: usize,
) -> Result<Json, String> {
    if depth > MAX_DEPTH {
        return Err("the schema nests too deeply (a table refers to itself?)".into());
    }
    let Value::Table(t) = v else {
        return to_json(v, mt, Unsupported::Error, depth)?
            .ok_or_else(|| format!("a schema may not hold a {}", v.type_name()));
    };
    if t.raw_len() == 0
        && t.for_each::<Value, Value>(|_, _| Err(mlua::Error::runtime("x")))
            .is_ok()
    {
        // Empty table.
        let as_array = match key {
            Some(k) if ARRAY_KEYS.contains(&k) => true,
            Some("items") => true,
            Some("default") | Some("const") => sibling_type == Some("array"),
            _ => t.metatable().is_some_and(|m| m == *mt),
        };
        return Ok(if as_array {
            Json::Array(vec![])
        } else {
            Json::Object(Map::new())
        });
    }
    if let Some(n) = array_len(t, mt) {
        let mut out = Vec::with_capacity(n);
        for i in 1..=n {
            let item: Value = t.raw_get(i).map_err(|e| e.to_string())?;
            // Items of `required`/`enum` are plain values; items of `anyOf` etc. are schemas.
            out.push(schema_node(&item, None, None, mt, depth + 1)?);
        }
        return Ok(Json::Array(out));
    }
    // An object: a schema, or a map of schemas (`properties`), or data (`default`).
    let own_type: Option<String> = t.raw_get::<Option<String>>("type").ok().flatten();
    let mut map = Map::new();
    let mut err = None;
    let _ = t.for_each::<Value, Value>(|k, item| {
        let name = match &k {
            Value::String(s) => s.to_string_lossy(),
            Value::Integer(i) => i.to_string(),
            Value::Number(f) => fmt_g14(*f),
            _ => return Ok(()),
        };
        match schema_node(&item, Some(&name), own_type.as_deref(), mt, depth + 1) {
            Ok(j) => {
                map.insert(name, j);
                Ok(())
            }
            Err(e) => {
                err = Some(e);
                Err(mlua::Error::runtime("stop"))
            }
        }
    });
    if let Some(e) = err {
        return Err(e);
    }
    Ok(Json::Object(map))
}

/// Writes into `dst` (the Lua conf table) what `checked` (the same conf after schema checking)
/// has and `dst` lacks: the defaults the validator filled in. Existing sub-tables keep their
/// identity, as api7/jsonschema fills defaults in place.
pub fn fill_defaults(lua: &Lua, dst: &Table, checked: &Json) -> mlua::Result<()> {
    let mt = array_mt(lua)?;
    fill(lua, dst, checked, &mt, 0)
}

fn fill(lua: &Lua, dst: &Table, checked: &Json, mt: &Table, depth: usize) -> mlua::Result<()> {
    if depth > MAX_DEPTH {
        return Ok(());
    }
    match checked {
        Json::Object(map) => {
            for (k, v) in map {
                let cur: Value = dst.raw_get(k.as_str())?;
                match cur {
                    Value::Nil => dst.raw_set(k.as_str(), to_lua(lua, v, mt)?)?,
                    Value::Table(sub) => fill(lua, &sub, v, mt, depth + 1)?,
                    _ => {}
                }
            }
        }
        Json::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                if let Value::Table(sub) = dst.raw_get::<Value>(i + 1)? {
                    fill(lua, &sub, v, mt, depth + 1)?;
                }
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn g14() {
        assert_eq!(fmt_g14(0.1 + 0.2), "0.3");
        assert_eq!(fmt_g14(1.5), "1.5");
        assert_eq!(fmt_g14(100.0), "100");
        assert_eq!(fmt_g14(1e20), "1e+20");
        assert_eq!(fmt_g14(0.0001), "0.0001");
        assert_eq!(fmt_g14(1.0e-5), "1e-05");
    }
}
