//! Comparing what a request got with what its case expects. Each difference is one
//! [`Mismatch`], with the expected and the received value as text, for the report's diff.

use http::HeaderMap;
use serde_json::Value;

use super::spec::{Expect, Received, ReceivedRequest};

/// What the client got from the gateway.
#[derive(Debug, Clone)]
pub struct Got {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

/// A request the runner's upstream received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// Path and query.
    pub uri: String,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

/// One difference between what was expected and what came.
#[derive(Debug, Clone, PartialEq)]
pub struct Mismatch {
    /// What was compared: `status`, `header x-a`, `json.message`, `upstream path`, `log`.
    pub what: String,
    pub expected: String,
    pub got: String,
}

fn mismatch(
    what: impl Into<String>,
    expected: impl Into<String>,
    got: impl Into<String>,
) -> Mismatch {
    Mismatch {
        what: what.into(),
        expected: expected.into(),
        got: got.into(),
    }
}

/// The header's values joined with ", ", or None when it is absent.
pub fn header_value(headers: &HeaderMap, name: &str) -> Option<String> {
    let values: Vec<String> = headers
        .get_all(name)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    if values.is_empty() {
        None
    } else {
        Some(values.join(", "))
    }
}

fn quoted(v: &Option<String>) -> String {
    match v {
        Some(s) => format!("{s:?}"),
        None => "(absent)".to_string(),
    }
}

/// Checks header equality, presence and absence; `side` prefixes the names ("" or "upstream ").
fn check_headers(
    side: &str,
    headers: &HeaderMap,
    equal: &std::collections::BTreeMap<String, String>,
    present: &[String],
    absent: &[String],
    out: &mut Vec<Mismatch>,
) {
    for (name, want) in equal {
        let got = header_value(headers, name);
        if got.as_deref() != Some(want.as_str()) {
            out.push(mismatch(
                format!("{side}header {name}"),
                format!("{want:?}"),
                quoted(&got),
            ));
        }
    }
    for name in present {
        if header_value(headers, name).is_none() {
            out.push(mismatch(
                format!("{side}header {name}"),
                "present",
                "(absent)",
            ));
        }
    }
    for name in absent {
        let got = header_value(headers, name);
        if got.is_some() {
            out.push(mismatch(
                format!("{side}header {name}"),
                "(absent)",
                quoted(&got),
            ));
        }
    }
}

/// Compares a body with an expected whole text and an expected JSON subset.
fn check_body(
    side: &str,
    body: &[u8],
    equal: Option<&str>,
    contains: &[String],
    json: Option<&Value>,
    out: &mut Vec<Mismatch>,
) {
    let text = String::from_utf8_lossy(body);
    if let Some(want) = equal {
        if text != want {
            out.push(mismatch(format!("{side}body"), want, text.clone()));
        }
    }
    for want in contains {
        if !text.contains(want.as_str()) {
            out.push(mismatch(
                format!("{side}body"),
                format!("contains {want:?}"),
                text.clone(),
            ));
        }
    }
    if let Some(want) = json {
        match serde_json::from_slice::<Value>(body) {
            Ok(got) => json_subset(&format!("{side}json"), want, &got, out),
            Err(e) => out.push(mismatch(
                format!("{side}json"),
                want.to_string(),
                format!("not JSON ({e}): {text}"),
            )),
        }
    }
}

/// Whether `got` contains `want`: objects need at least `want`'s keys (recursively), arrays the
/// same length with each item contained, anything else equality.
pub fn json_subset(path: &str, want: &Value, got: &Value, out: &mut Vec<Mismatch>) {
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => {
            for (k, wv) in w {
                let at = format!("{path}.{k}");
                match g.get(k) {
                    Some(gv) => json_subset(&at, wv, gv, out),
                    None => out.push(mismatch(at, wv.to_string(), "(absent)")),
                }
            }
        }
        (Value::Array(w), Value::Array(g)) if w.len() == g.len() => {
            for (i, (wv, gv)) in w.iter().zip(g).enumerate() {
                json_subset(&format!("{path}[{i}]"), wv, gv, out);
            }
        }
        // 1 and 1.0 are the same number to a plugin author.
        (Value::Number(w), Value::Number(g)) if w.as_f64() == g.as_f64() => {}
        _ if want == got => {}
        _ => out.push(mismatch(path, want.to_string(), got.to_string())),
    }
}

/// Everything a step expects of the client's response.
pub fn check_response(expect: &Expect, got: &Got) -> Vec<Mismatch> {
    let mut out = Vec::new();
    if let Some(want) = expect.status {
        if want != got.status {
            out.push(mismatch("status", want.to_string(), got.status.to_string()));
        }
    }
    check_headers(
        "",
        &got.headers,
        &expect.headers,
        &expect.headers_present,
        &expect.headers_absent,
        &mut out,
    );
    check_body(
        "",
        &got.body,
        expect.body.as_deref(),
        &expect.body_contains.to_vec(),
        expect.json.as_ref(),
        &mut out,
    );
    out
}

/// What the upstream must have received (`seen`: the requests it got during the step).
pub fn check_received(want: &Received, seen: &[Seen]) -> Vec<Mismatch> {
    let mut out = Vec::new();
    match (want, seen.last()) {
        (Received::Reached(false), None) | (Received::Reached(true), Some(_)) => {}
        (Received::Reached(false), Some(s)) => out.push(mismatch(
            "upstream",
            "not reached",
            format!("{} {}", s.method, s.uri),
        )),
        (Received::Reached(true), None) | (Received::Request(_), None) => {
            out.push(mismatch("upstream", "reached", "not reached"))
        }
        (Received::Request(r), Some(s)) => check_request(r, s, &mut out),
    }
    out
}

fn check_request(want: &ReceivedRequest, s: &Seen, out: &mut Vec<Mismatch>) {
    if let Some(m) = &want.method {
        if !m.eq_ignore_ascii_case(&s.method) {
            out.push(mismatch("upstream method", m.clone(), s.method.clone()));
        }
    }
    if let Some(p) = &want.path {
        if *p != s.uri {
            out.push(mismatch("upstream path", p.clone(), s.uri.clone()));
        }
    }
    check_headers(
        "upstream ",
        &s.headers,
        &want.headers,
        &want.headers_present,
        &want.headers_absent,
        out,
    );
    check_body(
        "upstream ",
        &s.body,
        want.body.as_deref(),
        &[],
        want.json.as_ref(),
        out,
    );
}

/// Each expected log text must be in one of `lines`.
pub fn check_log(want: &[String], lines: &[String]) -> Vec<Mismatch> {
    want.iter()
        .filter(|w| !lines.iter().any(|l| l.contains(w.as_str())))
        .map(|w| {
            mismatch(
                "log",
                format!("a line containing {w:?}"),
                format!("{} lines, none containing it", lines.len()),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn got(status: u16, headers: &[(&'static str, &'static str)], body: &str) -> Got {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(*k, http::HeaderValue::from_static(v));
        }
        Got {
            status,
            headers: h,
            body: body.as_bytes().to_vec(),
        }
    }

    fn expect(yaml: &str) -> Expect {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn a_matching_response_has_no_mismatch() {
        let e = expect("{status: 200, headers: {x-a: '1, 2'}, headers_present: [x-b], headers_absent: [x-c], json: {a: {b: 1}}, body_contains: '\"a\"'}");
        let g = got(
            200,
            &[("x-a", "1"), ("x-a", "2"), ("x-b", "")],
            r#"{"a":{"b":1.0,"c":2},"d":3}"#,
        );
        assert_eq!(check_response(&e, &g), vec![]);
    }

    #[test]
    fn each_difference_is_named() {
        let e = expect("{status: 401, headers: {x-a: '1'}, headers_absent: [x-b], json: {message: no, list: [1, 2]}}");
        let g = got(200, &[("x-b", "v")], r#"{"message":"yes","list":[1,3]}"#);
        let m = check_response(&e, &g);
        let whats: Vec<&str> = m.iter().map(|m| m.what.as_str()).collect();
        assert_eq!(
            whats,
            [
                "status",
                "header x-a",
                "header x-b",
                "json.message",
                "json.list[1]"
            ]
        );
        assert_eq!(m[0].expected, "401");
        assert_eq!(m[0].got, "200");
        assert_eq!(m[1].got, "(absent)");
        assert_eq!(m[3].expected, "\"no\"");
        assert_eq!(m[3].got, "\"yes\"");
    }

    #[test]
    fn a_body_that_is_not_json_is_said_so() {
        let m = check_response(&expect("{json: {a: 1}}"), &got(200, &[], "plain"));
        assert_eq!(m.len(), 1);
        assert!(m[0].got.starts_with("not JSON"), "{:?}", m);
    }

    #[test]
    fn upstream_reached_or_not() {
        let seen = Seen {
            method: "POST".into(),
            uri: "/a?b=1".into(),
            headers: HeaderMap::new(),
            body: b"hi".to_vec(),
        };
        assert!(check_received(&Received::Reached(false), &[]).is_empty());
        assert_eq!(
            check_received(&Received::Reached(false), std::slice::from_ref(&seen)).len(),
            1
        );
        let want = Received::Request(Box::new(ReceivedRequest {
            path: Some("/a?b=1".into()),
            body: Some("hi".into()),
            headers_absent: vec!["apikey".into()],
            ..Default::default()
        }));
        assert!(check_received(&want, std::slice::from_ref(&seen)).is_empty());
        let want = Received::Request(Box::new(ReceivedRequest {
            path: Some("/a".into()),
            ..Default::default()
        }));
        assert_eq!(check_received(&want, &[seen])[0].what, "upstream path");
        assert_eq!(check_received(&want, &[])[0].got, "not reached");
    }

    #[test]
    fn log_lines_are_searched() {
        let lines = vec!["WARN moongate::lua: x.lua:3: hello".to_string()];
        assert!(check_log(&["hello".into()], &lines).is_empty());
        assert_eq!(check_log(&["bye".into()], &lines).len(), 1);
    }
}
