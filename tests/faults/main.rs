//! `shardkv-faults`: a Jepsen-style fault-injection run on the real binaries.
//!
//! It creates a network namespace (`ip netns add`, so it needs root) and
//! runs itself inside it. There it starts 3 shardmasters and 3 groups of 3
//! (or 5) kvservers, each node on its own loopback address (127.0.1.x; a
//! node connects from the address it listens on, so iptables can tell nodes
//! apart). Concurrent clients record every operation's call, return and
//! result while a nemesis, driven by a printed seed, partitions the nodes
//! with iptables (random halves, an isolated group leader, a bridge, a
//! majority ring in every group, a node cut off one way only),
//! resets connections at random, kills and restarts nodes, pauses them with
//! SIGSTOP, and, at the same time, moves shards and joins and leaves a
//! group, and removes a replica of group 1 from its members and adds it
//! back. After the faults heal, every key is read back: every acknowledged
//! append must be there, and the history must be linearizable per key.
//!
//! ```text
//! shardkv-faults [--duration SECONDS] [--replicas 3|5] [--seed N] [--out DIR]
//! ```
//!
//! Exit 0 when the run found nothing; 1 on any anomaly or lost write, with
//! the seed, and the history and the nemesis schedule written to DIR.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use shardkv::linearizability::{check, Input, Operation, Verdict};
use shardkv::paxos::sim::SimRng;
use shardkv::proto::kv::shard_kv_client::ShardKvClient;
use shardkv::proto::kv::{GroupStatusReply, GroupStatusRequest};
use shardkv::replica::members::MembersAdmin;
use shardkv::shardkv::clerk::{Clerk, ClerkError, ClerkOptions};
use shardkv::shardkv::key_to_shard;
use shardkv::shardmaster::client::ClientError;
use shardkv::shardmaster::DEFAULT_SHARDS;
use shardkv_cluster_tests::{Cluster, Node};
use tokio::task::JoinSet;

/// Set inside the namespace, to the namespace's name.
const IN_NETNS: &str = "SHARDKV_FAULTS_NETNS";
const GROUPS: usize = 3;
/// Group 3 leaves in the second half of the run, and every later attempt
/// to join it again must be refused (its gid is retired); 1 and 2 stay.
const TOGGLED_GID: u64 = 3;
/// Clients that each make one write and go: thousands of sessions.
const SHORT_LIVED_CLIENTS_PER_S: u64 = 40;
const CLIENTS: u64 = 5;
const KEYS: u64 = 8;
/// A client operation gives up after this long; its outcome is then unknown.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(3);
/// A replica's status after healing must come within this: long enough
/// for a slow sync under the state's lock on a loaded machine, short
/// enough that a node which accepts and never answers is reported within
/// the garbage check's minute rather than hang the run.
const STATUS_TIMEOUT: Duration = Duration::from_secs(20);
/// The chain every nemesis rule goes into, so healing is one flush.
const CHAIN: &str = "SHARDKV_NEMESIS";

#[derive(Parser, Clone)]
#[command(
    name = "shardkv-faults",
    about = "Fault injection on real processes, with a linearizability verdict"
)]
struct Opts {
    /// How long clients run while the nemesis acts, in seconds.
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// Replicas in each kvserver group: 3 or 5 (the shardmaster has 3).
    #[arg(long, default_value_t = 3, value_parser = parse_replicas)]
    replicas: usize,
    /// The seed for the workload and the nemesis (default: from the clock).
    #[arg(long, env = "SHARDKV_SEED")]
    seed: Option<u64>,
    /// Where the history and the schedule go when the run fails.
    #[arg(long, default_value = "target/faults")]
    out: PathBuf,
}

fn parse_replicas(s: &str) -> Result<usize, String> {
    match s {
        "3" => Ok(3),
        "5" => Ok(5),
        _ => Err(format!("groups have 3 or 5 replicas, not {s}")),
    }
}

fn main() -> ExitCode {
    let opts = Opts::parse();
    if std::env::var_os(IN_NETNS).is_some() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        return runtime.block_on(run(opts));
    }
    // Outside: make the namespace, run inside it, remove it.
    let seed = opts.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let ns = format!("shardkv-faults-{}", std::process::id());
    if let Err(e) = sh("ip", &["netns", "add", &ns]) {
        eprintln!("shardkv-faults: cannot create a network namespace (root needed): {e}");
        return ExitCode::from(2);
    }
    let exe = std::env::current_exe().expect("own path");
    let status = Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(exe)
        .args([
            "--duration",
            &opts.duration.to_string(),
            "--replicas",
            &opts.replicas.to_string(),
            "--seed",
            &seed.to_string(),
        ])
        .arg("--out")
        .arg(&opts.out)
        .env(IN_NETNS, &ns)
        // Every kvserver drops 2% of its replies after executing: lost
        // acknowledgements of pulls, deletes and writes.
        .env("SHARDKV_FAULT_DROP_REPLY", "0.02")
        .env("SHARDKV_FAULT_SEED", seed.to_string())
        .status();
    let _ = sh("ip", &["netns", "del", &ns]);
    match status {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        Ok(s) => {
            eprintln!("shardkv-faults: FAILED (seed {seed}; rerun with --seed {seed}): {s}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("shardkv-faults: cannot run inside {ns}: {e}");
            ExitCode::from(2)
        }
    }
}

/// Runs a command; an error says what it printed.
fn sh(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn iptables(args: &[&str]) {
    if let Err(e) = sh("iptables", args) {
        panic!("{e}");
    }
}

fn ip_of(addr: &str) -> &str {
    addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr)
}

/// Blocks traffic between every node of `a` and every node of `b`, both ways.
fn cut(a: &[String], b: &[String]) {
    for x in a {
        for y in b {
            for (s, d) in [(x, y), (y, x)] {
                iptables(&["-A", CHAIN, "-s", ip_of(s), "-d", ip_of(d), "-j", "DROP"]);
            }
        }
    }
}

/// Blocks what every node of `from` sends to every node of `to`; the other
/// way still works.
fn cut_one_way(from: &[String], to: &[String]) {
    for x in from {
        for y in to {
            iptables(&["-A", CHAIN, "-s", ip_of(x), "-d", ip_of(y), "-j", "DROP"]);
        }
    }
}

/// Cuts the links of a Paxos group so every member still sees a majority,
/// but not the same one: with 3, one link; with 5, a ring (each member
/// keeps its two neighbours). Returns the links cut.
fn majority_ring(members: &[String], rng: &mut SimRng) -> Vec<String> {
    let n = members.len();
    let pairs: Vec<(usize, usize)> = if n == 5 {
        let mut order: Vec<usize> = (0..n).collect();
        shuffle(&mut order, rng);
        (0..n).map(|i| (order[i], order[(i + 2) % n])).collect()
    } else {
        let a = rng.below(n as u64) as usize;
        vec![(a, (a + 1 + rng.below(n as u64 - 1) as usize) % n)]
    };
    for (a, b) in &pairs {
        cut(&[members[*a].clone()], &[members[*b].clone()]);
    }
    pairs
        .iter()
        .map(|(a, b)| format!("{}-{}", members[*a], members[*b]))
        .collect()
}

fn heal_network() {
    iptables(&["-F", CHAIN]);
}

struct Shared {
    history: Mutex<Vec<Operation>>,
    ok: AtomicUsize,
    failed: AtomicUsize,
    unknown: AtomicUsize,
}

async fn run(opts: Opts) -> ExitCode {
    let seed = opts.seed.expect("the outer process passes the seed");
    println!(
        "shardkv-faults: seed {seed} (rerun with --seed {seed}), {} s, groups of {}",
        opts.duration, opts.replicas
    );
    sh("ip", &["link", "set", "lo", "up"]).expect("loopback up");
    iptables(&["-N", CHAIN]);
    iptables(&["-I", "INPUT", "-j", CHAIN]);

    let master = |i: usize| format!("127.0.1.{}:7000", 1 + i);
    let member = |g: usize, i: usize| format!("127.0.1.{}:7000", 10 * g + i);
    let replicas = opts.replicas;
    let mut cluster = Cluster::start_at("127.0.1.1", GROUPS, replicas, &master, &member, &[]).await;
    for gid in 1..=GROUPS as u64 {
        cluster.join(gid).await;
    }
    let masters = cluster.master_addrs();
    let start = Instant::now();
    let run_for = Duration::from_secs(opts.duration);
    let now = move || start.elapsed().as_micros() as u64;
    let shared = Arc::new(Shared {
        history: Mutex::default(),
        ok: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        unknown: AtomicUsize::new(0),
    });

    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let options = ClerkOptions {
            timeout: CLIENT_TIMEOUT,
            ..Default::default()
        };
        let ck = Clerk::new(&masters, options).expect("clerk");
        let shared = shared.clone();
        let mut rng = SimRng::new(seed ^ (c + 1).wrapping_mul(0x9e37_79b9));
        clients.push(tokio::spawn(async move {
            let mut i = 0u64;
            while start.elapsed() < run_for {
                i += 1;
                let key = Bytes::from(format!("f{}", rng.below(KEYS)));
                let input = if rng.below(10) < 4 {
                    Input::Get
                } else {
                    Input::Append(Bytes::from(format!("{c}.{i};")))
                };
                let call = now();
                let result = match &input {
                    Input::Get => ck.get(key.clone()).await,
                    Input::Append(v) => ck.append(key.clone(), v.clone()).await.map(|_| None),
                    _ => unreachable!("the workload is gets and appends"),
                };
                let ret = now();
                let (output, ret) = match result {
                    Ok(output) => {
                        shared.ok.fetch_add(1, Ordering::Relaxed);
                        (output, ret)
                    }
                    Err(ClerkError::Timeout { .. }) => {
                        shared.unknown.fetch_add(1, Ordering::Relaxed);
                        (None, u64::MAX)
                    }
                    // A definite failure: the operation did not happen.
                    Err(_) => {
                        shared.failed.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                };
                shared.history.lock().unwrap().push(Operation {
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

    // Two nemeses at once: network and processes, and reconfiguration.
    let schedule: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = {
        let schedule = schedule.clone();
        move |what: String| {
            println!("[{:>7.2}s] {what}", start.elapsed().as_secs_f64());
            schedule
                .lock()
                .unwrap()
                .push(format!("{:.3} {what}", start.elapsed().as_secs_f64()));
        }
    };
    // Short-lived clients: a new Clerk (a new session) per write, each to a
    // key of its own, all read back at the end.
    let short_lived = {
        let masters = masters.clone();
        tokio::spawn(async move {
            let mut written = Vec::new();
            let mut failed = 0usize;
            let mut n = 0u64;
            let mut running = JoinSet::new();
            while start.elapsed() < run_for {
                n += 1;
                let masters = masters.clone();
                running.spawn(async move {
                    let options = ClerkOptions {
                        timeout: CLIENT_TIMEOUT,
                        ..Default::default()
                    };
                    let ck = Clerk::new(&masters, options).expect("clerk");
                    (n, ck.put(format!("short-{n}"), format!("{n}")).await)
                });
                tokio::time::sleep(Duration::from_millis(1000 / SHORT_LIVED_CLIENTS_PER_S)).await;
            }
            while let Some(done) = running.join_next().await {
                match done.expect("short-lived client") {
                    (n, Ok(())) => written.push(n),
                    (_, Err(_)) => failed += 1,
                }
            }
            (written, failed)
        })
    };

    let reconfig = {
        let log = log.clone();
        let masters = masters.clone();
        let toggled: Vec<String> = (0..replicas).map(|i| member(GROUPS, i)).collect();
        let mut rng = SimRng::new(seed ^ 0x5eed_cafe);
        tokio::spawn(async move {
            let admin = shardkv::shardmaster::client::ShardMasterClient::new(
                &masters,
                Duration::from_secs(5),
            )
            .expect("admin");
            let mut joined = true;
            let mut left_acknowledged = false;
            let mut rejoined = Vec::new();
            while start.elapsed() < run_for {
                tokio::time::sleep(Duration::from_millis(500 + rng.below(1500))).await;
                let result = if rng.below(3) == 0 && start.elapsed() > run_for / 2 {
                    if !joined {
                        log(format!("join group {TOGGLED_GID} again (must be refused)"));
                        match admin.join(TOGGLED_GID, toggled.clone()).await {
                            Err(ClientError::Rejected(why)) if why.contains("retired") => {
                                log(format!("  refused: {why}"));
                            }
                            // No answer says nothing; whether the gid came
                            // back is read from the last configuration.
                            Err(ClientError::Timeout(..)) => {
                                log("  (the shardmaster did not answer)".into());
                            }
                            other => rejoined.push(format!("{other:?}")),
                        }
                        continue;
                    }
                    joined = false;
                    log(format!("leave group {TOGGLED_GID}"));
                    let left = admin.leave(TOGGLED_GID).await;
                    left_acknowledged |= left.is_ok();
                    left
                } else {
                    let key = format!("f{}", rng.below(KEYS));
                    let shard = key_to_shard(key.as_bytes(), DEFAULT_SHARDS) as u64;
                    let gid = 1 + rng.below(if joined { 3 } else { 2 });
                    log(format!("move shard {shard} to group {gid}"));
                    admin.r#move(shard, gid).await
                };
                if let Err(e) = result {
                    log(format!("  (the shardmaster did not answer: {e})"));
                }
            }
            (rejoined, !joined, left_acknowledged)
        })
    };

    // A third nemesis: group 1's members change. One replica at a time is
    // removed from the group and, a while later, added again (the same
    // life: its storage is kept), as a rolling replacement does, while the
    // other nemeses partition, kill and pause nodes.
    let membership = {
        let log = log.clone();
        let servers: Vec<String> = (0..replicas).map(|i| member(1, i)).collect();
        let mut rng = SimRng::new(seed ^ 0x3e3b_e125);
        tokio::spawn(async move {
            let admin = MembersAdmin::new(servers.clone(), Duration::from_secs(2));
            // The replicas the group does not count as voters now, by its
            // own account (a step whose answer was lost may have been
            // taken): None if no member answered.
            let outside = async |admin: &MembersAdmin| {
                let members = admin.list().await.ok()?;
                let out: Vec<String> = (servers.iter())
                    .filter(|s| !members.members.iter().any(|m| m.address == **s && m.voter))
                    .cloned()
                    .collect();
                Some(out)
            };
            let mut changes = 0usize;
            while start.elapsed() < run_for {
                tokio::time::sleep(Duration::from_millis(1000 + rng.below(2000))).await;
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                let Some(out) = outside(&admin).await else {
                    log("  (no member of group 1 answered)".into());
                    continue;
                };
                if let Some(addr) = out.first() {
                    log(format!("add {addr} to group 1 again"));
                    match admin.add(addr, "kv-1", deadline).await {
                        Ok(_) => changes += 1,
                        Err(e) => log(format!("  (not added yet: {e})")),
                    }
                } else {
                    let addr = servers[rng.below(servers.len() as u64) as usize].clone();
                    log(format!("remove {addr} from group 1"));
                    match admin.remove(&addr, deadline).await {
                        Ok(_) => changes += 1,
                        Err(e) => log(format!("  (not removed: {e})")),
                    }
                }
            }
            // The group ends whole: every replica a voter again.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
            loop {
                match outside(&admin).await {
                    Some(out) if out.is_empty() => return Ok(changes),
                    Some(out) => {
                        log(format!("add {} to group 1 again (end of run)", out[0]));
                        if let Err(e) = admin.add(&out[0], "kv-1", deadline).await {
                            log(format!("  (not added yet: {e})"));
                        } else {
                            changes += 1;
                        }
                    }
                    None => log("  (no member of group 1 answered)".into()),
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(format!(
                        "group 1 did not get every replica back as a voter after the faults \
                         ({changes} membership changes taken)"
                    ));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    let mut rng = SimRng::new(seed);
    let servers: Vec<String> = cluster
        .masters
        .iter()
        .chain(cluster.groups.iter().flatten())
        .map(|n| n.addr.clone())
        .collect();
    while start.elapsed() < run_for {
        let hold = Duration::from_millis(1000 + rng.below(3000));
        match rng.below(8) {
            0 => {
                let mut shuffled = servers.clone();
                shuffle(&mut shuffled, &mut rng);
                let (a, b) = shuffled.split_at(shuffled.len() / 2);
                log(format!("partition {a:?} | {b:?} for {hold:?}"));
                cut(a, b);
            }
            1 => {
                let gid = 1 + rng.below(GROUPS as u64) as usize;
                let i = cluster.kv_leader(gid as u64).await.unwrap_or(0);
                let leader = vec![cluster.groups[gid - 1][i].addr.clone()];
                let rest: Vec<String> = servers
                    .iter()
                    .filter(|s| **s != leader[0])
                    .cloned()
                    .collect();
                log(format!(
                    "isolate group {gid}'s leader {} for {hold:?}",
                    leader[0]
                ));
                cut(&leader, &rest);
            }
            2 => {
                // A bridge: two sides that reach only one node in between.
                let mut shuffled = servers.clone();
                shuffle(&mut shuffled, &mut rng);
                let bridge = shuffled.pop().unwrap();
                let (a, b) = shuffled.split_at(shuffled.len() / 2);
                log(format!(
                    "bridge {bridge} between {a:?} | {b:?} for {hold:?}"
                ));
                cut(a, b);
            }
            6 => {
                // A majority ring in every Paxos group.
                let mut cuts = Vec::new();
                for members in std::iter::once(&cluster.masters).chain(cluster.groups.iter()) {
                    let addrs: Vec<String> = members.iter().map(|n| n.addr.clone()).collect();
                    cuts.extend(majority_ring(&addrs, &mut rng));
                }
                log(format!("majority rings, cut {cuts:?} for {hold:?}"));
            }
            7 => {
                // One node cut off one way only: it hears nothing, or
                // nothing it sends arrives (a half-broken link).
                let node = servers[rng.below(servers.len() as u64) as usize].clone();
                let rest: Vec<String> = servers.iter().filter(|s| **s != node).cloned().collect();
                if rng.below(2) == 0 {
                    log(format!("{node} hears nothing for {hold:?}"));
                    cut_one_way(&rest, std::slice::from_ref(&node));
                } else {
                    log(format!("nothing {node} sends arrives for {hold:?}"));
                    cut_one_way(std::slice::from_ref(&node), &rest);
                }
            }
            3 => {
                log(format!("reset 5% of connections' packets for {hold:?}"));
                iptables(&[
                    "-A",
                    CHAIN,
                    "-p",
                    "tcp",
                    "-s",
                    "127.0.1.0/24",
                    "-d",
                    "127.0.1.0/24",
                    "-m",
                    "statistic",
                    "--mode",
                    "random",
                    "--probability",
                    "0.05",
                    "-j",
                    "REJECT",
                    "--reject-with",
                    "tcp-reset",
                ]);
            }
            4 => {
                let node = pick(&mut cluster, &mut rng);
                log(format!("kill -9 {} for {hold:?}", node.addr));
                node.kill9();
                tokio::time::sleep(hold).await;
                node.start();
                log(format!("restarted {}", node.addr));
                continue;
            }
            _ => {
                let node = pick(&mut cluster, &mut rng);
                log(format!("SIGSTOP {} for {hold:?}", node.addr));
                node.pause();
                tokio::time::sleep(hold).await;
                node.resume();
                log(format!("SIGCONT {}", node.addr));
                continue;
            }
        }
        tokio::time::sleep(hold).await;
        heal_network();
        log("heal".into());
        tokio::time::sleep(Duration::from_millis(200 + rng.below(800))).await;
    }
    heal_network();
    for c in clients {
        c.await.expect("client task");
    }
    let (mut rejoined, leave_tried, left_acknowledged) =
        reconfig.await.expect("reconfiguration task");
    let (short_written, short_failed) = short_lived.await.expect("short-lived clients");
    let membership_outcome = membership.await.expect("membership task");
    log("all faults healed; reading every key".into());

    // Read back every key, with time to recover.
    let ck = Clerk::new(
        &masters,
        ClerkOptions {
            timeout: Duration::from_secs(60),
            ..Default::default()
        },
    )
    .expect("clerk");
    let mut history = std::mem::take(&mut *shared.history.lock().unwrap());
    let mut problems = Vec::new();
    match membership_outcome {
        Ok(changes) => log(format!("{changes} membership changes of group 1 taken")),
        Err(e) => problems.push(e),
    }
    for k in 0..KEYS {
        let key = Bytes::from(format!("f{k}"));
        let call = now();
        match ck.get(key.clone()).await {
            Ok(value) => {
                let held: BTreeSet<&[u8]> = value
                    .as_deref()
                    .unwrap_or_default()
                    .split(|b| *b == b';')
                    .filter(|t| !t.is_empty())
                    .collect();
                for op in history.iter().filter(|o| o.key == key && o.ret != u64::MAX) {
                    if let Input::Append(v) = &op.input {
                        if !held.contains(&v[..v.len() - 1]) {
                            problems.push(format!(
                                "lost write: acknowledged append {} to {} is not in the final value",
                                String::from_utf8_lossy(v),
                                String::from_utf8_lossy(&key)
                            ));
                        }
                    }
                }
                history.push(Operation {
                    client: CLIENTS,
                    key,
                    input: Input::Get,
                    output: value,
                    call,
                    ret: now(),
                });
            }
            Err(e) => problems.push(format!(
                "the cluster did not recover: reading {} after healing: {e}",
                String::from_utf8_lossy(&key)
            )),
        }
    }
    if leave_tried {
        // Every fault has healed, so the shardmaster answers. Its history
        // says what unanswered calls did: once out, the gid stays out.
        let admin =
            shardkv::shardmaster::client::ShardMasterClient::new(&masters, Duration::from_secs(30))
                .expect("admin");
        match gid_history(&admin, TOGGLED_GID).await {
            Ok(history) => {
                let left_at = (history.windows(2))
                    .find(|w| w[0].1 && !w[1].1)
                    .map(|w| w[1].0);
                if let Some(left_at) = left_at {
                    if let Some((back_in, _)) =
                        (history.iter()).find(|(num, present)| *num > left_at && *present)
                    {
                        rejoined.push(format!(
                            "it left in configuration {left_at} and is in {back_in}"
                        ));
                    }
                } else if left_acknowledged {
                    rejoined.push("its acknowledged leave is in no configuration".into());
                }
            }
            Err(e) => problems.push(format!("cannot read the configurations: {e}")),
        }
    }
    for answer in rejoined {
        problems.push(format!("a retired gid was joined again: {answer}"));
    }
    for n in &short_written {
        match ck.get(format!("short-{n}")).await {
            Ok(Some(v)) if v == n.to_string().as_bytes() => {}
            other => problems.push(format!(
                "lost write: a short-lived client's acknowledged put of short-{n} reads {other:?}"
            )),
        }
    }
    println!(
        "shardkv-faults: {} short-lived clients wrote once each ({short_failed} gave up)",
        short_written.len()
    );
    problems.extend(garbage(&cluster).await);
    tighten_unknown_appends(&mut history);
    let verdict = check(&history, Duration::from_secs(120));
    match &verdict {
        Ok(Verdict::Linearizable) => {}
        Ok(Verdict::NotLinearizable { key, operations }) => problems.push(format!(
            "anomaly: the {operations} operations on {} are not linearizable",
            String::from_utf8_lossy(key)
        )),
        Ok(Verdict::Unknown { keys }) => problems.push(format!(
            "the checker ran out of time on {}: no verdict",
            keys.iter()
                .map(|k| String::from_utf8_lossy(k))
                .collect::<Vec<_>>()
                .join(", ")
        )),
        Err(e) => problems.push(format!("the recorded history is malformed: {e}")),
    }
    let (ok, failed, unknown) = (
        shared.ok.load(Ordering::Relaxed),
        shared.failed.load(Ordering::Relaxed),
        shared.unknown.load(Ordering::Relaxed),
    );
    let faults = schedule.lock().unwrap().len();
    println!(
        "shardkv-faults: seed {seed}: {ok} ok, {failed} failed, {unknown} unknown (timed out); \
         {faults} nemesis steps; {} anomalies or lost writes; verdict {verdict:?}",
        problems.len()
    );
    if problems.is_empty() {
        return ExitCode::SUCCESS;
    }
    for p in problems.iter().take(20) {
        println!("  {p}");
    }
    let dir = opts.out.join(format!("seed-{seed}"));
    let written = write_evidence(&dir, &history, &schedule.lock().unwrap())
        .and_then(|()| copy_node_logs(cluster.dir.path(), &dir.join("logs")));
    drop(cluster);
    if let Err(e) = written {
        println!("  could not write the evidence to {}: {e}", dir.display());
    } else {
        println!("  history, schedule and node logs in {}", dir.display());
    }
    ExitCode::from(1)
}

/// Once every fault has healed: no group holds a copy of a shard it no
/// longer owns, nor still has an old holder to tell, for long.
async fn garbage(cluster: &Cluster) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut left = Vec::new();
        for (g, members) in cluster.groups.iter().enumerate() {
            for node in members {
                match group_status(&node.addr).await {
                    Ok(s) if s.outgoing.is_empty() && s.pending_deletes == 0 => {}
                    Ok(s) => left.push(format!(
                        "garbage: group {} replica {} (configuration {}, applied slot {}) \
                         still holds {} handed-off copies {:?} and has {} old holders to tell",
                        g + 1,
                        node.addr,
                        s.config_num,
                        s.applied_slot,
                        s.outgoing.len(),
                        (s.outgoing.iter())
                            .map(|o| (o.config_num, o.shard))
                            .collect::<Vec<_>>(),
                        s.pending_deletes
                    )),
                    Err(e) => left.push(format!("group {} replica {}: {e}", g + 1, node.addr)),
                }
            }
        }
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A replica's status, or why not: bounded, so a node that accepts but
/// never answers is reported, not waited on for the rest of the run.
async fn group_status(addr: &str) -> Result<GroupStatusReply, String> {
    let ask = async {
        let mut client = ShardKvClient::connect(format!("http://{addr}"))
            .await
            .map_err(|e| e.to_string())?;
        let reply = client.group_status(GroupStatusRequest {}).await;
        reply
            .map(|r| r.into_inner())
            .map_err(|e| e.message().to_string())
    };
    tokio::time::timeout(STATUS_TIMEOUT, ask)
        .await
        .map_err(|_| format!("no status within {STATUS_TIMEOUT:?}"))?
}

/// Narrows the appends that timed out, without changing the verdict, so the
/// search does not try every order of them at every read.
///
/// The workload only appends unique tokens and reads, so a token's effect
/// never disappears. An unknown append whose token no read ever saw either
/// never happened or happened after the last read: either way nothing
/// observes it, so it is dropped. One some read saw took effect before that
/// read returned, so that return time bounds it.
fn tighten_unknown_appends(history: &mut Vec<Operation>) {
    let mut first_seen: BTreeMap<(Bytes, Vec<u8>), u64> = BTreeMap::new();
    for op in history.iter() {
        if let (Input::Get, Some(value)) = (&op.input, &op.output) {
            for token in value.split(|b| *b == b';').filter(|t| !t.is_empty()) {
                let seen = first_seen
                    .entry((op.key.clone(), token.to_vec()))
                    .or_insert(op.ret);
                *seen = (*seen).min(op.ret);
            }
        }
    }
    history.retain_mut(|op| {
        let Input::Append(v) = &op.input else {
            return true;
        };
        if op.ret != u64::MAX {
            return true;
        }
        let token = v.strip_suffix(b";").unwrap_or(v).to_vec();
        match first_seen.get(&(op.key.clone(), token)) {
            Some(&seen) => {
                op.ret = seen.max(op.call);
                true
            }
            None => false,
        }
    });
}

/// Whether `gid` is in each configuration, from the first to the latest.
async fn gid_history(
    admin: &shardkv::shardmaster::client::ShardMasterClient,
    gid: u64,
) -> Result<Vec<(u64, bool)>, ClientError> {
    let latest = admin.query(None).await?.num;
    let mut history = Vec::new();
    for num in 1..=latest {
        let config = admin.query(Some(num)).await?;
        history.push((num, config.groups.contains_key(&gid)));
    }
    Ok(history)
}

/// Every node's log, for what the history cannot say (what a replica
/// waited on, which fetch failed).
fn copy_node_logs(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "log") {
            if let Some(name) = path.file_name() {
                std::fs::copy(&path, to.join(name))?;
            }
        }
    }
    Ok(())
}

fn write_evidence(
    dir: &std::path::Path,
    history: &[Operation],
    schedule: &[String],
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("schedule.txt"), schedule.join("\n") + "\n")?;
    let mut by_key: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for op in history {
        let ret = if op.ret == u64::MAX {
            "never".to_string()
        } else {
            op.ret.to_string()
        };
        by_key
            .entry(String::from_utf8_lossy(&op.key).into_owned())
            .or_default()
            .push(format!(
                "client {} call {} ret {} {:?} -> {:?}",
                op.client,
                op.call,
                ret,
                op.input,
                op.output
                    .as_ref()
                    .map(|o| String::from_utf8_lossy(o).into_owned())
            ));
    }
    let mut text = String::new();
    for (key, ops) in by_key {
        text.push_str(&format!("# {key}\n"));
        for op in ops {
            text.push_str(&op);
            text.push('\n');
        }
    }
    std::fs::write(dir.join("history.txt"), text)
}

fn shuffle<T>(items: &mut [T], rng: &mut SimRng) {
    for i in (1..items.len()).rev() {
        items.swap(i, rng.below(i as u64 + 1) as usize);
    }
}

/// A random node: a shardmaster or a kvserver.
fn pick<'a>(cluster: &'a mut Cluster, rng: &mut SimRng) -> &'a mut Node {
    let total = cluster.masters.len() + cluster.groups.iter().map(Vec::len).sum::<usize>();
    let mut n = rng.below(total as u64) as usize;
    if n < cluster.masters.len() {
        return &mut cluster.masters[n];
    }
    n -= cluster.masters.len();
    let replicas = cluster.groups[0].len();
    &mut cluster.groups[n / replicas][n % replicas]
}
