//! Consistent hashing (`type: chash`): a ring of points per node, each node's share of the
//! ring in proportion to its weight, and the request key APISIX's `hash_on` / `key` name.
//!
//! A node's points are hashes of its address (`host:port`) and the point's number, so they do
//! not depend on the other nodes: removing one of N nodes moves only the keys that were on it
//! (about 1/N), and adding one takes about 1/(N+1) from the others. The hash is fixed (no
//! per-process seed), so every gateway process maps a key to the same node.

use std::borrow::Cow;

use crate::config::HashOn;
use crate::plugin::Ctx;

/// Points per unit of weight (after dividing the weights by their gcd), as resty.chash.
const POINTS_PER_WEIGHT: u64 = 160;
/// At most this many points per ring: extreme weight ratios are scaled down.
const MAX_POINTS: u64 = 160 * 1024;

/// One group's ring: points sorted by hash, each naming a node index.
pub struct Ring {
    points: Vec<(u32, u32)>,
}

impl Ring {
    /// `nodes`: (node index, weight above 0, address).
    pub fn new(nodes: &[(usize, u32, &str)]) -> Ring {
        let g = super::roundrobin::weights_gcd(nodes.iter().map(|n| n.1)).max(1);
        let mut counts: Vec<u64> = nodes
            .iter()
            .map(|n| POINTS_PER_WEIGHT * u64::from(n.1 / g))
            .collect();
        let total: u64 = counts.iter().sum();
        if total > MAX_POINTS {
            for c in &mut counts {
                *c = (*c * MAX_POINTS / total).max(1);
            }
        }
        let mut points = Vec::with_capacity(counts.iter().sum::<u64>() as usize);
        let mut buf = String::new();
        for (&(idx, _, addr), &count) in nodes.iter().zip(&counts) {
            for i in 0..count {
                buf.clear();
                buf.push_str(addr);
                buf.push('#');
                buf.push_str(itoa::Buffer::new().format(i));
                points.push((hash(buf.as_bytes()), idx as u32));
            }
        }
        points.sort_unstable();
        Ring { points }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.points.len()
    }

    /// The position of the first point at or after `h` (wrapping).
    pub fn find(&self, h: u32) -> usize {
        let p = self.points.partition_point(|&(ph, _)| ph < h);
        if p == self.points.len() {
            0
        } else {
            p
        }
    }

    /// The node of the point at `pos`.
    pub fn node_at(&self, pos: usize) -> usize {
        self.points[pos % self.points.len()].1 as usize
    }

    /// Walks the ring from `start` to the first point whose node `ok` accepts: its position.
    /// `any`: whether any node of the ring is acceptable (asked only when the first point's
    /// node is not, so a walk that cannot end is not started).
    pub fn walk(
        &self,
        start: usize,
        any: impl FnOnce() -> bool,
        ok: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let len = self.points.len();
        if len == 0 {
            return None;
        }
        if ok(self.node_at(start)) {
            return Some(start % len);
        }
        if !any() {
            return None;
        }
        (1..len)
            .map(|j| (start + j) % len)
            .find(|&pos| ok(self.node_at(pos)))
    }
}

/// FNV-1a over the bytes, finished with MurmurHash3's 64-bit mix (FNV alone spreads short,
/// similar keys poorly over the ring); the high 32 bits.
pub fn hash(bytes: &[u8]) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    (h >> 32) as u32
}

/// What a request is hashed on, compiled from `hash_on` and `key`.
pub struct HashKey {
    on: HashOn,
    /// The `ctx.var` name read for `vars`, `header` (`http_NAME`) and `cookie` (`cookie_NAME`).
    var: String,
    /// `vars_combinations`: the template.
    template: Vec<Part>,
}

#[derive(Debug, PartialEq)]
enum Part {
    Text(String),
    /// `$name`, `${name}`, `${name ?? default}`.
    Var {
        name: String,
        default: Option<String>,
    },
}

/// The variables `hash_on: vars` may name, as APISIX's `upstream_hash_vars_schema`.
const VARS: &[&str] = &[
    "uri",
    "server_name",
    "server_addr",
    "request_uri",
    "remote_port",
    "remote_addr",
    "query_string",
    "host",
    "hostname",
    "mqtt_client_id",
];
const VARS_PATTERN: &str = "^((uri|server_name|server_addr|request_uri|remote_port|remote_addr|query_string|host|hostname|mqtt_client_id)|arg_[0-9a-zA-Z_-]+)$";
const NAME_PATTERN: &str = "^[a-zA-Z0-9-_]+$";

fn name_chars(s: &str, extra: &[u8]) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || extra.contains(&b))
}

/// Checks `key` for `hash_on` as APISIX does (`missing key`, the schema's pattern), naming the
/// problem in APISIX's words.
pub fn check_key(on: HashOn, key: Option<&str>) -> Result<(), String> {
    if on == HashOn::Consumer {
        return Ok(());
    }
    let Some(key) = key else {
        return Err("missing key".into());
    };
    let ok = match on {
        HashOn::Vars => {
            VARS.contains(&key)
                || key
                    .strip_prefix("arg_")
                    .is_some_and(|a| name_chars(a, b"_-"))
        }
        HashOn::Header | HashOn::Cookie => name_chars(key, b"_-"),
        HashOn::Consumer | HashOn::VarsCombinations => true,
    };
    if ok {
        return Ok(());
    }
    let pattern = if on == HashOn::Vars {
        VARS_PATTERN
    } else {
        NAME_PATTERN
    };
    Err(format!(
        "failed to match pattern {pattern:?} with {key:?} (hash_on \"{}\")",
        on.as_str()
    ))
}

impl HashKey {
    /// `key` was checked by [`check_key`].
    pub fn new(on: HashOn, key: Option<&str>) -> HashKey {
        let key = key.unwrap_or("");
        let var = match on {
            HashOn::Vars => key.to_string(),
            HashOn::Header => format!("http_{}", key.to_ascii_lowercase()),
            HashOn::Cookie => format!("cookie_{key}"),
            HashOn::Consumer | HashOn::VarsCombinations => String::new(),
        };
        let template = match on {
            HashOn::VarsCombinations => parse_template(key),
            _ => Vec::new(),
        };
        HashKey { on, var, template }
    }

    /// The request's key, or None when it has none (APISIX then hashes `remote_addr`).
    pub fn key<'c>(&self, ctx: &'c Ctx) -> Option<Cow<'c, str>> {
        match self.on {
            HashOn::Vars | HashOn::Header | HashOn::Cookie => ctx.var(&self.var),
            HashOn::Consumer => ctx
                .consumer
                .as_ref()
                .map(|c| Cow::Borrowed(c.username.as_str())),
            HashOn::VarsCombinations => {
                resolve(&self.template, |name| ctx.var(name)).map(Cow::Owned)
            }
        }
    }
}

/// `vars_combinations`: the template with its variables filled in, or None when none of them
/// resolved (APISIX's `resolve_var` with `n_resolved == 0`). A variable with no value and no
/// `?? default` becomes "".
fn resolve<'a>(template: &[Part], var: impl Fn(&str) -> Option<Cow<'a, str>>) -> Option<String> {
    let mut out = String::new();
    let mut resolved = 0;
    for part in template {
        match part {
            Part::Text(t) => out.push_str(t),
            Part::Var { name, default } => match (var(name), default) {
                (Some(v), _) => {
                    out.push_str(&v);
                    resolved += 1;
                }
                (None, Some(d)) => {
                    out.push_str(d);
                    resolved += 1;
                }
                (None, None) => {}
            },
        }
    }
    (resolved > 0).then_some(out)
}

/// Splits a template as APISIX's `resolve_var` pattern does: `$name` (`[A-Za-z0-9_.]+`) or
/// `${ name }` / `${ name ?? default }`; a `$` after a backslash is text.
fn parse_template(tpl: &str) -> Vec<Part> {
    let mut parts = Vec::new();
    let mut text = String::new();
    let bytes = tpl.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c != b'$' || (i > 0 && bytes[i - 1] == b'\\') {
            // Whole UTF-8 characters: step to the next char boundary.
            let next = (i + 1..=bytes.len())
                .find(|&j| tpl.is_char_boundary(j))
                .unwrap_or(bytes.len());
            text.push_str(&tpl[i..next]);
            i = next;
            continue;
        }
        let rest = &tpl[i + 1..];
        let braced = rest
            .strip_prefix('{')
            .and_then(|r| r.find('}').map(|end| (&r[..end], end + 2)))
            .filter(|(inner, _)| !inner.trim().is_empty());
        let (var, used) = if let Some((inner, used)) = braced {
            let inner = inner.trim();
            let (name, default) = match inner.split_once("??") {
                Some((n, d)) => (n.trim(), Some(d.trim().to_string())),
                None => (inner, None),
            };
            (Some((name.to_string(), default)), used)
        } else {
            let len = rest
                .bytes()
                .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'.')
                .count();
            if len > 0 {
                (Some((rest[..len].to_string(), None)), len)
            } else {
                (None, 0)
            }
        };
        match var {
            Some((name, default)) => {
                if !text.is_empty() {
                    parts.push(Part::Text(std::mem::take(&mut text)));
                }
                parts.push(Part::Var { name, default });
                i += 1 + used;
            }
            None => {
                text.push('$');
                i += 1;
            }
        }
    }
    if !text.is_empty() {
        parts.push(Part::Text(text));
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn var(name: &str, default: Option<&str>) -> Part {
        Part::Var {
            name: name.into(),
            default: default.map(Into::into),
        }
    }

    #[test]
    fn templates_parse_as_apisix_resolve_var() {
        assert_eq!(
            parse_template("$remote_addr-${ http_x_user ?? anon }/${arg_a}"),
            vec![
                var("remote_addr", None),
                Part::Text("-".into()),
                var("http_x_user", Some("anon")),
                Part::Text("/".into()),
                var("arg_a", None),
            ]
        );
        assert_eq!(
            parse_template(r"a\$b $ ${} é"),
            vec![Part::Text(r"a\$b $ ${} é".into())]
        );
        let vars: HashMap<&str, &str> = [("host", "h"), ("arg_a", "1")].into();
        let get = |n: &str| vars.get(n).map(|v| Cow::Owned(v.to_string()));
        let t = parse_template("$host:${arg_b ?? x}:$arg_c");
        assert_eq!(resolve(&t, get).as_deref(), Some("h:x:"));
        // Nothing resolved, or no variable at all: no key (remote_addr is hashed instead).
        assert_eq!(resolve(&parse_template("$arg_c-$arg_d"), get), None);
        assert_eq!(resolve(&parse_template("constant"), get), None);
    }

    #[test]
    fn keys_are_checked_as_apisix() {
        assert_eq!(check_key(HashOn::Vars, None).unwrap_err(), "missing key");
        assert!(check_key(HashOn::Consumer, None).is_ok());
        assert!(check_key(HashOn::Vars, Some("arg_user-id")).is_ok());
        assert!(check_key(HashOn::Vars, Some("remote_addr")).is_ok());
        let e = check_key(HashOn::Vars, Some("http_x")).unwrap_err();
        assert!(e.starts_with("failed to match pattern \"^((uri|"), "{e}");
        assert!(check_key(HashOn::Header, Some("X-User_id")).is_ok());
        assert!(check_key(HashOn::Cookie, Some("a b")).is_err());
        assert!(check_key(HashOn::VarsCombinations, Some("anything $x")).is_ok());
    }

    fn ring(n: usize) -> Ring {
        let addrs: Vec<String> = (0..n).map(|i| format!("10.0.0.{i}:80")).collect();
        let nodes: Vec<(usize, u32, &str)> = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| (i, 1, a.as_str()))
            .collect();
        Ring::new(&nodes)
    }

    fn owner(r: &Ring, key: &str) -> usize {
        r.node_at(r.find(hash(key.as_bytes())))
    }

    #[test]
    fn weights_set_the_share_and_removal_moves_only_the_removed_nodes_keys() {
        let a = ["a:1", "b:1", "c:1"];
        let r = Ring::new(&[(0, 1, a[0]), (1, 2, a[1]), (2, 1, a[2])]);
        assert_eq!(r.len(), 4 * 160);
        let mut counts = [0usize; 3];
        for k in 0..20_000 {
            counts[owner(&r, &format!("user-{k}"))] += 1;
        }
        // Weight 2 gets about half.
        assert!((8_000..12_000).contains(&counts[1]), "{counts:?}");

        let five = ring(5);
        // Node 4 removed: the ring of the first four (same addresses, same points).
        let four = ring(4);
        let mut moved = 0;
        for k in 0..10_000 {
            let key = format!("k{k}");
            let before = owner(&five, &key);
            let after = owner(&four, &key);
            if before != 4 {
                assert_eq!(before, after, "a key not on the removed node moved");
            } else {
                moved += 1;
            }
        }
        assert!((1_200..2_800).contains(&moved), "{moved}");
    }

    #[test]
    fn walk_skips_refused_nodes_and_ends() {
        let r = ring(3);
        let start = r.find(hash(b"x"));
        let first = r.node_at(start);
        let pos = r
            .walk(start, || true, |i| i != first)
            .expect("another node");
        assert_ne!(r.node_at(pos), first);
        assert_eq!(r.walk(start, || false, |_| false), None);
    }
}
