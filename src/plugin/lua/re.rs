//! `ngx.re`: OpenResty's regex API (`find`, `match`, `gmatch`, `sub`, `gsub`, `split`, `opt`)
//! on PCRE2, so plugins get PCRE syntax (look-behind, lazy quantifiers, named groups, inline
//! flags) and OpenResty's option letters.
//!
//! Compiled patterns are cached per worker VM, keyed by pattern and options: OpenResty only
//! caches with the `o` flag, but APISIX passes `jo` almost everywhere and the cache is bounded,
//! so caching every pattern is the same behaviour at lower cost.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use mlua::{Function, Lua, MultiValue, Table, Value};
use pcre2::bytes::{CaptureLocations, Regex, RegexBuilder};

/// How many compiled patterns one VM keeps; the cache is emptied when it is full (patterns come
/// from confs, so the working set is small and rebuilt quickly).
const CACHE_MAX: usize = 1024;

thread_local! {
    static CACHE: RefCell<HashMap<(String, u16), Rc<Regex>>> = RefCell::new(HashMap::new());
}

const F_CASELESS: u16 = 1;
const F_DOTALL: u16 = 2;
const F_EXTENDED: u16 = 4;
const F_MULTILINE: u16 = 8;
const F_UTF: u16 = 16;
const F_ANCHORED: u16 = 32;
const F_DUPNAMES: u16 = 64;
const F_JIT: u16 = 128;

/// OpenResty's option letters; `Err` reads like OpenResty's `unknown flag` error.
fn parse_flags(opts: Option<&[u8]>) -> Result<u16, String> {
    let mut f = 0;
    let Some(opts) = opts else { return Ok(0) };
    for &c in opts {
        f |= match c {
            b'i' => F_CASELESS,
            b's' => F_DOTALL,
            b'x' => F_EXTENDED,
            b'm' => F_MULTILINE,
            b'u' | b'U' => F_UTF,
            b'a' => F_ANCHORED,
            b'D' => F_DUPNAMES,
            b'j' => F_JIT,
            // `o` (compile once: always cached here), `d` (DFA), `J` (JavaScript compat).
            b'o' | b'd' | b'J' => 0,
            _ => {
                return Err(format!(
                    "unknown flag \"{}\" (flags \"{}\")",
                    c as char,
                    String::from_utf8_lossy(opts)
                ))
            }
        };
    }
    Ok(f)
}

/// The PCRE2 message without the crate's prefix, e.g. `missing closing parenthesis`.
fn pcre_message(e: &pcre2::Error) -> String {
    let s = e.to_string();
    match s.rfind(": ") {
        Some(i) if s.starts_with("PCRE2:") => s[i + 2..].to_string(),
        _ => s,
    }
}

/// Compiles (or fetches from the cache) `pattern` with `flags`; `Err` is PCRE2's message.
pub(crate) fn compile(pattern: &[u8], flags: u16) -> Result<Rc<Regex>, String> {
    let pattern = std::str::from_utf8(pattern)
        .map_err(|_| "the pattern is not valid UTF-8".to_string())?
        .to_string();
    if let Some(r) = CACHE.with(|c| c.borrow().get(&(pattern.clone(), flags)).cloned()) {
        return Ok(r);
    }
    let mut src = String::with_capacity(pattern.len() + 8);
    if flags & F_DUPNAMES != 0 {
        src.push_str("(?J)");
    }
    if flags & F_ANCHORED != 0 {
        // `\G` anchors at the start offset, which is what PCRE's ANCHORED option does. The
        // newline ends a trailing `#` comment in extended mode.
        src.push_str("\\G(?:");
        src.push_str(&pattern);
        src.push_str(if flags & F_EXTENDED != 0 { "\n)" } else { ")" });
    } else {
        src.push_str(&pattern);
    }
    let re = RegexBuilder::new()
        .caseless(flags & F_CASELESS != 0)
        .dotall(flags & F_DOTALL != 0)
        .extended(flags & F_EXTENDED != 0)
        .multi_line(flags & F_MULTILINE != 0)
        .utf(flags & F_UTF != 0)
        .ucp(flags & F_UTF != 0)
        .jit_if_available(flags & F_JIT != 0)
        .build(&src)
        .map_err(|e| pcre_message(&e))?;
    let re = Rc::new(re);
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.len() >= CACHE_MAX {
            c.clear();
        }
        c.insert((pattern, flags), re.clone());
    });
    Ok(re)
}

/// Compiles with options given as OpenResty letters; errors read like OpenResty's.
fn compile_opts(pattern: &[u8], opts: Option<&[u8]>) -> Result<Rc<Regex>, String> {
    let flags = parse_flags(opts)?;
    compile(pattern, flags).map_err(|m| {
        format!(
            "failed to compile regex \"{}\": pcre2_compile() failed: {m} in \"{}\"",
            String::from_utf8_lossy(pattern),
            String::from_utf8_lossy(pattern)
        )
    })
}

/// Runs one search from byte offset `start`; `Ok(None)` when nothing matches.
fn search(re: &Regex, subject: &[u8], start: usize) -> Result<Option<CaptureLocations>, String> {
    if start > subject.len() {
        return Ok(None);
    }
    let mut locs = re.capture_locations();
    match re.captures_read_at(&mut locs, subject, start) {
        Ok(Some(_)) => Ok(Some(locs)),
        Ok(None) => Ok(None),
        Err(e) => Err(format!("pcre2_match() failed: {}", pcre_message(&e))),
    }
}

/// OpenResty's captures table: `[0]` the whole match, `[1..n]` the groups (false when a group
/// did not take part), and named groups by name.
fn captures_table(
    lua: &Lua,
    re: &Regex,
    subject: &[u8],
    locs: &CaptureLocations,
    into: Option<Table>,
) -> mlua::Result<Table> {
    let t = match into {
        Some(t) => t,
        None => lua.create_table()?,
    };
    let n = locs.len();
    for i in 0..n {
        match locs.get(i) {
            Some((s, e)) => t.raw_set(i, lua.create_string(&subject[s..e])?)?,
            None => t.raw_set(i, false)?,
        }
    }
    for (i, name) in re.capture_names().iter().enumerate() {
        if let Some(name) = name {
            let v: Value = t.raw_get(i)?;
            t.raw_set(name.as_str(), v)?;
        }
    }
    Ok(t)
}

/// The 0-based start offset from a `ctx` table's `pos` (1-based), or 0.
fn ctx_start(ctx: &Option<Table>) -> mlua::Result<usize> {
    Ok(match ctx {
        Some(t) => match t.get::<Option<i64>>("pos")? {
            Some(p) if p > 1 => (p - 1) as usize,
            _ => 0,
        },
        None => 0,
    })
}

fn opt_bytes(s: &Option<mlua::String>) -> Option<Vec<u8>> {
    s.as_ref().map(|s| s.as_bytes().to_vec())
}

/// A replacement: a `$0`/`$1`/`${1}`/`${name}` template, or a function of the captures.
enum Replace {
    Template(Vec<Piece>),
    Func(Function),
}

enum Piece {
    Lit(Vec<u8>),
    Group(usize),
    Named(String),
}

fn parse_template(t: &[u8]) -> Result<Vec<Piece>, String> {
    let mut out = Vec::new();
    let mut lit = Vec::new();
    let mut i = 0;
    while i < t.len() {
        if t[i] != b'$' {
            lit.push(t[i]);
            i += 1;
            continue;
        }
        let rest = &t[i + 1..];
        if rest.first() == Some(&b'$') {
            lit.push(b'$');
            i += 2;
            continue;
        }
        let digits = rest.iter().take_while(|c| c.is_ascii_digit()).count();
        if digits > 0 {
            let n: usize = std::str::from_utf8(&rest[..digits])
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or("bad capture number")?;
            out.push(Piece::Lit(std::mem::take(&mut lit)));
            out.push(Piece::Group(n));
            i += 1 + digits;
            continue;
        }
        if rest.first() == Some(&b'{') {
            if let Some(close) = rest.iter().position(|&c| c == b'}') {
                let inner = &rest[1..close];
                out.push(Piece::Lit(std::mem::take(&mut lit)));
                match std::str::from_utf8(inner).ok().and_then(|s| s.parse().ok()) {
                    Some(n) => out.push(Piece::Group(n)),
                    None => out.push(Piece::Named(String::from_utf8_lossy(inner).into_owned())),
                }
                i += 2 + close;
                continue;
            }
        }
        return Err(format!(
            "failed to compile the replacement template: invalid capturing variable name in \"{}\"",
            String::from_utf8_lossy(t)
        ));
    }
    out.push(Piece::Lit(lit));
    Ok(out)
}

fn group_bytes<'a>(subject: &'a [u8], locs: &CaptureLocations, i: usize) -> &'a [u8] {
    match locs.get(i) {
        Some((s, e)) => &subject[s..e],
        None => b"",
    }
}

/// sub/gsub: `(new, n)` or an error message.
fn substitute(
    lua: &Lua,
    subject: &[u8],
    re: &Regex,
    repl: &Replace,
    global: bool,
) -> mlua::Result<Result<(Vec<u8>, i64), String>> {
    let mut out = Vec::with_capacity(subject.len());
    let mut last = 0;
    let mut pos = 0;
    let mut n = 0;
    loop {
        let locs = match search(re, subject, pos) {
            Ok(Some(l)) => l,
            Ok(None) => break,
            Err(e) => return Ok(Err(e)),
        };
        let Some((s, e)) = locs.get(0) else { break };
        out.extend_from_slice(&subject[last..s]);
        match repl {
            Replace::Template(pieces) => {
                for p in pieces {
                    match p {
                        Piece::Lit(b) => out.extend_from_slice(b),
                        Piece::Group(i) => out.extend_from_slice(group_bytes(subject, &locs, *i)),
                        Piece::Named(name) => {
                            let idx = re
                                .capture_names()
                                .iter()
                                .position(|n| n.as_deref() == Some(name.as_str()));
                            if let Some(i) = idx {
                                out.extend_from_slice(group_bytes(subject, &locs, i));
                            }
                        }
                    }
                }
            }
            Replace::Func(f) => {
                let caps = captures_table(lua, re, subject, &locs, None)?;
                let v: Value = f.call(caps)?;
                match v {
                    Value::String(s) => out.extend_from_slice(&s.as_bytes()),
                    Value::Integer(i) => out.extend_from_slice(i.to_string().as_bytes()),
                    Value::Number(x) => {
                        out.extend_from_slice(super::convert::fmt_g14(x).as_bytes())
                    }
                    Value::Nil => {}
                    other => {
                        return Ok(Err(format!(
                            "the replace function returned a {}",
                            other.type_name()
                        )))
                    }
                }
            }
        }
        n += 1;
        last = e;
        if !global {
            break;
        }
        if e == s {
            // An empty match: copy one byte and search after it.
            if e < subject.len() {
                out.push(subject[e]);
            }
            last = e + 1;
            pos = e + 1;
        } else {
            pos = e;
        }
        if pos > subject.len() {
            break;
        }
    }
    if last < subject.len() {
        out.extend_from_slice(&subject[last..]);
    }
    Ok(Ok((out, n)))
}

fn nil_err(lua: &Lua, nils: usize, err: String) -> mlua::Result<MultiValue> {
    let mut v: Vec<Value> = vec![Value::Nil; nils];
    v.push(Value::String(lua.create_string(err)?));
    Ok(MultiValue::from_vec(v))
}

/// Installs `ngx.re` and the internal `__moongate.re_compile` (for `resty.core.regex`).
pub(crate) fn install(lua: &Lua, ngx: &Table, mg: &Table) -> mlua::Result<()> {
    let re_t = lua.create_table()?;

    re_t.set(
        "find",
        lua.create_function(
            |lua,
             (subject, pattern, opts, ctx, nth): (
                mlua::String,
                mlua::String,
                Option<mlua::String>,
                Option<Table>,
                Option<usize>,
            )| {
                let re = match compile_opts(&pattern.as_bytes(), opt_bytes(&opts).as_deref()) {
                    Ok(r) => r,
                    Err(e) => return nil_err(lua, 2, e),
                };
                let subj = subject.as_bytes();
                let start = ctx_start(&ctx)?;
                match search(&re, &subj, start) {
                    Err(e) => nil_err(lua, 2, e),
                    Ok(None) => Ok(MultiValue::from_vec(vec![Value::Nil])),
                    Ok(Some(locs)) => {
                        if let (Some(ctx), Some((_, e))) = (&ctx, locs.get(0)) {
                            ctx.set("pos", e + 1)?;
                        }
                        match locs.get(nth.unwrap_or(0)) {
                            Some((s, e)) => Ok(MultiValue::from_vec(vec![
                                Value::Integer((s + 1) as i64),
                                Value::Integer(e as i64),
                            ])),
                            None => Ok(MultiValue::from_vec(vec![Value::Nil])),
                        }
                    }
                }
            },
        )?,
    )?;

    re_t.set(
        "match",
        lua.create_function(
            |lua,
             (subject, pattern, opts, ctx, res): (
                mlua::String,
                mlua::String,
                Option<mlua::String>,
                Option<Table>,
                Option<Table>,
            )| {
                let re = match compile_opts(&pattern.as_bytes(), opt_bytes(&opts).as_deref()) {
                    Ok(r) => r,
                    Err(e) => return nil_err(lua, 1, e),
                };
                let subj = subject.as_bytes();
                let start = ctx_start(&ctx)?;
                match search(&re, &subj, start) {
                    Err(e) => nil_err(lua, 1, e),
                    Ok(None) => Ok(MultiValue::from_vec(vec![Value::Nil])),
                    Ok(Some(locs)) => {
                        if let (Some(ctx), Some((_, e))) = (&ctx, locs.get(0)) {
                            ctx.set("pos", e + 1)?;
                        }
                        let t = captures_table(lua, &re, &subj, &locs, res)?;
                        Ok(MultiValue::from_vec(vec![Value::Table(t)]))
                    }
                }
            },
        )?,
    )?;

    re_t.set(
        "gmatch",
        lua.create_function(
            |lua, (subject, pattern, opts): (mlua::String, mlua::String, Option<mlua::String>)| {
                let re = match compile_opts(&pattern.as_bytes(), opt_bytes(&opts).as_deref()) {
                    Ok(r) => r,
                    Err(e) => return nil_err(lua, 1, e),
                };
                let subj: Vec<u8> = subject.as_bytes().to_vec();
                let pos = RefCell::new(Some(0usize));
                let iter = lua.create_function(move |lua, ()| {
                    let Some(start) = *pos.borrow() else {
                        return Ok(MultiValue::from_vec(vec![Value::Nil]));
                    };
                    match search(&re, &subj, start) {
                        Err(e) => {
                            *pos.borrow_mut() = None;
                            nil_err(lua, 1, e)
                        }
                        Ok(None) => {
                            *pos.borrow_mut() = None;
                            Ok(MultiValue::from_vec(vec![Value::Nil]))
                        }
                        Ok(Some(locs)) => {
                            let (s, e) = locs.get(0).unwrap_or((start, start));
                            let next = if e == s { e + 1 } else { e };
                            *pos.borrow_mut() = if next > subj.len() { None } else { Some(next) };
                            let t = captures_table(lua, &re, &subj, &locs, None)?;
                            Ok(MultiValue::from_vec(vec![Value::Table(t)]))
                        }
                    }
                })?;
                Ok(MultiValue::from_vec(vec![Value::Function(iter)]))
            },
        )?,
    )?;

    for (name, global) in [("sub", false), ("gsub", true)] {
        re_t.set(
            name,
            lua.create_function(
                move |lua,
                      (subject, pattern, replace, opts): (
                    mlua::String,
                    mlua::String,
                    Value,
                    Option<mlua::String>,
                )| {
                    let re = match compile_opts(&pattern.as_bytes(), opt_bytes(&opts).as_deref())
                    {
                        Ok(r) => r,
                        Err(e) => return nil_err(lua, 2, e),
                    };
                    let repl = match replace {
                        Value::Function(f) => Replace::Func(f),
                        Value::String(s) => match parse_template(&s.as_bytes()) {
                            Ok(p) => Replace::Template(p),
                            Err(e) => return nil_err(lua, 2, e),
                        },
                        Value::Integer(i) => Replace::Template(vec![Piece::Lit(
                            i.to_string().into_bytes(),
                        )]),
                        Value::Number(x) => Replace::Template(vec![Piece::Lit(
                            super::convert::fmt_g14(x).into_bytes(),
                        )]),
                        other => {
                            return Err(mlua::Error::runtime(format!(
                                "bad argument #3 to '{name}' (string, number, or function expected, got {})",
                                other.type_name()
                            )))
                        }
                    };
                    match substitute(lua, &subject.as_bytes(), &re, &repl, global)? {
                        Ok((out, n)) => Ok(MultiValue::from_vec(vec![
                            Value::String(lua.create_string(out)?),
                            Value::Integer(n),
                        ])),
                        Err(e) => nil_err(lua, 2, e),
                    }
                },
            )?,
        )?;
    }

    re_t.set(
        "split",
        lua.create_function(
            |lua,
             (subject, pattern, opts, ctx, max, res): (
                mlua::String,
                mlua::String,
                Option<mlua::String>,
                Option<Table>,
                Option<i64>,
                Option<Table>,
            )| {
                let re = match compile_opts(&pattern.as_bytes(), opt_bytes(&opts).as_deref()) {
                    Ok(r) => r,
                    Err(e) => return nil_err(lua, 1, e),
                };
                let subj = subject.as_bytes();
                let out = match res {
                    Some(t) => t,
                    None => lua.create_table()?,
                };
                let max = max.filter(|m| *m > 0);
                let mut pos = ctx_start(&ctx)?;
                let mut last = pos;
                let mut n = 0usize;
                loop {
                    if max.is_some_and(|m| (n as i64) + 1 >= m) {
                        break;
                    }
                    let locs = match search(&re, &subj, pos) {
                        Ok(Some(l)) => l,
                        Ok(None) => break,
                        Err(e) => return nil_err(lua, 1, e),
                    };
                    let Some((s, e)) = locs.get(0) else { break };
                    if s == e {
                        // An empty separator splits between characters, never at the ends.
                        if s >= subj.len() {
                            break;
                        }
                        if s == last {
                            pos = s + 1;
                            continue;
                        }
                    }
                    n += 1;
                    out.raw_set(n, lua.create_string(&subj[last..s])?)?;
                    // Groups of the separator are part of the result, as in lua-resty-core.
                    for i in 1..locs.len() {
                        if let Some((cs, ce)) = locs.get(i) {
                            n += 1;
                            out.raw_set(n, lua.create_string(&subj[cs..ce])?)?;
                        }
                    }
                    last = e;
                    pos = if s == e { e + 1 } else { e };
                    if pos > subj.len() {
                        break;
                    }
                }
                if last < subj.len() || n == 0 {
                    n += 1;
                    out.raw_set(n, lua.create_string(&subj[last.min(subj.len())..])?)?;
                }
                // A reused result table loses its old tail.
                let old = out.raw_len();
                for i in n + 1..=old {
                    out.raw_set(i, Value::Nil)?;
                }
                Ok(MultiValue::from_vec(vec![Value::Table(out)]))
            },
        )?,
    )?;

    re_t.set("opt", lua.create_function(|_, _: MultiValue| Ok(()))?)?;
    ngx.set("re", &re_t)?;

    // resty.core.regex's re_match_compile(regex, opts): a compiled handle, or nil and
    // `pcre2_compile() failed: MSG in "REGEX"`.
    mg.set(
        "re_compile",
        lua.create_function(
            |lua, (pattern, opts): (mlua::String, Option<mlua::String>)| {
                let flags = match parse_flags(opt_bytes(&opts).as_deref()) {
                    Ok(f) => f,
                    Err(e) => return nil_err(lua, 1, e),
                };
                match compile(&pattern.as_bytes(), flags) {
                    Ok(_) => Ok(MultiValue::from_vec(vec![Value::Boolean(true)])),
                    Err(m) => nil_err(
                        lua,
                        1,
                        format!(
                            "pcre2_compile() failed: {m} in \"{}\"",
                            String::from_utf8_lossy(&pattern.as_bytes())
                        ),
                    ),
                }
            },
        )?,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(src: &str) -> String {
        let lua = Lua::new();
        let ngx = lua.create_table().unwrap();
        let mg = lua.create_table().unwrap();
        install(&lua, &ngx, &mg).unwrap();
        lua.globals().set("ngx", ngx).unwrap();
        lua.load(src).eval::<String>().unwrap()
    }

    #[test]
    fn pcre_features() {
        assert_eq!(
            run(
                r#"local m = ngx.re.match("a$b\\$c", [[(?<!\\)\$(\w)]], "jo") return m[0] .. m[1]"#
            ),
            "$bb"
        );
        assert_eq!(
            run(
                r#"local m = ngx.re.match("Hello", "(?<w>l+)(x)?", "i") return m.w .. tostring(m[2]) .. m[0]"#
            ),
            "llfalsell"
        );
        assert_eq!(
            run(r#"local s, n = ngx.re.gsub("a1b22", "[0-9]", "<$0>") return s .. n"#),
            "a<1>b<2><2>3"
        );
        assert_eq!(
            run(r#"local s = ngx.re.sub("/api/x", "^/api/(.*)", "/v2/${1}", "jo") return s"#),
            "/v2/x"
        );
        assert_eq!(
            run(r#"local f, t = ngx.re.find("xxHELLO", "hello", "ji") return f .. "," .. t"#),
            "3,7"
        );
        assert_eq!(
            run(
                r#"local t = {} for m in ngx.re.gmatch("a,b,,c", "([^,]+)", "jiox") do t[#t+1] = m[1] end return table.concat(t, "|")"#
            ),
            "a|b|c"
        );
        assert_eq!(
            run(r#"local t = ngx.re.split("a,b,,c", ",") return table.concat(t, "|") .. #t"#),
            "a|b||c4"
        );
        assert_eq!(
            run(r#"local _, _, err = ngx.re.sub("x", "(", "") return err"#),
            "failed to compile regex \"(\": pcre2_compile() failed: missing closing parenthesis in \"(\""
        );
        assert_eq!(
            run(r#"local s = ngx.re.gsub("abc", "", "-") return s"#),
            "-a-b-c-"
        );
        assert_eq!(
            run(
                r#"return tostring(ngx.re.find("xab", "ab", "a")) .. tostring(ngx.re.find("abx", "ab", "a"))"#
            ),
            "nil1"
        );
    }
}
