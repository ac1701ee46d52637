//! APISIX's upstream `checks` object: field names, types and defaults as APISIX's
//! `health_checker` schema has them. Types are checked by serde (unknown fields refused);
//! ranges by [`Checks::validate`], whose messages name the field path under `checks`.

use serde::{Deserialize, Serialize};

/// `checks`: an active checker, optionally with passive checks from real traffic. APISIX
/// requires `active` (a node taken out by passive checks alone would get no traffic to bring it
/// back).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Checks {
    pub active: Active,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passive: Option<Passive>,
}

/// How a check talks to a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CheckType {
    #[default]
    Http,
    Https,
    Tcp,
}

impl CheckType {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckType::Http => "http",
            CheckType::Https => "https",
            CheckType::Tcp => "tcp",
        }
    }
}

/// `checks.active`: probes the checker sends to every node.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Active {
    #[serde(rename = "type", default)]
    pub kind: CheckType,
    /// Seconds a probe may take (connect, send, and the status line each).
    #[serde(default = "one_f")]
    pub timeout: f64,
    /// Nodes probed at the same time.
    #[serde(default = "ten")]
    pub concurrency: u32,
    /// The `Host` of the probe request (default: the node's host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The port probed (default: the node's port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default = "get")]
    pub http_method: String,
    #[serde(default = "slash")]
    pub http_path: String,
    #[serde(default)]
    pub http_req_body: String,
    #[serde(default = "yes")]
    pub https_verify_certificate: bool,
    #[serde(default)]
    pub healthy: ActiveHealthy,
    #[serde(default)]
    pub unhealthy: ActiveUnhealthy,
    /// Extra request header lines, `"Name: value"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub req_headers: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ActiveHealthy {
    /// Seconds between probes of a healthy node.
    #[serde(default = "one")]
    pub interval: u32,
    #[serde(default = "active_healthy_statuses")]
    pub http_statuses: Vec<u16>,
    /// Successful probes in a row that make an unhealthy node healthy.
    #[serde(default = "two")]
    pub successes: u32,
}

impl Default for ActiveHealthy {
    fn default() -> Self {
        ActiveHealthy {
            interval: 1,
            http_statuses: active_healthy_statuses(),
            successes: 2,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ActiveUnhealthy {
    /// Seconds between probes of an unhealthy node.
    #[serde(default = "one")]
    pub interval: u32,
    #[serde(default = "active_unhealthy_statuses")]
    pub http_statuses: Vec<u16>,
    #[serde(default = "five")]
    pub http_failures: u32,
    #[serde(default = "two")]
    pub tcp_failures: u32,
    #[serde(default = "three")]
    pub timeouts: u32,
}

impl Default for ActiveUnhealthy {
    fn default() -> Self {
        ActiveUnhealthy {
            interval: 1,
            http_statuses: active_unhealthy_statuses(),
            http_failures: 5,
            tcp_failures: 2,
            timeouts: 3,
        }
    }
}

/// `checks.passive`: what real traffic says about a node. A threshold of 0 turns that kind of
/// observation off.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Passive {
    #[serde(rename = "type", default)]
    pub kind: CheckType,
    #[serde(default)]
    pub healthy: PassiveHealthy,
    #[serde(default)]
    pub unhealthy: PassiveUnhealthy,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PassiveHealthy {
    #[serde(default = "passive_healthy_statuses")]
    pub http_statuses: Vec<u16>,
    #[serde(default = "five")]
    pub successes: u32,
}

impl Default for PassiveHealthy {
    fn default() -> Self {
        PassiveHealthy {
            http_statuses: passive_healthy_statuses(),
            successes: 5,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PassiveUnhealthy {
    #[serde(default = "passive_unhealthy_statuses")]
    pub http_statuses: Vec<u16>,
    #[serde(default = "two")]
    pub tcp_failures: u32,
    #[serde(default = "seven")]
    pub timeouts: u32,
    #[serde(default = "five")]
    pub http_failures: u32,
}

impl Default for PassiveUnhealthy {
    fn default() -> Self {
        PassiveUnhealthy {
            http_statuses: passive_unhealthy_statuses(),
            tcp_failures: 2,
            timeouts: 7,
            http_failures: 5,
        }
    }
}

fn one() -> u32 {
    1
}
fn two() -> u32 {
    2
}
fn three() -> u32 {
    3
}
fn five() -> u32 {
    5
}
fn seven() -> u32 {
    7
}
fn ten() -> u32 {
    10
}
fn one_f() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}
fn get() -> String {
    "GET".into()
}
fn slash() -> String {
    "/".into()
}
fn active_healthy_statuses() -> Vec<u16> {
    vec![200, 302]
}
fn active_unhealthy_statuses() -> Vec<u16> {
    vec![429, 404, 500, 501, 502, 503, 504, 505]
}
fn passive_healthy_statuses() -> Vec<u16> {
    let mut v: Vec<u16> = (200..=208).collect();
    v.push(226);
    v.extend(300..=308);
    v
}
fn passive_unhealthy_statuses() -> Vec<u16> {
    vec![429, 500, 503]
}

const METHODS: [&str; 10] = [
    "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE", "PURGE",
];

impl Checks {
    /// Checks the ranges APISIX's schema sets. The message starts with the field's path
    /// under the upstream (`checks.active.healthy.successes ...`).
    // `!(v > 0.0)` on purpose: NaN must be refused too.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    pub fn validate(&self) -> Result<(), String> {
        let a = &self.active;
        if !(a.timeout > 0.0) || !a.timeout.is_finite() {
            return Err("checks.active.timeout must be greater than 0".into());
        }
        if a.concurrency == 0 {
            return Err("checks.active.concurrency must be at least 1".into());
        }
        if a.port == Some(0) {
            return Err("checks.active.port must be between 1 and 65535".into());
        }
        if !METHODS.contains(&a.http_method.as_str()) {
            return Err(format!(
                "checks.active.http_method must be one of {}",
                METHODS.join(", ")
            ));
        }
        if !a.http_path.starts_with('/') || a.http_path.bytes().any(|b| b <= b' ') {
            return Err(
                "checks.active.http_path must be a path starting with \"/\", without spaces".into(),
            );
        }
        if let Some(h) = &a.host {
            if h.is_empty() || h.bytes().any(|b| b <= b' ' || b == b'/') {
                return Err("checks.active.host must be a host name or address".into());
            }
        }
        if let Some(hs) = &a.req_headers {
            if hs.is_empty() {
                return Err("checks.active.req_headers must not be empty".into());
            }
            for (i, h) in hs.iter().enumerate() {
                let ok = h.split_once(':').is_some_and(|(n, v)| {
                    !n.is_empty()
                        && n.bytes().all(|b| b.is_ascii_graphic())
                        && !v.bytes().any(|b| b == b'\r' || b == b'\n')
                });
                if !ok {
                    return Err(format!(
                        "checks.active.req_headers[{i}] must be \"Name: value\" on one line"
                    ));
                }
            }
        }
        range(
            "checks.active.healthy.interval",
            a.healthy.interval,
            1,
            u32::MAX,
        )?;
        range(
            "checks.active.unhealthy.interval",
            a.unhealthy.interval,
            1,
            u32::MAX,
        )?;
        range(
            "checks.active.healthy.successes",
            a.healthy.successes,
            1,
            254,
        )?;
        range(
            "checks.active.unhealthy.http_failures",
            a.unhealthy.http_failures,
            1,
            254,
        )?;
        range(
            "checks.active.unhealthy.tcp_failures",
            a.unhealthy.tcp_failures,
            1,
            254,
        )?;
        range(
            "checks.active.unhealthy.timeouts",
            a.unhealthy.timeouts,
            1,
            254,
        )?;
        statuses(
            "checks.active.healthy.http_statuses",
            &a.healthy.http_statuses,
        )?;
        statuses(
            "checks.active.unhealthy.http_statuses",
            &a.unhealthy.http_statuses,
        )?;
        if let Some(p) = &self.passive {
            range(
                "checks.passive.healthy.successes",
                p.healthy.successes,
                0,
                254,
            )?;
            range(
                "checks.passive.unhealthy.http_failures",
                p.unhealthy.http_failures,
                0,
                254,
            )?;
            range(
                "checks.passive.unhealthy.tcp_failures",
                p.unhealthy.tcp_failures,
                0,
                254,
            )?;
            range(
                "checks.passive.unhealthy.timeouts",
                p.unhealthy.timeouts,
                0,
                254,
            )?;
            statuses(
                "checks.passive.healthy.http_statuses",
                &p.healthy.http_statuses,
            )?;
            statuses(
                "checks.passive.unhealthy.http_statuses",
                &p.unhealthy.http_statuses,
            )?;
        }
        Ok(())
    }
}

fn range(path: &str, v: u32, min: u32, max: u32) -> Result<(), String> {
    if v < min || v > max {
        if max == u32::MAX {
            return Err(format!("{path} must be at least {min}, got {v}"));
        }
        return Err(format!("{path} must be between {min} and {max}, got {v}"));
    }
    Ok(())
}

fn statuses(path: &str, v: &[u16]) -> Result<(), String> {
    if v.is_empty() {
        return Err(format!("{path} must not be empty"));
    }
    for (i, s) in v.iter().enumerate() {
        if !(200..=599).contains(s) {
            return Err(format!("{path}[{i}] must be between 200 and 599, got {s}"));
        }
        if v[..i].contains(s) {
            return Err(format!("{path}[{i}]: {s} is listed twice"));
        }
    }
    Ok(())
}

/// The statuses of one list, as a bit set (looked up on every proxied response).
#[derive(Debug, Clone, Default)]
pub struct StatusSet([u64; 10]);

impl StatusSet {
    pub fn new(list: &[u16]) -> Self {
        let mut s = StatusSet::default();
        for &c in list {
            if c < 640 {
                s.0[(c / 64) as usize] |= 1 << (c % 64);
            }
        }
        s
    }

    pub fn contains(&self, status: u16) -> bool {
        status < 640 && self.0[(status / 64) as usize] & (1 << (status % 64)) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Checks, String> {
        let v: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
        let c: Checks = serde_path_to_error::deserialize(v).map_err(|e| e.to_string())?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn defaults_are_apisix_s() {
        let c = parse(r#"{"active": {}, "passive": {}}"#).expect("valid");
        let a = &c.active;
        assert_eq!(a.kind, CheckType::Http);
        assert_eq!((a.timeout, a.concurrency), (1.0, 10));
        assert_eq!(a.http_path, "/");
        assert_eq!(a.healthy.interval, 1);
        assert_eq!(a.healthy.http_statuses, vec![200, 302]);
        assert_eq!(a.healthy.successes, 2);
        assert_eq!(
            (
                a.unhealthy.http_failures,
                a.unhealthy.tcp_failures,
                a.unhealthy.timeouts
            ),
            (5, 2, 3)
        );
        let p = c.passive.expect("passive");
        assert_eq!(p.healthy.successes, 5);
        assert_eq!(p.healthy.http_statuses.len(), 19);
        assert_eq!(p.unhealthy.http_statuses, vec![429, 500, 503]);
        assert_eq!(
            (
                p.unhealthy.http_failures,
                p.unhealthy.tcp_failures,
                p.unhealthy.timeouts
            ),
            (5, 2, 7)
        );
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse(r#"{"passive": {}}"#).unwrap_err();
        assert!(e.contains("missing field `active`"), "{e}");
        let e = parse(r#"{"active": {"healthy": {"successes": 0}}}"#).unwrap_err();
        assert_eq!(
            e,
            "checks.active.healthy.successes must be between 1 and 254, got 0"
        );
        let e = parse(r#"{"active": {"unhealthy": {"intervall": 1}}}"#).unwrap_err();
        assert!(
            e.starts_with("active.unhealthy.intervall: unknown field `intervall`"),
            "{e}"
        );
        let e = parse(r#"{"active": {"type": "udp"}}"#).unwrap_err();
        assert!(e.starts_with("active.type: unknown variant `udp`"), "{e}");
        let e = parse(r#"{"active": {"healthy": {"http_statuses": [200, 700]}}}"#).unwrap_err();
        assert_eq!(
            e,
            "checks.active.healthy.http_statuses[1] must be between 200 and 599, got 700"
        );
        let e = parse(r#"{"active": {"req_headers": ["X-A: 1\r\nX-B: 2"]}}"#).unwrap_err();
        assert!(e.starts_with("checks.active.req_headers[0]"), "{e}");
        // Passive thresholds may be 0 (that observation is off).
        parse(r#"{"active": {}, "passive": {"unhealthy": {"timeouts": 0}}}"#).expect("valid");
    }

    #[test]
    fn status_set() {
        let s = StatusSet::new(&[200, 302, 599]);
        assert!(s.contains(200) && s.contains(302) && s.contains(599));
        assert!(!s.contains(201) && !s.contains(0) && !s.contains(1000));
    }
}
