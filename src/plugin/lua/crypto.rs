//! Digests, HMAC, AES and random bytes under the module names APISIX's plugins require:
//! lua-resty-string's `resty.md5`/`resty.sha1`/`resty.sha224`/`resty.sha256`/`resty.sha384`/
//! `resty.sha512`/`resty.random`/`resty.aes`, lua-resty-hmac's `resty.hmac`, and
//! lua-resty-openssl's `resty.openssl.digest`/`resty.openssl.hmac`/`resty.openssl.mac`/
//! `resty.openssl.rand`. OpenResty backs them with OpenSSL through the FFI; here they are
//! RustCrypto's and ring's, with the same names, arguments, return values and error strings.

use aes::cipher::{BlockDecryptMut, BlockEncryptMut, KeyInit, KeyIvInit, StreamCipher};
use hmac::Mac;
use md5::Digest;
use mlua::{Lua, MultiValue, Table, UserData, UserDataMethods, Value};

/// A digest algorithm by the names OpenSSL gives them (`sha256`, `SHA256`, `sha-256`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Algo {
    Md5,
    Sha1,
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

impl Algo {
    fn parse(name: &str) -> Option<Algo> {
        let n: String = name
            .chars()
            .filter(|c| *c != '-' && *c != '_')
            .collect::<String>()
            .to_ascii_lowercase();
        Some(match n.as_str() {
            "md5" => Algo::Md5,
            "sha1" => Algo::Sha1,
            "sha224" => Algo::Sha224,
            "sha256" => Algo::Sha256,
            "sha384" => Algo::Sha384,
            "sha512" => Algo::Sha512,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Algo::Md5 => "md5",
            Algo::Sha1 => "sha1",
            Algo::Sha224 => "sha224",
            Algo::Sha256 => "sha256",
            Algo::Sha384 => "sha384",
            Algo::Sha512 => "sha512",
        }
    }
}

/// A running digest.
#[derive(Clone)]
enum Hasher {
    Md5(md5::Md5),
    Sha1(sha1::Sha1),
    Sha224(sha2::Sha224),
    Sha256(sha2::Sha256),
    Sha384(sha2::Sha384),
    Sha512(sha2::Sha512),
}

impl Hasher {
    fn new(a: Algo) -> Hasher {
        match a {
            Algo::Md5 => Hasher::Md5(md5::Md5::new()),
            Algo::Sha1 => Hasher::Sha1(sha1::Sha1::new()),
            Algo::Sha224 => Hasher::Sha224(sha2::Sha224::new()),
            Algo::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algo::Sha384 => Hasher::Sha384(sha2::Sha384::new()),
            Algo::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }

    fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Md5(h) => h.update(data),
            Hasher::Sha1(h) => h.update(data),
            Hasher::Sha224(h) => h.update(data),
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha384(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    /// The digest; the hasher starts over (OpenSSL's `*_Final` leaves it unusable until a
    /// reset, so nothing can rely on what is left).
    fn finish(&mut self) -> Vec<u8> {
        match self {
            Hasher::Md5(h) => h.finalize_reset().to_vec(),
            Hasher::Sha1(h) => h.finalize_reset().to_vec(),
            Hasher::Sha224(h) => h.finalize_reset().to_vec(),
            Hasher::Sha256(h) => h.finalize_reset().to_vec(),
            Hasher::Sha384(h) => h.finalize_reset().to_vec(),
            Hasher::Sha512(h) => h.finalize_reset().to_vec(),
        }
    }
}

/// One-shot digest.
fn digest(a: Algo, data: &[u8]) -> Vec<u8> {
    let mut h = Hasher::new(a);
    h.update(data);
    h.finish()
}

/// A running HMAC.
#[derive(Clone)]
enum Hmac {
    Md5(hmac::Hmac<md5::Md5>),
    Sha1(hmac::Hmac<sha1::Sha1>),
    Sha224(hmac::Hmac<sha2::Sha224>),
    Sha256(hmac::Hmac<sha2::Sha256>),
    Sha384(hmac::Hmac<sha2::Sha384>),
    Sha512(hmac::Hmac<sha2::Sha512>),
}

impl Hmac {
    fn new(a: Algo, key: &[u8]) -> Hmac {
        // HMAC takes a key of any length (a longer one is hashed), so new_from_slice cannot fail.
        macro_rules! mk {
            ($v:ident, $t:ty) => {
                Hmac::$v(
                    <hmac::Hmac<$t> as Mac>::new_from_slice(key)
                        .expect("HMAC accepts any key length"),
                )
            };
        }
        match a {
            Algo::Md5 => mk!(Md5, md5::Md5),
            Algo::Sha1 => mk!(Sha1, sha1::Sha1),
            Algo::Sha224 => mk!(Sha224, sha2::Sha224),
            Algo::Sha256 => mk!(Sha256, sha2::Sha256),
            Algo::Sha384 => mk!(Sha384, sha2::Sha384),
            Algo::Sha512 => mk!(Sha512, sha2::Sha512),
        }
    }

    fn update(&mut self, data: &[u8]) {
        match self {
            Hmac::Md5(h) => h.update(data),
            Hmac::Sha1(h) => h.update(data),
            Hmac::Sha224(h) => h.update(data),
            Hmac::Sha256(h) => h.update(data),
            Hmac::Sha384(h) => h.update(data),
            Hmac::Sha512(h) => h.update(data),
        }
    }

    /// The MAC; the state starts over with the same key.
    fn finish(&mut self) -> Vec<u8> {
        match self {
            Hmac::Md5(h) => h.finalize_reset().into_bytes().to_vec(),
            Hmac::Sha1(h) => h.finalize_reset().into_bytes().to_vec(),
            Hmac::Sha224(h) => h.finalize_reset().into_bytes().to_vec(),
            Hmac::Sha256(h) => h.finalize_reset().into_bytes().to_vec(),
            Hmac::Sha384(h) => h.finalize_reset().into_bytes().to_vec(),
            Hmac::Sha512(h) => h.finalize_reset().into_bytes().to_vec(),
        }
    }

    fn reset(&mut self) {
        match self {
            Hmac::Md5(h) => h.reset(),
            Hmac::Sha1(h) => h.reset(),
            Hmac::Sha224(h) => h.reset(),
            Hmac::Sha256(h) => h.reset(),
            Hmac::Sha384(h) => h.reset(),
            Hmac::Sha512(h) => h.reset(),
        }
    }
}

/// `resty.sha256:new()` and friends, and `resty.openssl.digest.new(alg)`.
struct DigestState(Hasher);

impl UserData for DigestState {
    fn add_methods<M: UserDataMethods<Self>>(m: &mut M) {
        // lua-resty-openssl's update takes several strings; lua-resty-string's one.
        m.add_method_mut("update", |_, this, parts: MultiValue| {
            for v in parts {
                if let Value::String(s) = v {
                    this.0.update(&s.as_bytes());
                }
            }
            Ok(true)
        });
        // lua-resty-openssl's final takes an optional last part.
        m.add_method_mut("final", |lua, this, last: Option<mlua::String>| {
            if let Some(s) = last {
                this.0.update(&s.as_bytes());
            }
            lua.create_string(this.0.finish())
        });
        m.add_method_mut("reset", |_, this, ()| {
            this.0.finish();
            Ok(true)
        });
    }
}

/// `resty.hmac:new(key, algo)` and lua-resty-openssl's hmac/mac objects.
struct HmacState {
    mac: Hmac,
    /// lua-resty-hmac's `final(data, output_hex)` can answer in hex.
    hex_final: bool,
}

impl UserData for HmacState {
    fn add_methods<M: UserDataMethods<Self>>(m: &mut M) {
        m.add_method_mut("update", |_, this, parts: MultiValue| {
            for v in parts {
                if let Value::String(s) = v {
                    this.mac.update(&s.as_bytes());
                }
            }
            Ok(true)
        });
        m.add_method_mut(
            "final",
            |lua, this, (last, hex): (Option<mlua::String>, Option<bool>)| {
                if let Some(s) = last {
                    this.mac.update(&s.as_bytes());
                }
                let out = this.mac.finish();
                if this.hex_final && hex.unwrap_or(false) {
                    return lua.create_string(to_hex(&out));
                }
                lua.create_string(out)
            },
        );
        m.add_method_mut("reset", |_, this, ()| {
            this.mac.reset();
            Ok(true)
        });
    }
}

fn to_hex(b: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for &x in b {
        s.push(HEX[(x >> 4) as usize] as char);
        s.push(HEX[(x & 15) as usize] as char);
    }
    s
}

/// Random bytes from the operating system (ring's `SystemRandom`: getrandom).
fn random_bytes(n: usize) -> Option<Vec<u8>> {
    use ring::rand::SecureRandom;
    let mut buf = vec![0u8; n];
    ring::rand::SystemRandom::new().fill(&mut buf).ok()?;
    Some(buf)
}

/// The first argument of a `module:fn(...)` call is the module table itself; skip it.
fn skip_self(args: MultiValue) -> MultiValue {
    let mut v: Vec<Value> = args.into_iter().collect();
    if matches!(v.first(), Some(Value::Table(_))) {
        v.remove(0);
    }
    MultiValue::from_iter(v)
}

/// A lua-resty-string digest module: `local d = require("resty.sha256"):new()`.
fn digest_module(lua: &Lua, algo: Algo) -> mlua::Result<Table> {
    let m = lua.create_table()?;
    m.set("_VERSION", "0.16")?;
    m.set(
        "new",
        lua.create_function(move |lua, _: MultiValue| {
            lua.create_userdata(DigestState(Hasher::new(algo)))
        })?,
    )?;
    Ok(m)
}

/// lua-resty-hmac: `hmac:new(key, hmac.ALGOS.SHA256)`, `:update`, `:final(data?, hex?)`,
/// `:reset`; `ALGOS` names MD5, SHA1, SHA224, SHA256, SHA384, SHA512 (MD5 is the default).
fn hmac_module(lua: &Lua) -> mlua::Result<Table> {
    let m = lua.create_table()?;
    m.set("_VERSION", "0.06")?;
    let algos = lua.create_table()?;
    for (k, v) in [
        ("MD5", "md5"),
        ("SHA1", "sha1"),
        ("SHA224", "sha224"),
        ("SHA256", "sha256"),
        ("SHA384", "sha384"),
        ("SHA512", "sha512"),
    ] {
        algos.set(k, v)?;
    }
    m.set("ALGOS", algos)?;
    m.set(
        "new",
        lua.create_function(|lua, args: MultiValue| {
            let mut args = skip_self(args).into_iter();
            let key = match args.next() {
                Some(Value::String(s)) => s.as_bytes().to_vec(),
                _ => {
                    return Err(mlua::Error::runtime(
                        "bad argument #1 to 'new' (key expected)",
                    ))
                }
            };
            let algo = match args.next() {
                Some(Value::String(s)) => Algo::parse(&s.to_str()?).ok_or_else(|| {
                    mlua::Error::runtime("unsupported hash algorithm".to_string())
                })?,
                _ => Algo::Md5,
            };
            let ud = lua.create_userdata(HmacState {
                mac: Hmac::new(algo, &key),
                hex_final: true,
            })?;
            Ok(Value::UserData(ud))
        })?,
    )?;
    Ok(m)
}

/// `resty.random`: `bytes(len, strong)`; moongate's bytes always come from the OS generator,
/// so `strong` changes nothing.
fn random_module(lua: &Lua) -> mlua::Result<Table> {
    let m = lua.create_table()?;
    m.set("_VERSION", "0.16")?;
    m.set(
        "bytes",
        lua.create_function(|lua, (len, _strong): (i64, Option<bool>)| {
            if len < 0 {
                return Ok(Value::Nil);
            }
            match random_bytes(len as usize) {
                Some(b) => Ok(Value::String(lua.create_string(b)?)),
                None => Ok(Value::Nil),
            }
        })?,
    )?;
    m.set(
        "number",
        lua.create_function(|_, (min, max): (Option<i64>, Option<i64>)| {
            let (lo, hi) = (min.unwrap_or(0), max.unwrap_or(i32::MAX as i64));
            let b = random_bytes(8).unwrap_or_default();
            let n = u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
            let span = (hi - lo + 1).max(1) as u64;
            Ok(lo + (n % span) as i64)
        })?,
    )?;
    Ok(m)
}

/// lua-resty-openssl's `digest`, `hmac`, `mac` and `rand` modules: dot-called, errors as
/// `nil, err`.
fn openssl_digest_module(lua: &Lua) -> mlua::Result<Table> {
    let m = lua.create_table()?;
    m.set(
        "new",
        lua.create_function(|lua, alg: Option<String>| {
            let name = alg.unwrap_or_else(|| "sha1".into());
            match Algo::parse(&name) {
                Some(a) => Ok((
                    Value::UserData(lua.create_userdata(DigestState(Hasher::new(a)))?),
                    Value::Nil,
                )),
                None => Ok((
                    Value::Nil,
                    Value::String(
                        lua.create_string(format!("digest.new: invalid digest type \"{name}\""))?,
                    ),
                )),
            }
        })?,
    )?;
    Ok(m)
}

fn openssl_hmac_new(lua: &Lua, key: &[u8], alg: Option<String>) -> mlua::Result<(Value, Value)> {
    let name = alg.unwrap_or_else(|| "sha1".into());
    match Algo::parse(&name) {
        Some(a) => Ok((
            Value::UserData(lua.create_userdata(HmacState {
                mac: Hmac::new(a, key),
                hex_final: false,
            })?),
            Value::Nil,
        )),
        None => Ok((
            Value::Nil,
            Value::String(lua.create_string(format!("hmac.new: invalid digest type \"{name}\""))?),
        )),
    }
}

fn openssl_hmac_module(lua: &Lua) -> mlua::Result<Table> {
    let m = lua.create_table()?;
    m.set(
        "new",
        lua.create_function(|lua, (key, alg): (mlua::String, Option<String>)| {
            openssl_hmac_new(lua, &key.as_bytes(), alg)
        })?,
    )?;
    Ok(m)
}

/// `mac.new(key, "HMAC", cipher, digest)`: only HMAC is provided.
fn openssl_mac_module(lua: &Lua) -> mlua::Result<Table> {
    let m = lua.create_table()?;
    m.set(
        "new",
        lua.create_function(
            |lua, (key, typ, _cipher, digest): (mlua::String, String, Value, Option<String>)| {
                if !typ.eq_ignore_ascii_case("hmac") {
                    return Ok((
                        Value::Nil,
                        Value::String(
                            lua.create_string(format!("mac.new: unsupported mac type \"{typ}\""))?,
                        ),
                    ));
                }
                openssl_hmac_new(lua, &key.as_bytes(), digest)
            },
        )?,
    )?;
    Ok(m)
}

fn openssl_rand_module(lua: &Lua) -> mlua::Result<Table> {
    let m = lua.create_table()?;
    m.set(
        "bytes",
        lua.create_function(|lua, (len, _private): (i64, Value)| {
            match random_bytes(len.max(0) as usize) {
                Some(b) => Ok((Value::String(lua.create_string(b)?), Value::Nil)),
                None => Ok((
                    Value::Nil,
                    Value::String(lua.create_string("rand.bytes: cannot get random bytes")?),
                )),
            }
        })?,
    )?;
    Ok(m)
}

// ---------------------------------------------------------------------------------------------
// AES (lua-resty-string's resty.aes)
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Ecb,
    Cbc,
    Ctr,
    Gcm,
}

impl Mode {
    fn parse(s: &str) -> Option<Mode> {
        Some(match s {
            "ecb" => Mode::Ecb,
            "cbc" => Mode::Cbc,
            "ctr" => Mode::Ctr,
            "gcm" => Mode::Gcm,
            _ => return None,
        })
    }
}

/// An `aes:new(...)` object: key and IV derived once.
struct AesState {
    bits: u32,
    mode: Mode,
    key: Vec<u8>,
    iv: Vec<u8>,
    padding: bool,
}

/// OpenSSL's `EVP_BytesToKey`: D_i = H^rounds(D_{i-1} || password || salt), concatenated
/// until there are enough bytes for the key and then the IV.
fn bytes_to_key(
    algo: Algo,
    password: &[u8],
    salt: Option<&[u8]>,
    rounds: u32,
    key_len: usize,
    iv_len: usize,
) -> (Vec<u8>, Vec<u8>) {
    let mut out = Vec::with_capacity(key_len + iv_len);
    let mut prev: Vec<u8> = Vec::new();
    while out.len() < key_len + iv_len {
        let mut h = Hasher::new(algo);
        h.update(&prev);
        h.update(password);
        if let Some(s) = salt {
            h.update(s);
        }
        let mut d = h.finish();
        for _ in 1..rounds.max(1) {
            d = digest(algo, &d);
        }
        out.extend_from_slice(&d);
        prev = d;
    }
    let iv = out[key_len..key_len + iv_len].to_vec();
    out.truncate(key_len);
    (out, iv)
}

/// Runs `$body` with `$C` bound to the AES block cipher of `$bits` bits.
macro_rules! with_aes {
    ($bits:expr, $C:ident => $body:expr) => {
        match $bits {
            128 => {
                type $C = aes::Aes128;
                $body
            }
            192 => {
                type $C = aes::Aes192;
                $body
            }
            _ => {
                type $C = aes::Aes256;
                $body
            }
        }
    };
}

use aes::cipher::block_padding::{NoPadding, Pkcs7};

fn block_enc(
    bits: u32,
    mode: Mode,
    key: &[u8],
    iv: &[u8],
    data: &[u8],
    pad: bool,
) -> Result<Vec<u8>, &'static str> {
    if !pad && data.len() % 16 != 0 {
        return Err("data length is not a multiple of the block size");
    }
    with_aes!(bits, C => {
        match mode {
            Mode::Cbc => {
                let e = cbc::Encryptor::<C>::new_from_slices(key, iv).map_err(|_| "bad key length")?;
                Ok(if pad { e.encrypt_padded_vec_mut::<Pkcs7>(data) } else { e.encrypt_padded_vec_mut::<NoPadding>(data) })
            }
            Mode::Ecb => {
                let e = ecb::Encryptor::<C>::new_from_slice(key).map_err(|_| "bad key length")?;
                Ok(if pad { e.encrypt_padded_vec_mut::<Pkcs7>(data) } else { e.encrypt_padded_vec_mut::<NoPadding>(data) })
            }
            _ => ctr_apply(bits, key, iv, data),
        }
    })
}

fn block_dec(
    bits: u32,
    mode: Mode,
    key: &[u8],
    iv: &[u8],
    data: &[u8],
    pad: bool,
) -> Result<Vec<u8>, &'static str> {
    with_aes!(bits, C => {
        match mode {
            Mode::Cbc => {
                let d = cbc::Decryptor::<C>::new_from_slices(key, iv).map_err(|_| "bad key length")?;
                if pad { d.decrypt_padded_vec_mut::<Pkcs7>(data) } else { d.decrypt_padded_vec_mut::<NoPadding>(data) }
                    .map_err(|_| "bad decrypt")
            }
            Mode::Ecb => {
                let d = ecb::Decryptor::<C>::new_from_slice(key).map_err(|_| "bad key length")?;
                if pad { d.decrypt_padded_vec_mut::<Pkcs7>(data) } else { d.decrypt_padded_vec_mut::<NoPadding>(data) }
                    .map_err(|_| "bad decrypt")
            }
            _ => ctr_apply(bits, key, iv, data),
        }
    })
}

/// CTR mode with a 128-bit big-endian counter (OpenSSL's); the same for both directions.
fn ctr_apply(bits: u32, key: &[u8], iv: &[u8], data: &[u8]) -> Result<Vec<u8>, &'static str> {
    let mut out = data.to_vec();
    with_aes!(bits, C => {
        let mut c = ctr::Ctr128BE::<C>::new_from_slices(key, iv).map_err(|_| "bad key length")?;
        c.apply_keystream(&mut out);
    });
    Ok(out)
}

fn gcm_enc(
    bits: u32,
    key: &[u8],
    iv: &[u8],
    data: &[u8],
) -> Result<(Vec<u8>, Vec<u8>), &'static str> {
    use aes_gcm::aead::AeadInPlace;
    if iv.len() != 12 {
        return Err("bad iv length");
    }
    let nonce = aes_gcm::Nonce::from_slice(iv);
    let mut buf = data.to_vec();
    let tag = match bits {
        128 => aes_gcm::Aes128Gcm::new_from_slice(key)
            .map_err(|_| "bad key length")?
            .encrypt_in_place_detached(nonce, b"", &mut buf),
        _ => aes_gcm::Aes256Gcm::new_from_slice(key)
            .map_err(|_| "bad key length")?
            .encrypt_in_place_detached(nonce, b"", &mut buf),
    }
    .map_err(|_| "encrypt failed")?;
    Ok((buf, tag.to_vec()))
}

fn gcm_dec(
    bits: u32,
    key: &[u8],
    iv: &[u8],
    data: &[u8],
    tag: &[u8],
) -> Result<Vec<u8>, &'static str> {
    use aes_gcm::aead::AeadInPlace;
    if iv.len() != 12 {
        return Err("bad iv length");
    }
    if tag.len() != 16 {
        return Err("bad tag length");
    }
    let nonce = aes_gcm::Nonce::from_slice(iv);
    let mut buf = data.to_vec();
    let tag = aes_gcm::Tag::from_slice(tag);
    match bits {
        128 => aes_gcm::Aes128Gcm::new_from_slice(key)
            .map_err(|_| "bad key length")?
            .decrypt_in_place_detached(nonce, b"", &mut buf, tag),
        _ => aes_gcm::Aes256Gcm::new_from_slice(key)
            .map_err(|_| "bad key length")?
            .decrypt_in_place_detached(nonce, b"", &mut buf, tag),
    }
    .map_err(|_| "bad decrypt")?;
    Ok(buf)
}

impl AesState {
    fn encrypt(&self, data: &[u8]) -> Result<(Vec<u8>, Option<Vec<u8>>), &'static str> {
        let (k, iv, p) = (&self.key[..], &self.iv[..], self.padding);
        Ok(match self.mode {
            Mode::Cbc | Mode::Ecb | Mode::Ctr => {
                (block_enc(self.bits, self.mode, k, iv, data, p)?, None)
            }
            Mode::Gcm => {
                let (c, t) = gcm_enc(self.bits, k, iv, data)?;
                (c, Some(t))
            }
        })
    }

    fn decrypt(&self, data: &[u8], tag: Option<&[u8]>) -> Result<Vec<u8>, &'static str> {
        let (k, iv, p) = (&self.key[..], &self.iv[..], self.padding);
        match self.mode {
            Mode::Cbc | Mode::Ecb | Mode::Ctr => block_dec(self.bits, self.mode, k, iv, data, p),
            Mode::Gcm => gcm_dec(self.bits, k, iv, data, tag.ok_or("no tag")?),
        }
    }
}

impl UserData for AesState {
    fn add_methods<M: UserDataMethods<Self>>(m: &mut M) {
        m.add_method("encrypt", |lua, this, s: mlua::String| {
            let mut out = MultiValue::new();
            match this.encrypt(&s.as_bytes()) {
                Ok((c, tag)) => {
                    out.push_back(Value::String(lua.create_string(c)?));
                    if let Some(t) = tag {
                        out.push_back(Value::String(lua.create_string(t)?));
                    }
                }
                Err(e) => {
                    out.push_back(Value::Nil);
                    out.push_back(Value::String(lua.create_string(e)?));
                }
            }
            Ok(out)
        });
        m.add_method(
            "decrypt",
            |lua, this, (s, tag): (mlua::String, Option<mlua::String>)| {
                let tag = tag.map(|t| t.as_bytes().to_vec());
                match this.decrypt(&s.as_bytes(), tag.as_deref()) {
                    Ok(p) => Ok((Value::String(lua.create_string(p)?), Value::Nil)),
                    Err(e) => Ok((Value::Nil, Value::String(lua.create_string(e)?))),
                }
            },
        );
    }
}

/// `aes:new(key, salt, cipher, hash, hash_rounds, iv_len, enable_padding)`.
fn aes_new(lua: &Lua, args: MultiValue) -> mlua::Result<(Value, Value)> {
    let err = |m: &str| -> mlua::Result<(Value, Value)> {
        Ok((Value::Nil, Value::String(lua.create_string(m)?)))
    };
    let a: Vec<Value> = skip_self(args).into_iter().collect();
    let arg = |i: usize| a.get(i).cloned().unwrap_or(Value::Nil);
    let key = match arg(0) {
        Value::String(s) => s.as_bytes().to_vec(),
        _ => return err("key is needed"),
    };
    let salt = match arg(1) {
        Value::String(s) => {
            if s.as_bytes().len() != 8 {
                return err("salt must be 8 characters or nil");
            }
            Some(s.as_bytes().to_vec())
        }
        _ => None,
    };
    let (bits, mode) = match arg(2) {
        Value::Table(t) => {
            let size: u32 = t.get("size").unwrap_or(128);
            let name: String = t.get("cipher").unwrap_or_else(|_| "cbc".into());
            match Mode::parse(&name) {
                Some(m) if matches!(size, 128 | 192 | 256) => (size, m),
                _ => return err("unsupported cipher"),
            }
        }
        _ => (128, Mode::Cbc),
    };
    if mode == Mode::Gcm && bits == 192 {
        return err("unsupported cipher");
    }
    let iv_len = match arg(5) {
        Value::Integer(n) => n as usize,
        Value::Number(n) => n as usize,
        _ if mode == Mode::Gcm => 12,
        _ => 16,
    };
    let padding = !matches!(arg(6), Value::Boolean(false));
    let key_len = (bits / 8) as usize;
    let (key, iv) = match arg(3) {
        Value::Table(t) => {
            let iv: Option<mlua::String> = t.get("iv")?;
            let Some(iv) = iv else {
                return err("iv is needed");
            };
            let iv = iv.as_bytes().to_vec();
            if iv.len() != iv_len {
                return err("bad iv length");
            }
            let key = match t.get::<Value>("method")? {
                Value::Function(f) => match f.call::<Value>(lua.create_string(&key)?)? {
                    Value::String(s) => s.as_bytes().to_vec(),
                    _ => return err("bad key length"),
                },
                _ => key,
            };
            if key.len() != key_len {
                return err("bad key length");
            }
            (key, iv)
        }
        Value::String(h) => {
            let Some(algo) = Algo::parse(&h.to_str()?) else {
                return err("unsupported hash");
            };
            let rounds = match arg(4) {
                Value::Integer(n) => n.max(1) as u32,
                Value::Number(n) => (n as u32).max(1),
                _ => 1,
            };
            bytes_to_key(algo, &key, salt.as_deref(), rounds, key_len, iv_len)
        }
        _ => bytes_to_key(Algo::Md5, &key, salt.as_deref(), 1, key_len, iv_len),
    };
    let ud = lua.create_userdata(AesState {
        bits,
        mode,
        key,
        iv,
        padding,
    })?;
    Ok((Value::UserData(ud), Value::Nil))
}

fn aes_module(lua: &Lua) -> mlua::Result<Table> {
    let m = lua.create_table()?;
    m.set("_VERSION", "0.16")?;
    m.set(
        "cipher",
        lua.create_function(|lua, (size, mode): (Option<u32>, Option<String>)| {
            let t = lua.create_table()?;
            t.set("size", size.unwrap_or(128))?;
            t.set("cipher", mode.unwrap_or_else(|| "cbc".into()))?;
            Ok(t)
        })?,
    )?;
    let hash = lua.create_table()?;
    for a in [
        Algo::Md5,
        Algo::Sha1,
        Algo::Sha224,
        Algo::Sha256,
        Algo::Sha384,
        Algo::Sha512,
    ] {
        hash.set(a.name(), a.name())?;
    }
    m.set("hash", hash)?;
    m.set("new", lua.create_function(aes_new)?)?;
    Ok(m)
}

/// Builds one module's table.
type ModuleFn = fn(&Lua) -> mlua::Result<Table>;

/// Registers the modules in `package.preload`.
pub(crate) fn install(lua: &Lua, preload: &Table) -> mlua::Result<()> {
    for (name, algo) in [
        ("resty.md5", Algo::Md5),
        ("resty.sha1", Algo::Sha1),
        ("resty.sha224", Algo::Sha224),
        ("resty.sha256", Algo::Sha256),
        ("resty.sha384", Algo::Sha384),
        ("resty.sha512", Algo::Sha512),
    ] {
        preload.set(
            name,
            lua.create_function(move |lua, _: MultiValue| digest_module(lua, algo))?,
        )?;
    }
    let loaders: [(&str, ModuleFn); 7] = [
        ("resty.hmac", hmac_module),
        ("resty.random", random_module),
        ("resty.aes", aes_module),
        ("resty.openssl.digest", openssl_digest_module),
        ("resty.openssl.hmac", openssl_hmac_module),
        ("resty.openssl.mac", openssl_mac_module),
        ("resty.openssl.rand", openssl_rand_module),
    ];
    for (name, f) in loaders {
        preload.set(name, lua.create_function(move |lua, _: MultiValue| f(lua))?)?;
    }
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

    const HEX: &str = r#"local function hex(s) return (s:gsub(".", function(c) return string.format("%02x", c:byte()) end)) end "#;

    #[test]
    fn digests_match_known_vectors() {
        let got = run(&format!(
            r#"{HEX} local d = require("resty.sha256"):new(); d:update("ab"); d:update("c")
            local a = hex(d:final())
            local m = require("resty.md5"):new(); m:update("abc")
            local s1 = require("resty.sha1"):new(); s1:update("abc")
            local o = require("resty.openssl.digest").new("sha512"); o:update("a", "bc")
            return a .. " " .. hex(m:final()) .. " " .. hex(s1:final()) .. " " .. hex(o:final()):sub(1, 16)"#
        ));
        assert_eq!(
            got,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad \
             900150983cd24fb0d6963f7d28e17f72 a9993e364706816aba3e25717850c26c9cd0d89d \
             ddaf35a193617aba"
        );
    }

    #[test]
    fn hmac_matches_rfc_4231() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let got = run(&format!(
            r#"{HEX} local hmac = require("resty.hmac")
            local h = hmac:new("Jefe", hmac.ALGOS.SHA256)
            local a = hex(h:final("what do ya want for nothing?"))
            local b = hmac:new("Jefe", hmac.ALGOS.SHA256):final("what do ya want for nothing?", true)
            local c = hex(require("resty.openssl.mac").new("Jefe", "HMAC", nil, "sha256"):final("what do ya want for nothing?"))
            return a .. " " .. tostring(a == b) .. " " .. tostring(a == c)"#
        ));
        assert_eq!(
            got,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843 true true"
        );
    }

    #[test]
    fn aes_round_trips_and_derives_keys_as_openssl() {
        // `openssl enc -aes-128-cbc -nosalt -k secret -md md5` derives this key and IV.
        let (k, iv) = bytes_to_key(Algo::Md5, b"secret", None, 1, 16, 16);
        assert_eq!(to_hex(&k), "5ebe2294ecd0e0f08eab7690d2a6ee69");
        assert_eq!(to_hex(&iv), "26ae5cc854e36b6bdfca366848dea6bb");
        let got = run(r#"local aes = require("resty.aes")
            local a = aes:new("secret")
            local c = a:encrypt("hello world")
            local g = assert(aes:new(string.rep("k", 32), nil, aes.cipher(256, "gcm"), {iv = string.rep("i", 12)}))
            local gc, tag = g:encrypt("payload")
            local bad = select(2, g:decrypt(gc, string.rep("\0", 16)))
            local iv = assert(aes:new(string.rep("k", 16), nil, aes.cipher(128, "cbc"), {iv = string.rep("v", 16)}))
            return a:decrypt(c) .. "|" .. #c .. "|" .. g:decrypt(gc, tag) .. "|" .. bad .. "|" ..
                iv:decrypt(iv:encrypt("x")) .. "|" .. select(2, aes:new("k", "short"))"#);
        assert_eq!(
            got,
            "hello world|16|payload|bad decrypt|x|salt must be 8 characters or nil"
        );
    }

    #[test]
    fn random_bytes_have_the_asked_length() {
        let got = run(r#"local r = require("resty.random").bytes(16, true)
            local o = require("resty.openssl.rand").bytes(7)
            return #r .. " " .. #o .. " " .. tostring(r ~= require("resty.random").bytes(16))"#);
        assert_eq!(got, "16 7 true");
    }
}
