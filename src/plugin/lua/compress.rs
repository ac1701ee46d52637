//! Compression under the module names APISIX's code requires: lua-ffi-zlib's `ffi-zlib`
//! (`inflateGzip`, `deflateGzip`, `crc32`, `adler`, over flate2) and lua-brotli's `brotli`
//! (`compressor:new(options)` with `compress`/`flush`/`finish`, `decompressor:new()` with
//! `decompress`/`finish`, over the `brotli` crate).
//!
//! Output goes to the caller's writer function chunk by chunk as it is produced, so a small
//! compressed input that inflates to a lot (a zip bomb) fills the Lua side, which the VM's
//! memory cap bounds, not an unbounded Rust buffer.

use std::io::{Read, Write};

use mlua::{Function, Lua, MultiValue, Table, UserData, UserDataMethods, Value};

/// lua-ffi-zlib's default chunk size.
const DEFAULT_CHUNK: usize = 16384;

/// Pulls input from a Lua reader function (`input(size)` returns a string, or nil at the end).
struct LuaReader {
    input: Function,
    chunk: usize,
    buf: Vec<u8>,
    pos: usize,
    done: bool,
}

impl Read for LuaReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.buf.len() {
            if self.done {
                return Ok(0);
            }
            match self.input.call::<Value>(self.chunk) {
                Ok(Value::String(s)) if !s.as_bytes().is_empty() => {
                    self.buf.clear();
                    self.buf.extend_from_slice(&s.as_bytes());
                    self.pos = 0;
                }
                Ok(_) => self.done = true,
                Err(e) => return Err(std::io::Error::other(e.to_string())),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Hands output to a Lua writer function (`output(data)`).
struct LuaWriter<'a> {
    lua: &'a Lua,
    output: Function,
}

impl Write for LuaWriter<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        let s = self
            .lua
            .create_string(data)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        self.output
            .call::<()>(s)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn chunk_size(v: Option<i64>) -> usize {
    v.filter(|n| *n > 0).map_or(DEFAULT_CHUNK, |n| n as usize)
}

/// Copies a decoder's output to the writer in `chunk`-sized pieces.
fn pump(mut from: impl Read, to: &mut impl Write, chunk: usize) -> std::io::Result<()> {
    let mut buf = vec![0u8; chunk];
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            return to.flush();
        }
        to.write_all(&buf[..n])?;
    }
}

/// `(true)` or `(false, err)`, as lua-ffi-zlib returns.
fn outcome(lua: &Lua, r: std::io::Result<()>, what: &str) -> mlua::Result<MultiValue> {
    let mut out = MultiValue::new();
    match r {
        Ok(()) => out.push_back(Value::Boolean(true)),
        Err(e) => {
            out.push_back(Value::Boolean(false));
            out.push_back(Value::String(lua.create_string(format!("{what}: {e}"))?));
        }
    }
    Ok(out)
}

/// `inflateGzip(input, output, chunk, windowBits)`: gzip or zlib data (zlib's automatic header
/// detection, the default windowBits 15+32), raw deflate with a negative windowBits.
fn inflate_gzip(
    lua: &Lua,
    (input, output, chunk, window_bits): (Function, Function, Option<i64>, Option<i64>),
) -> mlua::Result<MultiValue> {
    let chunk = chunk_size(chunk);
    let mut reader = std::io::BufReader::new(LuaReader {
        input,
        chunk,
        buf: Vec::new(),
        pos: 0,
        done: false,
    });
    let mut writer = LuaWriter { lua, output };
    let r = (|| {
        let raw = window_bits.is_some_and(|w| w < 0);
        if raw {
            return pump(
                flate2::bufread::DeflateDecoder::new(reader),
                &mut writer,
                chunk,
            );
        }
        let head = std::io::BufRead::fill_buf(&mut reader)?;
        if head.starts_with(&[0x1f, 0x8b]) {
            pump(
                flate2::bufread::MultiGzDecoder::new(reader),
                &mut writer,
                chunk,
            )
        } else if head.is_empty() {
            Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "no input",
            ))
        } else {
            pump(
                flate2::bufread::ZlibDecoder::new(reader),
                &mut writer,
                chunk,
            )
        }
    })();
    outcome(lua, r, "INFLATE")
}

/// `deflateGzip(input, output, chunk, options)`: gzip output; `options.level` 0-9 (default 6),
/// `options.windowBits` 8-15 for zlib framing, 16+ for gzip (the default 15+16), negative for
/// raw deflate.
fn deflate_gzip(
    lua: &Lua,
    (input, output, chunk, options): (Function, Function, Option<i64>, Option<Table>),
) -> mlua::Result<MultiValue> {
    let chunk = chunk_size(chunk);
    let (level, window_bits) = match &options {
        Some(o) => (
            o.get::<Option<u32>>("level")?.unwrap_or(6).min(9),
            o.get::<Option<i64>>("windowBits")?.unwrap_or(31),
        ),
        None => (6, 31),
    };
    let level = flate2::Compression::new(level);
    let reader = LuaReader {
        input,
        chunk,
        buf: Vec::new(),
        pos: 0,
        done: false,
    };
    let mut writer = LuaWriter { lua, output };
    let r = if window_bits < 0 {
        pump(
            flate2::read::DeflateEncoder::new(reader, level),
            &mut writer,
            chunk,
        )
    } else if window_bits > 15 {
        pump(
            flate2::read::GzEncoder::new(reader, level),
            &mut writer,
            chunk,
        )
    } else {
        pump(
            flate2::read::ZlibEncoder::new(reader, level),
            &mut writer,
            chunk,
        )
    };
    outcome(lua, r, "DEFLATE")
}

fn zlib_module(lua: &Lua) -> mlua::Result<Table> {
    let m = lua.create_table()?;
    m.set("_VERSION", "0.6")?;
    m.set("inflateGzip", lua.create_function(inflate_gzip)?)?;
    m.set("deflateGzip", lua.create_function(deflate_gzip)?)?;
    m.set(
        "crc32",
        lua.create_function(|_, (s, init): (mlua::String, Option<u32>)| {
            match init {
                // zlib's crc32(init, buf) continues from a previous value, which flate2's Crc
                // cannot be seeded with.
                Some(seed) if seed != 0 => Ok(crc32_continue(seed, &s.as_bytes())),
                _ => {
                    let mut h = flate2::Crc::new();
                    h.update(&s.as_bytes());
                    Ok(h.sum())
                }
            }
        })?,
    )?;
    m.set(
        "adler",
        lua.create_function(|_, (s, init): (mlua::String, Option<u32>)| {
            let (mut a, mut b) = match init {
                Some(v) if v != 0 => (v & 0xffff, v >> 16),
                _ => (1u32, 0u32),
            };
            for &x in s.as_bytes().iter() {
                a = (a + x as u32) % 65521;
                b = (b + a) % 65521;
            }
            Ok((b << 16) | a)
        })?,
    )?;
    Ok(m)
}

/// CRC-32 (IEEE) continued from `init`, bit by bit (only for a seeded call, which is rare).
fn crc32_continue(init: u32, data: &[u8]) -> u32 {
    let mut c = !init;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// `brotli.compressor:new(options)`: a streaming encoder.
struct BrotliCompressor {
    enc: Option<brotli::CompressorWriter<Vec<u8>>>,
}

impl BrotliCompressor {
    fn take_output(&mut self) -> Vec<u8> {
        match &mut self.enc {
            Some(e) => std::mem::take(e.get_mut()),
            None => Vec::new(),
        }
    }
}

impl UserData for BrotliCompressor {
    fn add_methods<M: UserDataMethods<Self>>(m: &mut M) {
        m.add_method_mut("compress", |lua, this, s: mlua::String| {
            let Some(e) = this.enc.as_mut() else {
                return Err(mlua::Error::runtime("compressor is finished"));
            };
            e.write_all(&s.as_bytes())
                .map_err(|e| mlua::Error::runtime(e.to_string()))?;
            lua.create_string(this.take_output())
        });
        m.add_method_mut("flush", |lua, this, ()| {
            if let Some(e) = this.enc.as_mut() {
                e.flush().map_err(|e| mlua::Error::runtime(e.to_string()))?;
            }
            lua.create_string(this.take_output())
        });
        m.add_method_mut("finish", |lua, this, ()| {
            let out = match this.enc.take() {
                Some(e) => e.into_inner(),
                None => Vec::new(),
            };
            lua.create_string(out)
        });
    }
}

/// `brotli.decompressor:new()`: a streaming decoder.
struct BrotliDecompressor {
    dec: brotli::DecompressorWriter<Vec<u8>>,
}

impl UserData for BrotliDecompressor {
    fn add_methods<M: UserDataMethods<Self>>(m: &mut M) {
        m.add_method_mut("decompress", |lua, this, s: mlua::String| {
            this.dec
                .write_all(&s.as_bytes())
                .map_err(|e| mlua::Error::runtime(format!("brotli: {e}")))?;
            lua.create_string(std::mem::take(this.dec.get_mut()))
        });
        m.add_method_mut("finish", |lua, this, ()| {
            this.dec
                .flush()
                .map_err(|e| mlua::Error::runtime(format!("brotli: {e}")))?;
            lua.create_string(std::mem::take(this.dec.get_mut()))
        });
    }
}

fn brotli_module(lua: &Lua) -> mlua::Result<Table> {
    let m = lua.create_table()?;
    let comp = lua.create_table()?;
    comp.set(
        "new",
        lua.create_function(|lua, args: MultiValue| {
            // `compressor:new(options)`: the options come after the class table.
            let opts = args.into_iter().nth(1);
            let (mut quality, mut lgwin) = (11u32, 22u32);
            if let Some(Value::Table(o)) = opts {
                quality = o.get::<Option<u32>>("quality")?.unwrap_or(quality).min(11);
                lgwin = o
                    .get::<Option<u32>>("lgwin")?
                    .unwrap_or(lgwin)
                    .clamp(10, 24);
            }
            let enc = brotli::CompressorWriter::new(Vec::new(), 4096, quality, lgwin);
            lua.create_userdata(BrotliCompressor { enc: Some(enc) })
        })?,
    )?;
    m.set("compressor", comp)?;
    let dec = lua.create_table()?;
    dec.set(
        "new",
        lua.create_function(|lua, _: MultiValue| {
            lua.create_userdata(BrotliDecompressor {
                dec: brotli::DecompressorWriter::new(Vec::new(), 4096),
            })
        })?,
    )?;
    m.set("decompressor", dec)?;
    m.set(
        "compress",
        lua.create_function(|lua, (s, o): (mlua::String, Option<Table>)| {
            let quality = match &o {
                Some(o) => o.get::<Option<u32>>("quality")?.unwrap_or(11).min(11),
                None => 11,
            };
            let mut out = Vec::new();
            {
                let mut w = brotli::CompressorWriter::new(&mut out, 4096, quality, 22);
                w.write_all(&s.as_bytes())
                    .map_err(|e| mlua::Error::runtime(e.to_string()))?;
            }
            lua.create_string(out)
        })?,
    )?;
    m.set(
        "decompress",
        lua.create_function(|lua, s: mlua::String| {
            let mut out = Vec::new();
            let bytes = s.as_bytes().to_vec();
            match brotli::Decompressor::new(&bytes[..], 4096).read_to_end(&mut out) {
                Ok(_) => Ok((Value::String(lua.create_string(out)?), Value::Nil)),
                Err(e) => Ok((Value::Nil, Value::String(lua.create_string(e.to_string())?))),
            }
        })?,
    )?;
    Ok(m)
}

/// Registers `ffi-zlib` and `brotli` in `package.preload`.
pub(crate) fn install(lua: &Lua, preload: &Table) -> mlua::Result<()> {
    preload.set(
        "ffi-zlib",
        lua.create_function(|lua, _: MultiValue| zlib_module(lua))?,
    )?;
    preload.set(
        "brotli",
        lua.create_function(|lua, _: MultiValue| brotli_module(lua))?,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(code: &str) -> String {
        let lua = Lua::new();
        let package: Table = lua.globals().get("package").unwrap();
        install(&lua, &package.get("preload").unwrap()).unwrap();
        lua.load(code).eval::<String>().unwrap()
    }

    /// Reader/writer pairs as APISIX's content-decode builds them.
    const IO: &str = r#"
        local function reader(s) local pos = 1
            return function(n) if pos > #s then return nil end
                local c = s:sub(pos, pos + n - 1); pos = pos + n; return c end end
        local function writer() local t = {}
            return function(d) t[#t + 1] = d end, function() return table.concat(t) end end
    "#;

    #[test]
    fn gzip_round_trips_through_lua_readers_and_writers() {
        let got = run(&format!(
            r#"{IO}
            local zlib = require("ffi-zlib")
            local text = string.rep("moongate ", 10000)
            local w, gz = writer()
            assert(zlib.deflateGzip(reader(text), w, 1000))
            local w2, plain = writer()
            local ok, err = zlib.inflateGzip(reader(gz()), w2, 512)
            local bw = writer()
            local bad_ok, bad_err = zlib.inflateGzip(reader("\31\139garbage"), bw)
            return tostring(ok) .. " " .. tostring(plain() == text) .. " " .. tostring(#gz() < 1000)
                .. " " .. tostring(bad_ok) .. " " .. tostring(bad_err ~= nil)
                .. " " .. string.format("%08x", zlib.crc32("123456789"))"#
        ));
        assert_eq!(got, "true true true false true cbf43926");
    }

    #[test]
    fn brotli_streams_as_lua_brotli() {
        let got = run(r#"local brotli = require("brotli")
            local c = brotli.compressor:new({quality = 5, lgwin = 19})
            local out = c:compress(string.rep("abc", 1000)) .. c:flush() .. c:compress("tail") .. c:finish()
            local d = brotli.decompressor:new()
            local plain = d:decompress(out) .. d:finish()
            return tostring(plain == string.rep("abc", 1000) .. "tail") .. " " .. tostring(#out < 100)
                .. " " .. brotli.decompress(brotli.compress("x"))"#);
        assert_eq!(got, "true true x");
    }

    #[test]
    fn crc32_continues_from_a_seed() {
        assert_eq!(crc32_continue(0, b"123456789"), 0xCBF4_3926);
        let part = crc32_continue(0, b"1234");
        assert_eq!(crc32_continue(part, b"56789"), 0xCBF4_3926);
    }
}
