//! Plugin configuration checking with APISIX's semantics and error wording.
//!
//! APISIX validates plugin configurations with `api7/jsonschema` (v0.9.8 is the version APISIX
//! pins), a code generator that turns a JSON Schema into a Lua function. That function has its own
//! behaviour, which plugin authors (and the tests of APISIX) rely on:
//!
//! * It returns the *first* error only, in its own wording (`property "timeout" validation failed:
//!   expected 99 to be at least 100`), with nested properties chained by prefixes.
//! * It writes `default` values of absent properties into the configuration, right after the
//!   property is checked. Defaults are not validated and not descended into. A property present
//!   as JSON `null` is not absent, so it is not defaulted.
//! * Lua has one table type: an empty array is a valid `object` and an empty object a valid
//!   `array`; `type` errors name Lua types (`got number`, `got table`, `got userdata` for null).
//! * Numbers have one type: `100.0` is an `integer`, and numbers are printed as Lua's `tostring`
//!   does (`%.14g`).
//!
//! This module interprets the schema (kept as JSON) the same way the generated code does, keyword
//! block by keyword block in the generated code's order, so the first error and the default
//! filling match. Where the generator iterates a Lua hash (`properties`, `patternProperties`, the
//! configuration's keys) the order in APISIX is unspecified; here it is the JSON order (schema
//! order for `properties`, then the remaining `required` names in array order; document order for
//! the configuration's keys).
//!
//! Regular expressions (`pattern`, `patternProperties`) are run with the `jsonschema` crate's
//! regex engine (ECMA-262 flavour on `fancy-regex`), which accepts the patterns APISIX uses. A
//! pattern it cannot compile never matches, as a PCRE compile error does with `ngx.re.find`.
//!
//! Deliberate differences from api7/jsonschema, all for inputs APISIX schemas do not contain:
//! draft-4 boolean `exclusiveMinimum`/`exclusiveMaximum` make `minimum`/`maximum` exclusive (the
//! generator emits a comparison with a boolean, a Lua runtime error); `contains` ignores
//! non-table values (the generator calls `ipairs` on them, a runtime error); only local `$ref`s
//! (`#`, `#/json/pointer`, `#anchor` declared by `$id`) are supported; a schema-form
//! `propertyNames` is ignored, as in api7 (only `true`/`false` are implemented there).
//! When `check` fails, defaults written before the failing keyword stay in the configuration
//! (api7 mutates the table in place too).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use serde_json::{Map, Value};

/// How deep nested schemas (through `$ref`s, sub-schemas and the data) may go before checking
/// gives up, which only a self-referencing schema reaches.
const MAX_DEPTH: usize = 256;
/// How many `$ref` hops one schema node may take.
const MAX_REF_HOPS: usize = 64;

/// A compiled plugin configuration schema.
#[derive(Clone)]
pub struct Schema {
    root: Value,
    /// `$id` anchors (`"#name"` without the `#`) to the JSON pointer of the schema declaring it.
    anchors: HashMap<String, String>,
    /// Every pattern reachable from the root (`pattern` values and `patternProperties` keys).
    /// `None` when the pattern does not compile: it then matches nothing.
    regexes: HashMap<String, Option<Arc<jsonschema::Validator>>>,
}

impl fmt::Debug for Schema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Schema")
            .field("schema", &self.root)
            .finish()
    }
}

impl Schema {
    /// Compiles a JSON Schema (draft 4..7 keywords as APISIX plugins use them).
    /// Err(message) if the schema itself is invalid.
    pub fn compile(schema: &Value) -> Result<Schema, String> {
        let mut anchors = HashMap::new();
        collect_anchors(schema, "", &mut anchors)?;
        let mut compiled = Schema {
            root: schema.clone(),
            anchors,
            regexes: HashMap::new(),
        };
        let mut walker = Walker {
            root: schema,
            anchors: &compiled.anchors,
            visited: HashSet::new(),
            patterns: Vec::new(),
        };
        walker.walk(schema, "")?;
        let patterns = walker.patterns;
        for pattern in patterns {
            if compiled.regexes.contains_key(&pattern) {
                continue;
            }
            let re = jsonschema::validator_for(&serde_json::json!({ "pattern": pattern }))
                .ok()
                .map(Arc::new);
            if re.is_none() {
                tracing::warn!(pattern = %pattern, "schema pattern is not supported, it matches nothing");
            }
            compiled.regexes.insert(pattern, re);
        }
        Ok(compiled)
    }

    /// Validates `conf` and, like api7/jsonschema, writes `default` values into it for absent
    /// properties (recursively into nested objects the validator descends into; defaults are
    /// written after the property is checked and are not validated themselves; a property present
    /// as JSON null is NOT defaulted). Returns the first error in api7/jsonschema's wording.
    /// On error, defaults written before the failing check remain in `conf`.
    pub fn check(&self, conf: &mut Value) -> Result<(), String> {
        self.validate(&self.root, conf, 0)
    }

    /// The schema as given to [`Schema::compile`].
    pub fn as_json(&self) -> &Value {
        &self.root
    }

    fn re_find(&self, pattern: &str, subject: &str) -> bool {
        match self.regexes.get(pattern) {
            Some(Some(re)) => re.is_valid(&Value::String(subject.to_owned())),
            _ => false,
        }
    }

    /// Follows `$ref`s (sibling keywords of a `$ref` are ignored, as in api7's store).
    fn resolve<'a>(&'a self, mut node: &'a Value) -> Result<&'a Value, String> {
        for _ in 0..MAX_REF_HOPS {
            match node.get("$ref") {
                Some(Value::String(r)) => node = resolve_ref(&self.root, &self.anchors, r)?,
                _ => return Ok(node),
            }
        }
        Err("too many $ref hops (reference loop?)".to_string())
    }

    /// One generated validator: returns the first error for `v` against `node`.
    fn validate(&self, node: &Value, v: &mut Value, depth: usize) -> Result<(), String> {
        if depth > MAX_DEPTH {
            return Err("schema nesting too deep".to_string());
        }
        let node = self.resolve(node)?;
        let s = match node {
            Value::Bool(true) => return Ok(()),
            Value::Bool(false) => return Err("expect false always".to_string()),
            Value::Object(s) => s,
            // An empty (or array-like) Lua table as a schema has no keywords.
            _ => return Ok(()),
        };

        // type
        match kw(s, "type") {
            Some(Value::String(t)) if !type_matches(t, v) => {
                return Err(format!("wrong type: expected {t}, got {}", lua_type(v)));
            }
            Some(Value::Array(ts))
                if !ts
                    .iter()
                    .any(|t| t.as_str().is_some_and(|t| type_matches(t, v))) =>
            {
                let names: Vec<&str> = ts.iter().filter_map(Value::as_str).collect();
                return Err(format!(
                    "wrong type: expected one of {}, got {}",
                    names.join(", "),
                    lua_type(v)
                ));
            }
            Some(Value::Object(_)) => {
                // an empty Lua table converted to `{}`: no type accepted
                return Err(format!("wrong type: expected one of , got {}", lua_type(v)));
            }
            _ => {}
        }

        // object keywords
        if truthy(s, "properties")
            || kw(s, "additionalProperties").is_some()
            || truthy(s, "patternProperties")
            || truthy(s, "minProperties")
            || truthy(s, "maxProperties")
            || truthy(s, "dependencies")
            || truthy(s, "required")
        {
            if matches!(table_kind(v), Some(TableKind::Object | TableKind::Empty)) {
                self.check_object(s, v, depth)?;
            }
            if truthy(s, "required")
                && list_len(&s["required"]) == 0
                && table_kind(v) != Some(TableKind::Empty)
            {
                return Err("the input data should be an empty table".to_string());
            }
        }

        // array keywords
        let items = kw(s, "items");
        if items.is_some()
            || truthy(s, "minItems")
            || truthy(s, "maxItems")
            || truthy(s, "uniqueItems")
        {
            match items {
                Some(Value::Bool(true)) => return Ok(()),
                Some(Value::Bool(false)) => {
                    return if table_kind(v) == Some(TableKind::Empty) {
                        Ok(())
                    } else {
                        Err("expect false always".to_string())
                    };
                }
                _ => {}
            }
            if matches!(table_kind(v), Some(TableKind::Array | TableKind::Empty)) {
                self.check_array(s, items, v, depth)?;
            }
        }

        // string keywords
        if truthy(s, "minLength") || truthy(s, "maxLength") || truthy(s, "pattern") {
            if let Value::String(str) = &*v {
                let len = str.chars().count() as f64;
                if let Some(min) = num(s, "minLength") {
                    let min = min.trunc();
                    if len < min {
                        return Err(format!(
                            "string too short, expected at least {}, got {}",
                            lua_int(min),
                            lua_num(len)
                        ));
                    }
                }
                if let Some(max) = num(s, "maxLength") {
                    let max = max.trunc();
                    if len > max {
                        return Err(format!(
                            "string too long, expected at most {}, got {}",
                            lua_int(max),
                            lua_num(len)
                        ));
                    }
                }
                if let Some(Value::String(p)) = kw(s, "pattern") {
                    if !self.re_find(p, str) {
                        return Err(format!(
                            "failed to match pattern {} with {}",
                            lua_quote(p),
                            lua_quote(str)
                        ));
                    }
                }
            }
        }

        // number keywords
        if truthy(s, "minimum")
            || truthy(s, "maximum")
            || truthy(s, "multipleOf")
            || truthy(s, "exclusiveMinimum")
            || truthy(s, "exclusiveMaximum")
        {
            if let Some(p) = v.as_f64() {
                check_numbers(s, p)?;
            }
        }

        // enum
        if let Some(e) = kw(s, "enum").filter(|e| !is_false(e)) {
            if !list(e).iter().any(|x| lua_eq(v, x)) {
                return Err("matches none of the enum values".to_string());
            }
        }

        // allOf
        if let Some(all) = kw(s, "allOf").filter(|e| !is_false(e)) {
            for (i, sub) in list(all).iter().enumerate() {
                if let Err(e) = self.validate(sub, v, depth + 1) {
                    return Err(format!("allOf {} failed: {e}", i + 1));
                }
            }
        }

        // anyOf
        if let Some(any) = kw(s, "anyOf").filter(|e| !is_false(e)) {
            let subs = list(any);
            let mut matched = false;
            for sub in subs {
                if self.validate(sub, v, depth + 1).is_ok() {
                    matched = true;
                    break;
                }
            }
            if !matched {
                let requires: Vec<String> = subs
                    .iter()
                    .filter_map(|sub| match sub.get("required") {
                        Some(r) if !is_false(r) && !r.is_null() => Some(cjson_encode(r)),
                        _ => None,
                    })
                    .collect();
                let mut msg = "object matches none of the required".to_string();
                if !requires.is_empty() {
                    msg.push_str(": ");
                    msg.push_str(&requires.join(" or "));
                }
                return Err(msg);
            }
        }

        // oneOf
        if let Some(one) = kw(s, "oneOf").filter(|e| !is_false(e)) {
            let mut matched: Option<usize> = None;
            for (i, sub) in list(one).iter().enumerate() {
                if self.validate(sub, v, depth + 1).is_ok() {
                    if let Some(m) = matched {
                        return Err(format!(
                            "value should match only one schema, but matches both schemas {m} and {}",
                            i + 1
                        ));
                    }
                    matched = Some(i + 1);
                }
            }
            if matched.is_none() {
                return Err("value should match only one schema, but matches none".to_string());
            }
        }

        // if / then / else
        if let Some(cond) = kw(s, "if").filter(|e| !is_false(e)) {
            let matched = self.validate(cond, v, depth + 1).is_ok();
            if let Some(then) = kw(s, "then").filter(|e| !is_false(e)) {
                if matched && self.validate(then, v, depth + 1).is_err() {
                    return Err("then clause did not match".to_string());
                }
            }
            if let Some(els) = kw(s, "else").filter(|e| !is_false(e)) {
                if !matched && self.validate(els, v, depth + 1).is_err() {
                    return Err("else clause did not match".to_string());
                }
            }
        }

        // not
        if let Some(not) = kw(s, "not").filter(|e| !is_false(e)) {
            if self.validate(not, v, depth + 1).is_ok() {
                return Err("value wasn't supposed to match schema".to_string());
            }
        }

        // propertyNames (api7 only implements the boolean forms)
        match kw(s, "propertyNames") {
            Some(Value::Bool(true)) => return Ok(()),
            Some(Value::Bool(false)) => {
                return if table_kind(v) == Some(TableKind::Empty) {
                    Ok(())
                } else {
                    Err("expect false always".to_string())
                };
            }
            _ => {}
        }

        // format
        if let (Some(Value::String(format)), Value::String(str)) = (kw(s, "format"), &*v) {
            check_format(format, str)?;
        }

        // const (a JSON null const is a real constraint)
        if let Some(c) = s.get("const") {
            if !lua_eq(v, c) {
                return Err("failed to check const value".to_string());
            }
        }

        // contains
        match kw(s, "contains") {
            None => {}
            Some(Value::Bool(b)) => {
                let kind = table_kind(v);
                if *b && kind != Some(TableKind::Array) {
                    return Err("check contains: expect array table".to_string());
                }
                if !*b && kind.is_some() {
                    return Err("check contains: expect table".to_string());
                }
            }
            Some(sub) => {
                if table_kind(v) == Some(TableKind::Empty) {
                    return Err("check contains: empty array is invalid".to_string());
                }
                if let Value::Array(arr) = v {
                    let len = arr.len();
                    let mut failed = 0;
                    for item in arr.iter_mut() {
                        if self.validate(sub, item, depth + 1).is_err() {
                            failed += 1;
                        }
                    }
                    if len > 0 && failed == len {
                        return Err("failed to check contains".to_string());
                    }
                }
            }
        }

        Ok(())
    }

    /// The object block of a generated validator; `v` is an object or an empty array.
    fn check_object(
        &self,
        s: &Map<String, Value>,
        v: &mut Value,
        depth: usize,
    ) -> Result<(), String> {
        let properties = kw(s, "properties").filter(|p| !is_false(p));
        let dependencies = kw(s, "dependencies").filter(|d| !is_false(d));
        let required: Vec<&str> = kw(s, "required")
            .map(|r| list(r).iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let mut required_left: Vec<&str> = Vec::new();
        for r in &required {
            if !required_left.contains(r) {
                required_left.push(r);
            }
        }

        for (prop, sub) in entries(properties) {
            let present = v.get(prop).is_some();
            if present {
                let value = v
                    .get_mut(prop)
                    .expect("property checked to be present above");
                if let Err(e) = self.validate(sub, value, depth + 1) {
                    return Err(format!("property \"{prop}\" validation failed: {e}"));
                }
                if let Some(dep) = dependencies.and_then(|d| d.get(prop)) {
                    self.check_dependency(prop, dep, v, depth)?;
                }
            } else if required.contains(&prop.as_str()) {
                return Err(format!("property \"{prop}\" is required"));
            }
            required_left.retain(|r| *r != prop.as_str());

            if !present {
                if let Some(default) = sub.get("default") {
                    if matches!(
                        default,
                        Value::Number(_)
                            | Value::String(_)
                            | Value::Bool(_)
                            | Value::Object(_)
                            | Value::Array(_)
                    ) {
                        if !v.is_object() {
                            // an empty array standing for an empty Lua table
                            *v = Value::Object(Map::new());
                        }
                        if let Value::Object(map) = v {
                            map.insert(prop.clone(), default.clone());
                        }
                    }
                }
            }
        }

        for prop in required_left {
            if v.get(prop).is_none() {
                return Err(format!("property \"{prop}\" is required"));
            }
        }

        let in_properties = |name: &str| properties.is_some_and(|p| p.get(name).is_some());
        for (prop, dep) in entries(dependencies) {
            if in_properties(prop) {
                continue;
            }
            match dep {
                Value::Array(names) if !names.is_empty() => {
                    for name in names.iter().filter_map(Value::as_str) {
                        if v.get(prop).is_some() && v.get(name).is_none() {
                            return Err(format!(
                                "property \"{name}\" is required when \"{prop}\" is set"
                            ));
                        }
                    }
                }
                _ => {
                    if v.get(prop).is_some() {
                        if let Err(e) = self.validate(dep, v, depth + 1) {
                            return Err(format!(
                                "failed to validate dependent schema for \"{prop}\": {e}"
                            ));
                        }
                    }
                }
            }
        }

        let additional = kw(s, "additionalProperties");
        let restrict = additional.is_some_and(|a| !matches!(a, Value::Bool(true)));
        let additional_schema = additional.filter(|a| a.is_object() || a.is_array());
        let patterns = kw(s, "patternProperties").filter(|p| !is_false(p));
        if patterns.is_some() || restrict {
            if let Value::Object(map) = v {
                for (key, value) in map.iter_mut() {
                    let mut matched = false;
                    for (pattern, sub) in entries(patterns) {
                        if self.re_find(pattern, key) {
                            if let Err(e) = self.validate(sub, value, depth + 1) {
                                return Err(format!(
                                    "failed to validate {key} (matching {}): {e}",
                                    lua_quote(pattern)
                                ));
                            }
                            matched = true;
                        }
                    }
                    if restrict && !(in_properties(key) || matched) {
                        match additional_schema {
                            Some(sub) => {
                                if let Err(e) = self.validate(sub, value, depth + 1) {
                                    return Err(format!(
                                        "failed to validate additional property {key}: {e}"
                                    ));
                                }
                            }
                            None => {
                                return Err(format!(
                                    "additional properties forbidden, found {key}"
                                ));
                            }
                        }
                    }
                }
            }
        }

        let count = v.as_object().map_or(0, Map::len) as f64;
        if let Some(min) = num(s, "minProperties") {
            if count < min.trunc() {
                return Err(format!(
                    "expect object to have at least {} properties",
                    lua_num(min)
                ));
            }
        }
        if let Some(max) = num(s, "maxProperties") {
            if count > max.trunc() {
                return Err(format!(
                    "expect object to have at most {} properties",
                    lua_num(max)
                ));
            }
        }
        Ok(())
    }

    fn check_dependency(
        &self,
        prop: &str,
        dep: &Value,
        v: &mut Value,
        depth: usize,
    ) -> Result<(), String> {
        match dep {
            Value::Array(names) if !names.is_empty() => {
                for name in names.iter().filter_map(Value::as_str) {
                    if v.get(name).is_none() {
                        return Err(format!(
                            "property \"{name}\" is required when \"{prop}\" is set"
                        ));
                    }
                }
                Ok(())
            }
            _ => self
                .validate(dep, v, depth + 1)
                .map_err(|e| format!("failed to validate dependent schema for \"{prop}\": {e}")),
        }
    }

    /// The array block of a generated validator; `v` is an array or an empty object.
    fn check_array(
        &self,
        s: &Map<String, Value>,
        items: Option<&Value>,
        v: &mut Value,
        depth: usize,
    ) -> Result<(), String> {
        let count = v.as_array().map_or(0, Vec::len) as f64;
        if let Some(min) = num(s, "minItems") {
            if count < min.trunc() {
                return Err(format!(
                    "expect array to have at least {} items",
                    lua_num(min)
                ));
            }
        }
        if let Some(max) = num(s, "maxItems") {
            if count > max.trunc() {
                return Err(format!(
                    "expect array to have at most {} items",
                    lua_num(max)
                ));
            }
        }

        if let Value::Array(arr) = v {
            match items {
                Some(Value::Array(tuple)) if !tuple.is_empty() => {
                    let mut complete = true;
                    for (i, sub) in tuple.iter().enumerate() {
                        let Some(item) = arr.get_mut(i) else {
                            complete = false;
                            break;
                        };
                        if let Err(e) = self.validate(sub, item, depth + 1) {
                            return Err(format!("failed to validate item {}: {e}", i + 1));
                        }
                    }
                    if complete {
                        match kw(s, "additionalItems") {
                            Some(Value::Bool(false)) if arr.len() > tuple.len() => {
                                return Err("found unexpected extra items in array".to_string());
                            }
                            Some(sub @ (Value::Object(_) | Value::Array(_))) => {
                                for (i, item) in arr.iter_mut().enumerate().skip(tuple.len()) {
                                    if let Err(e) = self.validate(sub, item, depth + 1) {
                                        return Err(format!(
                                            "failed to validate additional item {}: {e}",
                                            i + 1
                                        ));
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                }
                Some(sub) if !is_false(sub) => {
                    for (i, item) in arr.iter_mut().enumerate() {
                        if let Err(e) = self.validate(sub, item, depth + 1) {
                            return Err(format!("failed to validate item {}: {e}", i + 1));
                        }
                    }
                }
                _ => {}
            }

            if truthy(s, "uniqueItems") {
                if let Some((a, b)) = first_duplicate(arr) {
                    return Err(format!(
                        "expected unique items but items {a} and {b} are equal"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The number block of a generated validator.
fn check_numbers(s: &Map<String, Value>, p: f64) -> Result<(), String> {
    let ex_min = kw(s, "exclusiveMinimum");
    let ex_max = kw(s, "exclusiveMaximum");
    if let Some(min) = num(s, "minimum") {
        if matches!(ex_min, Some(Value::Bool(true))) {
            if p <= min {
                return Err(range_error(p, "greater than", min));
            }
        } else if p < min {
            return Err(range_error(p, "at least", min));
        }
    }
    if let Some(Value::Number(n)) = ex_min {
        let min = n.as_f64().unwrap_or(f64::NAN);
        if p <= min {
            return Err(range_error(p, "greater than", min));
        }
    }
    if let Some(max) = num(s, "maximum") {
        if matches!(ex_max, Some(Value::Bool(true))) {
            if p >= max {
                return Err(range_error(p, "smaller than", max));
            }
        } else if p > max {
            return Err(range_error(p, "at most", max));
        }
    }
    if let Some(Value::Number(n)) = ex_max {
        let max = n.as_f64().unwrap_or(f64::NAN);
        if p >= max {
            return Err(range_error(p, "smaller than", max));
        }
    }
    if let Some(m) = num(s, "multipleOf") {
        let bad = if m.trunc() == m {
            // Lua's floored modulo
            let r = p - (p / m).floor() * m;
            r != 0.0
        } else {
            let q = p / m;
            q.trunc() != q
        };
        if bad {
            return Err(format!(
                "expected {} to be a multiple of {}",
                lua_num(p),
                lua_num(m)
            ));
        }
    }
    Ok(())
}

fn range_error(p: f64, what: &str, reference: f64) -> String {
    format!(
        "expected {} to be {what} {}",
        lua_num(p),
        lua_num(reference)
    )
}

/// api7's `format` checks (only these four formats are implemented there). The `hostname`
/// message really says "ipv4" in api7/jsonschema 0.9.8.
fn check_format(format: &str, s: &str) -> Result<(), String> {
    let ok = match format {
        "email" => is_email(pcre_dollar(s)),
        "ipv4" => s.parse::<std::net::Ipv4Addr>().is_ok(),
        "ipv6" => s.parse::<std::net::Ipv6Addr>().is_ok(),
        "hostname" => {
            let s = pcre_dollar(s);
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        }
        _ => true,
    };
    if ok {
        return Ok(());
    }
    let what = match format {
        "email" => "email",
        "ipv6" => "ipv6",
        _ => "ipv4",
    };
    Err(format!("expect valid {what} address but got: {s}"))
}

/// PCRE's `$` also matches before a final newline.
fn pcre_dollar(s: &str) -> &str {
    s.strip_suffix('\n').unwrap_or(s)
}

/// `^([A-Za-z0-9_\-\.])+\@([A-Za-z0-9_\-\.])+\.([A-Za-z]{2,4})$`
fn is_email(s: &str) -> bool {
    let in_set = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.';
    let Some((local, domain)) = s.split_once('@') else {
        return false;
    };
    if local.is_empty() || !local.bytes().all(in_set) || !domain.bytes().all(in_set) {
        return false;
    }
    let Some(dot) = domain.rfind('.') else {
        return false;
    };
    let tld = &domain[dot + 1..];
    dot >= 1 && (2..=4).contains(&tld.len()) && tld.bytes().all(|b| b.is_ascii_alphabetic())
}

// ---------------------------------------------------------------------------------------------
// Lua value model

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TableKind {
    /// A table with string keys (a non-empty JSON object).
    Object,
    /// An empty table: both an object and an array.
    Empty,
    /// A non-empty sequence.
    Array,
}

fn table_kind(v: &Value) -> Option<TableKind> {
    match v {
        Value::Object(m) if m.is_empty() => Some(TableKind::Empty),
        Value::Object(_) => Some(TableKind::Object),
        Value::Array(a) if a.is_empty() => Some(TableKind::Empty),
        Value::Array(_) => Some(TableKind::Array),
        _ => None,
    }
}

/// Lua's `type()` of a decoded JSON value (cjson's null is a light userdata).
fn lua_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "userdata",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) | Value::Object(_) => "table",
    }
}

fn type_matches(t: &str, v: &Value) -> bool {
    match t {
        "object" => matches!(table_kind(v), Some(TableKind::Object | TableKind::Empty)),
        "array" => matches!(table_kind(v), Some(TableKind::Array | TableKind::Empty)),
        "table" => table_kind(v).is_some(),
        "integer" => v.as_f64().is_some_and(|n| n % 1.0 == 0.0),
        "number" => v.is_number(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        _ => false,
    }
}

const JSON_TYPES: &[&str] = &[
    "object", "array", "table", "integer", "number", "string", "boolean", "null", "function",
];

/// Lua's `==` for scalars and api7's `deepeq` for tables.
fn lua_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Null, Value::Null) => true,
        (Value::Bool(x), Value::Bool(y)) => x == y,
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::String(x), Value::String(y)) => x == y,
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| lua_eq(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, a)| y.get(k).is_some_and(|b| lua_eq(a, b)))
        }
        (Value::Array(x), Value::Object(y)) | (Value::Object(y), Value::Array(x)) => {
            x.is_empty() && y.is_empty()
        }
        _ => false,
    }
}

#[derive(Hash, PartialEq, Eq)]
enum ScalarKey<'a> {
    Null,
    Bool(bool),
    Num(u64),
    Str(&'a str),
}

/// api7's `unique_item_in_array`: scalars first (by Lua table key), then tables pairwise.
/// Returns 1-based indices.
fn first_duplicate(arr: &[Value]) -> Option<(usize, usize)> {
    let mut seen: HashMap<ScalarKey<'_>, usize> = HashMap::new();
    let mut tables: Vec<(usize, &Value)> = Vec::new();
    for (i, v) in arr.iter().enumerate() {
        let idx = i + 1;
        let key = match v {
            Value::Null => ScalarKey::Null,
            Value::Bool(b) => ScalarKey::Bool(*b),
            Value::Number(n) => {
                let f = n.as_f64().unwrap_or(f64::NAN);
                ScalarKey::Num(if f == 0.0 { 0 } else { f.to_bits() })
            }
            Value::String(s) => ScalarKey::Str(s),
            Value::Array(_) | Value::Object(_) => {
                tables.push((idx, v));
                continue;
            }
        };
        if let Some(prev) = seen.insert(key, idx) {
            return Some((prev, idx));
        }
    }
    for (n, (i, a)) in tables.iter().enumerate() {
        for (j, b) in &tables[n + 1..] {
            if lua_eq(a, b) {
                return Some((*i, *j));
            }
        }
    }
    None
}

/// Lua's `tostring` for numbers (LuaJIT prints `%.14g`).
fn lua_num(x: f64) -> String {
    if x.is_nan() {
        return if x.is_sign_negative() { "-nan" } else { "nan" }.to_string();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.to_string();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0" } else { "0" }.to_string();
    }
    let sci = format!("{x:.13e}");
    let (mantissa, exp) = sci.split_once('e').expect("exponent format has an 'e'");
    let exp: i32 = exp.parse().expect("exponent is an integer");
    if !(-4..14).contains(&exp) {
        let mantissa = strip_fraction_zeros(mantissa);
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    } else {
        let decimals = (13 - exp) as usize;
        strip_fraction_zeros(&format!("{x:.decimals$}")).to_string()
    }
}

fn strip_fraction_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

/// `string.format("%d", x)`.
fn lua_int(x: f64) -> String {
    if x.is_finite() && x.abs() < 9.2e18 {
        (x as i64).to_string()
    } else {
        lua_num(x)
    }
}

/// LuaJIT's `string.format("%q", s)`.
fn lua_quote(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out: Vec<u8> = Vec::with_capacity(bytes.len() + 2);
    out.push(b'"');
    for (i, &c) in bytes.iter().enumerate() {
        match c {
            b'"' | b'\\' | b'\n' => {
                out.push(b'\\');
                out.push(c);
            }
            0..=31 | 127 => {
                let next_digit = bytes.get(i + 1).is_some_and(u8::is_ascii_digit);
                let esc = if c >= 100 || next_digit {
                    format!("\\{c:03}")
                } else {
                    format!("\\{c}")
                };
                out.extend_from_slice(esc.as_bytes());
            }
            _ => out.push(c),
        }
    }
    out.push(b'"');
    // only ASCII was inserted around the original bytes
    String::from_utf8(out).unwrap_or_default()
}

/// lua-cjson's encoding of a `required` list, as api7 quotes it in anyOf errors (an empty Lua
/// table encodes as `{}`).
fn cjson_encode(v: &Value) -> String {
    match v {
        Value::Array(a) if !a.is_empty() => {
            let parts: Vec<String> = a.iter().map(cjson_encode).collect();
            format!("[{}]", parts.join(","))
        }
        Value::Array(_) => "{}".to_string(),
        Value::Object(m) => {
            if m.is_empty() {
                return "{}".to_string();
            }
            let parts: Vec<String> = m
                .iter()
                .map(|(k, v)| format!("{}:{}", cjson_string(k), cjson_encode(v)))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
        Value::String(s) => cjson_string(s),
        Value::Number(n) => lua_num(n.as_f64().unwrap_or(f64::NAN)),
        Value::Bool(b) => b.to_string(),
        Value::Null => "null".to_string(),
    }
}

fn cjson_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '/' => out.push_str("\\/"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

// ---------------------------------------------------------------------------------------------
// schema access helpers (JSON null counts as absent: a Lua table cannot hold nil)

fn kw<'a>(s: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    s.get(name).filter(|v| !v.is_null())
}

fn is_false(v: &Value) -> bool {
    matches!(v, Value::Bool(false))
}

/// Whether `schema.name` is truthy in Lua.
fn truthy(s: &Map<String, Value>, name: &str) -> bool {
    kw(s, name).is_some_and(|v| !is_false(v))
}

fn num(s: &Map<String, Value>, name: &str) -> Option<f64> {
    kw(s, name).and_then(Value::as_f64)
}

/// A Lua sequence: a JSON array (an empty object converted from `{}` is an empty list).
fn list(v: &Value) -> &[Value] {
    match v {
        Value::Array(a) => a,
        _ => &[],
    }
}

fn list_len(v: &Value) -> usize {
    list(v).len()
}

/// A Lua hash: a JSON object (an empty array converted from `{}` has no entries).
fn entries(v: Option<&Value>) -> impl Iterator<Item = (&String, &Value)> {
    v.and_then(Value::as_object).into_iter().flatten()
}

// ---------------------------------------------------------------------------------------------
// $ref resolution

/// Records `$id: "#name"` anchors anywhere in the schema (api7's store walks every table except
/// `enum` values and `_`-prefixed keys).
fn collect_anchors(
    v: &Value,
    pointer: &str,
    anchors: &mut HashMap<String, String>,
) -> Result<(), String> {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(id)) = m.get("$id") {
                match id.strip_prefix('#') {
                    Some(name) if !name.is_empty() => {
                        anchors.insert(name.to_string(), pointer.to_string());
                    }
                    _ => {
                        return Err(format!(
                            "Only location independent id is supported. Unsupported $id: {id}"
                        ))
                    }
                }
            }
            for (k, child) in m {
                if k == "enum" || k.starts_with('_') {
                    continue;
                }
                let p = format!("{pointer}/{}", escape_pointer(k));
                collect_anchors(child, &p, anchors)?;
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                collect_anchors(child, &format!("{pointer}/{i}"), anchors)?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn escape_pointer(k: &str) -> String {
    k.replace('~', "~0").replace('/', "~1")
}

fn unescape_part(part: &str) -> String {
    let bytes = part.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out)
        .replace("~1", "/")
        .replace("~0", "~")
}

fn lookup_pointer<'a>(root: &'a Value, pointer: &str) -> Option<&'a Value> {
    let mut node = root;
    for part in pointer.split('/').filter(|p| !p.is_empty()) {
        let part = unescape_part(part);
        node = match node {
            Value::Object(m) => m.get(&part)?,
            Value::Array(a) => a.get(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(node)
}

fn resolve_ref<'a>(
    root: &'a Value,
    anchors: &HashMap<String, String>,
    r: &str,
) -> Result<&'a Value, String> {
    let Some(fragment) = r.strip_prefix('#') else {
        return Err(format!(
            "an external resolver is required to fetch {r} (only local $ref is supported)"
        ));
    };
    if let Some(pointer) = anchors.get(fragment) {
        return lookup_pointer(root, pointer).ok_or_else(|| format!("reference not found: {r}"));
    }
    lookup_pointer(root, fragment).ok_or_else(|| format!("reference not found: {r}"))
}

// ---------------------------------------------------------------------------------------------
// compile-time walk: rejects what api7's generator rejects and collects patterns

struct Walker<'a> {
    root: &'a Value,
    anchors: &'a HashMap<String, String>,
    visited: HashSet<*const Value>,
    patterns: Vec<String>,
}

impl<'a> Walker<'a> {
    fn walk(&mut self, node: &'a Value, at: &str) -> Result<(), String> {
        if !self.visited.insert(node as *const Value) {
            return Ok(());
        }
        let s = match node {
            Value::Bool(_) | Value::Array(_) => return Ok(()),
            Value::Object(s) => s,
            other => {
                return Err(format!(
                    "invalid schema at \"{at}\": expected an object or a boolean, got {}",
                    lua_type(other)
                ))
            }
        };
        if let Some(r) = s.get("$ref") {
            let Value::String(r) = r else {
                return Err(format!("invalid schema at \"{at}\": $ref must be a string"));
            };
            let target = resolve_ref(self.root, self.anchors, r)?;
            return self.walk(target, r);
        }

        match kw(s, "type") {
            None => {}
            Some(Value::String(t)) => check_type_name(t)?,
            Some(Value::Array(ts)) => {
                for t in ts {
                    match t {
                        Value::String(t) => check_type_name(t)?,
                        Value::Number(n) => {
                            return Err(format!(
                                "invalid JSON type: {}",
                                lua_num(n.as_f64().unwrap_or(f64::NAN))
                            ));
                        }
                        other => {
                            return Err(format!("invalid JSON type: {}", lua_type(other)));
                        }
                    }
                }
            }
            Some(Value::Object(o)) if o.is_empty() => {}
            Some(other) => return Err(format!("invalid \"type\" type: got {}", lua_type(other))),
        }

        for name in [
            "minimum",
            "maximum",
            "multipleOf",
            "minLength",
            "maxLength",
            "minItems",
            "maxItems",
            "minProperties",
            "maxProperties",
        ] {
            if let Some(v) = kw(s, name) {
                if !v.is_number() && !is_false(v) {
                    return Err(format!(
                        "invalid schema at \"{at}\": \"{name}\" must be a number"
                    ));
                }
            }
        }
        for name in ["exclusiveMinimum", "exclusiveMaximum"] {
            if let Some(v) = kw(s, name) {
                if !v.is_number() && !v.is_boolean() {
                    return Err(format!(
                        "invalid schema at \"{at}\": \"{name}\" must be a number or a boolean"
                    ));
                }
            }
        }
        if let Some(m) = num(s, "multipleOf") {
            if m <= 0.0 {
                return Err(format!(
                    "invalid schema at \"{at}\": \"multipleOf\" must be greater than 0"
                ));
            }
        }

        match kw(s, "pattern") {
            None => {}
            Some(Value::String(p)) => self.patterns.push(p.clone()),
            Some(v) if is_false(v) => {}
            Some(_) => {
                return Err(format!(
                    "invalid schema at \"{at}\": \"pattern\" must be a string"
                ))
            }
        }

        if let Some(r) = kw(s, "required") {
            if !is_false(r) {
                let ok = match r {
                    Value::Array(a) => a.iter().all(Value::is_string),
                    Value::Object(o) => o.is_empty(),
                    _ => false,
                };
                if !ok {
                    return Err(format!(
                        "invalid schema at \"{at}\": \"required\" must be an array of strings"
                    ));
                }
            }
        }

        if let Some(e) = kw(s, "enum") {
            if !is_false(e) {
                let values = list(e);
                if values.is_empty() {
                    return Err(format!("invalid schema at \"{at}\": \"enum\" is empty"));
                }
                if values.iter().any(Value::is_null) {
                    return Err("unsupported enum type: userdata".to_string());
                }
            }
        }

        for name in ["properties", "patternProperties", "dependencies"] {
            let Some(v) = kw(s, name) else { continue };
            match v {
                Value::Object(m) => {
                    for (k, sub) in m {
                        if name == "patternProperties" {
                            self.patterns.push(k.clone());
                        }
                        if name == "dependencies" {
                            if let Value::Array(names) = sub {
                                if names.iter().all(Value::is_string) {
                                    continue;
                                }
                                return Err(format!(
                                    "invalid schema at \"{at}\": dependencies of \"{k}\" must be strings"
                                ));
                            }
                        }
                        self.walk(sub, &format!("{at}/{name}/{}", escape_pointer(k)))?;
                    }
                }
                Value::Array(a) if a.is_empty() => {}
                v if is_false(v) => {}
                _ => {
                    return Err(format!(
                        "invalid schema at \"{at}\": \"{name}\" must be an object"
                    ))
                }
            }
        }

        for name in ["anyOf", "allOf", "oneOf"] {
            let Some(v) = kw(s, name) else { continue };
            match v {
                Value::Array(subs) => {
                    if subs.is_empty() && name == "anyOf" {
                        return Err(format!("invalid schema at \"{at}\": \"anyOf\" is empty"));
                    }
                    for (i, sub) in subs.iter().enumerate() {
                        self.walk(sub, &format!("{at}/{name}/{i}"))?;
                    }
                }
                Value::Object(o) if o.is_empty() && name != "anyOf" => {}
                v if is_false(v) => {}
                _ => {
                    return Err(format!(
                        "invalid schema at \"{at}\": \"{name}\" must be an array"
                    ))
                }
            }
        }

        match kw(s, "items") {
            Some(Value::Array(subs)) => {
                for (i, sub) in subs.iter().enumerate() {
                    self.walk(sub, &format!("{at}/items/{i}"))?;
                }
            }
            Some(sub @ (Value::Object(_) | Value::Bool(_))) => {
                self.walk(sub, &format!("{at}/items"))?;
            }
            Some(_) => {
                return Err(format!(
                    "invalid schema at \"{at}\": \"items\" must be a schema or an array"
                ))
            }
            None => {}
        }

        for name in [
            "additionalProperties",
            "additionalItems",
            "not",
            "if",
            "then",
            "else",
            "contains",
        ] {
            if let Some(sub @ (Value::Object(_) | Value::Array(_))) = kw(s, name) {
                self.walk(sub, &format!("{at}/{name}"))?;
            }
        }
        Ok(())
    }
}

fn check_type_name(t: &str) -> Result<(), String> {
    if JSON_TYPES.contains(&t) {
        Ok(())
    } else {
        Err(format!("invalid JSON type: {t}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(schema: Value, mut conf: Value) -> Result<Value, String> {
        let s = Schema::compile(&schema).expect("schema compiles");
        s.check(&mut conf).map(|()| conf)
    }

    fn err(schema: Value, conf: Value) -> String {
        check(schema, conf).expect_err("check should fail")
    }

    fn openfunction() -> Value {
        json!({
            "type": "object",
            "properties": {
                "function_uri": {"type": "string"},
                "ssl_verify": {"type": "boolean", "default": true},
                "authorization": {
                    "type": "object",
                    "properties": {
                        "service_token": {"type": "string"}
                    }
                },
                "timeout": {"type": "integer", "minimum": 100, "default": 3000},
                "keepalive": {"type": "boolean", "default": true},
                "keepalive_timeout": {"type": "integer", "minimum": 1000, "default": 60000},
                "keepalive_pool": {"type": "integer", "minimum": 1, "default": 5},
                "max_req_body_size": {"type": "integer", "minimum": 1, "default": 67108864}
            },
            "required": ["function_uri"]
        })
    }

    #[test]
    fn openfunction_schema() {
        assert_eq!(
            err(openfunction(), json!({})),
            r#"property "function_uri" is required"#
        );
        assert_eq!(
            err(openfunction(), json!({"function_uri": 1})),
            r#"property "function_uri" validation failed: wrong type: expected string, got number"#
        );
        assert_eq!(
            err(openfunction(), json!({"function_uri": "x", "timeout": 99})),
            r#"property "timeout" validation failed: expected 99 to be at least 100"#
        );
        assert_eq!(
            err(
                openfunction(),
                json!({"function_uri": "x", "authorization": {"service_token": 1}})
            ),
            "property \"authorization\" validation failed: property \"service_token\" \
             validation failed: wrong type: expected string, got number"
        );
        let conf = check(openfunction(), json!({"function_uri": "http://f"})).unwrap();
        assert_eq!(
            conf,
            json!({
                "function_uri": "http://f",
                "ssl_verify": true,
                "timeout": 3000,
                "keepalive": true,
                "keepalive_timeout": 60000,
                "keepalive_pool": 5,
                "max_req_body_size": 67108864
            })
        );
        let conf = check(
            openfunction(),
            json!({"function_uri": "u", "timeout": 100.0, "ssl_verify": false}),
        )
        .unwrap();
        assert_eq!(conf["timeout"], json!(100.0));
        assert_eq!(conf["ssl_verify"], json!(false));
    }

    #[test]
    fn types() {
        let int = json!({"properties": {"timeout": {"type": "integer"}}});
        assert_eq!(
            err(int.clone(), json!({"timeout": 1.5})),
            r#"property "timeout" validation failed: wrong type: expected integer, got number"#
        );
        assert_eq!(
            err(int.clone(), json!({"timeout": "1"})),
            r#"property "timeout" validation failed: wrong type: expected integer, got string"#
        );
        check(int.clone(), json!({"timeout": 100})).unwrap();
        check(int.clone(), json!({"timeout": 100.0})).unwrap();
        check(int, json!({"timeout": -5})).unwrap();

        assert_eq!(
            err(json!({"type": ["string", "number"]}), json!(true)),
            "wrong type: expected one of string, number, got boolean"
        );
        check(json!({"type": ["string", "number"]}), json!(1)).unwrap();
        assert_eq!(
            err(json!({"type": "string"}), json!(null)),
            "wrong type: expected string, got userdata"
        );
        assert_eq!(
            err(json!({"type": "object"}), json!([1])),
            "wrong type: expected object, got table"
        );
        assert_eq!(
            err(json!({"type": "array"}), json!({"a": 1})),
            "wrong type: expected array, got table"
        );
        // one Lua table type: empty object and empty array are both
        check(json!({"type": "object"}), json!([])).unwrap();
        check(json!({"type": "array"}), json!({})).unwrap();
        check(json!({"type": "null"}), json!(null)).unwrap();
        check(json!({"type": "boolean"}), json!(false)).unwrap();
    }

    #[test]
    fn numbers() {
        let s = |k: &str, n: Value| json!({"properties": {"n": {"type": "number", k: n}}});
        assert_eq!(
            err(s("minimum", json!(100)), json!({"n": 99})),
            r#"property "n" validation failed: expected 99 to be at least 100"#
        );
        assert_eq!(
            err(s("minimum", json!(0.5)), json!({"n": 0.25})),
            r#"property "n" validation failed: expected 0.25 to be at least 0.5"#
        );
        assert_eq!(
            err(s("exclusiveMinimum", json!(0)), json!({"n": 0})),
            r#"property "n" validation failed: expected 0 to be greater than 0"#
        );
        assert_eq!(
            err(s("maximum", json!(10)), json!({"n": 10.5})),
            r#"property "n" validation failed: expected 10.5 to be at most 10"#
        );
        assert_eq!(
            err(s("exclusiveMaximum", json!(10)), json!({"n": 10})),
            r#"property "n" validation failed: expected 10 to be smaller than 10"#
        );
        assert_eq!(
            err(s("multipleOf", json!(3)), json!({"n": 10})),
            r#"property "n" validation failed: expected 10 to be a multiple of 3"#
        );
        check(s("multipleOf", json!(0.5)), json!({"n": 1.5})).unwrap();
        assert_eq!(
            err(s("multipleOf", json!(0.5)), json!({"n": 1.25})),
            r#"property "n" validation failed: expected 1.25 to be a multiple of 0.5"#
        );
        check(s("minimum", json!(100)), json!({"n": 100})).unwrap();
        // draft-4 boolean exclusiveMinimum
        assert_eq!(
            err(json!({"minimum": 1, "exclusiveMinimum": true}), json!(1)),
            "expected 1 to be greater than 1"
        );
        // strings are not checked by number keywords
        check(json!({"minimum": 1}), json!("0")).unwrap();
    }

    #[test]
    fn lua_number_formatting() {
        assert_eq!(lua_num(99.0), "99");
        assert_eq!(lua_num(-3.0), "-3");
        assert_eq!(lua_num(0.1), "0.1");
        assert_eq!(lua_num(1.5), "1.5");
        assert_eq!(lua_num(67108864.0), "67108864");
        assert_eq!(lua_num(1e14), "1e+14");
        assert_eq!(lua_num(99999999999999.0), "99999999999999");
        assert_eq!(lua_num(123456789012345.0), "1.2345678901234e+14");
        assert_eq!(lua_num(1e-5), "1e-05");
        assert_eq!(lua_num(0.0001), "0.0001");
        assert_eq!(lua_num(1.0 / 3.0), "0.33333333333333");
        assert_eq!(lua_num(2.5e300), "2.5e+300");
        assert_eq!(lua_num(0.0), "0");
    }

    #[test]
    fn lua_quoting() {
        assert_eq!(lua_quote("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(lua_quote("a\nb"), "\"a\\\nb\"");
        assert_eq!(lua_quote("a\rb"), r#""a\13b""#);
        assert_eq!(lua_quote("a\r1"), r#""a\0131""#);
        assert_eq!(lua_quote("\u{0}"), r#""\0""#);
        assert_eq!(lua_quote("\u{7f}"), r#""\127""#);
        assert_eq!(lua_quote("é"), "\"é\"");
    }

    #[test]
    fn strings() {
        let s = json!({"properties": {"s": {"type": "string", "minLength": 3, "maxLength": 5}}});
        assert_eq!(
            err(s.clone(), json!({"s": "ab"})),
            r#"property "s" validation failed: string too short, expected at least 3, got 2"#
        );
        assert_eq!(
            err(s.clone(), json!({"s": "abcdef"})),
            r#"property "s" validation failed: string too long, expected at most 5, got 6"#
        );
        // length counts UTF-8 characters
        check(s, json!({"s": "ééé"})).unwrap();
        assert_eq!(
            err(json!({"pattern": "^a"}), json!("b")),
            r#"failed to match pattern "^a" with "b""#
        );
        check(json!({"pattern": "^a"}), json!("abc")).unwrap();
        // unanchored search
        check(json!({"pattern": "b"}), json!("abc")).unwrap();
        check(json!({"pattern": "^a"}), json!(1)).unwrap();
        assert_eq!(
            err(json!({"pattern": "^\\d+$"}), json!("1a\"")),
            r#"failed to match pattern "^\\d+$" with "1a\"""#
        );
    }

    #[test]
    fn apisix_patterns() {
        // patterns found in APISIX schemas
        let cases = [
            ("^[a-zA-Z0-9-_.]+$", "abc-1_2.3", "a b"),
            ("^[^/]+$", "abc", "a/b"),
            ("^\\*?[0-9a-zA-Z-._\\[\\]:]+$", "*.example.com", "a b"),
            ("^[a-zA-Z-_]+$", "X-Real-IP", "x y"),
            ("^\\$[0-9a-zA-Z_]+$", "$remote_addr", "remote_addr"),
            ("^(?!\\d)", "abc", "1bc"),
            ("^https?://", "https://a", "ftp://a"),
            ("^[a-zA-Z0-9_]+$", "a_b", "a-b"),
        ];
        for (p, good, bad) in cases {
            let s = Schema::compile(&json!({"pattern": p})).unwrap();
            assert!(
                matches!(s.regexes.get(p), Some(Some(_))),
                "pattern {p} compiles"
            );
            s.check(&mut json!(good)).unwrap();
            assert!(s.check(&mut json!(bad)).is_err(), "{p} rejects {bad}");
        }
        // an unsupported pattern matches nothing
        let s = Schema::compile(&json!({"pattern": "(unclosed"})).unwrap();
        assert!(s.check(&mut json!("x")).is_err());
    }

    #[test]
    fn enums() {
        let s = json!({"properties": {"m": {"enum": ["GET", "POST", 1, true, {"a": 1}]}}});
        assert_eq!(
            err(s.clone(), json!({"m": "PUT"})),
            r#"property "m" validation failed: matches none of the enum values"#
        );
        check(s.clone(), json!({"m": "GET"})).unwrap();
        check(s.clone(), json!({"m": 1.0})).unwrap();
        check(s.clone(), json!({"m": true})).unwrap();
        check(s.clone(), json!({"m": {"a": 1}})).unwrap();
        assert!(check(s, json!({"m": "1"})).is_err());
    }

    #[test]
    fn arrays() {
        let s = json!({"type": "array", "minItems": 2, "maxItems": 3,
                       "items": {"type": "string"}, "uniqueItems": true});
        assert_eq!(
            err(s.clone(), json!(["a"])),
            "expect array to have at least 2 items"
        );
        assert_eq!(
            err(s.clone(), json!(["a", "b", "c", "d"])),
            "expect array to have at most 3 items"
        );
        assert_eq!(
            err(s.clone(), json!(["a", 2])),
            "failed to validate item 2: wrong type: expected string, got number"
        );
        assert_eq!(
            err(s.clone(), json!(["a", "b", "a"])),
            "expected unique items but items 1 and 3 are equal"
        );
        check(s, json!(["a", "b"])).unwrap();
        assert_eq!(
            err(json!({"uniqueItems": true}), json!([1, 2, 2.0])),
            "expected unique items but items 2 and 3 are equal"
        );
        assert_eq!(
            err(json!({"uniqueItems": true}), json!([{"a": 1}, 1, {"a": 1}])),
            "expected unique items but items 1 and 3 are equal"
        );
        // scalars are compared before tables
        assert_eq!(
            err(json!({"uniqueItems": true}), json!([[1], [1], "x", "x"])),
            "expected unique items but items 3 and 4 are equal"
        );
        // tuple validation
        let t = json!({"items": [{"type": "string"}, {"type": "integer"}],
                       "additionalItems": false});
        assert_eq!(
            err(t.clone(), json!(["a", "b"])),
            "failed to validate item 2: wrong type: expected integer, got string"
        );
        assert_eq!(
            err(t.clone(), json!(["a", 1, 2])),
            "found unexpected extra items in array"
        );
        check(t.clone(), json!(["a"])).unwrap();
        let t = json!({"items": [{"type": "string"}], "additionalItems": {"type": "string"}});
        assert_eq!(
            err(t, json!(["a", "b", 3])),
            "failed to validate additional item 3: wrong type: expected string, got number"
        );
        // items: nested objects get defaults
        let s = json!({"type": "array", "items": {"type": "object",
                       "properties": {"w": {"type": "integer", "default": 1}}}});
        assert_eq!(
            check(s, json!([{}, {"w": 5}])).unwrap(),
            json!([{"w": 1}, {"w": 5}])
        );
    }

    #[test]
    fn objects() {
        let s = json!({"type": "object", "properties": {"a": {"type": "string"}},
                       "additionalProperties": false});
        assert_eq!(
            err(s.clone(), json!({"a": "x", "foo": 1})),
            "additional properties forbidden, found foo"
        );
        check(s, json!({"a": "x"})).unwrap();
        let s = json!({"additionalProperties": {"type": "integer"}});
        assert_eq!(
            err(s, json!({"x": "1"})),
            "failed to validate additional property x: wrong type: expected integer, got string"
        );
        assert_eq!(
            err(json!({"type": "object", "minProperties": 1}), json!({})),
            "expect object to have at least 1 properties"
        );
        assert_eq!(
            err(json!({"maxProperties": 1}), json!({"a": 1, "b": 2})),
            "expect object to have at most 1 properties"
        );
        // minProperties counts after defaults were written
        check(
            json!({"minProperties": 1, "properties": {"a": {"default": 1}}}),
            json!({}),
        )
        .unwrap();
        let s = json!({"patternProperties": {"^x-": {"type": "string"}},
                       "additionalProperties": false});
        assert_eq!(
            err(s.clone(), json!({"x-a": 1})),
            r#"failed to validate x-a (matching "^x-"): wrong type: expected string, got number"#
        );
        assert_eq!(
            err(s.clone(), json!({"y": "1"})),
            "additional properties forbidden, found y"
        );
        check(s, json!({"x-a": "1"})).unwrap();
        // required outside properties, after the properties loop, in array order
        let s = json!({"properties": {"a": {"type": "string"}}, "required": ["b", "c"]});
        assert_eq!(
            err(s.clone(), json!({"a": 1})),
            r#"property "a" validation failed: wrong type: expected string, got number"#
        );
        assert_eq!(err(s, json!({"a": "x"})), r#"property "b" is required"#);
        // a required property inside properties is reported in properties order
        let s = json!({"properties": {"a": {"type": "string"}, "b": {"type": "string"}},
                       "required": ["b"]});
        assert_eq!(
            err(s.clone(), json!({"a": 1})),
            r#"property "a" validation failed: wrong type: expected string, got number"#
        );
        assert_eq!(err(s, json!({"a": "1"})), r#"property "b" is required"#);
        // object keywords do not apply to non-objects
        check(json!({"required": ["a"]}), json!("str")).unwrap();
        // required: [] accepts only an empty table
        assert_eq!(
            err(json!({"required": []}), json!({"a": 1})),
            "the input data should be an empty table"
        );
        check(json!({"required": []}), json!({})).unwrap();
    }

    #[test]
    fn dependencies() {
        let s = json!({"properties": {"a": {}, "b": {}}, "dependencies": {"a": ["b"]}});
        assert_eq!(
            err(s.clone(), json!({"a": 1})),
            r#"property "b" is required when "a" is set"#
        );
        check(s, json!({"a": 1, "b": 2})).unwrap();
        let s = json!({"dependencies": {"a": ["b"]}});
        assert_eq!(
            err(s, json!({"a": 1})),
            r#"property "b" is required when "a" is set"#
        );
        let s = json!({"dependencies": {"a": {"required": ["c"]}}});
        assert_eq!(
            err(s, json!({"a": 1})),
            r#"failed to validate dependent schema for "a": property "c" is required"#
        );
    }

    #[test]
    fn compound() {
        let one = json!({"oneOf": [{"type": "string"}, {"type": "integer"}]});
        assert_eq!(
            err(one.clone(), json!(true)),
            "value should match only one schema, but matches none"
        );
        check(one, json!("a")).unwrap();
        let one = json!({"oneOf": [{"type": "number"}, {"type": "integer"}]});
        assert_eq!(
            err(one, json!(1)),
            "value should match only one schema, but matches both schemas 1 and 2"
        );
        let any = json!({"anyOf": [{"required": ["a"]}, {"required": ["b"]}]});
        assert_eq!(
            err(any.clone(), json!({"c": 1})),
            r#"object matches none of the required: ["a"] or ["b"]"#
        );
        check(any, json!({"b": 1})).unwrap();
        assert_eq!(
            err(
                json!({"anyOf": [{"type": "string"}, {"type": "integer"}]}),
                json!(1.5)
            ),
            "object matches none of the required"
        );
        assert_eq!(
            err(
                json!({"anyOf": [{"required": ["a/b", "c"]}, {"type": "string"}]}),
                json!({})
            ),
            r#"object matches none of the required: ["a\/b","c"]"#
        );
        let all = json!({"allOf": [{"type": "object"}, {"required": ["x"]}]});
        assert_eq!(
            err(all, json!({})),
            r#"allOf 2 failed: property "x" is required"#
        );
        assert_eq!(
            err(json!({"not": {"type": "string"}}), json!("a")),
            "value wasn't supposed to match schema"
        );
        check(json!({"not": {"type": "string"}}), json!(1)).unwrap();
        let cond = json!({"if": {"properties": {"k": {"const": "a"}}},
                          "then": {"required": ["x"]}, "else": {"required": ["y"]}});
        assert_eq!(
            err(cond.clone(), json!({"k": "a"})),
            "then clause did not match"
        );
        assert_eq!(
            err(cond.clone(), json!({"k": "b"})),
            "else clause did not match"
        );
        check(cond, json!({"k": "b", "y": 1})).unwrap();
        assert_eq!(
            err(json!({"const": 5}), json!(6)),
            "failed to check const value"
        );
        assert_eq!(err(json!(false), json!(1)), "expect false always");
        check(json!(true), json!(1)).unwrap();
        assert_eq!(
            err(json!({"contains": {"type": "integer"}}), json!(["a"])),
            "failed to check contains"
        );
        check(json!({"contains": {"type": "integer"}}), json!(["a", 1])).unwrap();
    }

    #[test]
    fn formats() {
        assert_eq!(
            err(json!({"format": "ipv4"}), json!("1.2.3")),
            "expect valid ipv4 address but got: 1.2.3"
        );
        check(json!({"format": "ipv4"}), json!("10.0.0.1")).unwrap();
        assert_eq!(
            err(json!({"format": "ipv6"}), json!("::g")),
            "expect valid ipv6 address but got: ::g"
        );
        check(json!({"format": "ipv6"}), json!("::1")).unwrap();
        assert_eq!(
            err(json!({"format": "email"}), json!("a@b")),
            "expect valid email address but got: a@b"
        );
        check(json!({"format": "email"}), json!("a.b@c.example.com")).unwrap();
        // api7's hostname message says ipv4
        assert_eq!(
            err(json!({"format": "hostname"}), json!("a b")),
            "expect valid ipv4 address but got: a b"
        );
        check(json!({"format": "hostname"}), json!("a-b.example")).unwrap();
        check(json!({"format": "uri"}), json!("not checked")).unwrap();
    }

    #[test]
    fn defaults() {
        let s = json!({
            "type": "object",
            "properties": {
                "n": {"type": "integer", "default": 1},
                "s": {"type": "string", "default": "x"},
                "o": {"type": "object", "default": {"k": [1, 2]}},
                "nested": {
                    "type": "object",
                    "properties": {
                        "inner": {"type": "boolean", "default": false},
                        "deeper": {
                            "type": "object",
                            "properties": {"d": {"default": 2}}
                        }
                    }
                },
                "z": {"type": "string", "default": "zz"}
            }
        });
        let conf = check(s.clone(), json!({"nested": {"deeper": {}}, "z": null}));
        // null is present: it is validated (and fails here), not defaulted
        assert_eq!(
            conf.unwrap_err(),
            r#"property "z" validation failed: wrong type: expected string, got userdata"#
        );
        let conf = check(s.clone(), json!({"nested": {"deeper": {}}})).unwrap();
        assert_eq!(
            conf,
            json!({
                "nested": {"deeper": {"d": 2}, "inner": false},
                "n": 1, "s": "x", "o": {"k": [1, 2]}, "z": "zz"
            })
        );
        // defaults are not descended into: an absent "nested" gets no inner defaults
        let conf = check(s, json!({})).unwrap();
        assert!(conf.get("nested").is_none());

        // a null property stays null when the schema accepts it
        let s = json!({"properties": {"a": {"default": 1}}});
        assert_eq!(check(s, json!({"a": null})).unwrap(), json!({"a": null}));

        // defaults are not validated
        let s = json!({"properties": {"a": {"type": "integer", "default": "x"}}});
        assert_eq!(check(s, json!({})).unwrap(), json!({"a": "x"}));

        // a required property with a default is still required
        let s = json!({"properties": {"a": {"default": 1}}, "required": ["a"]});
        assert_eq!(err(s, json!({})), r#"property "a" is required"#);

        // defaults are written in order; a later failure leaves earlier defaults in place
        let s = Schema::compile(&json!({"properties": {
            "a": {"default": 1},
            "b": {"type": "string"}
        }}))
        .unwrap();
        let mut conf = json!({"b": 1});
        assert!(s.check(&mut conf).is_err());
        assert_eq!(conf, json!({"b": 1, "a": 1}));

        // an empty array standing for an empty Lua table receives defaults as an object
        let s = json!({"properties": {"x": {"type": "object",
                       "properties": {"a": {"default": 1}}}}});
        assert_eq!(check(s, json!({"x": []})).unwrap(), json!({"x": {"a": 1}}));
    }

    #[test]
    fn refs() {
        let s = json!({
            "definitions": {
                "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                "node": {"$id": "#node", "type": "object",
                         "properties": {"port": {"$ref": "#/definitions/port"},
                                        "w": {"default": 1}}}
            },
            "type": "object",
            "properties": {
                "nodes": {"type": "array", "items": {"$ref": "#node"}},
                "port": {"$ref": "#/definitions/port", "default": 80}
            }
        });
        assert_eq!(
            err(s.clone(), json!({"port": 0})),
            r#"property "port" validation failed: expected 0 to be at least 1"#
        );
        assert_eq!(
            err(s.clone(), json!({"nodes": [{"port": 70000}]})),
            "property \"nodes\" validation failed: failed to validate item 1: \
             property \"port\" validation failed: expected 70000 to be at most 65535"
        );
        assert_eq!(
            check(s, json!({"nodes": [{"port": 1}]})).unwrap(),
            json!({"nodes": [{"port": 1, "w": 1}], "port": 80})
        );
        assert!(Schema::compile(&json!({"$ref": "#/definitions/missing"})).is_err());
        assert!(Schema::compile(&json!({"$ref": "http://x/y.json"})).is_err());
        // recursive schemas terminate
        let s = json!({"type": "object", "properties": {"child": {"$ref": "#"}}});
        check(s.clone(), json!({"child": {"child": {}}})).unwrap();
        assert_eq!(
            err(s, json!({"child": {"child": 1}})),
            "property \"child\" validation failed: property \"child\" validation failed: \
             wrong type: expected object, got number"
        );
    }

    #[test]
    fn invalid_schemas() {
        assert_eq!(
            Schema::compile(&json!({"type": "strin"})).unwrap_err(),
            "invalid JSON type: strin"
        );
        assert_eq!(
            Schema::compile(&json!({"type": 1})).unwrap_err(),
            r#"invalid "type" type: got number"#
        );
        assert!(Schema::compile(&json!({"properties": {"a": {"type": "x"}}})).is_err());
        assert!(Schema::compile(&json!({"minimum": "1"})).is_err());
        assert!(Schema::compile(&json!({"properties": 1})).is_err());
        assert!(Schema::compile(&json!({"enum": []})).is_err());
        assert!(Schema::compile(&json!({"required": "a"})).is_err());
        // unreferenced definitions are not compiled (api7 generates code for reachable schemas)
        Schema::compile(&json!({"definitions": {"x": {"type": "nope"}}})).unwrap();
        // Lua-converted empty tables
        Schema::compile(&json!({"properties": [], "required": {}, "items": []})).unwrap();
    }

    #[test]
    fn send_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Schema>();
    }
}
