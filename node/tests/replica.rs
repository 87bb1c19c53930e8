//! The driver on real threads, storage and sockets: in-process replicas, and
//! a group talking gRPC over loopback with write-ahead-log storage, restarted from disk.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use shardkv::paxos::{
    Config, MemStorage, MembershipChange, MembershipError, RoleKind, Slot, WalOptions, WalStorage,
};
use shardkv::replica::grpc::{AddressBook, GrpcTransport, PaxosPeerService};
use shardkv::replica::local::LocalNetwork;
use shardkv::replica::{ApplyError, Replica, ReplicaError, ReplicaOptions, StateMachine};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

const WAIT: Duration = Duration::from_secs(20);

/// Records every command in order; returns the slot it was applied at.
#[derive(Default)]
struct Recorder {
    commands: Vec<Bytes>,
    shared: SharedLog,
}

impl StateMachine for Recorder {
    fn apply(&mut self, slot: Slot, command: &[u8]) -> Result<Bytes, ApplyError> {
        self.commands.push(Bytes::copy_from_slice(command));
        *self.shared.lock().unwrap() = self.commands.clone();
        Ok(Bytes::from(slot.to_string()))
    }
    fn snapshot(&self) -> Bytes {
        postcard::to_allocvec(&self.commands).unwrap().into()
    }
    fn restore(&mut self, _index: Slot, snapshot: &[u8]) -> Result<(), String> {
        self.commands = postcard::from_bytes(snapshot).map_err(|e| e.to_string())?;
        *self.shared.lock().unwrap() = self.commands.clone();
        Ok(())
    }
}

fn options() -> ReplicaOptions {
    ReplicaOptions {
        tick: Duration::from_millis(5),
        snapshot_every_slots: 50,
        ..Default::default()
    }
}

async fn await_leader(replicas: &[Replica]) -> Replica {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(r) = replicas
            .iter()
            .find(|r| r.status().role == RoleKind::Leader)
        {
            return r.clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "no leader elected");
        let mut rx = replicas[0].watch();
        let _ = tokio::time::timeout(Duration::from_millis(50), rx.changed()).await;
    }
}

/// Waits until every replica has applied everything any of them has
/// committed. (Right after an election two replicas may both still claim to
/// lead; the stale one's commit index is lower, so take the highest.)
async fn await_all_applied(replicas: &[Replica]) {
    let target = replicas
        .iter()
        .map(|r| r.status().commit)
        .max()
        .unwrap_or(0);
    for r in replicas {
        assert!(
            r.wait_for(WAIT, |s| s.applied >= target).await,
            "replica {} behind",
            r.status().id
        );
    }
}

type SharedLog = std::sync::Arc<std::sync::Mutex<Vec<Bytes>>>;

/// Three in-process replicas with memory storage, and each one's applied log.
fn local_group() -> (LocalNetwork, Vec<Replica>, Vec<SharedLog>) {
    let network = LocalNetwork::new(3);
    let mut replicas = Vec::new();
    let mut logs = Vec::new();
    for id in 0..3 {
        let machine = Recorder::default();
        logs.push(machine.shared.clone());
        let (replica, _thread) = Replica::start(
            Config::new_group(id, 3),
            MemStorage::new(),
            machine,
            network.transport(id),
            options(),
        )
        .unwrap();
        network.register(id, replica.clone());
        replicas.push(replica);
    }
    (network, replicas, logs)
}

/// Proposes through the leader, retrying across leader changes like a client.
async fn propose(replicas: &[Replica], command: &str) -> Bytes {
    for _ in 0..100 {
        let leader = await_leader(replicas).await;
        match leader.propose(Bytes::from(command.to_string())).await {
            Ok(result) => return result,
            Err(ReplicaError::NotLeader { .. } | ReplicaError::Busy) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("propose {command}: {e}"),
        }
    }
    panic!("propose {command}: no leader took it");
}

/// A membership change is answered with the membership it made; the group
/// goes on deciding without the member it removed; and a second change
/// computed from the old epoch is refused rather than undoing the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_membership_change_is_answered_once_in_force() {
    let (_network, replicas, logs) = local_group();
    propose(&replicas, "before").await;
    let leader = await_leader(&replicas).await;
    let me = leader.status().id;
    let removed = (0..3).find(|id| *id != me).expect("a follower");
    let voters = (0..3u32)
        .filter(|id| *id != removed)
        .fold(0u64, |set, id| set | 1 << id);
    let epoch = leader.status().membership.epoch;
    let change = MembershipChange {
        voters,
        expected_epoch: Some(epoch),
        ..Default::default()
    };
    let entered = leader
        .change_membership(change.clone())
        .await
        .expect("the change");
    assert_eq!(entered.voters, voters);
    assert_eq!(entered.epoch, epoch + 1);
    // The same change again, computed from the epoch before: refused.
    let leader = await_leader(&replicas).await;
    match leader.change_membership(change).await {
        Err(ReplicaError::Membership(MembershipError::EpochChanged { expected, current })) => {
            assert_eq!((expected, current), (epoch, epoch + 1));
        }
        other => panic!("a change from an old epoch gave {other:?}"),
    }
    propose(&replicas, "after").await;
    let removed_log = logs[removed as usize].lock().unwrap().clone();
    assert!(
        !removed_log.iter().any(|c| c == "after"),
        "the removed replica applied a command decided after its removal"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_group_decides_concurrent_proposals_in_one_order() {
    let (_network, replicas, logs) = local_group();
    let leader = await_leader(&replicas).await;
    let tasks: Vec<_> = (0..500)
        .map(|i| {
            let leader = leader.clone();
            tokio::spawn(async move { leader.propose(Bytes::from(format!("c{i}"))).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().expect("leader stayed in place");
    }
    let commit = leader.status().commit;
    for r in &replicas {
        assert!(
            r.wait_for(WAIT, |s| s.applied >= commit).await,
            "replica behind"
        );
    }
    let first = logs[0].lock().unwrap().clone();
    assert_eq!(first.len(), 500);
    for log in &logs[1..] {
        assert_eq!(
            *log.lock().unwrap(),
            first,
            "replicas applied different orders"
        );
    }
    // Compaction ran: the log is bounded by the snapshot interval.
    assert!(replicas.iter().all(|r| r.status().log_len <= 200));
    for r in &replicas {
        r.shutdown();
    }
}

struct GrpcNode {
    replica: Replica,
    shared: SharedLog,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

async fn start_grpc_node(id: u32, listener: TcpListener, peers: &[String], dir: &Path) -> GrpcNode {
    let storage =
        WalStorage::open(dir.join(format!("replica-{id}")), WalOptions::default()).unwrap();
    let machine = Recorder::default();
    let shared = machine.shared.clone();
    let transport = GrpcTransport::start("test-group", id, &AddressBook::from_peers(peers));
    let (replica, thread) = Replica::start(
        Config::new_group(id, peers.len() as u32),
        storage,
        machine,
        transport,
        options(),
    )
    .unwrap();
    let service = PaxosPeerService::new("test-group", replica.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service.into_server())
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stopped.await;
            }),
    );
    GrpcNode {
        replica,
        shared,
        stop,
        thread,
    }
}

async fn listeners(n: usize) -> (Vec<TcpListener>, Vec<String>) {
    let mut ls = Vec::new();
    let mut addrs = Vec::new();
    for _ in 0..n {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = l.local_addr().unwrap();
        addrs.push(addr.to_string());
        ls.push(l);
    }
    (ls, addrs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_group_survives_full_restart_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (ls, peers) = listeners(3).await;
    let mut nodes = Vec::new();
    for (id, l) in ls.into_iter().enumerate() {
        nodes.push(start_grpc_node(id as u32, l, &peers, dir.path()).await);
    }
    let replicas: Vec<Replica> = nodes.iter().map(|n| n.replica.clone()).collect();
    for i in 0..120 {
        propose(&replicas, &format!("before-{i}")).await;
    }
    await_all_applied(&replicas).await;
    let before = nodes[0].shared.lock().unwrap().clone();
    assert_eq!(before.len(), 120);

    // Stop everything, then start again on the same files and ports.
    for n in nodes {
        n.replica.shutdown();
        let _ = n.stop.send(());
        n.thread.join().unwrap();
    }
    let mut ls = Vec::new();
    for addr in &peers {
        // The OS may take a moment to release the port.
        let mut bound = None;
        for _ in 0..100 {
            match TcpListener::bind(addr).await {
                Ok(l) => {
                    bound = Some(l);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        ls.push(bound.expect("port released"));
    }
    let mut nodes = Vec::new();
    for (id, l) in ls.into_iter().enumerate() {
        nodes.push(start_grpc_node(id as u32, l, &peers, dir.path()).await);
    }
    let replicas: Vec<Replica> = nodes.iter().map(|n| n.replica.clone()).collect();
    propose(&replicas, "after").await;
    await_all_applied(&replicas).await;
    for n in &nodes {
        let log = n.shared.lock().unwrap().clone();
        assert_eq!(
            &log[..120],
            &before[..],
            "a decided command was lost or reordered"
        );
        assert_eq!(log.last().unwrap().as_ref(), b"after");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_peer_port_is_refused_and_the_replica_keeps_running() {
    use shardkv::proto::paxos_peer_client::PaxosPeerClient;
    use shardkv::proto::PeerMessage;
    let dir = tempfile::tempdir().unwrap();
    let (mut ls, peers) = listeners(1).await;
    let node = start_grpc_node(0, ls.remove(0), &peers, dir.path()).await;
    let mut client = PaxosPeerClient::connect(format!("http://{}", peers[0]))
        .await
        .unwrap();
    for (group, from, payload) in [
        ("test-group", 0u32, vec![0xff, 0xfe, 0x01]),
        ("other-group", 0, vec![]),
        ("test-group", 7, vec![]),
    ] {
        let msg = PeerMessage {
            group: group.into(),
            from,
            payload: payload.into(),
        };
        let result = client.deliver(tokio_stream::iter(vec![msg])).await;
        assert!(result.is_err(), "bad message from {group}/{from} accepted");
    }
    // Raw garbage bytes on the socket.
    {
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::TcpStream::connect(&peers[0]).await.unwrap();
        s.write_all(b"GET / HTTP/1.0\r\n\r\n\x00\x01garbage")
            .await
            .unwrap();
    }
    // A single replica is its own majority: it still decides.
    let result = propose(std::slice::from_ref(&node.replica), "still-alive").await;
    assert_eq!(result.as_ref(), b"1");
}

#[test]
fn invalid_config_is_an_error_not_a_panic() {
    let network = LocalNetwork::new(3);
    for config in [Config::new(3, 3), Config::new(0, 0), {
        let mut c = Config::new(0, 3);
        c.election_timeout_max_ticks = 0;
        c
    }] {
        let result = Replica::start(
            config,
            MemStorage::new(),
            Recorder::default(),
            network.transport(0),
            options(),
        );
        assert!(
            matches!(result, Err(ReplicaError::Config(_))),
            "accepted an invalid config"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proposals_at_a_deposed_leader_fail_instead_of_hanging() {
    let (network, replicas, _logs) = local_group();
    let leader = await_leader(&replicas).await;
    let id = leader.status().id;
    // Cut the leader off: it takes the proposal, can never decide it, and
    // must step aside; the caller must then hear so, not wait forever.
    network.set_isolated(id, true);
    let outcome = tokio::time::timeout(WAIT, leader.propose(Bytes::from_static(b"orphan"))).await;
    match outcome {
        Ok(Err(ReplicaError::OutcomeUnknown | ReplicaError::NotLeader { .. })) => {}
        other => panic!("a deposed leader's proposal ended as {other:?}"),
    }
    for r in &replicas {
        r.shutdown();
    }
}

/// Applies like [`Recorder`], but panics on the command `panic`.
#[derive(Default)]
struct PanicsOnCommand(Recorder);

impl StateMachine for PanicsOnCommand {
    fn apply(&mut self, slot: Slot, command: &[u8]) -> Result<Bytes, ApplyError> {
        assert_ne!(command, b"panic", "planted panic in apply");
        self.0.apply(slot, command)
    }
    fn snapshot(&self) -> Bytes {
        self.0.snapshot()
    }
    fn restore(&mut self, index: Slot, snapshot: &[u8]) -> Result<(), String> {
        self.0.restore(index, snapshot)
    }
}

/// A panic on the replica thread stops the replica as an error does: its
/// status says it is not running (the node exits on that) and callers get
/// `Stopped`. Before, the status still said running after the panic, and
/// a node kept answering from a state frozen where the panic left it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_on_the_replica_thread_stops_the_replica_visibly() {
    let network = LocalNetwork::new(1);
    let (replica, thread) = Replica::start(
        Config::new_group(0, 1),
        MemStorage::new(),
        PanicsOnCommand::default(),
        network.transport(0),
        options(),
    )
    .unwrap();
    network.register(0, replica.clone());
    let group = [replica.clone()];
    propose(&group, "before").await;
    let outcome = tokio::time::timeout(WAIT, replica.propose(Bytes::from_static(b"panic"))).await;
    assert!(
        matches!(outcome, Ok(Err(ReplicaError::Stopped))),
        "the proposal that panicked ended as {outcome:?}"
    );
    assert!(
        replica.wait_for(WAIT, |s| !s.running).await,
        "the replica still reports running after its thread panicked"
    );
    assert!(
        matches!(
            replica.propose(Bytes::from_static(b"after")).await,
            Err(ReplicaError::Stopped)
        ),
        "a stopped replica took a proposal"
    );
    assert!(
        thread.join().is_err(),
        "joining the thread no longer reports its panic"
    );
}
