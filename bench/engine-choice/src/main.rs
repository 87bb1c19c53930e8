//! The state machine's pattern on each candidate engine: batches of 64
//! writes applied without fsync, a durable checkpoint every 1,000 batches
//! (the snapshot interval), random overwrites, random point reads, then a
//! reopen. Prints one line of figures per phase.
//!
//! `cargo run --release -- ENGINE DIR KEYS VALUE_BYTES` (ENGINE: fjall or redb)

use std::time::Instant;

use rand::seq::SliceRandom;
use redb::ReadableDatabase;
use rand::{Rng, SeedableRng};

const BATCH: usize = 64;
const CHECKPOINT_EVERY_BATCHES: usize = 1000;
const CACHE_BYTES: u64 = 64 << 20;

trait Engine {
    fn write_batch(&mut self, items: &[(Vec<u8>, Vec<u8>)], durable: bool);
    fn get(&self, key: &[u8]) -> Option<usize>;
}

struct Fjall {
    db: fjall::Database,
    data: fjall::Keyspace,
}

impl Engine for Fjall {
    fn write_batch(&mut self, items: &[(Vec<u8>, Vec<u8>)], durable: bool) {
        let mut batch = self.db.batch();
        for (k, v) in items {
            batch.insert(&self.data, k.clone(), v.clone());
        }
        batch.insert(&self.data, b"\0applied".to_vec(), 1u64.to_be_bytes().to_vec());
        batch.commit().unwrap();
        if durable {
            self.db.persist(fjall::PersistMode::SyncAll).unwrap();
        }
    }
    fn get(&self, key: &[u8]) -> Option<usize> {
        self.data.get(key).unwrap().map(|v| v.len())
    }
}

const TABLE: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("data");

struct Redb {
    db: redb::Database,
}

impl Engine for Redb {
    fn write_batch(&mut self, items: &[(Vec<u8>, Vec<u8>)], durable: bool) {
        let mut tx = self.db.begin_write().unwrap();
        let durability = if durable {
            redb::Durability::Immediate
        } else {
            redb::Durability::None
        };
        tx.set_durability(durability).unwrap();
        {
            let mut t = tx.open_table(TABLE).unwrap();
            for (k, v) in items {
                t.insert(k.as_slice(), v.as_slice()).unwrap();
            }
            t.insert(&b"\0applied"[..], &1u64.to_be_bytes()[..]).unwrap();
        }
        tx.commit().unwrap();
    }
    fn get(&self, key: &[u8]) -> Option<usize> {
        let tx = self.db.begin_read().unwrap();
        let t = tx.open_table(TABLE).unwrap();
        t.get(key).unwrap().map(|v| v.value().len())
    }
}

fn open(engine: &str, dir: &str) -> Box<dyn Engine> {
    match engine {
        "fjall" => {
            let db = fjall::Database::builder(dir)
                .cache_size(CACHE_BYTES)
                .manual_journal_persist(true)
                .open()
                .unwrap();
            let data = db
                .keyspace("data", fjall::KeyspaceCreateOptions::default)
                .unwrap();
            Box::new(Fjall { db, data })
        }
        "redb" => {
            std::fs::create_dir_all(dir).unwrap();
            let db = redb::Database::builder()
                .set_cache_size(CACHE_BYTES as usize)
                .create(format!("{dir}/data.redb"))
                .unwrap();
            let tx = db.begin_write().unwrap();
            tx.open_table(TABLE).unwrap();
            tx.commit().unwrap();
            Box::new(Redb { db })
        }
        other => panic!("unknown engine {other}"),
    }
}

fn key(i: u64) -> Vec<u8> {
    // Shard prefix, then the user key, as the store lays them out.
    let mut k = vec![b'd'];
    k.extend_from_slice(&((i % 10) as u32).to_be_bytes());
    k.extend_from_slice(format!("key-{i:010}").as_bytes());
    k
}

fn status(field: &str) -> String {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find(|l| l.starts_with(field))
        .map(|l| l.split_whitespace().nth(1).unwrap().to_string())
        .unwrap_or_default()
}

fn disk_mib(dir: &str) -> u64 {
    fn walk(p: &std::path::Path) -> u64 {
        let mut n = 0;
        for e in std::fs::read_dir(p).unwrap().flatten() {
            let m = e.metadata().unwrap();
            n += if m.is_dir() { walk(&e.path()) } else { m.len() };
        }
        n
    }
    walk(std::path::Path::new(dir)) >> 20
}

fn report(phase: &str, ops: usize, started: Instant, dir: &str) {
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{phase:10} {ops:>9} ops {secs:8.1} s {:>9.0} ops/s  rss {:>7} KiB  hwm {:>7} KiB  disk {:>6} MiB",
        ops as f64 / secs,
        status("VmRSS:"),
        status("VmHWM:"),
        disk_mib(dir)
    );
}

fn writes(e: &mut dyn Engine, keys: &[u64], value_bytes: usize, rng: &mut impl Rng) {
    let mut batch = Vec::with_capacity(BATCH);
    for (n, chunk) in keys.chunks(BATCH).enumerate() {
        batch.clear();
        for &i in chunk {
            let mut v = vec![0u8; value_bytes];
            rng.fill(&mut v[..]);
            batch.push((key(i), v));
        }
        e.write_batch(&batch, (n + 1) % CHECKPOINT_EVERY_BATCHES == 0);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (engine, dir) = (&args[1], &args[2]);
    let keys: u64 = args[3].parse().unwrap();
    let value_bytes: usize = args[4].parse().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut e = open(engine, dir);

    let mut order: Vec<u64> = (0..keys).collect();
    order.shuffle(&mut rng);
    let t = Instant::now();
    writes(e.as_mut(), &order, value_bytes, &mut rng);
    report("load", order.len(), t, dir);

    let overwrites: Vec<u64> = (0..200_000).map(|_| rng.random_range(0..keys)).collect();
    let t = Instant::now();
    writes(e.as_mut(), &overwrites, value_bytes, &mut rng);
    report("overwrite", overwrites.len(), t, dir);

    let t = Instant::now();
    let reads = 200_000;
    for _ in 0..reads {
        let i = rng.random_range(0..keys);
        assert_eq!(e.get(&key(i)), Some(value_bytes));
    }
    report("read", reads, t, dir);

    drop(e);
    let t = Instant::now();
    let e = open(engine, dir);
    assert!(e.get(&key(0)).is_some());
    report("reopen", 1, t, dir);
}
