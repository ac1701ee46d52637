//! An access-log format compiled once into segments: literal text and variables, rendered per
//! request with nginx's escaping.

use std::borrow::Cow;

use serde_json::{Map, Value};

use crate::plugin::Ctx;

/// `access_log_format_escape`: how variable values are escaped (nginx's `log_format escape=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Escape {
    /// `"`, `\`, control and non-ASCII bytes as `\xHH`; an unset variable is `-`.
    #[default]
    Default,
    /// JSON string escapes; an unset variable is empty.
    Json,
    /// Values as they are; an unset variable is `-`.
    None,
}

/// One piece of a template.
#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Text(String),
    /// A request header (`$http_NAME`), by its lower-case name with `-`: read as bytes, so a
    /// value that is not UTF-8 is logged (escaped) rather than lost.
    Header(String),
    /// Any other variable, read through [`Ctx::var`].
    Var(String),
    /// A name that is no built-in variable: set by a plugin (`ctx.var.NAME = v`) or registered
    /// by a Lua one (`core.ctx.register_var`), computed on the worker's VM.
    Registered(String),
}

/// A template: `$remote_addr - [$time_local] "$request"`.
#[derive(Debug, Clone, PartialEq)]
pub struct Template(Vec<Segment>);

/// A compiled `access_log_format`.
#[derive(Debug, Clone, PartialEq)]
pub enum Format {
    /// A line of text with variables, nginx's `log_format`.
    Text(Template),
    /// JSON lines: one object per request, each key's value a template (`null` when the
    /// template is one variable that is unset).
    Json(Vec<(String, Template)>),
}

impl Template {
    /// Splits `text` at `$name` and `${name}` (names of `[A-Za-z0-9_]`). A `$` that starts no
    /// name stays literal.
    fn compile(text: &str) -> Result<Template, String> {
        let mut out = Vec::new();
        let mut lit = String::new();
        let bytes = text.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] != b'$' {
                let next = text[i..].find('$').map_or(text.len(), |n| i + n);
                lit.push_str(&text[i..next]);
                i = next;
                continue;
            }
            let (name, end) = if bytes.get(i + 1) == Some(&b'{') {
                let close = text[i + 2..]
                    .find('}')
                    .ok_or_else(|| format!("unterminated variable name at \"{}\"", &text[i..]))?;
                (&text[i + 2..i + 2 + close], i + 3 + close)
            } else {
                let len = text[i + 1..]
                    .bytes()
                    .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
                    .count();
                (&text[i + 1..i + 1 + len], i + 1 + len)
            };
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                if bytes.get(i + 1) == Some(&b'{') {
                    return Err(format!("invalid variable name \"{name}\""));
                }
                lit.push('$');
                i += 1;
                continue;
            }
            if !lit.is_empty() {
                out.push(Segment::Text(std::mem::take(&mut lit)));
            }
            out.push(match name.strip_prefix("http_") {
                Some(h) if !h.is_empty() => {
                    Segment::Header(h.to_ascii_lowercase().replace('_', "-"))
                }
                _ if Ctx::is_builtin_var(name) => Segment::Var(name.to_string()),
                _ => Segment::Registered(name.to_string()),
            });
            i = end;
        }
        if !lit.is_empty() {
            out.push(Segment::Text(lit));
        }
        Ok(Template(out))
    }

    /// The value of the template's only segment when it is one variable.
    fn single_var(&self) -> bool {
        matches!(
            self.0.as_slice(),
            [Segment::Header(_) | Segment::Var(_) | Segment::Registered(_)]
        )
    }

    fn render(&self, ctx: &mut Ctx, escape: Escape, out: &mut Vec<u8>) {
        for seg in &self.0 {
            match seg {
                Segment::Text(t) => out.extend_from_slice(t.as_bytes()),
                seg => match value(seg, ctx) {
                    Some(v) => push_escaped(&v, escape, out),
                    None if escape != Escape::Json => out.push(b'-'),
                    None => {}
                },
            }
        }
    }
}

/// A variable's value as bytes; None when unset.
fn value<'a>(seg: &Segment, ctx: &'a mut Ctx) -> Option<Cow<'a, [u8]>> {
    match seg {
        Segment::Header(name) => {
            let mut values = ctx.headers.get_all(name.as_str()).iter();
            let first = values.next()?;
            let Some(second) = values.next() else {
                return Some(Cow::Borrowed(first.as_bytes()));
            };
            let mut joined = first.as_bytes().to_vec();
            for v in std::iter::once(second).chain(values) {
                joined.extend_from_slice(b", ");
                joined.extend_from_slice(v.as_bytes());
            }
            Some(Cow::Owned(joined))
        }
        Segment::Var(name) => match ctx.var(name)? {
            Cow::Borrowed(s) => Some(Cow::Borrowed(s.as_bytes())),
            Cow::Owned(s) => Some(Cow::Owned(s.into_bytes())),
        },
        Segment::Registered(name) => {
            if let Some(v) = ctx.vars.get(name) {
                return Some(Cow::Owned(v.clone().into_bytes()));
            }
            crate::plugin::lua::runtime::registered_var(ctx, name)
                .map(|v| Cow::Owned(v.into_bytes()))
        }
        Segment::Text(t) => Some(Cow::Owned(t.clone().into_bytes())),
    }
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";
const HEX_LOWER: &[u8; 16] = b"0123456789abcdef";

/// Appends `v` escaped as nginx does for `escape=default|json|none`.
fn push_escaped(v: &[u8], escape: Escape, out: &mut Vec<u8>) {
    match escape {
        Escape::None => out.extend_from_slice(v),
        Escape::Default => {
            for &b in v {
                if b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b) {
                    out.extend_from_slice(&[
                        b'\\',
                        b'x',
                        HEX_UPPER[usize::from(b >> 4)],
                        HEX_UPPER[usize::from(b & 15)],
                    ]);
                } else {
                    out.push(b);
                }
            }
        }
        Escape::Json => push_json(v, out),
    }
}

/// JSON string escapes (without the quotes). Bytes that are not UTF-8 become U+FFFD, so the
/// line stays valid JSON.
fn push_json(v: &[u8], out: &mut Vec<u8>) {
    let text = String::from_utf8_lossy(v);
    for &b in text.as_bytes() {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            b if b < 0x20 => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX_LOWER[usize::from(b >> 4)],
                HEX_LOWER[usize::from(b & 15)],
            ]),
            b => out.push(b),
        }
    }
}

impl Format {
    /// Compiles `access_log_format`: a string (nginx's `log_format`) or a map of keys to
    /// templates (JSON lines). `at` is the setting's path, for errors.
    pub fn compile(v: &Value, at: &str) -> Result<Format, String> {
        match v {
            Value::String(s) => Template::compile(s.trim_end_matches('\n'))
                .map(Format::Text)
                .map_err(|e| format!("{at}: {e}")),
            Value::Object(m) => Self::compile_fields(m, at),
            _ => Err(format!(
                "{at}: must be a string (a log_format line) or a map of JSON keys to values"
            )),
        }
    }

    fn compile_fields(m: &Map<String, Value>, at: &str) -> Result<Format, String> {
        if m.is_empty() {
            return Err(format!("{at}: needs at least one field"));
        }
        let mut fields = Vec::with_capacity(m.len());
        for (k, v) in m {
            let Some(s) = v.as_str() else {
                return Err(format!("{at}.{k}: must be a string"));
            };
            let t = Template::compile(s).map_err(|e| format!("{at}.{k}: {e}"))?;
            fields.push((k.clone(), t));
        }
        Ok(Format::Json(fields))
    }

    /// Appends the request's line (without the newline) to `out`.
    pub fn render(&self, ctx: &mut Ctx, escape: Escape, out: &mut Vec<u8>) {
        match self {
            Format::Text(t) => t.render(ctx, escape, out),
            Format::Json(fields) => {
                out.push(b'{');
                for (i, (k, t)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    out.push(b'"');
                    push_json(k.as_bytes(), out);
                    out.extend_from_slice(b"\":");
                    if t.single_var() {
                        // Computed once (a registered variable runs Lua).
                        match value(&t.0[0], ctx) {
                            None => out.extend_from_slice(b"null"),
                            Some(v) => {
                                out.push(b'"');
                                push_json(&v, out);
                                out.push(b'"');
                            }
                        }
                        continue;
                    }
                    out.push(b'"');
                    t.render(ctx, Escape::Json, out);
                    out.push(b'"');
                }
                out.push(b'}');
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segs(s: &str) -> Vec<Segment> {
        Template::compile(s).unwrap().0
    }

    #[test]
    fn splits_variables() {
        use Segment::*;
        assert_eq!(
            segs("$remote_addr - [${time_local}] \"$http_User_Agent\" $ 5$"),
            vec![
                Var("remote_addr".into()),
                Text(" - [".into()),
                Var("time_local".into()),
                Text("] \"".into()),
                Header("user-agent".into()),
                Text("\" $ 5$".into()),
            ]
        );
        assert!(Template::compile("a ${oops").is_err());
        assert!(Template::compile("a ${a-b}").is_err());
    }

    #[test]
    fn escapes_as_nginx() {
        let mut out = Vec::new();
        push_escaped(b"a\"b\\c\x01\x7f\xc3\xa9 d", Escape::Default, &mut out);
        assert_eq!(out, b"a\\x22b\\x5Cc\\x01\\x7F\\xC3\\xA9 d");
        out.clear();
        push_escaped(b"a\"b\\c\x01\t\xc3\xa9", Escape::Json, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "a\\\"b\\\\c\\u0001\\t\u{e9}"
        );
    }
}
