//! A small, fast, non-cryptographic hasher for the router's lookup tables.
//!
//! The tables hold only keys from the configuration and are never grown by
//! requests, so a request cannot degrade them by choosing colliding keys; a
//! keyed SipHash would only cost time on every lookup.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// `HashMap` with [`FastHasher`].
pub(crate) type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;

const K: u64 = 0xf135_7aea_2e62_a9c5;

/// Multiply-rotate hash over 8-byte words, with a final avalanche so both
/// the low bits (bucket) and the top bits (hashbrown's tag) are mixed.
#[derive(Default, Clone, Copy)]
pub(crate) struct FastHasher(u64);

impl FastHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0 ^ word).wrapping_mul(K).rotate_left(26);
    }
}

impl Hasher for FastHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().unwrap()));
        }
        let r = chunks.remainder();
        if !r.is_empty() {
            let mut buf = [0u8; 8];
            buf[..r.len()].copy_from_slice(r);
            self.add(u64::from_le_bytes(buf));
        }
        self.add(bytes.len() as u64);
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::{BuildHasher, BuildHasherDefault};

    #[test]
    fn distinct_keys_hash_apart() {
        let b = BuildHasherDefault::<FastHasher>::default();
        let keys = ["", "/", "/a", "/a\0", "/a/", "/abcdefgh", "/abcdefgh/"];
        let hashes: Vec<u64> = keys.iter().map(|k| b.hash_one(k)).collect();
        for i in 0..hashes.len() {
            for j in i + 1..hashes.len() {
                assert_ne!(hashes[i], hashes[j], "{:?} vs {:?}", keys[i], keys[j]);
            }
        }
        // Lookups by borrowed form agree with owned keys.
        let mut m: FastMap<Box<str>, u32> = FastMap::default();
        m.insert("/x".into(), 1);
        assert_eq!(m.get("/x"), Some(&1));
    }
}
