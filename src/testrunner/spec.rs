//! The test file format (`*.test.yaml`): what a plugin author writes.
//!
//! ```yaml
//! plugins: ..                 # plugin folder(s), relative to this file (default: see below)
//! consumers: [...]            # optional, as in a config file; so are consumer_groups,
//! plugin_metadata: [...]      # global_rules, services and upstreams
//! cases:
//!   - name: a wrong key is refused
//!     route: {uri: /hello, plugins: {example-key-auth: {key: secret}}}
//!     request: {path: /hello, headers: {apikey: nope}}
//!     upstream: echo            # or {status, headers, body}
//!     expect:
//!       status: 401
//!       json: {message: Invalid API key in request}
//! ```
//!
//! A case with several requests lists `steps` (each a `request`, an optional `upstream` and an
//! `expect`) instead. `expect: {check_error: TEXT}` makes the case a conf check: the build of
//! the case's resources must fail with an error containing TEXT.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::config::{from_value_at, ConfigError};

/// One test file, parsed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestFile {
    /// Plugin folders, relative to the test file. Default: the folder above a `tests/` folder
    /// the file is in (`plugins/tests/x.test.yaml` tests `plugins/`), else the file's folder.
    #[serde(default)]
    pub plugins: Option<OneOrMany<PathBuf>>,
    /// Node settings for the run (`lua`, `plugin_attr`, `plugins`, ...), as in a config file.
    #[serde(default)]
    pub node: Map<String, Value>,
    #[serde(default)]
    pub consumers: Vec<Value>,
    #[serde(default)]
    pub consumer_groups: Vec<Value>,
    #[serde(default)]
    pub plugin_metadata: Vec<Value>,
    #[serde(default)]
    pub global_rules: Vec<Value>,
    #[serde(default)]
    pub services: Vec<Value>,
    #[serde(default)]
    pub upstreams: Vec<Value>,
    pub cases: Vec<Case>,
}

/// A value or a list of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    pub fn to_vec(&self) -> Vec<T> {
        match self {
            OneOrMany::One(v) => vec![v.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

impl<T> Default for OneOrMany<T> {
    fn default() -> Self {
        OneOrMany::Many(Vec::new())
    }
}

/// One case: a route and one request, or several (`steps`), or a conf check.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    /// The route, as in a config file (`uri`, `hosts`, `methods`, `plugins`, `upstream`, ...).
    /// Without an upstream it proxies to the runner's upstream.
    #[serde(default)]
    pub route: Map<String, Value>,
    /// More resources for this case only, after the file's.
    #[serde(default)]
    pub consumers: Vec<Value>,
    #[serde(default)]
    pub plugin_metadata: Vec<Value>,
    #[serde(default)]
    pub global_rules: Vec<Value>,
    #[serde(default)]
    pub request: Option<Request>,
    /// What the upstream answers (default `echo`); a step may say otherwise.
    #[serde(default)]
    pub upstream: Option<UpstreamAnswer>,
    #[serde(default)]
    pub expect: Option<Expect>,
    #[serde(default)]
    pub steps: Vec<Step>,
}

/// One request of a case and what must come of it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    #[serde(default)]
    pub request: Request,
    #[serde(default)]
    pub upstream: Option<UpstreamAnswer>,
    #[serde(default)]
    pub expect: Expect,
}

/// The request the runner sends to the gateway.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Default `GET`.
    #[serde(default)]
    pub method: Option<String>,
    /// Path and query. Default: the route's `uri` when it has no wildcard.
    #[serde(default)]
    pub path: Option<String>,
    /// Header values; a list sends the header once per value.
    #[serde(default)]
    pub headers: BTreeMap<String, OneOrMany<String>>,
    #[serde(default)]
    pub body: Option<String>,
    /// A JSON body (sent with `Content-Type: application/json` unless headers say otherwise).
    #[serde(default)]
    pub json: Option<Value>,
}

/// What the runner's upstream answers: `echo` (a JSON description of the request it got:
/// `method`, `uri`, `headers`, `body`) or a fixed response.
#[derive(Debug, Clone, PartialEq)]
pub enum UpstreamAnswer {
    Echo,
    Fixed(FixedAnswer),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixedAnswer {
    #[serde(default = "ok_status")]
    pub status: u16,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub body: String,
}

fn ok_status() -> u16 {
    200
}

impl<'de> Deserialize<'de> for UpstreamAnswer {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        match v {
            Value::String(s) if s == "echo" => Ok(UpstreamAnswer::Echo),
            Value::Object(_) => FixedAnswer::deserialize(v)
                .map(UpstreamAnswer::Fixed)
                .map_err(serde::de::Error::custom),
            _ => Err(serde::de::Error::custom(
                "expected \"echo\" or {status, headers, body}",
            )),
        }
    }
}

/// What the client must get. Every field is optional; an empty `expect` only asks that the
/// request was answered.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// The case is a conf check: building its resources must fail with an error containing
    /// this text. No request is sent.
    #[serde(default)]
    pub check_error: Option<String>,
    #[serde(default)]
    pub status: Option<u16>,
    /// Headers whose value must equal the given one (several values are joined with ", ").
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub headers_present: Vec<String>,
    #[serde(default)]
    pub headers_absent: Vec<String>,
    /// The whole body.
    #[serde(default)]
    pub body: Option<String>,
    /// Text the body must contain (each of a list).
    #[serde(default)]
    pub body_contains: OneOrMany<String>,
    /// The body is JSON and contains this (objects: at least these keys, recursively).
    #[serde(default)]
    pub json: Option<Value>,
    /// Text that must appear in the gateway's log while the request is served (each of a list).
    #[serde(default)]
    pub log: OneOrMany<String>,
    /// What the upstream must have received; `false`: the request must not reach it.
    #[serde(default)]
    pub received: Option<Received>,
}

/// What the upstream got.
#[derive(Debug, Clone, PartialEq)]
pub enum Received {
    /// `true`: it was reached (nothing more checked); `false`: it was not.
    Reached(bool),
    Request(Box<ReceivedRequest>),
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceivedRequest {
    #[serde(default)]
    pub method: Option<String>,
    /// Path and query as the upstream saw them.
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub headers_present: Vec<String>,
    #[serde(default)]
    pub headers_absent: Vec<String>,
    #[serde(default)]
    pub body: Option<String>,
    #[serde(default)]
    pub json: Option<Value>,
}

impl<'de> Deserialize<'de> for Received {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        match v {
            Value::Bool(b) => Ok(Received::Reached(b)),
            Value::Object(_) => ReceivedRequest::deserialize(v)
                .map(|r| Received::Request(Box::new(r)))
                .map_err(serde::de::Error::custom),
            _ => Err(serde::de::Error::custom(
                "expected true, false or {method, path, headers, body}",
            )),
        }
    }
}

impl Case {
    /// The case's requests, each with its upstream answer and expectation.
    pub fn steps(&self) -> Vec<Step> {
        if !self.steps.is_empty() {
            return self
                .steps
                .iter()
                .map(|s| Step {
                    upstream: s.upstream.clone().or_else(|| self.upstream.clone()),
                    ..s.clone()
                })
                .collect();
        }
        vec![Step {
            request: self.request.clone().unwrap_or_default(),
            upstream: self.upstream.clone(),
            expect: self.expect.clone().unwrap_or_default(),
        }]
    }

    /// The text a conf check expects, when the case is one.
    pub fn check_error(&self) -> Option<&str> {
        self.expect.as_ref().and_then(|e| e.check_error.as_deref())
    }
}

/// Parses a test file's text, naming the bad field on failure (`cases[2].expect.status: ...`).
pub fn parse(text: &str) -> Result<TestFile, ConfigError> {
    let value: Value = serde_yaml_ng::from_str(text)
        .map_err(|e| ConfigError::new("", format!("not valid YAML: {e}")))?;
    let file: TestFile = from_value_at("", value)?;
    for (i, case) in file.cases.iter().enumerate() {
        let at = format!("cases[{i}]");
        if !case.steps.is_empty() && (case.request.is_some() || case.expect.is_some()) {
            return Err(ConfigError::new(
                at,
                "a case has either request/expect or steps, not both",
            ));
        }
        if case.check_error().is_some() && (case.request.is_some() || !case.steps.is_empty()) {
            return Err(ConfigError::new(
                at,
                "a check_error case sends no request: drop request/steps",
            ));
        }
    }
    Ok(file)
}

/// The plugin folders a test file at `path` names, absolute.
pub fn plugin_dirs(path: &Path, file: &TestFile) -> Vec<PathBuf> {
    let base = path.parent().unwrap_or(Path::new("."));
    let base = if base.as_os_str().is_empty() {
        Path::new(".")
    } else {
        base
    };
    let dirs = match &file.plugins {
        Some(list) => list.to_vec().into_iter().map(|d| base.join(d)).collect(),
        None if base.file_name().is_some_and(|n| n == "tests") => {
            vec![base.join("..")]
        }
        None => vec![base.to_path_buf()],
    };
    dirs.into_iter().map(|d| clean(&d)).collect()
}

/// An absolute path with `.` and `..` resolved (through symlinks when the path exists), so
/// file names in messages and watch events compare equal.
pub fn clean(p: &Path) -> PathBuf {
    if let Ok(c) = std::fs::canonicalize(p) {
        return c;
    }
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_request_case_and_a_steps_case() {
        let f = parse(
            "cases:\n  - name: one\n    route: {uri: /a}\n    request: {path: /a}\n    upstream: echo\n    expect: {status: 200}\n  - name: two\n    upstream: {status: 201}\n    steps:\n      - expect: {status: 200}\n      - upstream: echo\n        expect: {received: false}\n",
        )
        .unwrap();
        let s = f.cases[0].steps();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].upstream, Some(UpstreamAnswer::Echo));
        let s = f.cases[1].steps();
        assert_eq!(s.len(), 2);
        assert!(matches!(&s[0].upstream, Some(UpstreamAnswer::Fixed(a)) if a.status == 201));
        assert_eq!(s[1].upstream, Some(UpstreamAnswer::Echo));
        assert_eq!(s[1].expect.received, Some(Received::Reached(false)));
    }

    #[test]
    fn bad_fields_are_named_by_path() {
        let e = parse("cases:\n  - name: x\n    expect: {stauts: 200}\n").unwrap_err();
        assert!(e.path.starts_with("cases[0].expect"), "{e}");
        assert!(e.message.contains("stauts"), "{e}");
        let e = parse("cases:\n  - name: x\n    upstream: mirror\n").unwrap_err();
        assert!(e.to_string().contains("echo"), "{e}");
        let e =
            parse("cases:\n  - name: x\n    request: {path: /}\n    expect: {check_error: bad}\n")
                .unwrap_err();
        assert!(e.message.contains("check_error"), "{e}");
    }

    #[test]
    fn plugin_folder_defaults_to_the_one_above_tests() {
        let f = parse("cases: []\n").unwrap();
        let tmp = std::env::temp_dir();
        let dirs = plugin_dirs(&tmp.join("p/tests/a.test.yaml"), &f);
        assert_eq!(dirs, vec![clean(&tmp.join("p"))]);
        let dirs = plugin_dirs(&tmp.join("p/a.test.yaml"), &f);
        assert_eq!(dirs, vec![clean(&tmp.join("p"))]);
    }
}
