//! lua-resty-openssl's `resty.openssl.pkey` on ring: keys read from PEM or DER (public keys as
//! SubjectPublicKeyInfo or PKCS#1; private keys as PKCS#8, PKCS#1 or SEC1), signatures made and
//! checked with RSA PKCS#1 v1.5 and PSS (SHA-256/384/512), ECDSA P-256 and P-384 (DER or raw
//! `r||s` with `ecdsa_use_raw`) and Ed25519, and the public half written as a JWK
//! (`resty.openssl.auxiliary.jwk`'s `dump_jwk`, which openid-connect's DPoP check calls). This
//! is what `jwt-auth` and other APISIX plugins call. Not provided: key generation, encryption, P-521, and signing a digest object (ring
//! signs messages, not precomputed hashes): those answer `nil, err`.

use base64::Engine;
use mlua::{Lua, MultiValue, Table, UserData, UserDataMethods, Value};
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair, UnparsedPublicKey};

/// lua-resty-openssl's `pkey.PADDINGS` values (OpenSSL's numbers).
const RSA_PKCS1_PADDING: i64 = 1;
const RSA_PKCS1_PSS_PADDING: i64 = 6;

/// What a key is, after parsing: enough to build ring's signer or verifier per call.
enum Key {
    RsaPrivate(RsaKeyPair),
    /// PKCS#1 `RSAPublicKey` DER.
    RsaPublic(Vec<u8>),
    /// PKCS#8 DER (ring builds the signer for the digest and encoding asked for).
    EcPrivate {
        curve: Curve,
        pkcs8: Vec<u8>,
        public: Vec<u8>,
    },
    /// The uncompressed point.
    EcPublic {
        curve: Curve,
        point: Vec<u8>,
    },
    Ed25519Private(Ed25519KeyPair),
    Ed25519Public(Vec<u8>),
}

#[derive(Clone, Copy, PartialEq)]
enum Curve {
    P256,
    P384,
}

const OID_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const OID_EC: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];
const OID_ED25519: &[u8] = &[0x2b, 0x65, 0x70];

/// One DER element: (tag, contents, what follows). Definite lengths only, as DER requires.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |a, &b| (a << 8) | b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The algorithm OID and its parameter OID (the curve, for EC) of an AlgorithmIdentifier.
fn algorithm(seq: &[u8]) -> Option<(&[u8], Option<&[u8]>)> {
    let (tag, oid, rest) = tlv(seq)?;
    if tag != 0x06 {
        return None;
    }
    let param = tlv(rest).filter(|(t, _, _)| *t == 0x06).map(|(_, p, _)| p);
    Some((oid, param))
}

fn curve_of(oid: Option<&[u8]>) -> Result<Curve, String> {
    match oid {
        Some(OID_P256) => Ok(Curve::P256),
        Some(OID_P384) => Ok(Curve::P384),
        _ => Err("unsupported EC curve (P-256 and P-384 are)".into()),
    }
}

/// A SubjectPublicKeyInfo.
fn public_from_spki(der: &[u8]) -> Result<Key, String> {
    let bad = || "invalid public key".to_string();
    let (_, body, _) = tlv(der).filter(|(t, _, _)| *t == 0x30).ok_or_else(bad)?;
    let (_, alg, rest) = tlv(body).filter(|(t, _, _)| *t == 0x30).ok_or_else(bad)?;
    let (_, bits, _) = tlv(rest).filter(|(t, _, _)| *t == 0x03).ok_or_else(bad)?;
    let key = bits.get(1..).ok_or_else(bad)?.to_vec();
    let (oid, param) = algorithm(alg).ok_or_else(bad)?;
    match oid {
        OID_RSA => Ok(Key::RsaPublic(key)),
        OID_EC => Ok(Key::EcPublic {
            curve: curve_of(param)?,
            point: key,
        }),
        OID_ED25519 => Ok(Key::Ed25519Public(key)),
        _ => Err("unsupported public key type".into()),
    }
}

/// A PKCS#8 PrivateKeyInfo.
fn private_from_pkcs8(der: &[u8]) -> Result<Key, String> {
    let bad = || "invalid private key".to_string();
    let (_, body, _) = tlv(der).filter(|(t, _, _)| *t == 0x30).ok_or_else(bad)?;
    let (_, _version, rest) = tlv(body).ok_or_else(bad)?;
    let (_, alg, _) = tlv(rest).filter(|(t, _, _)| *t == 0x30).ok_or_else(bad)?;
    let (oid, param) = algorithm(alg).ok_or_else(bad)?;
    match oid {
        OID_RSA => RsaKeyPair::from_pkcs8(der)
            .map(Key::RsaPrivate)
            .map_err(|e| format!("invalid RSA private key: {e}")),
        OID_EC => {
            let curve = curve_of(param)?;
            let kp = EcdsaKeyPair::from_pkcs8(ecdsa_alg(curve, true), der, &SystemRandom::new())
                .map_err(|e| format!("invalid EC private key: {e}"))?;
            Ok(Key::EcPrivate {
                curve,
                public: kp.public_key().as_ref().to_vec(),
                pkcs8: der.to_vec(),
            })
        }
        OID_ED25519 => Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map(Key::Ed25519Private)
            .map_err(|e| format!("invalid Ed25519 private key: {e}")),
        _ => Err("unsupported private key type".into()),
    }
}

/// A SEC1 ECPrivateKey (`EC PRIVATE KEY`), rewrapped as PKCS#8 for ring.
fn private_from_sec1(der: &[u8]) -> Result<Key, String> {
    let bad = || "invalid EC private key".to_string();
    let (_, body, _) = tlv(der).filter(|(t, _, _)| *t == 0x30).ok_or_else(bad)?;
    let mut rest = body;
    let mut curve = None;
    while let Some((tag, content, next)) = tlv(rest) {
        if tag == 0xa0 {
            curve = tlv(content).map(|(_, oid, _)| oid);
        }
        rest = next;
    }
    let curve_oid = curve.ok_or_else(bad)?;
    curve_of(Some(curve_oid))?;
    // PrivateKeyInfo { version 0, AlgorithmIdentifier { id-ecPublicKey, curve }, OCTET STRING
    // { the SEC1 key } }.
    let mut alg = der_elem(0x06, OID_EC);
    alg.extend(der_elem(0x06, curve_oid));
    let mut info = der_elem(0x02, &[0]);
    info.extend(der_elem(0x30, &alg));
    info.extend(der_elem(0x04, der));
    private_from_pkcs8(&der_elem(0x30, &info))
}

fn der_elem(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let n = content.len();
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let bytes: Vec<u8> = n
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(content);
    out
}

/// The label and DER of the first PEM block in `text`.
fn pem_block(text: &str) -> Option<(String, Vec<u8>)> {
    let start = text.find("-----BEGIN ")?;
    let after = &text[start + 11..];
    let label_end = after.find("-----")?;
    let label = after[..label_end].to_string();
    let body = &after[label_end + 5..];
    let end = body.find(&format!("-----END {label}-----"))?;
    let b64: String = body[..end].chars().filter(|c| !c.is_whitespace()).collect();
    let der = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    Some((label, der))
}

/// One way of reading a DER key.
type KeyReader = fn(&[u8]) -> Result<Key, String>;

/// `pkey.new(text, opts)`: PEM (any of the key labels) or DER, public or private.
fn parse_key(input: &[u8], want: Option<&str>) -> Result<Key, String> {
    let as_text = std::str::from_utf8(input).ok();
    if let Some((label, der)) = as_text.and_then(pem_block) {
        return match label.as_str() {
            "PUBLIC KEY" => public_from_spki(&der),
            "RSA PUBLIC KEY" => Ok(Key::RsaPublic(der)),
            "PRIVATE KEY" => private_from_pkcs8(&der),
            "RSA PRIVATE KEY" => RsaKeyPair::from_der(&der)
                .map(Key::RsaPrivate)
                .map_err(|e| format!("invalid RSA private key: {e}")),
            "EC PRIVATE KEY" => private_from_sec1(&der),
            "ENCRYPTED PRIVATE KEY" => Err("encrypted private keys are not supported".into()),
            other => Err(format!("unsupported PEM block \"{other}\"")),
        };
    }
    // DER: try what the caller said, else public first, then the private forms.
    let tries: &[KeyReader] = match want {
        Some("pu") => &[public_from_spki],
        Some("pr") => &[private_from_pkcs8, private_from_sec1],
        _ => &[public_from_spki, private_from_pkcs8, private_from_sec1],
    };
    for f in tries {
        if let Ok(k) = f(input) {
            return Ok(k);
        }
    }
    Err("could not read a key from the input (PEM or DER expected)".into())
}

fn ecdsa_alg(curve: Curve, raw: bool) -> &'static signature::EcdsaSigningAlgorithm {
    match (curve, raw) {
        (Curve::P256, true) => &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        (Curve::P256, false) => &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        (Curve::P384, true) => &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
        (Curve::P384, false) => &signature::ECDSA_P384_SHA384_ASN1_SIGNING,
    }
}

/// The ECDSA verifier for a curve, digest and encoding ring offers.
fn ecdsa_verify_alg(
    curve: Curve,
    md: &str,
    raw: bool,
) -> Result<&'static signature::EcdsaVerificationAlgorithm, String> {
    Ok(match (curve, md, raw) {
        (Curve::P256, "sha256", true) => &signature::ECDSA_P256_SHA256_FIXED,
        (Curve::P256, "sha256", false) => &signature::ECDSA_P256_SHA256_ASN1,
        (Curve::P256, "sha384", false) => &signature::ECDSA_P256_SHA384_ASN1,
        (Curve::P384, "sha384", true) => &signature::ECDSA_P384_SHA384_FIXED,
        (Curve::P384, "sha384", false) => &signature::ECDSA_P384_SHA384_ASN1,
        (Curve::P384, "sha256", false) => &signature::ECDSA_P384_SHA256_ASN1,
        _ => return Err(format!("unsupported digest {md} for this EC key")),
    })
}

fn rsa_sign_alg(md: &str, pss: bool) -> Result<&'static dyn signature::RsaEncoding, String> {
    Ok(match (md, pss) {
        ("sha256", false) => &signature::RSA_PKCS1_SHA256,
        ("sha384", false) => &signature::RSA_PKCS1_SHA384,
        ("sha512", false) => &signature::RSA_PKCS1_SHA512,
        ("sha256", true) => &signature::RSA_PSS_SHA256,
        ("sha384", true) => &signature::RSA_PSS_SHA384,
        ("sha512", true) => &signature::RSA_PSS_SHA512,
        _ => return Err(format!("unsupported digest {md} for RSA")),
    })
}

fn rsa_verify_alg(md: &str, pss: bool) -> Result<&'static signature::RsaParameters, String> {
    Ok(match (md, pss) {
        ("sha256", false) => &signature::RSA_PKCS1_2048_8192_SHA256,
        ("sha384", false) => &signature::RSA_PKCS1_2048_8192_SHA384,
        ("sha512", false) => &signature::RSA_PKCS1_2048_8192_SHA512,
        ("sha256", true) => &signature::RSA_PSS_2048_8192_SHA256,
        ("sha384", true) => &signature::RSA_PSS_2048_8192_SHA384,
        ("sha512", true) => &signature::RSA_PSS_2048_8192_SHA512,
        _ => return Err(format!("unsupported digest {md} for RSA")),
    })
}

/// How a call signs or verifies: digest name, PSS or not, raw ECDSA or not.
struct Mode {
    md: String,
    pss: bool,
    raw: bool,
}

impl Mode {
    fn from_args(
        md: Option<String>,
        padding: Option<i64>,
        opts: Option<Table>,
    ) -> Result<Mode, String> {
        let pss = match padding {
            None | Some(RSA_PKCS1_PADDING) => false,
            Some(RSA_PKCS1_PSS_PADDING) => true,
            Some(p) => return Err(format!("unsupported padding {p}")),
        };
        let raw = opts
            .and_then(|t| t.get::<Option<bool>>("ecdsa_use_raw").ok().flatten())
            .unwrap_or(false);
        Ok(Mode {
            md: md.unwrap_or_else(|| "sha256".into()).to_ascii_lowercase(),
            pss,
            raw,
        })
    }
}

impl Key {
    fn is_private(&self) -> bool {
        matches!(
            self,
            Key::RsaPrivate(_) | Key::EcPrivate { .. } | Key::Ed25519Private(_)
        )
    }

    fn type_name(&self) -> (&'static str, &'static str, i64) {
        // (short name, long name, OpenSSL NID), as `get_key_type()` answers.
        match self {
            Key::RsaPrivate(_) | Key::RsaPublic(_) => ("rsaEncryption", "rsaEncryption", 6),
            Key::EcPrivate { .. } | Key::EcPublic { .. } => {
                ("id-ecPublicKey", "id-ecPublicKey", 408)
            }
            Key::Ed25519Private(_) | Key::Ed25519Public(_) => ("ED25519", "ED25519", 1087),
        }
    }

    /// The public half as a JWK (RFC 7517/7518/8037), members in lua-resty-openssl's order.
    fn public_jwk(&self) -> Result<String, String> {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
        let rsa = |der: &[u8]| -> Result<String, String> {
            let bad = || "invalid RSA public key".to_string();
            let (_, seq, _) = tlv(der).ok_or_else(bad)?;
            let (_, n, rest) = tlv(seq).ok_or_else(bad)?;
            let (_, e, _) = tlv(rest).ok_or_else(bad)?;
            let strip = |v: &[u8]| -> Vec<u8> {
                let start = v.iter().position(|&b| b != 0).unwrap_or(v.len());
                v[start..].to_vec()
            };
            Ok(format!(
                r#"{{"kty":"RSA","n":"{}","e":"{}"}}"#,
                B64.encode(strip(n)),
                B64.encode(strip(e))
            ))
        };
        let ec = |curve: Curve, point: &[u8]| -> Result<String, String> {
            let size = if curve == Curve::P256 { 32 } else { 48 };
            if point.len() != 1 + 2 * size || point[0] != 4 {
                return Err("invalid EC public key".into());
            }
            let crv = if curve == Curve::P256 {
                "P-256"
            } else {
                "P-384"
            };
            Ok(format!(
                r#"{{"kty":"EC","crv":"{crv}","x":"{}","y":"{}"}}"#,
                B64.encode(&point[1..1 + size]),
                B64.encode(&point[1 + size..])
            ))
        };
        let okp = |k: &[u8]| format!(r#"{{"kty":"OKP","crv":"Ed25519","x":"{}"}}"#, B64.encode(k));
        match self {
            Key::RsaPrivate(kp) => rsa(kp.public().as_ref()),
            Key::RsaPublic(der) => rsa(der),
            Key::EcPrivate { curve, public, .. } => ec(*curve, public),
            Key::EcPublic { curve, point } => ec(*curve, point),
            Key::Ed25519Private(kp) => Ok(okp(kp.public_key().as_ref())),
            Key::Ed25519Public(k) => Ok(okp(k)),
        }
    }

    fn sign(&self, data: &[u8], m: &Mode) -> Result<Vec<u8>, String> {
        let rng = SystemRandom::new();
        match self {
            Key::RsaPrivate(kp) => {
                let mut sig = vec![0; kp.public().modulus_len()];
                kp.sign(rsa_sign_alg(&m.md, m.pss)?, &rng, data, &mut sig)
                    .map_err(|_| "RSA signing failed".to_string())?;
                Ok(sig)
            }
            Key::EcPrivate { curve, pkcs8, .. } => {
                let want = if *curve == Curve::P256 {
                    "sha256"
                } else {
                    "sha384"
                };
                if m.md != want {
                    return Err(format!("unsupported digest {} for this EC key", m.md));
                }
                let kp = EcdsaKeyPair::from_pkcs8(ecdsa_alg(*curve, m.raw), pkcs8, &rng)
                    .map_err(|e| format!("invalid EC private key: {e}"))?;
                kp.sign(&rng, data)
                    .map(|s| s.as_ref().to_vec())
                    .map_err(|_| "ECDSA signing failed".to_string())
            }
            Key::Ed25519Private(kp) => Ok(kp.sign(data).as_ref().to_vec()),
            _ => Err("signing needs a private key".into()),
        }
    }

    fn verify(&self, sig: &[u8], data: &[u8], m: &Mode) -> Result<bool, String> {
        // Every kind verifies with its public half: pick the algorithm and those bytes once.
        let (alg, public): (&'static dyn signature::VerificationAlgorithm, &[u8]) = match self {
            Key::RsaPrivate(kp) => (rsa_verify_alg(&m.md, m.pss)?, kp.public().as_ref()),
            Key::RsaPublic(der) => (rsa_verify_alg(&m.md, m.pss)?, der),
            Key::EcPrivate { curve, public, .. } => {
                (ecdsa_verify_alg(*curve, &m.md, m.raw)?, public)
            }
            Key::EcPublic { curve, point } => (ecdsa_verify_alg(*curve, &m.md, m.raw)?, point),
            Key::Ed25519Private(kp) => (&signature::ED25519, kp.public_key().as_ref()),
            Key::Ed25519Public(k) => (&signature::ED25519, k),
        };
        Ok(UnparsedPublicKey::new(alg, public)
            .verify(data, sig)
            .is_ok())
    }
}

struct PKey(Key);

/// `nil, "pkey:NAME: MSG"`, lua-resty-openssl's error shape.
fn fail(lua: &Lua, what: &str, msg: &str) -> mlua::Result<(Value, Value)> {
    Ok((
        Value::Nil,
        Value::String(lua.create_string(format!("pkey:{what}: {msg}"))?),
    ))
}

/// The message to sign or verify: a string. A digest object (lua-resty-openssl signs its
/// hash) is refused: ring signs messages.
fn message(v: &Value) -> Result<Vec<u8>, String> {
    match v {
        Value::String(s) => Ok(s.as_bytes().to_vec()),
        Value::UserData(_) => {
            Err("signing or verifying a digest object is not supported: pass the data".into())
        }
        other => Err(format!("expected a string, got {}", other.type_name())),
    }
}

impl UserData for PKey {
    fn add_methods<M: UserDataMethods<Self>>(m: &mut M) {
        m.add_method(
            "sign",
            |lua, this, (data, md, padding, opts): (Value, Option<String>, Option<i64>, Option<Table>)| {
                let r = message(&data)
                    .and_then(|d| Mode::from_args(md, padding, opts).map(|m| (d, m)))
                    .and_then(|(d, m)| this.0.sign(&d, &m));
                match r {
                    Ok(sig) => Ok((Value::String(lua.create_string(sig)?), Value::Nil)),
                    Err(e) => fail(lua, "sign", &e),
                }
            },
        );
        m.add_method(
            "verify",
            |lua,
             this,
             (sig, data, md, padding, opts): (
                mlua::String,
                Value,
                Option<String>,
                Option<i64>,
                Option<Table>,
            )| {
                let r = message(&data)
                    .and_then(|d| Mode::from_args(md, padding, opts).map(|m| (d, m)))
                    .and_then(|(d, m)| this.0.verify(&sig.as_bytes(), &d, &m));
                match r {
                    Ok(ok) => Ok((Value::Boolean(ok), Value::Nil)),
                    Err(e) => fail(lua, "verify", &e),
                }
            },
        );
        m.add_method("is_private", |_, this, ()| Ok(this.0.is_private()));
        m.add_method(
            "tostring",
            |lua, this, (which, fmt): (Option<String>, Option<String>)| {
                // Only the JWK form of the public half is written (auxiliary.jwk's dump_jwk).
                if which.as_deref().unwrap_or("public") != "public"
                    || !fmt.as_deref().unwrap_or("JWK").eq_ignore_ascii_case("JWK")
                {
                    return fail(lua, "tostring", "only the public key as JWK is supported");
                }
                match this.0.public_jwk() {
                    Ok(j) => Ok((Value::String(lua.create_string(j)?), Value::Nil)),
                    Err(e) => fail(lua, "tostring", &e),
                }
            },
        );
        m.add_method("get_key_type", |lua, this, ()| {
            let (sn, ln, id) = this.0.type_name();
            let t = lua.create_table()?;
            t.set("sn", sn)?;
            t.set("ln", ln)?;
            t.set("id", id)?;
            Ok(t)
        });
    }
}

fn pkey_module(lua: &Lua) -> mlua::Result<Table> {
    let m = lua.create_table()?;
    let paddings = lua.create_table()?;
    paddings.set("RSA_PKCS1_PADDING", RSA_PKCS1_PADDING)?;
    paddings.set("RSA_PKCS1_PSS_PADDING", RSA_PKCS1_PSS_PADDING)?;
    m.set("PADDINGS", paddings)?;
    m.set(
        "new",
        lua.create_function(|lua, (key, opts): (Value, Option<Table>)| {
            let Value::String(key) = key else {
                return fail(
                    lua,
                    "new",
                    "generating keys is not supported: pass a PEM or DER key",
                );
            };
            let want: Option<String> = opts.and_then(|t| t.get("type").ok().flatten());
            match parse_key(&key.as_bytes(), want.as_deref()) {
                Ok(k) => Ok((Value::UserData(lua.create_userdata(PKey(k))?), Value::Nil)),
                Err(e) => fail(lua, "new", &e),
            }
        })?,
    )?;
    m.set(
        "istype",
        lua.create_function(|_, v: Value| Ok(matches!(v, Value::UserData(ud) if ud.is::<PKey>())))?,
    )?;
    Ok(m)
}

/// `resty.openssl.auxiliary.jwk`: `dump_jwk(pkey, is_priv)` writes a key's public half as JWK
/// JSON. Private members (`is_priv` true) and `load_jwk` are not provided: they answer
/// `nil, err` (lua-resty-openssl raises nothing there either).
fn jwk_module(lua: &Lua) -> mlua::Result<Table> {
    let m = lua.create_table()?;
    m.set(
        "dump_jwk",
        lua.create_function(|lua, (key, is_priv): (mlua::AnyUserData, Option<bool>)| {
            if is_priv == Some(true) {
                return Ok((
                    Value::Nil,
                    Value::String(
                        lua.create_string(
                            "jwk.dump_jwk: writing private members is not supported",
                        )?,
                    ),
                ));
            }
            let key = key.borrow::<PKey>()?;
            match key.0.public_jwk() {
                Ok(j) => Ok((Value::String(lua.create_string(j)?), Value::Nil)),
                Err(e) => Ok((
                    Value::Nil,
                    Value::String(lua.create_string(format!("jwk.dump_jwk: {e}"))?),
                )),
            }
        })?,
    )?;
    m.set(
        "load_jwk",
        lua.create_function(|lua, _: MultiValue| {
            Ok((
                Value::Nil,
                Value::String(lua.create_string("jwk.load_jwk: reading JWKs is not supported")?),
            ))
        })?,
    )?;
    Ok(m)
}

/// `ngx.base64`: the URL-safe codec of lua-resty-core (no padding on encode; decode accepts
/// input with or without it and answers `nil, "invalid input"` otherwise).
fn base64_module(lua: &Lua) -> mlua::Result<Table> {
    use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
    let m = lua.create_table()?;
    m.set(
        "encode_base64url",
        lua.create_function(|lua, s: mlua::String| {
            lua.create_string(URL_SAFE_NO_PAD.encode(s.as_bytes()))
        })?,
    )?;
    m.set(
        "decode_base64url",
        lua.create_function(|lua, s: mlua::String| {
            let b = s.as_bytes();
            let r = if b.ends_with(b"=") {
                URL_SAFE.decode(&*b)
            } else {
                URL_SAFE_NO_PAD.decode(&*b)
            };
            match r {
                Ok(v) => Ok((Value::String(lua.create_string(v)?), Value::Nil)),
                Err(_) => Ok((
                    Value::Nil,
                    Value::String(lua.create_string("invalid input")?),
                )),
            }
        })?,
    )?;
    Ok(m)
}

pub(crate) fn install(lua: &Lua, preload: &Table) -> mlua::Result<()> {
    preload.set(
        "resty.openssl.pkey",
        lua.create_function(|lua, _: MultiValue| pkey_module(lua))?,
    )?;
    preload.set(
        "resty.openssl.auxiliary.jwk",
        lua.create_function(|lua, _: MultiValue| jwk_module(lua))?,
    )?;
    preload.set(
        "ngx.base64",
        lua.create_function(|lua, _: MultiValue| base64_module(lua))?,
    )?;
    Ok(())
}
