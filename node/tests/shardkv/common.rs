//! A whole deployment in one process.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use shardkv::paxos::{Config as PaxosConfig, MemStorage, RoleKind, WalOptions, WalStorage};
use shardkv::proto::kv::shard_kv_client::ShardKvClient;
use shardkv::proto::kv::{GroupStatusReply, GroupStatusRequest};
use shardkv::replica::local::LocalNetwork;
use shardkv::replica::{Replica, ReplicaOptions};
use shardkv::shardkv::clerk::{Clerk, ClerkOptions};
use shardkv::shardkv::server::{KvServer, KvServerOptions, Unreliable};
use shardkv::shardkv::snapshot::GrpcSnapshotSource;
use shardkv::shardkv::state::{KvState, SharedKvState};
use shardkv::shardmaster::client::ShardMasterClient;
use shardkv::shardmaster::service::ShardMasterService;
use shardkv::shardmaster::{Gid, ShardMasterState, SharedMasterState};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_stream::wrappers::TcpListenerStream;

pub const SHARDS: usize = 10;
pub const WAIT: Duration = Duration::from_secs(30);

fn replica_options() -> ReplicaOptions {
    ReplicaOptions {
        tick: Duration::from_millis(5),
        snapshot_every_slots: 200,
        ..Default::default()
    }
}

async fn bind_all(n: usize) -> (Vec<TcpListener>, Vec<String>) {
    let mut listeners = Vec::new();
    let mut addrs = Vec::new();
    for _ in 0..n {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.push(l.local_addr().unwrap().to_string());
        listeners.push(l);
    }
    (listeners, addrs)
}

/// Serves `router` on `listener` until the returned sender fires or drops.
fn serve(router: tonic::transport::server::Router, listener: TcpListener) -> oneshot::Sender<()> {
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(
        router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
            let _ = stopped.await;
        }),
    );
    stop
}

/// A running kvserver.
struct KvNode {
    replica: Replica,
    thread: std::thread::JoinHandle<()>,
    state: SharedKvState,
    /// Stops the gRPC server and the reconfiguration loop.
    stop_server: oneshot::Sender<()>,
    stop_background: oneshot::Sender<()>,
}

pub struct Group {
    pub gid: Gid,
    pub addrs: Vec<String>,
    /// The group's Paxos network: `set_isolated` cuts a replica off.
    pub net: LocalNetwork,
    nodes: Vec<Option<KvNode>>,
    /// Each replica's disk: a wipe gives the replica a new one, as a
    /// replaced volume would. A killed node's last threads (a snapshot
    /// stream, a copy fetch) may still hold its store for a moment after
    /// `kill`; a directory removed and made again under it had no lock to
    /// keep the two apart, and that store's engine deleted files of its
    /// blank successor's (`FjallError ... NotFound` at the open).
    disks: Vec<u32>,
}

pub struct Cluster {
    pub master_addrs: Vec<String>,
    pub groups: Vec<Group>,
    masters_admin: ShardMasterClient,
    /// Kept for the whole test: the masters' replicas and servers.
    _master_stops: Vec<oneshot::Sender<()>>,
    dir: tempfile::TempDir,
    options: KvServerOptions,
}

impl Cluster {
    /// Starts a shardmaster group of 3 and `groups` kv groups of `replicas`
    /// (gids 100, 101, ...), none joined yet.
    pub async fn start(groups: usize, replicas: usize, unreliable: Option<Unreliable>) -> Cluster {
        let options = KvServerOptions {
            unreliable,
            ..Default::default()
        };
        Self::start_with(groups, replicas, options).await
    }

    /// As [`Cluster::start`], with the kvservers' options (the poll interval
    /// and call timeout are the tests' own).
    pub async fn start_with(groups: usize, replicas: usize, options: KvServerOptions) -> Cluster {
        // Logs for a failing test, at the level in RUST_LOG (default: off).
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
            )
            .with_test_writer()
            .try_init();
        let (listeners, master_addrs) = bind_all(3).await;
        let net = LocalNetwork::new(3);
        let mut master_stops = Vec::new();
        for (id, listener) in listeners.into_iter().enumerate() {
            let state = SharedMasterState::new(ShardMasterState::new(SHARDS));
            let (replica, _thread) = Replica::start(
                PaxosConfig::new_group(id as u32, 3),
                MemStorage::new(),
                state.clone(),
                net.transport(id as u32),
                replica_options(),
            )
            .unwrap();
            net.register(id as u32, replica.clone());
            let service = ShardMasterService::new(replica, state, &master_addrs).unwrap();
            let router = tonic::transport::Server::builder().add_service(service.into_server());
            master_stops.push(serve(router, listener));
        }
        let options = KvServerOptions {
            poll_interval: Duration::from_millis(50),
            peer_call_timeout: Duration::from_secs(1),
            ..options
        };
        let mut cluster = Cluster {
            masters_admin: ShardMasterClient::new(&master_addrs, WAIT).unwrap(),
            master_addrs,
            groups: Vec::new(),
            _master_stops: master_stops,
            dir: tempfile::tempdir().unwrap(),
            options,
        };
        for g in 0..groups {
            let gid = 100 + g as Gid;
            let (listeners, addrs) = bind_all(replicas).await;
            let mut group = Group {
                gid,
                addrs,
                net: LocalNetwork::new(replicas),
                nodes: (0..replicas).map(|_| None).collect(),
                disks: vec![0; replicas],
            };
            for (i, listener) in listeners.into_iter().enumerate() {
                let node = cluster.start_node(&group, i, listener);
                group.nodes[i] = Some(node);
            }
            cluster.groups.push(group);
        }
        cluster
    }

    fn storage_path(&self, group: &Group, i: usize) -> PathBuf {
        let (gid, disk) = (group.gid, group.disks[i]);
        self.dir.path().join(format!("g{gid}-r{i}-d{disk}"))
    }

    fn state_path(&self, group: &Group, i: usize) -> PathBuf {
        let (gid, disk) = (group.gid, group.disks[i]);
        self.dir.path().join(format!("g{gid}-r{i}-d{disk}-state"))
    }

    fn start_node(&self, group: &Group, i: usize, listener: TcpListener) -> KvNode {
        // Small segments, so that roll-overs happen under these workloads too.
        let wal = WalOptions {
            segment_bytes: 256 << 10,
        };
        let storage = WalStorage::open(self.storage_path(group, i), wal).unwrap();
        // The real store, and snapshots streamed from the group's other
        // replicas over their gRPC ports, as a node does.
        let source = GrpcSnapshotSource {
            gid: group.gid,
            me: i as u32,
            peers: shardkv::replica::grpc::AddressBook::from_peers(&group.addrs),
            chunk_timeout: Duration::from_secs(5),
            rounds: 3,
        };
        let state_dir = self.state_path(group, i);
        let source: Arc<dyn shardkv::shardkv::state::PeerSource> = Arc::new(source);
        // A killed node's last streams (a snapshot or a copy a peer is
        // still reading) may hold its store's lock for a moment after
        // `kill`, as a dying process would: a restart waits for it.
        let deadline = std::time::Instant::now() + WAIT;
        let state = loop {
            match KvState::open(
                group.gid,
                &state_dir,
                Some(source.clone()),
                Default::default(),
            ) {
                Ok(state) => break state,
                Err(e) if e.is_in_use() && std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("replica {i} of group {}: {e}", group.gid),
            }
        };
        let state = SharedKvState::new(state);
        let (replica, thread) = Replica::start(
            PaxosConfig::new_group(i as u32, group.addrs.len() as u32),
            storage,
            state.clone(),
            group.net.transport(i as u32),
            replica_options(),
        )
        .unwrap();
        group.net.register(i as u32, replica.clone());
        let masters = ShardMasterClient::new(&self.master_addrs, Duration::from_secs(5)).unwrap();
        let server = KvServer::new(
            group.gid,
            replica.clone(),
            state.clone(),
            masters,
            self.options.clone(),
        );
        let (stop_background, stopped) = oneshot::channel::<()>();
        server.spawn_background(async {
            let _ = stopped.await;
        });
        let router = tonic::transport::Server::builder().add_service(server.into_server());
        KvNode {
            replica,
            thread,
            state,
            stop_server: serve(router, listener),
            stop_background,
        }
    }

    pub fn clerk(&self) -> Clerk {
        self.clerk_with_timeout(WAIT)
    }

    pub fn clerk_with_timeout(&self, timeout: Duration) -> Clerk {
        let options = ClerkOptions {
            timeout,
            attempt_timeout: Duration::from_millis(500),
            ..Default::default()
        };
        Clerk::new(&self.master_addrs, options).unwrap()
    }

    pub fn admin(&self) -> &ShardMasterClient {
        &self.masters_admin
    }

    pub fn group(&self, gid: Gid) -> &Group {
        self.groups
            .iter()
            .find(|g| g.gid == gid)
            .expect("no such group")
    }

    fn group_mut(&mut self, gid: Gid) -> &mut Group {
        self.groups
            .iter_mut()
            .find(|g| g.gid == gid)
            .expect("no such group")
    }

    pub async fn join(&self, gid: Gid) {
        let servers = self.group(gid).addrs.clone();
        self.admin().join(gid, servers).await.unwrap();
    }

    pub async fn leave(&self, gid: Gid) {
        self.admin().leave(gid).await.unwrap();
    }

    /// Stops replica `i` of group `gid` (its storage stays).
    pub async fn kill(&mut self, gid: Gid, i: usize) {
        let node = self.group_mut(gid).nodes[i].take();
        if let Some(node) = node {
            node.replica.shutdown();
            let _ = node.stop_server.send(());
            let _ = node.stop_background.send(());
            tokio::task::spawn_blocking(move || node.thread.join())
                .await
                .unwrap()
                .unwrap();
        }
    }

    /// Restarts a killed replica from its storage, on its old address.
    pub async fn restart(&mut self, gid: Gid, i: usize) {
        let addr = self.group(gid).addrs[i].clone();
        // The old server may take a moment to release the port.
        let deadline = tokio::time::Instant::now() + WAIT;
        let listener = loop {
            match TcpListener::bind(&addr).await {
                Ok(l) => break l,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("cannot rebind {addr}: {e}"),
            }
        };
        let node = self.start_node(self.group(gid), i, listener);
        self.group_mut(gid).nodes[i] = Some(node);
    }

    /// Stops every replica of `gid` and starts them again blank, each on a
    /// new disk, on the same addresses: a group that lost every disk.
    pub async fn wipe_group(&mut self, gid: Gid) {
        self.kill_group(gid).await;
        // The old directories are left to the temporary directory's
        // cleanup: removing them could race a lingering store's last write.
        for disk in &mut self.group_mut(gid).disks {
            *disk += 1;
        }
        self.group_mut(gid).net = LocalNetwork::new(self.group(gid).addrs.len());
        for i in 0..self.group(gid).addrs.len() {
            self.restart(gid, i).await;
        }
    }

    /// Stops every replica of `gid` and starts them again from their
    /// storage on new ports (pods rescheduled at other addresses). Nothing
    /// is told the new addresses.
    pub async fn readdress_group(&mut self, gid: Gid) {
        self.kill_group(gid).await;
        let (listeners, addrs) = bind_all(self.group(gid).addrs.len()).await;
        self.group_mut(gid).addrs = addrs;
        self.group_mut(gid).net = LocalNetwork::new(listeners.len());
        for (i, listener) in listeners.into_iter().enumerate() {
            let node = self.start_node(self.group(gid), i, listener);
            self.group_mut(gid).nodes[i] = Some(node);
        }
    }

    pub async fn kill_group(&mut self, gid: Gid) {
        for i in 0..self.group(gid).addrs.len() {
            self.kill(gid, i).await;
        }
    }

    /// Every live replica's applied state, for white-box checks.
    pub fn states(&self, gid: Gid) -> Vec<SharedKvState> {
        self.group(gid)
            .nodes
            .iter()
            .flatten()
            .map(|n| n.state.clone())
            .collect()
    }

    pub fn leader(&self, gid: Gid) -> Option<usize> {
        self.group(gid).nodes.iter().position(|n| {
            n.as_ref()
                .is_some_and(|n| n.replica.status().role == RoleKind::Leader)
        })
    }

    /// Asks one replica for its GroupStatus over gRPC.
    pub async fn status(&self, gid: Gid, i: usize) -> GroupStatusReply {
        let addr = format!("http://{}", self.group(gid).addrs[i]);
        let mut client = ShardKvClient::connect(addr).await.unwrap();
        client
            .group_status(GroupStatusRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    /// Waits until every live replica of every group has applied the latest
    /// configuration, pulled everything and released every old copy.
    pub async fn await_settled(&self) {
        let latest = self.admin().query(None).await.unwrap().num;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let settled = self.groups.iter().all(|g| {
                g.nodes.iter().flatten().all(|n| {
                    let s = n.state.lock();
                    s.config.num == latest
                        && s.ready_for_next_config()
                        && s.pending_deletes.is_empty()
                        && s.outgoing.is_empty()
                })
            });
            if settled {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "cluster did not settle on configuration {latest}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Polls `done` until it holds or `WAIT` passes.
pub async fn wait_until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn key(i: usize) -> String {
    format!("key-{i}")
}
