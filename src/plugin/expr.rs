//! Rule expressions over request variables, as APISIX evaluates `_meta.filter` (and `vars`
//! fields) with lua-resty-expr.
//!
//! A rule is a JSON array. Its elements are conditions that must all hold, unless the first
//! element is a logical operator (`"AND"`, `"OR"`, `"!AND"`, `"!OR"`, any case), which then
//! combines the remaining elements (at least two elements after it, as lua-resty-expr wants).
//! Elements nest. A condition is `[var, op, value]`, `[var, "!", op, value]` (negated) or
//! `[var, value]` (short for `==`). Operators:
//!
//! - `==`, `~=`: string (in)equality; against a number value, the variable is read as a number.
//! - `>`, `>=`, `<`, `<=`: numeric; false when either side is not a number.
//! - `~~`, `~*`: PCRE match (`~*` case-insensitive); false when the variable is unset.
//! - `in`: the variable equals one element of the value array.
//! - `has`: the variable is a list holding the value (request variables are strings: false).
//! - `ipmatch`: the variable is an IP inside one of the value's addresses or CIDR ranges.
//!
//! Everything is checked when the rule is compiled (at config time): an unknown operator, a bad
//! shape, a regex that does not compile or an IP range that does not parse is an error.

use std::net::IpAddr;

use pcre2::bytes::{Regex, RegexBuilder};
use serde_json::Value;

/// A compiled rule.
#[derive(Debug)]
pub struct Expr {
    /// None for the empty rule `[]`, which always holds.
    root: Option<Node>,
}

#[derive(Debug)]
enum Node {
    Logic {
        op: Logic,
        items: Vec<Node>,
    },
    Cond {
        var: String,
        negate: bool,
        test: Test,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Logic {
    And,
    Or,
    NotAnd,
    NotOr,
}

#[derive(Debug)]
enum Test {
    Eq(Value),
    Ne(Value),
    Num(NumOp, Option<f64>),
    Regex(Box<Regex>),
    In(Vec<Value>),
    Has,
    IpMatch(Vec<(IpAddr, u8)>),
}

#[derive(Debug, Clone, Copy)]
enum NumOp {
    Gt,
    Ge,
    Lt,
    Le,
}

fn logic_op(v: &Value) -> Option<Logic> {
    match v.as_str()?.to_ascii_uppercase().as_str() {
        "AND" => Some(Logic::And),
        "OR" => Some(Logic::Or),
        "!AND" => Some(Logic::NotAnd),
        "!OR" => Some(Logic::NotOr),
        _ => None,
    }
}

const OPS: [&str; 11] = [
    "==", "~=", ">", ">=", "<", "<=", "~~", "~*", "in", "has", "ipmatch",
];

impl Expr {
    /// Compiles a rule; the error reads like lua-resty-expr's (`invalid operator '=~'`, `rule
    /// too short`, ...).
    pub fn compile(rule: &Value) -> Result<Expr, String> {
        let Value::Array(items) = rule else {
            return Err("rule should be an array".into());
        };
        if items.is_empty() {
            return Ok(Expr { root: None });
        }
        if !items[0].is_array() && logic_op(&items[0]).is_none() {
            return Err("rule should be wrapped inside brackets".into());
        }
        Ok(Expr {
            root: Some(compile_node(items)?),
        })
    }

    /// Evaluates the rule, reading variables through `var` (None: unset).
    pub fn eval<'a, F>(&self, var: &F) -> bool
    where
        F: Fn(&str) -> Option<std::borrow::Cow<'a, str>>,
    {
        match &self.root {
            None => true,
            Some(n) => eval_node(n, var),
        }
    }
}

fn compile_node(items: &[Value]) -> Result<Node, String> {
    if items.is_empty() {
        return Err("rule too short".into());
    }
    if items[0].is_array() {
        let mut out = Vec::with_capacity(items.len());
        for it in items {
            let Value::Array(sub) = it else {
                return Err("rule should be an array".into());
            };
            out.push(compile_node(sub)?);
        }
        return Ok(Node::Logic {
            op: Logic::And,
            items: out,
        });
    }
    if let Some(op) = logic_op(&items[0]) {
        if items.len() <= 2 {
            return Err("rule too short".into());
        }
        let mut out = Vec::with_capacity(items.len() - 1);
        for it in &items[1..] {
            let Value::Array(sub) = it else {
                return Err("rule should be an array".into());
            };
            out.push(compile_node(sub)?);
        }
        return Ok(Node::Logic { op, items: out });
    }
    compile_cond(items)
}

fn compile_cond(c: &[Value]) -> Result<Node, String> {
    let (var, op, value, negate) = match c {
        [var, not, op, value] => {
            if not.as_str() != Some("!") {
                return Err("bad 'not' expression".into());
            }
            (var, op, value.clone(), true)
        }
        [var, op, value] => (var, op, value.clone(), false),
        // lua-resty-expr's short form `[var, value]` means `==` (unless value is an operator).
        [var, op] => match op.as_str().map(str::to_ascii_lowercase) {
            Some(o) if OPS.contains(&o.as_str()) => (var, op, Value::Null, false),
            _ => (var, &Value::Null, op.clone(), false),
        },
        _ => return Err("invalid expression".into()),
    };
    let Value::String(var) = var else {
        return Err("invalid expression: the variable name must be a string".into());
    };
    let op = match op {
        Value::Null => "==".to_string(),
        Value::String(s) => s.to_ascii_lowercase(),
        other => return Err(format!("invalid operator '{other}'")),
    };
    let test = match op.as_str() {
        "==" => Test::Eq(value),
        "~=" => Test::Ne(value),
        ">" | ">=" | "<" | "<=" => {
            let n = match op.as_str() {
                ">" => NumOp::Gt,
                ">=" => NumOp::Ge,
                "<" => NumOp::Lt,
                _ => NumOp::Le,
            };
            Test::Num(n, to_number_json(&value))
        }
        "~~" | "~*" => {
            let Value::String(pat) = &value else {
                return Err(format!("invalid regex for '{op}': expected a string"));
            };
            let re = RegexBuilder::new()
                .caseless(op == "~*")
                .utf(true)
                .jit_if_available(true)
                .build(pat)
                .map_err(|e| format!("failed to compile regex \"{pat}\": {e}"))?;
            Test::Regex(Box::new(re))
        }
        "in" => match value {
            Value::Array(a) => Test::In(a),
            _ => Test::In(Vec::new()),
        },
        "has" => Test::Has,
        "ipmatch" => {
            let list: Vec<&Value> = match &value {
                Value::Array(a) => a.iter().collect(),
                v => vec![v],
            };
            let mut nets = Vec::with_capacity(list.len());
            for v in list {
                let Some(s) = v.as_str() else {
                    return Err(format!("invalid ip address: {v}"));
                };
                nets.push(parse_cidr(s).ok_or_else(|| format!("invalid ip address: {s}"))?);
            }
            Test::IpMatch(nets)
        }
        _ => return Err(format!("invalid operator '{op}'")),
    };
    Ok(Node::Cond {
        var: var.clone(),
        negate,
        test,
    })
}

/// `10.0.0.0/8`, `::1`, `192.168.1.1`.
fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (ip, bits) = match s.split_once('/') {
        Some((ip, bits)) => (ip, Some(bits)),
        None => (s, None),
    };
    let ip: IpAddr = ip.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let bits = match bits {
        Some(b) => b.parse::<u8>().ok().filter(|b| *b <= max)?,
        None => max,
    };
    Some((ip, bits))
}

fn ip_in(ip: IpAddr, (net, bits): (IpAddr, u8)) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - bits)
            };
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits)
            };
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

/// Lua's `tonumber` on a string: surrounding spaces allowed, decimal or `0x` hex.
fn to_number(s: &str) -> Option<f64> {
    let t = s.trim();
    if t.is_empty() {
        return None;
    }
    let (neg, body) = match t.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, t),
    };
    if let Some(hex) = body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
        let v = u64::from_str_radix(hex, 16).ok()? as f64;
        return Some(if neg { -v } else { v });
    }
    // Rust accepts "inf"/"nan", Lua's tonumber does not.
    if !t
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'))
    {
        return None;
    }
    t.parse::<f64>().ok()
}

fn to_number_json(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => to_number(s),
        _ => None,
    }
}

fn eval_node<'a, F>(n: &Node, var: &F) -> bool
where
    F: Fn(&str) -> Option<std::borrow::Cow<'a, str>>,
{
    match n {
        Node::Logic { op, items } => {
            let r = match op {
                Logic::And | Logic::NotAnd => items.iter().all(|i| eval_node(i, var)),
                Logic::Or | Logic::NotOr => items.iter().any(|i| eval_node(i, var)),
            };
            match op {
                Logic::NotAnd | Logic::NotOr => !r,
                _ => r,
            }
        }
        Node::Cond {
            var: name,
            negate,
            test,
        } => {
            let l = var(name);
            test_value(test, l.as_deref()) != *negate
        }
    }
}

fn test_value(t: &Test, l: Option<&str>) -> bool {
    match t {
        Test::Eq(r) => equals(l, r),
        Test::Ne(r) => !equals(l, r),
        Test::Num(op, r) => {
            let (Some(a), Some(b)) = (l.and_then(to_number), *r) else {
                return false;
            };
            match op {
                NumOp::Gt => a > b,
                NumOp::Ge => a >= b,
                NumOp::Lt => a < b,
                NumOp::Le => a <= b,
            }
        }
        Test::Regex(re) => l.is_some_and(|s| re.is_match(s.as_bytes()).unwrap_or(false)),
        Test::In(list) => list.iter().any(|v| equals(l, v)),
        Test::Has => false,
        Test::IpMatch(nets) => {
            let Some(ip) = l.and_then(|s| s.trim().parse::<IpAddr>().ok()) else {
                return false;
            };
            nets.iter().any(|n| ip_in(ip, *n))
        }
    }
}

/// lua-resty-expr's `==`: a number on the right compares numerically, a string as text, `null`
/// matches an unset variable, anything else never matches a request variable.
fn equals(l: Option<&str>, r: &Value) -> bool {
    match r {
        Value::Null => l.is_none(),
        Value::String(s) => l == Some(s.as_str()),
        Value::Number(n) => l.and_then(to_number) == n.as_f64(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::borrow::Cow;
    use std::collections::HashMap;

    fn eval(rule: Value, vars: &[(&str, &str)]) -> bool {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let e = Expr::compile(&rule).expect("compiles");
        e.eval(&|k: &str| m.get(k).map(|v| Cow::Owned(v.clone())))
    }

    #[test]
    fn conditions() {
        assert!(eval(json!([["arg_v", "==", "v2"]]), &[("arg_v", "v2")]));
        assert!(!eval(json!([["arg_v", "==", "v2"]]), &[("arg_v", "v1")]));
        assert!(!eval(json!([["arg_v", "==", "v2"]]), &[]));
        assert!(eval(json!([["arg_v", "~=", "v2"]]), &[]));
        assert!(eval(json!([["arg_n", "==", 10]]), &[("arg_n", "10.0")]));
        assert!(eval(json!([["arg_n", ">", 9]]), &[("arg_n", " 10 ")]));
        assert!(!eval(json!([["arg_n", ">", 9]]), &[("arg_n", "x")]));
        assert!(eval(json!([["arg_n", "<=", "0x10"]]), &[("arg_n", "16")]));
        assert!(eval(
            json!([["uri", "~~", "^/a/[0-9]+$"]]),
            &[("uri", "/a/12")]
        ));
        assert!(eval(
            json!([["http_x", "~*", "^abc"]]),
            &[("http_x", "ABCd")]
        ));
        assert!(!eval(
            json!([["http_x", "~~", "^abc"]]),
            &[("http_x", "ABCd")]
        ));
        assert!(eval(
            json!([["arg_v", "in", ["a", "b"]]]),
            &[("arg_v", "b")]
        ));
        assert!(eval(
            json!([["arg_v", "!", "in", ["a", "b"]]]),
            &[("arg_v", "c")]
        ));
        assert!(eval(
            json!([["remote_addr", "ipmatch", ["10.0.0.0/8", "::1"]]]),
            &[("remote_addr", "10.2.3.4")]
        ));
        assert!(!eval(
            json!([["remote_addr", "ipmatch", "10.0.0.0/8"]]),
            &[("remote_addr", "11.2.3.4")]
        ));
        assert!(eval(json!([["arg_v", "v2"]]), &[("arg_v", "v2")]));
        assert!(eval(json!([["arg_v", "IN", ["x"]]]), &[("arg_v", "x")]));
        assert!(eval(json!([]), &[]));
    }

    #[test]
    fn logic() {
        let r = json!([
            "OR",
            ["arg_a", "==", "1"],
            ["AND", ["arg_b", "==", "2"], ["arg_c", "==", "3"]]
        ]);
        assert!(eval(r.clone(), &[("arg_a", "1")]));
        assert!(eval(r.clone(), &[("arg_b", "2"), ("arg_c", "3")]));
        assert!(!eval(r, &[("arg_b", "2")]));
        let r = json!(["!AND", ["arg_a", "==", "1"], ["arg_b", "==", "2"]]);
        assert!(eval(r.clone(), &[("arg_a", "1")]));
        assert!(!eval(r, &[("arg_a", "1"), ("arg_b", "2")]));
    }

    #[test]
    fn refused() {
        let err = |r: Value| Expr::compile(&r).unwrap_err();
        assert_eq!(err(json!([["a", "=~", "x"]])), "invalid operator '=~'");
        assert_eq!(
            err(json!(["arg_a", "==", "x"])),
            "rule should be wrapped inside brackets"
        );
        assert_eq!(err(json!(["OR", ["a", "==", "1"]])), "rule too short");
        assert_eq!(err(json!([["a", "?", "==", "1"]])), "bad 'not' expression");
        assert!(err(json!([["a", "~~", "("]])).starts_with("failed to compile regex"));
        assert_eq!(
            err(json!([["a", "ipmatch", ["1.2.3.4/40"]]])),
            "invalid ip address: 1.2.3.4/40"
        );
        assert_eq!(err(json!({"a": 1})), "rule should be an array");
        assert_eq!(err(json!([["a"]])), "invalid expression");
    }
}
