//! Decided commands per second for a 3-replica group: in-process (memory
//! storage, direct hand-off) and over gRPC on loopback (write-ahead log, fdatasync).
//!
//! `cargo bench --bench paxos -- [--seconds S] [--clients 1,64] [--value-bytes N]`

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use shardkv::paxos::{Config, MemStorage, RoleKind, Slot, Storage, WalOptions, WalStorage};
use shardkv::replica::grpc::{AddressBook, GrpcTransport, PaxosPeerService};
use shardkv::replica::local::LocalNetwork;
use shardkv::replica::{ApplyError, Replica, ReplicaOptions, StateMachine, Transport};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

/// Counts commands; the benchmark measures replication, not an application.
struct Counter(u64);

impl StateMachine for Counter {
    fn apply(&mut self, _slot: Slot, _command: &[u8]) -> Result<Bytes, ApplyError> {
        self.0 += 1;
        Ok(Bytes::new())
    }
    fn snapshot(&self) -> Bytes {
        Bytes::copy_from_slice(&self.0.to_le_bytes())
    }
    fn restore(&mut self, _index: Slot, s: &[u8]) -> Result<(), String> {
        let bytes: [u8; 8] = s.try_into().map_err(|_| "bad snapshot".to_string())?;
        self.0 = u64::from_le_bytes(bytes);
        Ok(())
    }
}

struct Args {
    seconds: u64,
    clients: Vec<usize>,
    value_bytes: usize,
}

fn parse_args() -> Args {
    let mut args = Args {
        seconds: 5,
        clients: vec![1, 64],
        value_bytes: 256,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => {
                args.seconds = it.next().and_then(|v| v.parse().ok()).expect("--seconds N")
            }
            "--clients" => {
                args.clients = it
                    .next()
                    .expect("--clients 1,64")
                    .split(',')
                    .map(|c| c.parse().expect("client count"))
                    .collect()
            }
            "--value-bytes" => {
                args.value_bytes = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--value-bytes N")
            }
            _ => {} // cargo bench passes --bench
        }
    }
    args
}

fn start<S: Storage + 'static, T: Transport>(id: u32, storage: S, transport: T) -> Replica {
    let options = ReplicaOptions {
        snapshot_every_slots: 10_000,
        ..Default::default()
    };
    Replica::start(
        Config::new_group(id, 3),
        storage,
        Counter(0),
        transport,
        options,
    )
    .expect("start")
    .0
}

async fn leader(replicas: &[Replica]) -> Replica {
    for _ in 0..1000 {
        if let Some(r) = replicas
            .iter()
            .find(|r| r.status().role == RoleKind::Leader)
        {
            return r.clone();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no leader");
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

async fn run(name: &str, replicas: &[Replica], clients: usize, seconds: u64, value_bytes: usize) {
    let leader = leader(replicas).await;
    let value = Bytes::from(vec![b'x'; value_bytes]);
    // Warm up so connections and the pipeline are established.
    for _ in 0..100 {
        leader.propose(value.clone()).await.expect("warm-up");
    }
    let slots_before = leader.status().commit;
    let syncs_before = leader.status().syncs;
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (leader, value, stop) = (leader.clone(), value.clone(), stop.clone());
            tokio::spawn(async move {
                let mut latencies_us = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    leader
                        .propose(value.clone())
                        .await
                        .expect("leader stayed in place");
                    latencies_us.push(t.elapsed().as_micros() as u32);
                }
                latencies_us
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.expect("client task"));
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let status = leader.status();
    let slots = status.commit - slots_before;
    let commands = latencies.len();
    println!(
        "{name:<28} clients={clients:<3} {:>9.0} cmd/s  batch={:>6.1} cmd/slot  syncs/s={:>6.0}  p50={:.2}ms p99={:.2}ms max={:.2}ms",
        commands as f64 / elapsed,
        commands as f64 / slots.max(1) as f64,
        (status.syncs - syncs_before) as f64 / elapsed,
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        percentile(&latencies, 1.0),
    );
}

async fn bench_in_process(args: &Args) {
    let network = LocalNetwork::new(3);
    let replicas: Vec<Replica> = (0..3)
        .map(|id| {
            let r = start(id, MemStorage::new(), network.transport(id));
            network.register(id, r.clone());
            r
        })
        .collect();
    for &c in &args.clients {
        run(
            "in-process, memory storage",
            &replicas,
            c,
            args.seconds,
            args.value_bytes,
        )
        .await;
    }
    replicas.iter().for_each(|r| r.shutdown());
}

async fn bench_grpc(args: &Args) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut listeners = Vec::new();
    let mut peers = Vec::new();
    for _ in 0..3 {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr: SocketAddr = l.local_addr().expect("addr");
        peers.push(addr.to_string());
        listeners.push(l);
    }
    let mut replicas = Vec::new();
    for (id, l) in listeners.into_iter().enumerate() {
        let id = id as u32;
        let storage =
            WalStorage::open(dir.path().join(format!("{id}")), WalOptions::default()).expect("wal");
        let replica = start(
            id,
            storage,
            GrpcTransport::start("bench", id, &AddressBook::from_peers(&peers)),
        );
        let service = PaxosPeerService::new("bench", replica.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service.into_server())
                .serve_with_incoming(TcpListenerStream::new(l)),
        );
        replicas.push(replica);
    }
    for &c in &args.clients {
        run(
            "gRPC loopback, WAL+fdatasync",
            &replicas,
            c,
            args.seconds,
            args.value_bytes,
        )
        .await;
    }
    replicas.iter().for_each(|r| r.shutdown());
}

fn main() {
    let args = parse_args();
    println!(
        "3 replicas, {}-byte commands, {} s per run, {} cores",
        args.value_bytes,
        args.seconds,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        bench_in_process(&args).await;
        bench_grpc(&args).await;
    });
}
