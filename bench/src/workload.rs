//! What a benchmark run asks of a store: the mix of reads and writes, which
//! keys, how large the values are, how many clients and for how long.

use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum KeyDistribution {
    /// Every key equally likely.
    Uniform,
    /// YCSB's scrambled Zipfian (theta 0.99): a few keys take most requests,
    /// and the hot keys are spread over the key space, hence over shards.
    Zipfian,
}

/// How long a run lasts: for a time, or until a number of operations.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Length {
    Seconds(f64),
    Operations(u64),
}

#[derive(Clone, Debug, Serialize)]
pub struct Workload {
    /// Fraction of operations that are reads, 0.0 to 1.0; the rest are puts.
    pub read_ratio: f64,
    pub key_count: u64,
    pub value_bytes: usize,
    pub distribution: KeyDistribution,
    /// Closed-loop clients, each with one operation outstanding and its own
    /// client object (its own connections), as independent users would be.
    pub clients: usize,
    pub length: Length,
    /// Run (and discard) this long first, so connections, leaders and
    /// caches are settled when measuring starts.
    #[serde(skip)]
    pub warmup: Duration,
    /// Seeds each client's key and operation choices (client i uses
    /// `seed + i`), so a run's request sequence can be replayed.
    pub seed: u64,
    /// Client i uses only keys of shard i (modulo the shard count): while
    /// a shard moves, its clients wait and the others go on. With keys
    /// drawn from every shard, each closed-loop client soon waits on a
    /// moving shard, and a move stops the whole load.
    pub shard_per_client: bool,
}

impl Workload {
    /// A short human label such as `50% reads, 64 clients`.
    pub fn label(&self) -> String {
        let writes = self.read_ratio == 0.0;
        let mix = if writes {
            "100% writes".to_string()
        } else {
            format!("{:.0}% reads", self.read_ratio * 100.0)
        };
        let pinned = if self.shard_per_client {
            ", a shard each"
        } else {
            ""
        };
        format!("{mix}, {} clients{pinned}", self.clients)
    }
}

/// The fixed-width key for index `i`: every key has the same length, so
/// key size does not vary with the distribution.
pub fn key(i: u64) -> String {
    format!("key{i:010}")
}

/// A value of `len` bytes, different per write so that no store can
/// shortcut an unchanged value.
pub fn value(len: usize, stamp: u64) -> Vec<u8> {
    let mut v = vec![b'v'; len];
    let stamp = stamp.to_be_bytes();
    let n = stamp.len().min(len);
    v[..n].copy_from_slice(&stamp[stamp.len() - n..]);
    v
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read(u64),
    Write(u64),
}

/// One client's sequence of operations.
pub struct OpGenerator {
    rng: SmallRng,
    read_ratio: f64,
    keys: KeyChooser,
    /// With `--shard-per-client`: this client's shard, of how many.
    shard: Option<(usize, usize)>,
}

impl OpGenerator {
    pub fn new(workload: &Workload, client: usize) -> Self {
        OpGenerator {
            rng: SmallRng::seed_from_u64(workload.seed.wrapping_add(client as u64)),
            read_ratio: workload.read_ratio,
            keys: KeyChooser::new(workload.distribution, workload.key_count),
            shard: None,
        }
    }

    /// Draws only keys of `shard` of `shards` (by rejection: about
    /// `shards` draws a key, where a network round trip costs thousands).
    pub fn in_shard(mut self, shard: usize, shards: usize) -> Self {
        debug_assert!(shard < shards);
        self.shard = Some((shard, shards));
        self
    }

    pub fn next_op(&mut self) -> Op {
        let mut index = self.keys.next(&mut self.rng);
        if let Some((shard, shards)) = self.shard {
            // Bounded: with fewer keys than shards, one may hold none.
            for _ in 0..shards.saturating_mul(64) {
                if shardkv::shardkv::key_to_shard(key(index).as_bytes(), shards) == shard {
                    break;
                }
                index = self.keys.next(&mut self.rng);
            }
        }
        let key = index;
        if self.rng.random::<f64>() < self.read_ratio {
            Op::Read(key)
        } else {
            Op::Write(key)
        }
    }
}

enum KeyChooser {
    Uniform(u64),
    Zipfian(Zipfian),
}

impl KeyChooser {
    fn new(distribution: KeyDistribution, key_count: u64) -> Self {
        match distribution {
            KeyDistribution::Uniform => KeyChooser::Uniform(key_count.max(1)),
            KeyDistribution::Zipfian => KeyChooser::Zipfian(Zipfian::new(key_count.max(1))),
        }
    }

    fn next(&mut self, rng: &mut SmallRng) -> u64 {
        match self {
            KeyChooser::Uniform(n) => rng.random_range(0..*n),
            KeyChooser::Zipfian(z) => z.next_scrambled(rng),
        }
    }
}

/// Gray et al.'s Zipfian generator, as YCSB uses it: item 0 is the most
/// popular, and popularity falls as 1/rank^theta.
pub struct Zipfian {
    items: u64,
    theta: f64,
    alpha: f64,
    zeta_n: f64,
    eta: f64,
}

impl Zipfian {
    const THETA: f64 = 0.99;

    pub fn new(items: u64) -> Self {
        let theta = Self::THETA;
        // O(items) once per client; a million keys take a few milliseconds.
        let zeta = |n: u64| (1..=n).map(|i| 1.0 / (i as f64).powf(theta)).sum::<f64>();
        let zeta_n = zeta(items);
        let zeta_2 = zeta(2.min(items));
        let eta = (1.0 - (2.0 / items as f64).powf(1.0 - theta)) / (1.0 - zeta_2 / zeta_n);
        Zipfian {
            items,
            theta,
            alpha: 1.0 / (1.0 - theta),
            zeta_n,
            eta,
        }
    }

    /// A rank: 0 is the most popular item.
    pub fn next_rank(&self, rng: &mut SmallRng) -> u64 {
        let u: f64 = rng.random();
        let uz = u * self.zeta_n;
        if uz < 1.0 {
            return 0;
        }
        if uz < 1.0 + 0.5f64.powf(self.theta) {
            return 1.min(self.items - 1);
        }
        let rank = (self.items as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64;
        rank.min(self.items - 1)
    }

    /// A rank hashed onto the key space, so the popular keys are not
    /// neighbours (and not all in one shard).
    pub fn next_scrambled(&self, rng: &mut SmallRng) -> u64 {
        fnv1a64(self.next_rank(rng)) % self.items
    }
}

fn fnv1a64(x: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in x.to_le_bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(read_ratio: f64, distribution: KeyDistribution) -> Workload {
        Workload {
            read_ratio,
            key_count: 1000,
            value_bytes: 16,
            distribution,
            clients: 1,
            length: Length::Operations(1),
            warmup: Duration::ZERO,
            seed: 7,
            shard_per_client: false,
        }
    }

    fn counts(w: &Workload, n: usize) -> (Vec<u64>, u64) {
        let mut g = OpGenerator::new(w, 0);
        let mut per_key = vec![0u64; w.key_count as usize];
        let mut reads = 0;
        for _ in 0..n {
            let k = match g.next_op() {
                Op::Read(k) => {
                    reads += 1;
                    k
                }
                Op::Write(k) => k,
            };
            per_key[k as usize] += 1;
        }
        (per_key, reads)
    }

    #[test]
    fn the_read_ratio_is_kept() {
        for ratio in [0.0, 0.5, 0.95, 1.0] {
            let (_, reads) = counts(&workload(ratio, KeyDistribution::Uniform), 100_000);
            let got = reads as f64 / 100_000.0;
            assert!((got - ratio).abs() < 0.01, "ratio {ratio}: got {got}");
        }
    }

    #[test]
    fn uniform_keys_cover_the_space_evenly() {
        let (per_key, _) = counts(&workload(0.5, KeyDistribution::Uniform), 200_000);
        let (min, max) = (per_key.iter().min().unwrap(), per_key.iter().max().unwrap());
        assert!(*min > 100 && *max < 320, "min {min}, max {max}");
    }

    #[test]
    fn zipfian_keys_are_skewed_and_scrambled() {
        let (mut per_key, _) = counts(&workload(0.5, KeyDistribution::Zipfian), 200_000);
        // Theta 0.99 over 1000 keys: the top key takes about 13%, and the
        // top 10 about 39%.
        let hottest = per_key
            .iter()
            .enumerate()
            .max_by_key(|(_, c)| **c)
            .unwrap()
            .0;
        assert_ne!(hottest, 0, "rank 0 must be scrambled away from key 0");
        per_key.sort_unstable_by(|a, b| b.cmp(a));
        let top: f64 = per_key[0] as f64 / 200_000.0;
        let top10: f64 = per_key[..10].iter().sum::<u64>() as f64 / 200_000.0;
        assert!((0.10..0.16).contains(&top), "top key {top}");
        assert!((0.33..0.45).contains(&top10), "top 10 {top10}");
    }

    #[test]
    fn the_same_seed_gives_the_same_operations() {
        let w = workload(0.5, KeyDistribution::Zipfian);
        let a: Vec<Op> = {
            let mut g = OpGenerator::new(&w, 3);
            (0..100).map(|_| g.next_op()).collect()
        };
        let mut g = OpGenerator::new(&w, 3);
        let b: Vec<Op> = (0..100).map(|_| g.next_op()).collect();
        assert_eq!(a, b);
    }

    #[test]
    fn a_client_in_a_shard_draws_only_its_keys() {
        let w = workload(0.5, KeyDistribution::Uniform);
        let mut g = OpGenerator::new(&w, 5).in_shard(5, 64);
        for _ in 0..200 {
            let (Op::Read(k) | Op::Write(k)) = g.next_op();
            assert_eq!(shardkv::shardkv::key_to_shard(key(k).as_bytes(), 64), 5);
        }
    }

    #[test]
    fn values_have_the_asked_length_and_differ() {
        assert_eq!(value(256, 1).len(), 256);
        assert_eq!(value(3, 1).len(), 3);
        assert_ne!(value(256, 1), value(256, 2));
    }
}
