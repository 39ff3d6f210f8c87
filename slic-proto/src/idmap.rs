//! Maps keyed by the integer ids of a connection (channels, requests, peers), with a hasher
//! that costs one multiplication instead of SipHash's rounds: the lookup runs for every frame.
//!
//! The hash is keyed with a value drawn at random for every map, so ids a peer chooses cannot
//! be aimed at one bucket without knowing the key; and every map keyed by peer-chosen ids is
//! bounded by a limit (channels by `max_channels`, requests by the in-flight limit), which caps
//! the cost of collisions even if they were found.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};

/// A `HashMap` keyed by integer ids, hashed with [`IdHasher`].
pub type IdMap<K, V> = HashMap<K, V, IdHashBuilder>;

/// Creates an empty [`IdMap`] with a fresh random key.
pub fn id_map<K, V>() -> IdMap<K, V> {
    HashMap::with_hasher(IdHashBuilder::default())
}

/// Builds [`IdHasher`]s that share one random key (drawn from std's `RandomState`).
#[derive(Clone, Debug)]
pub struct IdHashBuilder {
    key: u64,
}

impl Default for IdHashBuilder {
    fn default() -> Self {
        Self {
            key: std::collections::hash_map::RandomState::new().hash_one(0x51_1c_u64),
        }
    }
}

impl BuildHasher for IdHashBuilder {
    type Hasher = IdHasher;

    fn build_hasher(&self) -> IdHasher {
        IdHasher { state: self.key }
    }
}

/// Hashes integers with a folded multiply (the low and high halves of a 128-bit product
/// XORed), which mixes every input bit into both the low bits that pick a bucket and the high
/// bits a `HashMap` compares first. Not meant for strings: it takes other input byte by byte.
#[derive(Clone, Debug)]
pub struct IdHasher {
    state: u64,
}

/// An odd constant with well-spread bits (2^64 divided by the golden ratio).
const MULTIPLIER: u64 = 0x9E37_79B9_7F4A_7C15;

impl IdHasher {
    fn mix(&mut self, n: u64) {
        let product = u128::from(self.state ^ n) * u128::from(MULTIPLIER);
        // Truncations on purpose: the halves of the product, folded.
        #[allow(clippy::cast_possible_truncation)]
        let folded = (product as u64) ^ ((product >> 64) as u64);
        self.state = folded;
    }
}

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.mix(u64::from(b));
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.mix(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.mix(n);
    }

    fn finish(&self) -> u64 {
        self.state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_ids_spread_over_buckets_and_high_bits() {
        let b = IdHashBuilder::default();
        let mut low = std::collections::HashSet::new();
        let mut high = std::collections::HashSet::new();
        for id in 0_u32..1024 {
            let h = b.hash_one(id);
            low.insert(h & 1023);
            high.insert(h >> 57);
        }
        // Random placement fills ~63% of 1024 buckets and all 128 top-7-bit tags.
        assert!(
            low.len() > 550,
            "{} of 1024 low-bit buckets used",
            low.len()
        );
        assert!(high.len() > 120, "{} of 128 tags used", high.len());
    }

    #[test]
    fn each_map_draws_its_own_key_and_a_map_hashes_consistently() {
        let (a, b) = (IdHashBuilder::default(), IdHashBuilder::default());
        assert_eq!(a.hash_one(7_u64), a.hash_one(7_u64));
        assert_ne!(a.hash_one(7_u64), b.hash_one(7_u64));
        let mut m = id_map();
        for id in 0_u64..10_000 {
            m.insert(id * 4096, id);
        }
        assert!((0..10_000).all(|id| m[&(id * 4096)] == id));
    }
}
