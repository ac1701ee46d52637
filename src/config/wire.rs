//! Config values that go onto the wire as they are: header names and values, request targets,
//! hosts.
//!
//! CR, LF or NUL in such a value can never be used: HTTP/1.1 would end the line there (a
//! header or request-line injection), HTTP/2 and every HTTP library refuse them. So they are
//! refused when a snapshot is built, with the field's path, for config files, Admin API writes
//! and etcd alike, rather than failing (or worse, splitting) each request that would use them.
//! Ids are held to a stricter rule already (`validate_id`).

use serde_json::Value;

/// What a refused value is told.
pub const REFUSED: &str = "must not hold CR, LF or NUL";

/// Whether `s` holds a byte no header line or request target may carry.
pub fn has_line_break(s: &str) -> bool {
    s.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0))
}

/// A string field that goes onto the wire: the message for a refused value.
pub fn check_field(value: &str) -> Result<(), String> {
    if has_line_break(value) {
        Err(format!("{REFUSED}: {value:?}"))
    } else {
        Ok(())
    }
}

/// Checks the strings of a plugin conf that a plugin sends on: everything under a property
/// whose name says header (`headers`, `header_name`, `allow_headers`, ...: keys and values
/// both, at any depth), and the values of `uri`, `host`, `upstream_host` and `location`
/// properties. Plugins are free to hold line breaks elsewhere (a response body, Lua code), so
/// the rule goes by property name; it holds for native and Lua plugins, APISIX's bundled ones
/// (`proxy-rewrite`, `response-rewrite`, `cors`, `redirect`, ...) included.
///
/// The plugin's name counts as a property name too (`plugins.response-headers`: every header
/// in its conf). The message names the property in APISIX's form (`property "headers.set.X-A"
/// ...`).
pub fn check_plugin_conf(plugin: &str, conf: &Value) -> Result<(), String> {
    let mut path = String::new();
    walk(conf, &mut path, is_wire_key(plugin))
}

fn walk(v: &Value, path: &mut String, on_wire: bool) -> Result<(), String> {
    match v {
        Value::String(s) if on_wire && has_line_break(s) => {
            Err(format!("property \"{path}\" {REFUSED}: {s:?}"))
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                walk(item, path, on_wire)?;
                path.truncate(len);
            }
            Ok(())
        }
        Value::Object(map) => {
            for (key, item) in map {
                if on_wire && has_line_break(key) {
                    return Err(format!(
                        "property \"{path}\" has a key that {REFUSED}: {key:?}"
                    ));
                }
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
                walk(item, path, on_wire || is_wire_key(key))?;
                path.truncate(len);
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// A property whose strings a plugin puts into a header or request line.
fn is_wire_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    key.contains("header") || matches!(key.as_str(), "uri" | "host" | "upstream_host" | "location")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn header_strings_are_checked_at_any_depth() {
        assert!(
            check_plugin_conf("p", &json!({"headers": {"set": {"X-A": "v", "X-N": 1}}})).is_ok()
        );
        assert_eq!(
            check_plugin_conf("p", &json!({"headers": {"set": {"X-A": "a\r\nX-B: b"}}}))
                .unwrap_err(),
            "property \"headers.set.X-A\" must not hold CR, LF or NUL: \"a\\r\\nX-B: b\""
        );
        assert_eq!(
            check_plugin_conf("p", &json!({"headers": {"add": ["X-A: a", "X-B: \u{0}"]}}))
                .unwrap_err(),
            "property \"headers.add[1]\" must not hold CR, LF or NUL: \"X-B: \\0\""
        );
        assert_eq!(
            check_plugin_conf("p", &json!({"headers": {"X-A\nB": "v"}})).unwrap_err(),
            "property \"headers\" has a key that must not hold CR, LF or NUL: \"X-A\\nB\""
        );
        assert!(check_plugin_conf("p", &json!({"header_name": "X-Id\r"})).is_err());
        assert!(check_plugin_conf("p", &json!({"allow_headers": "a,\nb"})).is_err());
        assert!(check_plugin_conf("p", &json!({"uri": "/a\nb"})).is_err());
        assert!(check_plugin_conf("p", &json!({"upstream_host": "a\r"})).is_err());
        assert_eq!(
            check_plugin_conf("response-headers", &json!({"set": {"X-A": "a\rb"}})).unwrap_err(),
            "property \"set.X-A\" must not hold CR, LF or NUL: \"a\\rb\""
        );
    }

    #[test]
    fn other_strings_may_hold_line_breaks() {
        assert!(check_plugin_conf("p", &json!({"body": "line 1\nline 2\r\n"})).is_ok());
        assert!(check_plugin_conf("p", &json!({"functions": ["return function()\nend"]})).is_ok());
        // A key outside a header property is not a header name.
        assert!(check_plugin_conf("p", &json!({"vars": {"a\nb": 1}})).is_ok());
    }
}
