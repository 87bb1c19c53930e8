//! Running a role as a long-lived process: storage in a data directory,
//! one gRPC port for peers and clients, health, metrics and a clean
//! shutdown. The binaries are thin wrappers over [`run_master`],
//! [`run_kv`] and [`local`].

pub mod local;
pub mod metrics;
pub mod probe;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::paxos::{Config as PaxosConfig, WalOptions, WalStorage};
use crate::replica::grpc::{AddressBook, GrpcTransport, PaxosPeerService};
use crate::replica::members::MembersService;
use crate::replica::{Replica, ReplicaOptions, StateMachine, Status};
use crate::shardkv::server::{KvServer, KvServerOptions, Unreliable};
use crate::shardkv::state::{KvState, SharedKvState};
use crate::shardkv::store::StoreOptions;
use crate::shardkv::Limits;
use crate::shardmaster::client::ShardMasterClient;
use crate::shardmaster::service::ShardMasterService;
use crate::shardmaster::{Gid, ShardMasterState, SharedMasterState};

use self::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("invalid setting: {0}")]
    Config(String),
    #[error("data directory {path}: {message}")]
    DataDir { path: PathBuf, message: String },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("replica failed: {0}")]
    Replica(String),
    #[error("server failed: {0}")]
    Serve(String),
}

/// Settings shared by both roles.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// This replica's index in `peers`.
    pub id: u32,
    /// Every replica of the group, `host:port`, in id order. Names are
    /// resolved on every connection, so a pod that returns with a new IP is
    /// found again.
    pub peers: Vec<String>,
    pub data_dir: PathBuf,
    /// Where to listen; defaults to `peers[id]`.
    pub listen: Option<String>,
    pub metrics_addr: Option<SocketAddr>,
    /// The Paxos tick: heartbeats and election timeouts are counted in it.
    pub tick: Duration,
    /// Applied slots between checkpoints (a store sync, then the log is
    /// compacted through it): bounds the log a restart replays.
    pub snapshot_every_slots: u64,
    /// Log entries kept for a lagging replica; one further behind gets a
    /// snapshot streamed instead.
    pub log_retain_slots: u64,
    /// A kvserver's store memory (cache and memtables): what bounds its
    /// RSS whatever the data size. The shardmaster has no store.
    pub store: StoreOptions,
    /// Joins a running group: on blank storage, this replica is a new
    /// member that votes in nothing until `shardkvctl member add` adds it.
    /// Ignored once the data directory holds state.
    pub join: bool,
    /// The group's size when it was created: replicas with ids below it
    /// were its first voters; a replica at or above it is a new member on
    /// blank storage (as with `join`). `None`: every replica in `peers`.
    /// Lets `peers` name every replica the group may grow to (an operator
    /// lists them all, so its pod template never changes with the size).
    pub initial_replicas: Option<u32>,
    /// The group already exists (etcd's `--initial-cluster-state
    /// existing`): blank storage is never a new group. A group first
    /// started alone would otherwise, on a lost disk, start alone again
    /// and serve nothing under the group's name; this way the replica
    /// waits to be added as a new member. A group first started with more
    /// replicas recovers a lost disk from its first voters, unless they all
    /// answer blank: then too the replica waits to be added.
    pub existing_group: bool,
}

/// A node's Paxos tick unless told otherwise: heartbeats every 100 ms and
/// elections after 500 to 1,000 ms, near etcd's (100 ms and 1 s). A replica's
/// thread sends no heartbeat while it syncs, and under a join at 1,000,000
/// keys syncs took up to 380 ms: at the 10 ms tick (elections after 100 to
/// 200 ms) group 1 changed leader 6 times in one `at-size.sh` run, with 91
/// syncs longer than the election timeout; at 50 ms, 2 and 1. The cost is
/// a slower failover: the first read after a `kill -9` of the whole group
/// came 3.1 s after the restart against 2.1 s. (The library's
/// `ReplicaOptions` keeps 10 ms, for in-process tests.)
pub const NODE_TICK_DEFAULT: Duration = Duration::from_millis(50);

impl NodeOptions {
    /// The tuning defaults; the identity fields are left empty to be set.
    pub fn defaults() -> Self {
        NodeOptions {
            id: 0,
            peers: Vec::new(),
            data_dir: PathBuf::new(),
            listen: None,
            metrics_addr: None,
            tick: NODE_TICK_DEFAULT,
            snapshot_every_slots: ReplicaOptions::default().snapshot_every_slots,
            log_retain_slots: PaxosConfig::new(0, 1).log_retain_slots_max,
            store: StoreOptions::default(),
            join: false,
            initial_replicas: None,
            existing_group: false,
        }
    }

    fn check(&self) -> Result<(), NodeError> {
        if self.snapshot_every_slots == 0 || self.log_retain_slots == 0 {
            return Err(NodeError::Config(
                "--snapshot-every-slots and --log-retain-slots must be at least 1".into(),
            ));
        }
        if self.store.cache_bytes < 1 << 20 || self.store.memtable_bytes < 1 << 20 {
            return Err(NodeError::Config(
                "--store-cache-mib and --store-memtable-mib must be at least 1".into(),
            ));
        }
        if self.peers.is_empty() {
            return Err(NodeError::Config(
                "--peers must name at least one replica".into(),
            ));
        }
        if self.id as usize >= self.peers.len() {
            return Err(NodeError::Config(format!(
                "--id {} is out of range: --peers names {} replicas (ids 0..{})",
                self.id,
                self.peers.len(),
                self.peers.len()
            )));
        }
        if let Some(n) = self.initial_replicas {
            if n == 0 || n as usize > self.peers.len() {
                return Err(NodeError::Config(format!(
                    "--initial-replicas {n} must be between 1 and the {} replicas --peers names",
                    self.peers.len()
                )));
            }
        }
        for p in &self.peers {
            if p.rsplit_once(':')
                .is_none_or(|(h, port)| h.is_empty() || port.parse::<u16>().is_err())
            {
                return Err(NodeError::Config(format!(
                    "peer address {p:?} is not host:port"
                )));
            }
        }
        Ok(())
    }

    /// The group's first voters: ids below this.
    fn first_voters(&self) -> usize {
        self.initial_replicas
            .map_or(self.peers.len(), |n| n as usize)
    }

    /// Whether blank storage makes this replica a new member waiting to be
    /// added, rather than one of the group's first voters.
    fn joins_when_blank(&self) -> bool {
        self.join
            || self.id as usize >= self.first_voters()
            || (self.existing_group && self.first_voters() == 1)
    }

    fn listen_addr(&self) -> String {
        self.listen
            .clone()
            .unwrap_or_else(|| self.peers[self.id as usize].clone())
    }
}

/// What a data directory belongs to. Written on first start; a later start
/// with another role, group, id or shard count is refused rather than
/// mixing two groups' data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub role: String,
    /// 0 for the shardmaster.
    pub gid: Gid,
    pub id: u32,
    /// Replicas in `--peers` at the first start: the group's first voters
    /// (ids below it) when it was created. Later starts may name another
    /// peer list (members change): the membership the group recorded is
    /// what counts.
    pub replicas: usize,
    /// The shardmaster's shard count, fixed for its life.
    pub shards: Option<usize>,
}

const IDENTITY_FILE: &str = "shardkv-node.json";

/// How long requests in flight at shutdown may take to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

fn data_dir_error(path: &Path, message: impl Into<String>) -> NodeError {
    NodeError::DataDir {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// The data directory's lock file: held (`flock`) for a node's whole life.
const LOCK_FILE: &str = "LOCK";

/// Proof that this process alone uses a data directory. The log and the
/// store lock their own directories too; this lock comes first, so a
/// second node started by mistake is refused before it touches anything
/// (the identity file included), with an error that names the directory.
/// The lock goes with the process, however it ends (`kill -9` included).
#[derive(Debug)]
pub struct DataDirLock {
    /// Open for as long as the lock is held: closing it releases it.
    _file: std::fs::File,
}

/// Creates the data directory if needed, locks it, and checks it belongs
/// to `identity`. Keep the lock until the node has stopped.
/// Returns the identity the directory holds (`replicas` as first started).
pub fn claim_data_dir(
    dir: &Path,
    identity: &Identity,
) -> Result<(DataDirLock, Identity), NodeError> {
    std::fs::create_dir_all(dir).map_err(|e| data_dir_error(dir, format!("cannot create: {e}")))?;
    let lock_path = dir.join(LOCK_FILE);
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| data_dir_error(dir, format!("cannot open {LOCK_FILE}: {e}")))?;
    match lock_file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(data_dir_error(
                dir,
                "is in use by another running node (its LOCK file is held); \
                 stop that node, or give this one its own --data-dir",
            ))
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(data_dir_error(dir, format!("cannot lock {LOCK_FILE}: {e}")))
        }
    }
    let lock = DataDirLock { _file: lock_file };
    let found = check_identity(dir, identity)?;
    Ok((lock, found))
}

fn check_identity(dir: &Path, identity: &Identity) -> Result<Identity, NodeError> {
    let file = dir.join(IDENTITY_FILE);
    match std::fs::read(&file) {
        Ok(bytes) => {
            let found: Identity = serde_json::from_slice(&bytes)
                .map_err(|e| data_dir_error(dir, format!("unreadable {IDENTITY_FILE}: {e}")))?;
            let same_replica = Identity {
                replicas: found.replicas,
                ..identity.clone()
            };
            if found != same_replica {
                return Err(data_dir_error(
                    dir,
                    format!(
                        "belongs to {found:?}, but this node was started as {identity:?}; \
                         use another directory, or the original settings"
                    ),
                ));
            }
            if found.replicas != identity.replicas {
                tracing::info!(
                    first_peers = found.replicas,
                    peers = identity.replicas,
                    "--peers names another number of replicas than at the first start: \
                     the group's recorded membership decides who its members are"
                );
            }
            Ok(found)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Write then rename: a crash leaves either no file or a whole one.
            let tmp = dir.join(format!("{IDENTITY_FILE}.tmp"));
            let json = serde_json::to_vec_pretty(identity)
                .map_err(|e| data_dir_error(dir, e.to_string()))?;
            let write = || -> std::io::Result<()> {
                use std::io::Write;
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(&json)?;
                f.sync_all()?;
                std::fs::rename(&tmp, &file)?;
                std::fs::File::open(dir)?.sync_all()
            };
            write()
                .map_err(|e| data_dir_error(dir, format!("cannot write {IDENTITY_FILE}: {e}")))?;
            Ok(identity.clone())
        }
        Err(e) => Err(data_dir_error(
            dir,
            format!("cannot read {IDENTITY_FILE}: {e}"),
        )),
    }
}

async fn bind(addr: &str) -> Result<TcpListener, NodeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| NodeError::Listen {
            addr: addr.to_string(),
            source,
        })
}

/// Binds the metrics port, if any, with the node's own: every port is
/// bound before anything starts, so a port in use fails the node with no
/// store open and no replica running.
async fn bind_metrics(addr: Option<SocketAddr>) -> Result<Option<TcpListener>, NodeError> {
    match addr {
        Some(addr) => Ok(Some(bind(&addr.to_string()).await?)),
        None => Ok(None),
    }
}

fn start_replica<M: StateMachine>(
    group: &str,
    options: &NodeOptions,
    identity: &Identity,
    book: &AddressBook,
    machine: M,
) -> Result<(Replica, std::thread::JoinHandle<()>), NodeError> {
    // Storage of the versions before the write-ahead log. Opening the new
    // log beside it would start blank, and a group whose every member did
    // so would take itself for new and lose its data: refuse instead.
    if options.data_dir.join("paxos.redb").exists() {
        return Err(data_dir_error(
            &options.data_dir,
            "holds paxos.redb, the storage of an earlier shardkv version, \
             which this version cannot read; start from a fresh directory",
        ));
    }
    let storage = WalStorage::open(options.data_dir.join("paxos"), WalOptions::default())
        .map_err(|e| data_dir_error(&options.data_dir, format!("cannot open storage: {e}")))?;
    let transport = GrpcTransport::start(group, options.id, book);
    let replica_options = ReplicaOptions {
        tick: options.tick,
        snapshot_every_slots: options.snapshot_every_slots,
        ..Default::default()
    };
    // The group's first voters: the peer list at this directory's first
    // start (a later start's --peers may differ: members change).
    let first_voters = u32::try_from(identity.replicas).unwrap_or(u32::MAX);
    let mut paxos_config = PaxosConfig::new(options.id, first_voters);
    paxos_config.joining = options.joins_when_blank();
    paxos_config.existing_group = options.existing_group;
    paxos_config.log_retain_slots_max = options.log_retain_slots;
    let started = Replica::start(paxos_config, storage, machine, transport, replica_options)
        .map_err(|e| NodeError::Replica(e.to_string()))?;
    let membership = started.0.status().membership;
    for (id, member) in &membership.members {
        if options.peers.get(*id as usize) != Some(&member.address) {
            tracing::warn!(
                replica = id,
                recorded = %member.address,
                peers = ?options.peers.get(*id as usize),
                epoch = membership.epoch,
                "--peers disagrees with the group's recorded membership: following the recorded one"
            );
        }
    }
    Ok(started)
}

fn members_service(group: &str, options: &NodeOptions, replica: &Replica) -> MembersService {
    MembersService::new(
        group,
        options.peers[options.id as usize].clone(),
        options.peers.clone(),
        options.tick,
        replica.clone(),
    )
}

/// A future that resolves once `rx` turns true.
async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// True when a replica can serve: it knows a leader and has applied all it
/// knows to be decided.
fn caught_up(s: &Status) -> bool {
    s.running && s.leader.is_some() && s.applied >= s.commit
}

/// Keeps health and metrics current until `stop`; returns early with an
/// error if the replica thread dies on its own (storage failure).
async fn watch_replica(
    replica: Replica,
    health: tonic_health::server::HealthReporter,
    metrics: Metrics,
    extra: impl Fn(&Metrics) + Send,
    mut stop: watch::Receiver<bool>,
) -> Result<(), NodeError> {
    let mut serving = None;
    loop {
        let status = replica.status();
        if !status.running && !*stop.borrow() {
            health
                .set_service_status("", ServingStatus::NotServing)
                .await;
            return Err(NodeError::Replica(
                "the replica thread stopped; see the log for the cause".into(),
            ));
        }
        metrics.update_replica(&status);
        extra(&metrics);
        let now = caught_up(&status);
        if serving != Some(now) {
            let s = if now {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            health.set_service_status("", s).await;
            tracing::info!(serving = now, "health changed");
            serving = Some(now);
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

/// Runs `router` until `stop`, then stops the replica and waits for its thread.
#[allow(clippy::too_many_arguments)]
async fn serve_until_stopped(
    router: tonic::transport::server::Router,
    listener: TcpListener,
    replica: Replica,
    thread: std::thread::JoinHandle<()>,
    health: tonic_health::server::HealthReporter,
    metrics: Metrics,
    extra: impl Fn(&Metrics) + Send + 'static,
    metrics_listener: Option<TcpListener>,
    stop_tx: watch::Sender<bool>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    let stopper = stop_tx.clone();
    tokio::spawn(async move {
        shutdown.await;
        let _ = stopper.send(true);
    });
    let stop_rx = stop_tx.subscribe();
    if let Some(listener) = metrics_listener {
        metrics::serve_on(listener, metrics.clone(), stopped(stop_rx.clone()));
    }
    let watcher = tokio::spawn(watch_replica(
        replica.clone(),
        health.clone(),
        metrics,
        extra,
        stop_rx.clone(),
    ));
    // Without TCP_NODELAY on accepted sockets, a reply written in more
    // than one piece waits on the client's delayed ACK (40 ms on Linux):
    // measured, every Get took 40 to 48 ms.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let server =
        tokio::spawn(router.serve_with_incoming_shutdown(incoming, stopped(stop_rx.clone())));
    // Either a stop request, or the replica failing, ends the node.
    let watched = watcher.await.map_err(|e| NodeError::Serve(e.to_string()))?;
    let _ = stop_tx.send(true);
    // In-flight requests get a grace period to finish (the replica still
    // runs, so their proposals complete); long-lived peer streams never
    // finish on their own, so past it the server is dropped.
    let abort = server.abort_handle();
    let served = match tokio::time::timeout(SHUTDOWN_GRACE, server).await {
        Ok(joined) => joined.map_err(|e| NodeError::Serve(e.to_string()))?,
        Err(_) => {
            abort.abort();
            Ok(())
        }
    };
    replica.shutdown();
    tokio::task::spawn_blocking(move || thread.join())
        .await
        .map_err(|e| NodeError::Serve(e.to_string()))?
        .map_err(|_| NodeError::Replica("replica thread panicked".into()))?;
    watched?;
    served.map_err(|e| NodeError::Serve(e.to_string()))?;
    Ok(())
}

/// Runs a shardmaster replica until `shutdown` resolves.
pub async fn run_master(
    options: NodeOptions,
    shards: usize,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    options.check()?;
    if shards == 0 {
        return Err(NodeError::Config("--shards must be at least 1".into()));
    }
    let (_lock, identity) = claim_data_dir(
        &options.data_dir,
        &Identity {
            role: "master".into(),
            gid: 0,
            id: options.id,
            replicas: options.first_voters(),
            shards: Some(shards),
        },
    )?;
    let listen = options.listen_addr();
    let listener = bind(&listen).await?;
    let metrics_listener = bind_metrics(options.metrics_addr).await?;
    let state = SharedMasterState::new(ShardMasterState::new(shards));
    let book = AddressBook::from_peers(&options.peers);
    let (replica, thread) =
        start_replica("shardmaster", &options, &identity, &book, state.clone())?;
    let service = ShardMasterService::new(replica.clone(), state, &options.peers)
        .map_err(NodeError::Config)?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    let peers = PaxosPeerService::new("shardmaster", replica.clone());
    let members = members_service("shardmaster", &options, &replica);
    let router = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(peers.into_server())
        .add_service(members.into_server())
        .add_service(service.into_server());
    let metrics = Metrics::new("master", "shardmaster", options.id);
    tracing::info!(id = options.id, %listen, shards, "shardmaster replica started");
    let (stop_tx, _) = watch::channel(false);
    serve_until_stopped(
        router,
        listener,
        replica,
        thread,
        health,
        metrics,
        |_| {},
        metrics_listener,
        stop_tx,
        shutdown,
    )
    .await
}

/// Runs a kvserver until `shutdown` resolves.
pub async fn run_kv(
    options: NodeOptions,
    gid: Gid,
    masters: Vec<String>,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    options.check()?;
    if gid == 0 {
        return Err(NodeError::Config(
            "--gid must be positive (0 means no group)".into(),
        ));
    }
    if masters.is_empty() {
        return Err(NodeError::Config(
            "--masters must name at least one shardmaster".into(),
        ));
    }
    let (_lock, identity) = claim_data_dir(
        &options.data_dir,
        &Identity {
            role: "kv".into(),
            gid,
            id: options.id,
            replicas: options.first_voters(),
            shards: None,
        },
    )?;
    let listen = options.listen_addr();
    let listener = bind(&listen).await?;
    let metrics_listener = bind_metrics(options.metrics_addr).await?;
    let group = format!("kv-{gid}");
    let book = AddressBook::from_peers(&options.peers);
    let source = crate::shardkv::snapshot::GrpcSnapshotSource {
        gid,
        me: options.id,
        peers: book.clone(),
        chunk_timeout: Duration::from_secs(10),
        rounds: 6,
    };
    let kv_state = KvState::open(
        gid,
        &options.data_dir.join("state"),
        Some(std::sync::Arc::new(source)),
        options.store,
    )
    .map_err(|e| {
        data_dir_error(
            &options.data_dir,
            format!("cannot open the state store: {e}"),
        )
    })?;
    // What can fail is done before the replica starts, so that a failure
    // leaves no replica running (in `local`, nodes share the process).
    let master_client = ShardMasterClient::new(&masters, Duration::from_secs(10))
        .map_err(|e| NodeError::Config(e.to_string()))?;
    let server_options = KvServerOptions {
        limits,
        unreliable: injected_reply_drops(gid, options.id)?,
        ..Default::default()
    };
    let state = SharedKvState::new(kv_state);
    let (replica, thread) = start_replica(&group, &options, &identity, &book, state.clone())?;
    let metrics = Metrics::new("kv", &group, options.id);
    let server = KvServer::new(
        gid,
        replica.clone(),
        state.clone(),
        master_client,
        server_options,
    )
    .with_metrics(metrics.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    server.spawn_background(stopped(stop_rx));
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    let peers = PaxosPeerService::new(group.clone(), replica.clone());
    let members = members_service(&group, &options, &replica);
    let router = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(peers.into_server())
        .add_service(members.into_server())
        .add_service(server.into_server());
    tracing::info!(gid, id = options.id, %listen, "kvserver started");
    let extra = move |m: &Metrics| {
        let s = state.lock();
        let pulling = s
            .owned
            .values()
            .filter(|o| o.status == crate::shardkv::state::ShardStatus::Pulling)
            .count();
        m.config_num.set(s.config.num as i64);
        m.shards_serving.set((s.owned.len() - pulling) as i64);
        m.shards_pulling.set(pulling as i64);
        m.shards_outgoing.set(s.outgoing.len() as i64);
    };
    serve_until_stopped(
        router,
        listener,
        replica,
        thread,
        health,
        metrics,
        extra,
        metrics_listener,
        stop_tx,
        shutdown,
    )
    .await
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
/// Logs to stderr at the level in `RUST_LOG` (default `info`), in colour
/// only on a terminal. For the binaries' `main`.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

pub async fn terminate_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutting down");
}

/// Test-only fault injection for the fault suite: with
/// `SHARDKV_FAULT_DROP_REPLY=P` (0 to 1) a kvserver executes a request and
/// then drops its reply with chance P (acknowledgements of deletes and
/// writes lost on the way back), drawn from `SHARDKV_FAULT_SEED`. Never
/// set in production; said loudly when set.
fn injected_reply_drops(gid: u64, id: u32) -> Result<Option<Unreliable>, NodeError> {
    let Ok(chance) = std::env::var("SHARDKV_FAULT_DROP_REPLY") else {
        return Ok(None);
    };
    let drop_reply = chance
        .parse::<f64>()
        .ok()
        .filter(|p| (0.0..=1.0).contains(p))
        .ok_or_else(|| {
            NodeError::Config(format!(
                "SHARDKV_FAULT_DROP_REPLY={chance:?} is not a probability from 0 to 1"
            ))
        })?;
    let seed = std::env::var("SHARDKV_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(0)
        ^ (gid << 8)
        ^ u64::from(id);
    tracing::warn!(
        drop_reply,
        seed,
        "fault injection on: replies are dropped (tests only)"
    );
    Ok(Some(Unreliable {
        drop_request: 0.0,
        drop_reply,
        seed,
        refuse_deletes: false,
        stall_copy_stream: None,
    }))
}
