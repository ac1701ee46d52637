//! APISIX's `data_encryption.keyring`: private keys of `ssls` entries stored encrypted.
//!
//! APISIX encrypts an `ssls` key before it writes it to etcd: AES-CBC (AES-128 for a 16-byte
//! keyring entry, AES-256 for a 32-byte one) with the entry as both key and IV (its first 16
//! bytes, as OpenSSL reads an IV), PKCS#7 padding, base64. A value starting with `---` is a PEM key in clear text and is used as it is. The
//! first entry encrypts; every entry is tried to decrypt, so a keyring can be rotated by putting
//! the new entry first. Reading such values lets etcd data written by APISIX serve here.

use aes::cipher::block_padding::Pkcs7;
use aes::cipher::{BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use base64::Engine;
use serde::{Deserialize, Serialize};

/// `data_encryption:` in the node config.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataEncryption {
    /// Accepted for APISIX's files; plugin `encrypt_fields` are not encrypted by moongate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_encrypt_fields: Option<bool>,
    /// AES keys, 16 or 32 characters each; the first one encrypts.
    #[serde(default)]
    pub keyring: Keyring,
}

/// The keyring: a string or a list of strings of 16 (AES-128) or 32 (AES-256) bytes.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Keyring(pub Vec<String>);

impl<'de> Deserialize<'de> for Keyring {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(String),
            Many(Vec<String>),
        }
        let raw = Raw::deserialize(d)
            .map_err(|_| serde::de::Error::custom("expected a string or a list of strings"))?;
        let keys = match raw {
            Raw::One(k) => vec![k],
            Raw::Many(v) => v,
        };
        for (i, k) in keys.iter().enumerate() {
            if k.len() != 16 && k.len() != 32 {
                return Err(serde::de::Error::custom(format!(
                    "entry {i}: expected a 16 byte (AES-128) or 32 byte (AES-256) key, got {} bytes",
                    k.len()
                )));
            }
        }
        Ok(Keyring(keys))
    }
}

/// Whether `value` is a PEM text rather than an encrypted one (APISIX's test).
pub fn is_clear(value: &str) -> bool {
    value.starts_with("---")
}

impl Keyring {
    /// Encrypts a PEM key with the first entry; anything else (already encrypted, or no
    /// keyring) is returned as it is.
    pub fn encrypt(&self, value: &str) -> String {
        let Some(k) = self.0.first() else {
            return value.to_string();
        };
        if !is_clear(value) {
            return value.to_string();
        }
        let k = k.as_bytes();
        let out = match k.len() {
            16 => cbc::Encryptor::<aes::Aes128>::new_from_slices(k, k)
                .map(|e| e.encrypt_padded_vec_mut::<Pkcs7>(value.as_bytes())),
            _ => cbc::Encryptor::<aes::Aes256>::new_from_slices(k, &k[..16])
                .map(|e| e.encrypt_padded_vec_mut::<Pkcs7>(value.as_bytes())),
        };
        match out {
            Ok(bytes) => base64::engine::general_purpose::STANDARD.encode(bytes),
            Err(_) => value.to_string(),
        }
    }

    /// The PEM text of a stored key: clear text as it is, else decrypted with the first entry
    /// that can. The errors are APISIX's.
    pub fn decrypt(&self, value: &str) -> Result<String, String> {
        if is_clear(value) {
            return Ok(value.to_string());
        }
        if self.0.is_empty() {
            return Err(
                "failed to parse key: not a PEM key (a key APISIX encrypted needs its data_encryption.keyring)"
                    .to_string(),
            );
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(value.trim())
            .map_err(|_| {
                "failed to decrypt previous encrypted key: base64 decode ssl key failed"
            })?;
        for k in &self.0 {
            let k = k.as_bytes();
            let plain = match k.len() {
                16 => cbc::Decryptor::<aes::Aes128>::new_from_slices(k, k)
                    .ok()
                    .and_then(|d| d.decrypt_padded_vec_mut::<Pkcs7>(&bytes).ok()),
                _ => cbc::Decryptor::<aes::Aes256>::new_from_slices(k, &k[..16])
                    .ok()
                    .and_then(|d| d.decrypt_padded_vec_mut::<Pkcs7>(&bytes).ok()),
            };
            if let Some(text) = plain.and_then(|p| String::from_utf8(p).ok()) {
                return Ok(text);
            }
        }
        Err("failed to decrypt previous encrypted key: decrypt ssl key failed".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rotation() {
        let old = Keyring(vec!["qeddd145sfvddff3".into()]);
        let pem = "-----BEGIN PRIVATE KEY-----\nabc\n-----END PRIVATE KEY-----\n";
        let enc = old.encrypt(pem);
        assert!(!is_clear(&enc));
        assert_eq!(old.encrypt(&enc), enc, "already encrypted stays");
        assert_eq!(old.decrypt(&enc).unwrap(), pem);
        let rotated = Keyring(vec![
            "0123456789abcdef0123456789abcdef".into(),
            "qeddd145sfvddff3".into(),
        ]);
        assert_eq!(rotated.decrypt(&enc).unwrap(), pem);
        let enc256 = rotated.encrypt(pem);
        assert_eq!(rotated.decrypt(&enc256).unwrap(), pem);
        assert!(old
            .decrypt(&enc256)
            .unwrap_err()
            .contains("decrypt ssl key failed"));
        assert!(Keyring::default().decrypt(&enc).is_err());
        assert_eq!(Keyring::default().encrypt(pem), pem);
    }

    /// The same value lua-resty-string's `aes:new(k, nil, aes.cipher(128, "cbc"), {iv = k})`
    /// gives for "hello" (computed with `openssl enc -aes-128-cbc -K .. -iv ..`).
    #[test]
    fn matches_openssl() {
        let k = Keyring(vec!["qeddd145sfvddff3".into()]);
        let out = std::process::Command::new("openssl")
            .args([
                "enc",
                "-aes-128-cbc",
                "-base64",
                "-K",
                "71656464643134357366766464666633",
                "-iv",
                "71656464643134357366766464666633",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(b"---hello")?;
                c.wait_with_output()
            })
            .expect("run openssl");
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert_eq!(k.encrypt("---hello"), text);
        assert_eq!(k.decrypt(&text).unwrap(), "---hello");
    }
}
