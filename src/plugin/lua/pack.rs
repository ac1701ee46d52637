//! `lua_pack`, the binary packing library lua-resty-ldap reads LDAP messages with (the rock of
//! that name: Luiz Henrique de Figueiredo's lpack as Kong publishes it), written here so APISIX's
//! `ldap-auth` needs no C build.
//!
//! `pack(fmt, ...)` returns the values packed into a string; `unpack(s, fmt [, init])` returns
//! the position after what it read, then one value per code, stopping quietly where `s` ends.
//! Codes: `<` `>` `=` byte order (little, big, native; native at the start); `z` a
//! zero-terminated string, `p`/`P`/`a` a string after its length as a byte / 16-bit / size_t,
//! `A` a string (in `unpack` its count is the length to read); `c`/`C` signed/unsigned byte,
//! `s`/`S` 16-bit, `i`/`I` 32-bit, `l`/`L` 64-bit (x86-64's long), `f` float, `d`/`n` double;
//! `B` bits as a string of `0`/`1`, `X` hexadecimal digits (both: count = bytes in `unpack`),
//! `x` a zero byte (a byte skipped in `unpack`); spaces and commas are ignored. A count after a
//! code repeats it.

use mlua::{Lua, MultiValue, Table, Value};

#[derive(Clone, Copy, PartialEq)]
enum Order {
    Little,
    Big,
}

const NATIVE: Order = if cfg!(target_endian = "big") {
    Order::Big
} else {
    Order::Little
};

/// The width in bytes of a fixed-size code, or None.
fn width(code: u8) -> Option<usize> {
    Some(match code {
        b'c' | b'C' => 1,
        b's' | b'S' => 2,
        b'i' | b'I' | b'f' => 4,
        b'l' | b'L' | b'd' | b'n' => 8,
        _ => return None,
    })
}

/// Codes and their counts: `(code, Some(count))` when digits follow the code.
fn codes(fmt: &[u8]) -> impl Iterator<Item = (u8, Option<usize>)> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        let &c = fmt.get(i)?;
        i += 1;
        let start = i;
        while fmt.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        let count = (i > start).then(|| {
            fmt[start..i].iter().fold(0usize, |n, d| {
                n.saturating_mul(10).saturating_add((d - b'0') as usize)
            })
        });
        Some((c, count))
    })
}

fn bad_code(func: &str, c: u8) -> mlua::Error {
    mlua::Error::RuntimeError(format!(
        "bad argument #{} to '{func}' (bad code `{}')",
        if func == "pack" { 1 } else { 2 },
        c as char
    ))
}

fn put(out: &mut Vec<u8>, bytes: &[u8], order: Order) {
    if order == Order::Little {
        out.extend_from_slice(bytes);
    } else {
        out.extend(bytes.iter().rev());
    }
}

/// An argument as lpack's `luaL_checknumber` takes it (numbers and numeric strings).
fn number(lua: &Lua, v: &Value, arg: usize) -> mlua::Result<f64> {
    lua.coerce_number(v.clone())?.ok_or_else(|| {
        mlua::Error::RuntimeError(format!(
            "bad argument #{arg} to 'pack' (number expected, got {})",
            v.type_name()
        ))
    })
}

fn string(v: &Value, arg: usize) -> mlua::Result<Vec<u8>> {
    match v {
        Value::String(s) => Ok(s.as_bytes().to_vec()),
        Value::Integer(n) => Ok(n.to_string().into_bytes()),
        Value::Number(n) => Ok(n.to_string().into_bytes()),
        other => Err(mlua::Error::RuntimeError(format!(
            "bad argument #{arg} to 'pack' (string expected, got {})",
            other.type_name()
        ))),
    }
}

/// Writes `x` as the fixed-size `code`, converting as C's casts from a double do (through a
/// 64-bit integer, keeping the low bytes).
fn put_number(out: &mut Vec<u8>, code: u8, x: f64, order: Order) {
    let int = if x < 0.0 { x as i64 as u64 } else { x as u64 };
    match code {
        b'f' => put(out, &(x as f32).to_le_bytes(), order),
        b'd' | b'n' => put(out, &x.to_le_bytes(), order),
        _ => {
            let w = width(code).unwrap_or(1);
            put(out, &int.to_le_bytes()[..w], order);
        }
    }
}

/// The longest string `pack` builds (a repeat count such as `x99999999999` would otherwise
/// grow it until the process runs out of memory).
const MAX_PACKED: usize = 64 * 1024 * 1024;

fn pack(lua: &Lua, (fmt, args): (mlua::String, MultiValue)) -> mlua::Result<mlua::String> {
    let fmt = fmt.as_bytes();
    let args: Vec<Value> = args.into_iter().collect();
    let mut next = 0usize;
    let take = |n: &mut usize| -> (Value, usize) {
        let v = args.get(*n).cloned().unwrap_or(Value::Nil);
        *n += 1;
        (v, *n + 1)
    };
    let mut order = NATIVE;
    let mut out = Vec::new();
    for (c, count) in codes(&fmt) {
        match c {
            b'<' => order = Order::Little,
            b'>' => order = Order::Big,
            b'=' => order = NATIVE,
            b' ' | b',' => {}
            _ => {
                for _ in 0..count.unwrap_or(1) {
                    // Built outside Lua's allocator, so the memory cap cannot stop it.
                    if out.len() > MAX_PACKED {
                        return Err(mlua::Error::runtime("pack: result too large"));
                    }
                    match c {
                        b'A' | b'z' => {
                            let (v, arg) = take(&mut next);
                            out.extend(string(&v, arg)?);
                            if c == b'z' {
                                out.push(0);
                            }
                        }
                        b'p' | b'P' | b'a' => {
                            let (v, arg) = take(&mut next);
                            let s = string(&v, arg)?;
                            let w = match c {
                                b'p' => 1,
                                b'P' => 2,
                                _ => 8,
                            };
                            put(&mut out, &(s.len() as u64).to_le_bytes()[..w], order);
                            out.extend(s);
                        }
                        b'B' => {
                            let (v, arg) = take(&mut next);
                            for chunk in string(&v, arg)?.chunks(8) {
                                let bits = chunk
                                    .iter()
                                    .fold(0u8, |b, &d| (b << 1) | u8::from(d != b'0'));
                                out.push(bits << (8 - chunk.len()));
                            }
                        }
                        b'X' => {
                            let (v, arg) = take(&mut next);
                            let digits: Vec<u8> = string(&v, arg)?
                                .iter()
                                .filter_map(|&d| (d as char).to_digit(16).map(|x| x as u8))
                                .collect();
                            for pair in digits.chunks(2) {
                                out.push(pair[0] << 4 | pair.get(1).copied().unwrap_or(0));
                            }
                        }
                        b'x' => out.push(0),
                        _ if width(c).is_some() => {
                            let (v, arg) = take(&mut next);
                            put_number(&mut out, c, number(lua, &v, arg)?, order);
                        }
                        _ => return Err(bad_code("pack", c)),
                    }
                }
            }
        }
    }
    lua.create_string(out)
}

/// Reads `w` bytes at `at` in `order` as an unsigned integer (w <= 8).
fn read_uint(s: &[u8], at: usize, w: usize, order: Order) -> u64 {
    let mut b = [0u8; 8];
    if order == Order::Little {
        b[..w].copy_from_slice(&s[at..at + w]);
    } else {
        for (k, &x) in s[at..at + w].iter().rev().enumerate() {
            b[k] = x;
        }
    }
    u64::from_le_bytes(b)
}

fn read_number(s: &[u8], at: usize, code: u8, order: Order) -> f64 {
    let w = width(code).unwrap_or(1);
    let u = read_uint(s, at, w, order);
    match code {
        b'f' => f32::from_bits(u as u32) as f64,
        b'd' | b'n' => f64::from_bits(u),
        b'c' => u as u8 as i8 as f64,
        b's' => u as u16 as i16 as f64,
        b'i' => u as u32 as i32 as f64,
        b'l' => u as i64 as f64,
        _ => u as f64,
    }
}

fn unpack(
    lua: &Lua,
    (s, fmt, init): (mlua::String, mlua::String, Option<f64>),
) -> mlua::Result<MultiValue> {
    let s = s.as_bytes();
    let fmt = fmt.as_bytes();
    let len = s.len();
    // Past the end nothing can be read: clamping keeps every `i + w` far from overflowing.
    let mut i = (init.unwrap_or(1.0) - 1.0).clamp(0.0, len as f64) as usize;
    let mut order = NATIVE;
    let mut values = Vec::new();
    'codes: for (c, count) in codes(&fmt) {
        match c {
            b'<' => order = Order::Little,
            b'>' => order = Order::Big,
            b'=' => order = NATIVE,
            b' ' | b',' => {}
            // Codes whose count is a length in bytes, not a repetition.
            b'A' | b'B' | b'X' | b'x' => {
                let n = count.unwrap_or(1);
                if c == b'x' {
                    i = i.saturating_add(n).min(len);
                    continue;
                }
                if n == 0 {
                    if c == b'A' {
                        values.push(Value::String(lua.create_string("")?));
                    }
                    continue;
                }
                if i.saturating_add(n) > len {
                    break 'codes;
                }
                let bytes = &s[i..i + n];
                let text = match c {
                    b'A' => bytes.to_vec(),
                    b'B' => bytes
                        .iter()
                        .flat_map(|b| (0..8).rev().map(move |k| b'0' + (b >> k & 1)))
                        .collect(),
                    _ => bytes
                        .iter()
                        .flat_map(|b| [b >> 4, b & 15].map(|d| b"0123456789ABCDEF"[d as usize]))
                        .collect(),
                };
                values.push(Value::String(lua.create_string(text)?));
                i += n;
            }
            _ => {
                for _ in 0..count.unwrap_or(1) {
                    match c {
                        b'z' => {
                            if i >= len {
                                break 'codes;
                            }
                            let l = s[i..].iter().position(|&b| b == 0).unwrap_or(len - i);
                            values.push(Value::String(lua.create_string(&s[i..i + l])?));
                            i += l + 1;
                        }
                        b'p' | b'P' | b'a' => {
                            let w = match c {
                                b'p' => 1,
                                b'P' => 2,
                                _ => 8,
                            };
                            if i + w > len {
                                break 'codes;
                            }
                            let l = read_uint(&s, i, w, order);
                            let Some(end) = usize::try_from(l)
                                .ok()
                                .and_then(|l| (i + w).checked_add(l))
                                .filter(|&e| e <= len)
                            else {
                                break 'codes;
                            };
                            values.push(Value::String(lua.create_string(&s[i + w..end])?));
                            i = end;
                        }
                        _ => {
                            let Some(w) = width(c) else {
                                return Err(bad_code("unpack", c));
                            };
                            if i + w > len {
                                break 'codes;
                            }
                            values.push(Value::Number(read_number(&s, i, c, order)));
                            i += w;
                        }
                    }
                }
            }
        }
    }
    let mut out = MultiValue::new();
    out.push_back(Value::Number((i + 1) as f64));
    out.extend(values);
    Ok(out)
}

fn module(lua: &Lua) -> mlua::Result<Table> {
    let m = lua.create_table()?;
    m.set("pack", lua.create_function(pack)?)?;
    m.set("unpack", lua.create_function(unpack)?)?;
    Ok(m)
}

pub(crate) fn install(lua: &Lua, preload: &Table) -> mlua::Result<()> {
    preload.set(
        "lua_pack",
        lua.create_function(|lua, _: MultiValue| module(lua))?,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(code: &str) {
        let lua = Lua::new();
        lua.globals()
            .set("P", module(&lua).expect("module"))
            .expect("global");
        lua.load(
            r#"function eq(got, want)
                if got ~= want then
                    error(("got %q, want %q"):format(tostring(got), tostring(want)), 2)
                end
            end"#,
        )
        .exec()
        .expect("eq");
        if let Err(e) = lua.load(code).exec() {
            panic!("{e}");
        }
    }

    #[test]
    fn positions_and_counts_past_any_end_are_refused_not_panics() {
        run(r#"
            -- A start beyond the string (or beyond any address) reads nothing.
            for _, init in ipairs({ math.huge, 2^70, 2^64, 4, 1e300 }) do
                for _, f in ipairs({ "C", "p", "P", "a", "z", "A2", "L", "B2", "X1" }) do
                    local pos, v = P.unpack("abc", f, init)
                    eq(pos, 4); eq(v, nil)
                end
            end
            -- A skip past the end stops at the end.
            local pos, v = P.unpack("abc", "x99999999999999999999C")
            eq(pos, 4); eq(v, nil)
            -- A repeat count that would build gigabytes is an error, not an exhausted process.
            local ok, err = pcall(P.pack, "x99999999999")
            eq(ok, false); eq(tostring(err):find("result too large", 1, true) ~= nil, true)
            eq(#P.pack("x1000"), 1000)
        "#);
    }

    #[test]
    fn reads_ber_lengths_as_lua_resty_ldap_does() {
        run(r##"
            -- An LDAP message head: SEQUENCE, a long-form length (0x82 0x01 0x2c = 300).
            local msg = "\48\130\1\44rest"
            local pos, tag = P.unpack(msg, "C", 1)
            eq(pos, 2); eq(tag, 0x30)
            local pos2, first = P.unpack(msg, "C", pos)
            eq(pos2, 3); eq(first, 0x82)
            local pos3, hi, lo = P.unpack(msg, "CC", pos2)
            eq(pos3, 5); eq(hi * 256 + lo, 300)
            -- past the end: the position only
            local n = select("#", P.unpack(msg, "C", #msg + 1))
            eq(n, 1)
        "##);
    }

    #[test]
    fn packs_and_unpacks_every_code() {
        run(r##"
            local s = P.pack(">SIl", 0x1234, 0xdeadbeef, -2)
            eq(#s, 14); eq(s:byte(1), 0x12); eq(s:byte(2), 0x34); eq(s:byte(3), 0xde)
            local pos, a, b, c = P.unpack(s, ">SIl")
            eq(pos, 15); eq(a, 0x1234); eq(b, 0xdeadbeef); eq(c, -2)
            local _, le = P.unpack(P.pack("<S", 0x0102), "<S"); eq(le, 0x0102)
            eq(P.pack("<S", 0x0102), "\2\1")
            local _, sc, uc = P.unpack("\255\255", "cC"); eq(sc, -1); eq(uc, 255)
            -- strings
            local z = P.pack("zpPA", "ab", "cde", "f", "gh")
            eq(z, "ab\0\3cde" .. P.pack("=S", 1) .. "fgh")
            local p2, s1, s2, s3, s4 = P.unpack(z, "zpPA2")
            eq(s1, "ab"); eq(s2, "cde"); eq(s3, "f"); eq(s4, "gh"); eq(p2, #z + 1)
            local _, e = P.unpack("x", "A0"); eq(e, "")
            -- floats
            local _, d, f = P.unpack(P.pack("df", 1.5, 0.25), "df"); eq(d, 1.5); eq(f, 0.25)
            -- bits and hex
            eq(P.pack("B", "10000001"), "\129")
            eq(P.pack("X", "0aFf"), "\10\255")
            local _, bits, hex = P.unpack("\129\10\255", "B1X2"); eq(bits, "10000001"); eq(hex, "0AFF")
            -- x: a zero byte, a skipped byte
            eq(P.pack("CxC", 1, 2), "\1\0\2")
            local _, skipped = P.unpack("\1\0\2", "xxC"); eq(skipped, 2)
            -- repetition
            local _, r1, r2, r3 = P.unpack(P.pack("C3", 7, 8, 9), "C3"); eq(r1 + r2 + r3, 24)
            -- a string whose length runs past the data stops the read
            local cut = select("#", P.unpack("\9ab", "p")); eq(cut, 1)
            -- bad codes and arguments are errors
            local ok, err = pcall(P.pack, "Q", 1)
            eq(ok, false); assert(tostring(err):find("bad code `Q'", 1, true), err)
            ok, err = pcall(P.pack, "C", {})
            eq(ok, false); assert(tostring(err):find("number expected", 1, true), err)
        "##);
    }
}
