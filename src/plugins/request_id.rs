//! `request-id`: APISIX's plugin of that name. Gives every request an id in a header
//! (`X-Request-Id` by default): the client's own when it sent one, else a new one from the
//! configured algorithm. The id goes upstream, back in the response (`include_in_response`),
//! and into `ctx.var.apisix_request_id` for later plugins and the access log.
//!
//! ```yaml
//! plugins:
//!   request-id:
//!     header_name: X-Request-Id      # the default
//!     include_in_response: true      # the default
//!     algorithm: uuid                # uuid, uuidv7, nanoid, range_id, ksuid
//!     range_id: {char_set: abcdef0123456789, length: 16}
//! ```

use std::any::Any;
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use http::header::{HeaderName, HeaderValue};
use serde_json::{json, Value};

use crate::plugin::{
    ConfScope, Ctx, Flow, Phase, PhaseCall, PhaseResult, PhaseSet, Plugin, PluginConf,
    ResponseHead, Schema,
};

pub struct RequestId;

const NAME: &str = "request-id";

/// APISIX's default `range_id.char_set` (with its `IGK` for `IJK`, kept so ids look the same).
const DEFAULT_CHAR_SET: &str = "abcdefghijklmnopqrstuvwxyzABCDEFGHIGKLMNOPQRSTUVWXYZ0123456789";

fn schema() -> &'static Schema {
    static S: OnceLock<Schema> = OnceLock::new();
    S.get_or_init(|| {
        Schema::compile(&json!({
            "type": "object",
            "properties": {
                "header_name": {"type": "string", "default": "X-Request-Id"},
                "include_in_response": {"type": "boolean", "default": true},
                "algorithm": {
                    "type": "string",
                    "enum": ["uuid", "nanoid", "range_id", "ksuid", "uuidv7"],
                    "default": "uuid"
                },
                "range_id": {
                    "type": "object",
                    "properties": {
                        "length": {"type": "integer", "minimum": 6, "default": 16},
                        "char_set": {"type": "string", "minLength": 6, "default": DEFAULT_CHAR_SET}
                    },
                    "default": {"length": 16, "char_set": DEFAULT_CHAR_SET}
                }
            }
        }))
        .expect("the request-id schema compiles")
    })
}

#[derive(Debug, Clone, PartialEq)]
enum Algorithm {
    Uuid,
    UuidV7,
    Nanoid,
    RangeId { char_set: Vec<u8>, length: usize },
    Ksuid,
}

/// The compiled conf.
#[derive(Debug)]
struct Conf {
    header: HeaderName,
    include_in_response: bool,
    algorithm: Algorithm,
}

/// The ids this request got, per header name (a global rule and a route may both set one).
#[derive(Default)]
struct Ids(Vec<(HeaderName, HeaderValue)>);

/// Fills `buf` with random bytes from the operating system.
fn random(buf: &mut [u8]) {
    // getrandom fails only where the OS has no random source at all; the id then still
    // differs per request through the time-based fallback.
    if getrandom::fill(buf).is_err() {
        let mut x = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        for b in buf {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }
}

/// The standard nanoid: 21 characters of a 64-character alphabet, 6 random bits each.
fn nanoid() -> String {
    const ALPHABET: &[u8; 64] = b"-_0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let mut bytes = [0u8; 21];
    random(&mut bytes);
    bytes
        .iter()
        .map(|b| ALPHABET[usize::from(b & 63)] as char)
        .collect()
}

/// `length` characters drawn uniformly from `char_set` (rejection sampling: no modulo bias).
fn range_id(char_set: &[u8], length: usize) -> String {
    let n = char_set.len();
    // The largest multiple of n that fits in a byte: bytes at or above it are redrawn.
    let limit = 256 - 256 % n;
    let mut out = String::with_capacity(length);
    let mut buf = [0u8; 64];
    while out.len() < length {
        random(&mut buf);
        for &b in &buf {
            if usize::from(b) < limit && out.len() < length {
                out.push(char_set[usize::from(b) % n] as char);
            }
        }
    }
    out
}

/// A KSUID: 4 bytes of seconds since 2014-05-13 and 16 random bytes, 27 base62 digits.
fn ksuid() -> String {
    const EPOCH: u64 = 1_400_000_000;
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        .saturating_sub(EPOCH) as u32;
    let mut payload = [0u8; 16];
    random(&mut payload);
    ksuid_of(secs, &payload)
}

/// The KSUID of a timestamp and payload.
fn ksuid_of(secs: u32, payload: &[u8; 16]) -> String {
    const DIGITS: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut n = [0u8; 20];
    n[..4].copy_from_slice(&secs.to_be_bytes());
    n[4..].copy_from_slice(payload);
    // Base62 by long division of the 160-bit big-endian number.
    let mut out = [b'0'; 27];
    for slot in out.iter_mut().rev() {
        let mut rem = 0u32;
        for byte in n.iter_mut() {
            let acc = (rem << 8) | u32::from(*byte);
            *byte = (acc / 62) as u8;
            rem = acc % 62;
        }
        *slot = DIGITS[rem as usize];
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Algorithm {
    fn generate(&self) -> String {
        match self {
            Algorithm::Uuid => uuid::Uuid::new_v4().hyphenated().to_string(),
            Algorithm::UuidV7 => uuid::Uuid::now_v7().hyphenated().to_string(),
            Algorithm::Nanoid => nanoid(),
            Algorithm::RangeId { char_set, length } => range_id(char_set, *length),
            Algorithm::Ksuid => ksuid(),
        }
    }
}

impl RequestId {
    /// rewrite: keeps the client's id or makes one; never waits.
    fn rewrite_now(&self, conf: &PluginConf, ctx: &mut Ctx) -> PhaseResult {
        let Some(c) = conf.compiled::<Conf>() else {
            return Err(crate::plugin::PluginError::new(
                NAME,
                Phase::Rewrite,
                "conf was not compiled",
            ));
        };
        let sent = ctx
            .headers
            .get(&c.header)
            .filter(|v| !v.is_empty())
            .cloned();
        let value = match sent {
            Some(v) => v,
            None => {
                let id = c.algorithm.generate();
                // Every algorithm's alphabet is visible ASCII; a char_set is checked so too.
                let v = HeaderValue::from_str(&id).map_err(|_| {
                    crate::plugin::PluginError::new(NAME, Phase::Rewrite, "invalid id")
                })?;
                ctx.headers.insert(c.header.clone(), v.clone());
                v
            }
        };
        ctx.vars.insert(
            "apisix_request_id".to_string(),
            String::from_utf8_lossy(value.as_bytes()).into_owned(),
        );
        if c.include_in_response {
            let ids = match ctx.data_mut::<Ids>() {
                Some(ids) => ids,
                None => {
                    ctx.set_data(Ids::default());
                    ctx.data_mut::<Ids>().expect("just set")
                }
            };
            ids.0.retain(|(h, _)| h != c.header);
            ids.0.push((c.header.clone(), value));
        }
        Ok(Flow::Continue)
    }
}

#[async_trait(?Send)]
impl Plugin for RequestId {
    fn name(&self) -> &str {
        NAME
    }

    fn priority(&self) -> i64 {
        12015
    }

    fn schema(&self) -> &Schema {
        schema()
    }

    fn check_conf(
        &self,
        conf: &mut Value,
        _scope: ConfScope,
    ) -> Result<Arc<dyn Any + Send + Sync>, String> {
        self.schema().check(conf)?;
        let name = conf["header_name"].as_str().unwrap_or("X-Request-Id");
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("invalid header_name \"{name}\""))?;
        let algorithm = match conf["algorithm"].as_str().unwrap_or("uuid") {
            "nanoid" => Algorithm::Nanoid,
            "uuidv7" => Algorithm::UuidV7,
            "ksuid" => Algorithm::Ksuid,
            "range_id" => {
                let r = &conf["range_id"];
                let char_set = r["char_set"].as_str().unwrap_or(DEFAULT_CHAR_SET);
                if !char_set.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(
                        "property \"range_id.char_set\" must hold visible ASCII characters only"
                            .into(),
                    );
                }
                Algorithm::RangeId {
                    char_set: char_set.as_bytes().to_vec(),
                    length: r["length"].as_u64().unwrap_or(16) as usize,
                }
            }
            _ => Algorithm::Uuid,
        };
        Ok(Arc::new(Conf {
            header,
            include_in_response: conf["include_in_response"].as_bool().unwrap_or(true),
            algorithm,
        }))
    }

    fn phases(&self) -> PhaseSet {
        PhaseSet::empty()
            .with(Phase::Rewrite)
            .with(Phase::HeaderFilter)
    }

    async fn rewrite(&self, conf: &PluginConf, ctx: &mut Ctx) -> PhaseResult {
        self.rewrite_now(conf, ctx)
    }

    /// The rewrite never waits: no boxed future for it.
    fn start_phase<'a>(
        &'a self,
        phase: Phase,
        conf: &'a PluginConf,
        ctx: &'a mut Ctx,
    ) -> PhaseCall<'a> {
        match phase {
            Phase::Rewrite => PhaseCall::Ready(self.rewrite_now(conf, ctx)),
            _ => PhaseCall::Ready(Ok(Flow::Continue)),
        }
    }

    /// Puts the id in the response unless the response has that header already.
    fn header_filter(
        &self,
        conf: &PluginConf,
        ctx: &mut Ctx,
        head: &mut ResponseHead,
    ) -> Result<(), crate::plugin::PluginError> {
        let Some(c) = conf.compiled::<Conf>() else {
            return Ok(());
        };
        if !c.include_in_response {
            return Ok(());
        }
        if head.headers.get(&c.header).is_some_and(|v| !v.is_empty()) {
            return Ok(());
        }
        if let Some((_, v)) = ctx
            .data::<Ids>()
            .and_then(|ids| ids.0.iter().find(|(h, _)| *h == c.header))
        {
            head.headers.insert(c.header.clone(), v.clone());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_their_algorithms_shapes() {
        let n = nanoid();
        assert_eq!(n.len(), 21);
        assert!(n
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        let r = range_id(b"abc", 40);
        assert_eq!(r.len(), 40);
        assert!(r.bytes().all(|b| b"abc".contains(&b)));
        let k = ksuid();
        assert_eq!(k.len(), 27);
        assert!(k.bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_ne!(ksuid(), ksuid());
        assert_ne!(nanoid(), nanoid());
    }

    #[test]
    fn ksuid_matches_the_reference_encoding() {
        // The example in segmentio/ksuid's README.
        let payload = [
            0xB5, 0xA1, 0xCD, 0x34, 0xB5, 0xF9, 0x9D, 0x11, 0x54, 0xFB, 0x68, 0x53, 0x34, 0x5C,
            0x97, 0x35,
        ];
        assert_eq!(
            ksuid_of(107_608_047, &payload),
            "0ujtsYcgvSTl8PAuAdqWYSMnLOv"
        );
    }
}
