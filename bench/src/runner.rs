//! Drives a workload against a target with closed-loop clients and
//! measures throughput and latency.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::target::{Store, TargetSpec};
use crate::workload::{self, Length, Op, OpGenerator, Workload};

/// Latencies are recorded in microseconds, 1 µs to 60 s, 3 significant
/// digits (HdrHistogram keeps the error under 0.1%).
const LATENCY_MAX_US: u64 = 60_000_000;
/// Error messages kept per run, so a failing run says why without
/// keeping every message of a long outage.
const ERROR_SAMPLES_MAX: usize = 5;
/// Clients writing the initial keys at once.
const PRELOAD_CLIENTS: usize = 32;

#[derive(Debug, Serialize)]
pub struct Report {
    pub target: String,
    pub workload: Workload,
    /// Operations that succeeded within the measured window.
    pub operations: u64,
    pub reads: u64,
    pub writes: u64,
    /// Failed or timed-out operations, and reads that found no value for a
    /// key that was written before the run (a store that loses data).
    pub errors: u64,
    pub error_samples: Vec<String>,
    pub elapsed_seconds: f64,
    pub throughput_ops_per_second: f64,
    pub latency_us: Latency,
    /// shardkv, when some shard changed group during the run (a join, a
    /// leave, a move): the operations on those shards and on the others,
    /// apart. A move's cost to the shards it did not touch is the second.
    pub by_move: Option<MoveSplit>,
}

#[derive(Debug, Serialize)]
pub struct MoveSplit {
    /// The shards whose group changed in some configuration during the run.
    pub moved_shards: Vec<usize>,
    pub moved: ShardSet,
    pub unmoved: ShardSet,
}

#[derive(Debug, Serialize)]
pub struct ShardSet {
    pub operations: u64,
    pub errors: u64,
    pub latency_us: Latency,
    /// The same, by the second of the run in which each operation started:
    /// when in a move the tail comes (the copy, the install, or the
    /// cleanup after it).
    pub by_second: Vec<Second>,
}

#[derive(Debug, Serialize)]
pub struct Second {
    /// Seconds since the measurement began.
    pub second: u32,
    pub operations: u64,
    pub errors: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

/// One measured operation, kept to split a run by moved shards.
#[derive(Clone, Copy)]
struct ShardOp {
    shard: u32,
    /// `None`: it failed.
    latency_us: Option<u32>,
    /// When it started, since the measurement began.
    started_ms: u32,
}

#[derive(Debug, Serialize)]
pub struct Latency {
    pub p50: u64,
    pub p95: u64,
    pub p99: u64,
    pub max: u64,
    pub mean: f64,
}

impl Report {
    pub fn human(&self) -> String {
        let w = &self.workload;
        let l = &self.latency_us;
        format!(
            "{target}: {label}, {keys} keys ({dist:?}), {bytes}-byte values\n  \
             {ops} ops in {secs:.1} s = {tput:.0} ops/s ({reads} reads, {writes} writes), {errors} errors\n  \
             latency p50 {p50} p95 {p95} p99 {p99} max {max} (mean {mean})",
            target = self.target,
            label = w.label(),
            keys = w.key_count,
            dist = w.distribution,
            bytes = w.value_bytes,
            ops = self.operations,
            secs = self.elapsed_seconds,
            tput = self.throughput_ops_per_second,
            reads = self.reads,
            writes = self.writes,
            errors = self.errors,
            p50 = ms(l.p50),
            p95 = ms(l.p95),
            p99 = ms(l.p99),
            max = ms(l.max),
            mean = ms(l.mean as u64),
        ) + &self
            .by_move
            .iter()
            .map(|m| {
                let line = |name: &str, set: &ShardSet| {
                    let l = &set.latency_us;
                    format!(
                        "\n  {name}: {} ops, {} errors, p50 {} p99 {} max {}",
                        set.operations,
                        set.errors,
                        ms(l.p50),
                        ms(l.p99),
                        ms(l.max)
                    )
                };
                format!("\n  {} shards changed group during the run", m.moved_shards.len())
                    + &line("on them", &m.moved)
                    + &line("on the others", &m.unmoved)
            })
            .collect::<String>()
            + &self
            .error_samples
            .iter()
            .map(|e| format!("\n  error: {e}"))
            .collect::<String>()
    }
}

/// `1234` µs as `1.23 ms`.
pub fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

/// Writes every key of the workload once, so that reads find values.
pub async fn preload(target: &TargetSpec, workload: &Workload) -> Result<(), String> {
    let clients = PRELOAD_CLIENTS.min(workload.key_count.max(1) as usize);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let target = target.clone();
        let (keys, value_bytes) = (workload.key_count, workload.value_bytes);
        tasks.push(tokio::spawn(async move {
            let mut store = target.connect().await?;
            for k in (c as u64..keys).step_by(clients) {
                store
                    .put(&workload::key(k), workload::value(value_bytes, k))
                    .await
                    .map_err(|e| format!("preloading {}: {e}", workload::key(k)))?;
            }
            Ok::<(), String>(())
        }));
    }
    for t in tasks {
        t.await.map_err(|e| format!("preload task: {e}"))??;
    }
    Ok(())
}

/// What one client measured.
struct ClientResult {
    histogram: Histogram<u64>,
    /// With `shards`: each measured operation, to split them by moved
    /// shards at the end. Twelve bytes an operation: a 60 s run at 20,000
    /// ops/s keeps 15 MB.
    by_shard: Vec<ShardOp>,
    reads: u64,
    writes: u64,
    errors: u64,
    error_samples: Vec<String>,
    /// When its last measured operation finished.
    finished: Instant,
}

/// Runs `workload` against `target`. Every client connects before the
/// clock starts; the warm-up runs the same loop, unrecorded.
pub async fn run(target: &TargetSpec, workload: &Workload) -> Result<Report, String> {
    let clients = workload.clients.max(1);
    let mut stores = Vec::with_capacity(clients);
    for _ in 0..clients {
        stores.push(target.connect().await?);
    }
    let start_config = target.configs_since(None).await?.and_then(|mut c| c.pop());
    let shards = start_config.as_ref().map(|c| c.shards.len());
    if workload.shard_per_client && shards.is_none_or(|n| n == 0) {
        return Err(format!(
            "--shard-per-client needs shards, and {} has none",
            target.name()
        ));
    }
    let measure_from = Instant::now() + workload.warmup;
    let mut tasks = Vec::with_capacity(clients);
    for (i, store) in stores.into_iter().enumerate() {
        let quota = match workload.length {
            Length::Operations(n) => {
                Some(n / clients as u64 + u64::from((i as u64) < n % clients as u64))
            }
            Length::Seconds(_) => None,
        };
        let until = match workload.length {
            Length::Seconds(s) => Some(measure_from + Duration::from_secs_f64(s)),
            Length::Operations(_) => None,
        };
        let mut generator = OpGenerator::new(workload, i);
        if let (true, Some(shards)) = (workload.shard_per_client, shards) {
            generator = generator.in_shard(i % shards, shards);
        }
        let value_bytes = workload.value_bytes;
        tasks.push(tokio::spawn(client_loop(
            store,
            generator,
            value_bytes,
            measure_from,
            until,
            quota,
            (i as u64) << 40,
            shards,
        )));
    }
    let mut histogram = new_histogram();
    let (mut reads, mut writes, mut errors) = (0, 0, 0);
    let mut error_samples = Vec::new();
    let mut finished = measure_from;
    let mut by_shard = Vec::new();
    for t in tasks {
        let mut r = t.await.map_err(|e| format!("client task: {e}"))?;
        by_shard.append(&mut r.by_shard);
        histogram
            .add(&r.histogram)
            .map_err(|e| format!("merging latencies: {e}"))?;
        reads += r.reads;
        writes += r.writes;
        errors += r.errors;
        finished = finished.max(r.finished);
        for e in r.error_samples {
            if error_samples.len() < ERROR_SAMPLES_MAX {
                error_samples.push(e);
            }
        }
    }
    // A timed run's window is its length, or longer if operations begun
    // inside it ended after it.
    let mut elapsed = finished
        .saturating_duration_since(measure_from)
        .as_secs_f64();
    if let Length::Seconds(s) = workload.length {
        elapsed = elapsed.max(s);
    }
    let operations = reads + writes;
    let by_move = match start_config {
        Some(start) => {
            let configs = target
                .configs_since(Some(start.num))
                .await?
                .unwrap_or_default();
            split_by_move(&configs, &by_shard)
        }
        None => None,
    };
    Ok(Report {
        target: target.name().to_string(),
        workload: workload.clone(),
        operations,
        reads,
        writes,
        errors,
        error_samples,
        elapsed_seconds: elapsed,
        throughput_ops_per_second: if elapsed > 0.0 {
            operations as f64 / elapsed
        } else {
            0.0
        },
        latency_us: latency(&histogram),
        by_move,
    })
}

fn latency(histogram: &Histogram<u64>) -> Latency {
    Latency {
        p50: histogram.value_at_quantile(0.50),
        p95: histogram.value_at_quantile(0.95),
        p99: histogram.value_at_quantile(0.99),
        max: histogram.max(),
        mean: histogram.mean(),
    }
}

/// The operations split by whether their shard changed group in any of
/// `configs` (the run's first through its last); `None` if none did.
fn split_by_move(
    configs: &[shardkv::shardmaster::Config],
    by_shard: &[ShardOp],
) -> Option<MoveSplit> {
    let first = configs.first()?;
    let moved_shards: Vec<usize> = (0..first.shards.len())
        .filter(|&s| {
            configs
                .iter()
                .any(|c| c.shards.get(s) != first.shards.get(s))
        })
        .collect();
    if moved_shards.is_empty() {
        return None;
    }
    let mut sets = [new_histogram(), new_histogram()];
    let mut errors = [0, 0];
    // By second: (histogram, errors) for each of the two sets.
    let mut seconds: [BTreeMap<u32, (Histogram<u64>, u64)>; 2] = Default::default();
    for op in by_shard {
        let moved = usize::from(moved_shards.binary_search(&(op.shard as usize)).is_ok());
        let second =
            (seconds[moved].entry(op.started_ms / 1000)).or_insert_with(|| (new_histogram(), 0));
        match op.latency_us {
            Some(us) => {
                let us = u64::from(us).clamp(1, LATENCY_MAX_US);
                sets[moved].saturating_record(us);
                second.0.saturating_record(us);
            }
            None => {
                errors[moved] += 1;
                second.1 += 1;
            }
        }
    }
    let set = |i: usize| ShardSet {
        operations: sets[i].len(),
        errors: errors[i],
        latency_us: latency(&sets[i]),
        by_second: (seconds[i].iter())
            .map(|(&second, (h, errors))| Second {
                second,
                operations: h.len(),
                errors: *errors,
                p99_us: h.value_at_quantile(0.99),
                max_us: h.max(),
            })
            .collect(),
    };
    Some(MoveSplit {
        moved_shards,
        moved: set(1),
        unmoved: set(0),
    })
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_US, 3).expect("valid histogram bounds")
}

/// One closed-loop client: the next operation starts when the last one
/// ends. Operations started before `measure_from` are the warm-up.
#[allow(clippy::too_many_arguments)]
async fn client_loop(
    mut store: Store,
    mut generator: OpGenerator,
    value_bytes: usize,
    measure_from: Instant,
    until: Option<Instant>,
    quota: Option<u64>,
    stamp_base: u64,
    shards: Option<usize>,
) -> ClientResult {
    let mut r = ClientResult {
        histogram: new_histogram(),
        by_shard: Vec::new(),
        reads: 0,
        writes: 0,
        errors: 0,
        error_samples: Vec::new(),
        finished: measure_from,
    };
    let mut stamp = stamp_base;
    loop {
        let start = Instant::now();
        let measured = start >= measure_from;
        if measured {
            if until.is_some_and(|u| start >= u) {
                break;
            }
            if quota.is_some_and(|q| r.reads + r.writes + r.errors >= q) {
                break;
            }
        }
        let op = generator.next_op();
        let outcome = match op {
            Op::Read(k) => {
                let key = workload::key(k);
                match store.get(&key).await {
                    Ok(Some(_)) => Ok(()),
                    Ok(None) => Err(format!("{key} has no value, but it was written")),
                    Err(e) => Err(e),
                }
            }
            Op::Write(k) => {
                stamp += 1;
                store
                    .put(&workload::key(k), workload::value(value_bytes, stamp))
                    .await
            }
        };
        if !measured {
            continue;
        }
        let end = Instant::now();
        let us = end.duration_since(start).as_micros() as u64;
        if let Some(shards) = shards {
            let k = match op {
                Op::Read(k) | Op::Write(k) => k,
            };
            let shard = shardkv::shardkv::key_to_shard(workload::key(k).as_bytes(), shards);
            let latency = outcome
                .is_ok()
                .then_some(us.min(u64::from(u32::MAX)) as u32);
            r.by_shard.push(ShardOp {
                shard: shard as u32,
                latency_us: latency,
                started_ms: start.duration_since(measure_from).as_millis() as u32,
            });
        }
        match outcome {
            Ok(()) => {
                r.histogram.saturating_record(us.clamp(1, LATENCY_MAX_US));
                match op {
                    Op::Read(_) => r.reads += 1,
                    Op::Write(_) => r.writes += 1,
                }
            }
            Err(e) => {
                r.errors += 1;
                if r.error_samples.len() < ERROR_SAMPLES_MAX {
                    r.error_samples.push(e);
                }
            }
        }
        r.finished = end;
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardkv::shardmaster::Config;

    fn config(num: u64, shards: Vec<u64>) -> Config {
        Config {
            num,
            shards,
            groups: Default::default(),
        }
    }

    #[test]
    fn operations_split_by_whether_their_shard_changed_group() {
        // Shard 1 moves to group 2; shard 3 goes away and comes back.
        let configs = [
            config(4, vec![1, 1, 1, 1]),
            config(5, vec![1, 2, 1, 2]),
            config(6, vec![1, 2, 1, 1]),
        ];
        let op = |shard, latency_us, started_ms| ShardOp {
            shard,
            latency_us,
            started_ms,
        };
        let ops = [
            op(0, Some(100), 10),
            op(1, Some(5000), 20),
            op(3, None, 1500),
            op(2, Some(200), 2100),
        ];
        let split = split_by_move(&configs, &ops).unwrap();
        assert_eq!(split.moved_shards, vec![1, 3]);
        assert_eq!((split.moved.operations, split.moved.errors), (1, 1));
        assert_eq!((split.unmoved.operations, split.unmoved.errors), (2, 0));
        assert!(split.unmoved.latency_us.max < 250);
        assert!(split.moved.latency_us.max >= 5000);
        let seconds = |set: &ShardSet| -> Vec<(u32, u64, u64)> {
            (set.by_second.iter())
                .map(|s| (s.second, s.operations, s.errors))
                .collect()
        };
        assert_eq!(seconds(&split.moved), vec![(0, 1, 0), (1, 0, 1)]);
        assert_eq!(seconds(&split.unmoved), vec![(0, 1, 0), (2, 1, 0)]);
        assert!(split.unmoved.by_second[1].max_us >= 200);
        assert!(split.unmoved.by_second[0].p99_us < 250);
    }

    #[test]
    fn a_run_in_which_no_shard_moved_is_not_split() {
        let configs = [config(4, vec![1, 2]), config(5, vec![1, 2])];
        let ops = [ShardOp {
            shard: 0,
            latency_us: Some(1),
            started_ms: 0,
        }];
        assert!(split_by_move(&configs, &ops).is_none());
        assert!(split_by_move(&[], &ops).is_none());
    }
}
