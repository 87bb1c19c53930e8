//! Concurrent clients record every operation while shards move, replicas
//! are cut off, crash and restart, and requests and replies are dropped;
//! the history must be linearizable.
//!
//! The seed fixes the workload and the fault schedule; thread timing still
//! varies between runs, as it does in production.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use shardkv::linearizability::{check, Input, Operation, Verdict};
use shardkv::paxos::sim::{test_seed, SimRng};
use shardkv::shardkv::clerk::ClerkError;
use shardkv::shardkv::key_to_shard;
use shardkv::shardkv::server::Unreliable;

use crate::common::{Cluster, SHARDS};

const CLIENTS: u64 = 6;
const KEYS: u64 = 5;
const RUN: Duration = Duration::from_secs(8);

#[derive(Default)]
struct Tally {
    ok: usize,
    unknown: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn histories_under_moves_partitions_crashes_and_drops_are_linearizable() {
    let seed = test_seed("histories_under_moves_partitions_crashes_and_drops_are_linearizable");
    let faults = Unreliable {
        drop_request: 0.05,
        drop_reply: 0.05,
        seed,
        refuse_deletes: false,
        stall_copy_stream: None,
    };
    let mut cluster = Cluster::start(3, 3, Some(faults)).await;
    for gid in [100, 101, 102] {
        cluster.join(gid).await;
    }
    let start = Instant::now();
    let now = move || start.elapsed().as_micros() as u64;
    let history: Arc<Mutex<Vec<Operation>>> = Arc::default();
    let tally: Arc<Mutex<Tally>> = Arc::default();
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        // Short timeouts, so some operations end with unknown outcomes.
        let ck = cluster.clerk_with_timeout(Duration::from_secs(3));
        let history = history.clone();
        let tally = tally.clone();
        let mut rng = SimRng::new(seed ^ (c + 1));
        clients.push(tokio::spawn(async move {
            let mut i = 0;
            while start.elapsed() < RUN {
                i += 1;
                let key = Bytes::from(format!("h{}", rng.below(KEYS)));
                let value = Bytes::from(format!("{c}.{i};"));
                let input = match rng.below(10) {
                    0..4 => Input::Get,
                    4..6 => Input::Put(value.clone()),
                    _ => Input::Append(value.clone()),
                };
                let call = now();
                let result = match &input {
                    Input::Get => ck.get(key.clone()).await,
                    Input::Put(v) => ck.put(key.clone(), v.clone()).await.map(|_| None),
                    Input::Append(v) => ck.append(key.clone(), v.clone()).await.map(|_| None),
                    _ => unreachable!(),
                };
                let ret = now();
                let (output, ret) = match result {
                    Ok(output) => {
                        tally.lock().unwrap().ok += 1;
                        (output, ret)
                    }
                    Err(ClerkError::Timeout { .. }) => {
                        tally.lock().unwrap().unknown += 1;
                        (None, u64::MAX)
                    }
                    Err(e) => panic!("seed {seed}: client {c}: {e}"),
                };
                history.lock().unwrap().push(Operation {
                    client: c,
                    key,
                    input,
                    output,
                    call,
                    ret,
                });
            }
        }));
    }

    // The nemesis: one fault at a time, chosen by the seed.
    let mut rng = SimRng::new(seed);
    let mut schedule = Vec::new();
    while start.elapsed() < RUN {
        let gid = 100 + rng.below(3);
        let replica = rng.below(3) as usize;
        let hold = Duration::from_millis(100 + rng.below(400));
        match rng.below(4) {
            0 => {
                // A shard that holds some of the workload's keys.
                let key = format!("h{}", rng.below(KEYS));
                let shard = key_to_shard(key.as_bytes(), SHARDS) as u64;
                schedule.push(format!("move shard {shard} to {gid}"));
                cluster.admin().r#move(shard, gid).await.unwrap();
            }
            1 => {
                // Prefer the leader: cutting it off forces an election.
                let victim = cluster.leader(gid).unwrap_or(replica);
                schedule.push(format!("isolate {gid}/{victim} for {hold:?}"));
                cluster.group(gid).net.set_isolated(victim as u32, true);
                tokio::time::sleep(hold).await;
                cluster.group(gid).net.set_isolated(victim as u32, false);
            }
            2 => {
                schedule.push(format!("crash {gid}/{replica}, restart after {hold:?}"));
                cluster.kill(gid, replica).await;
                tokio::time::sleep(hold).await;
                cluster.restart(gid, replica).await;
            }
            _ => {
                schedule.push(format!("calm for {hold:?}"));
                tokio::time::sleep(hold).await;
            }
        }
    }
    for c in clients {
        c.await.unwrap();
    }
    // Every key read once more after the faults: nothing acknowledged lost.
    let ck = cluster.clerk();
    let mut history = std::mem::take(&mut *history.lock().unwrap());
    for k in 0..KEYS {
        let key = Bytes::from(format!("h{k}"));
        let call = now();
        let output = ck.get(key.clone()).await.unwrap();
        history.push(Operation {
            client: CLIENTS,
            key,
            input: Input::Get,
            output,
            call,
            ret: now(),
        });
    }
    let tally = tally.lock().unwrap();
    println!(
        "seed {seed}: {} operations ok, {} unknown; nemesis: {schedule:?}",
        tally.ok, tally.unknown
    );
    assert!(
        tally.ok > 100,
        "seed {seed}: too few operations completed to prove anything"
    );
    let verdict = check(&history, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("seed {seed}: the recorded history is malformed: {e}"));
    assert_eq!(
        verdict,
        Verdict::Linearizable,
        "seed {seed}: nemesis {schedule:?}"
    );
}
