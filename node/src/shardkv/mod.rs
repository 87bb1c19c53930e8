//! ShardKV: the key/value service. Replica groups of kvservers replicate
//! their shards with the Paxos core; the shardmaster says which group serves
//! which shard, and groups hand shards to each other as it changes.
//!
//! - [`state`]: the replicated state machine (data, duplicate tables,
//!   reconfiguration), deterministic, driven only by the commands it is
//!   given; [`store`] keeps its data on disk.
//! - [`server`]: the gRPC service and the leader's reconfiguration loop.
//! - [`clerk`]: the client library.

pub mod clerk;
pub mod pool;
pub mod server;
pub mod snapshot;
pub mod state;
pub mod store;

use bytes::Bytes;

/// Request size limits, checked by the server before anything is proposed
/// and by the [`clerk::Clerk`] before anything is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub key_bytes_max: usize,
    pub value_bytes_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            key_bytes_max: 4 << 10,
            value_bytes_max: 1 << 20,
        }
    }
}

/// Why a request is refused before it reaches the log.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRequest {
    #[error("key must not be empty")]
    EmptyKey,
    #[error("key is {len} bytes; the limit is {max}")]
    KeyTooLarge { len: usize, max: usize },
    #[error("value is {len} bytes; the limit is {max}")]
    ValueTooLarge { len: usize, max: usize },
}

impl Limits {
    pub fn check(&self, key: &[u8], value: &[u8]) -> Result<(), InvalidRequest> {
        if key.is_empty() {
            return Err(InvalidRequest::EmptyKey);
        }
        if key.len() > self.key_bytes_max {
            return Err(InvalidRequest::KeyTooLarge {
                len: key.len(),
                max: self.key_bytes_max,
            });
        }
        if value.len() > self.value_bytes_max {
            return Err(InvalidRequest::ValueTooLarge {
                len: value.len(),
                max: self.value_bytes_max,
            });
        }
        Ok(())
    }
}

const FNV64_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV64_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The shard a key belongs to, out of `shards`. FNV-1a followed by a
/// 64-bit finalizer (from SplitMix64), so keys that differ only in their
/// last bytes, like `user1`, `user2`, still spread evenly.
pub fn key_to_shard(key: &[u8], shards: usize) -> usize {
    if shards == 0 {
        return 0;
    }
    let mut h = FNV64_OFFSET;
    for b in key {
        h ^= u64::from(*b);
        h = h.wrapping_mul(FNV64_PRIME);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    (h % shards as u64) as usize
}

/// The 32-bit FNV-1a hash, as the lab defines it for PutHash.
pub fn fnv1a32(parts: &[&[u8]]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for part in parts {
        for b in *part {
            h ^= u32::from(*b);
            h = h.wrapping_mul(0x0100_0193);
        }
    }
    h
}

/// What PutHash stores: the decimal string of `fnv1a32(previous + value)`.
pub fn put_hash_value(previous: &[u8], value: &[u8]) -> Bytes {
    Bytes::from(fnv1a32(&[previous, value]).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a32_matches_the_reference_vectors() {
        // From the FNV reference test suite.
        assert_eq!(fnv1a32(&[b""]), 0x811c_9dc5);
        assert_eq!(fnv1a32(&[b"a"]), 0xe40c_292c);
        assert_eq!(fnv1a32(&[b"foobar"]), 0xbf9c_f968);
        assert_eq!(fnv1a32(&[b"foo", b"bar"]), 0xbf9c_f968);
        assert_eq!(put_hash_value(b"", b"a"), Bytes::from("3826002220"));
    }

    #[test]
    fn keys_spread_evenly_over_shards() {
        let shards = 64;
        let keys = 64_000;
        let mut counts = vec![0usize; shards];
        for i in 0..keys {
            counts[key_to_shard(format!("user{i}").as_bytes(), shards)] += 1;
        }
        let expected = keys / shards;
        for (shard, count) in counts.iter().enumerate() {
            // Binomial sd here is about 31; 5 sd either way.
            assert!(
                count.abs_diff(expected) < 160,
                "shard {shard} got {count} keys; expected about {expected}"
            );
        }
    }

    #[test]
    fn limits_refuse_empty_and_oversized_input() {
        let limits = Limits {
            key_bytes_max: 4,
            value_bytes_max: 8,
        };
        assert_eq!(limits.check(b"", b""), Err(InvalidRequest::EmptyKey));
        assert!(matches!(
            limits.check(b"12345", b""),
            Err(InvalidRequest::KeyTooLarge { len: 5, max: 4 })
        ));
        assert!(matches!(
            limits.check(b"k", b"123456789"),
            Err(InvalidRequest::ValueTooLarge { len: 9, max: 8 })
        ));
        assert_eq!(limits.check(b"1234", b"12345678"), Ok(()));
    }
}
