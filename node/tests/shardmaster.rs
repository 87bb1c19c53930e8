//! The lab's shardmaster tests, ported: a 3-replica shardmaster group whose
//! replicas talk Paxos in-process (so tests can cut one off) and serve the
//! client API over gRPC on loopback.

use std::collections::BTreeSet;
use std::time::Duration;

use shardkv::paxos::{Config as PaxosConfig, MemStorage, RoleKind};
use shardkv::replica::local::LocalNetwork;
use shardkv::replica::{Replica, ReplicaOptions};
use shardkv::shardmaster::client::{ClientError, ShardMasterClient};
use shardkv::shardmaster::service::ShardMasterService;
use shardkv::shardmaster::{Config, Gid, ShardMasterState, SharedMasterState};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

const SHARDS: usize = 10;
const TIMEOUT: Duration = Duration::from_secs(20);

struct Cluster {
    net: LocalNetwork,
    replicas: Vec<Replica>,
    addrs: Vec<String>,
    servers: Vec<Option<tokio::sync::oneshot::Sender<()>>>,
}

impl Cluster {
    async fn start(snapshot_every_slots: u64) -> Cluster {
        let net = LocalNetwork::new(3);
        let mut listeners = Vec::new();
        let mut addrs = Vec::new();
        for _ in 0..3 {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            addrs.push(l.local_addr().unwrap().to_string());
            listeners.push(l);
        }
        let mut replicas = Vec::new();
        let mut servers = Vec::new();
        for (id, listener) in listeners.into_iter().enumerate() {
            let id = id as u32;
            let options = ReplicaOptions {
                tick: Duration::from_millis(5),
                snapshot_every_slots,
                ..Default::default()
            };
            let state = SharedMasterState::new(ShardMasterState::new(SHARDS));
            let (replica, _thread) = Replica::start(
                PaxosConfig::new_group(id, 3),
                MemStorage::new(),
                state.clone(),
                net.transport(id),
                options,
            )
            .unwrap();
            net.register(id, replica.clone());
            let service = ShardMasterService::new(replica.clone(), state, &addrs).unwrap();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(service.into_server())
                    .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                        let _ = stopped.await;
                    }),
            );
            replicas.push(replica);
            servers.push(Some(stop));
        }
        Cluster {
            net,
            replicas,
            addrs,
            servers,
        }
    }

    fn client(&self) -> ShardMasterClient {
        ShardMasterClient::new(&self.addrs, TIMEOUT).unwrap()
    }

    /// A client that only knows replica `i`.
    fn bound_client(&self, i: usize, timeout: Duration) -> ShardMasterClient {
        ShardMasterClient::new(&self.addrs[i..=i], timeout).unwrap()
    }

    /// Stops replica `i` and its server: its calls fail from now on.
    fn kill(&mut self, i: usize) {
        self.replicas[i].shutdown();
        if let Some(stop) = self.servers[i].take() {
            let _ = stop.send(());
        }
    }
}

fn servers(gid: Gid) -> Vec<String> {
    // Deliberately unsorted: the order given at Join must be kept.
    vec![
        format!("g{gid}-c:1"),
        format!("g{gid}-a:1"),
        format!("g{gid}-b:1"),
    ]
}

/// Every shard on a member; counts differ by at most one.
fn check_balanced(config: &Config) {
    let groups: BTreeSet<Gid> = config.groups.keys().copied().collect();
    for g in &config.shards {
        if groups.is_empty() {
            assert_eq!(
                *g, 0,
                "config {}: shard assigned with no groups",
                config.num
            );
        } else {
            assert!(
                groups.contains(g),
                "config {}: shard on non-member {g}",
                config.num
            );
        }
    }
    let counts: Vec<usize> = groups
        .iter()
        .map(|g| config.shards.iter().filter(|s| *s == g).count())
        .collect();
    if let (Some(max), Some(min)) = (counts.iter().max(), counts.iter().min()) {
        assert!(
            max - min <= 1,
            "config {} unbalanced: {:?}",
            config.num,
            config.shards
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_join_leave_and_bad_input() {
    let cluster = Cluster::start(1000).await;
    let ck = cluster.client();
    let c0 = ck.query(None).await.unwrap();
    assert_eq!(
        (c0.num, c0.shards.clone(), c0.groups.len()),
        (0, vec![0; SHARDS], 0)
    );

    let c1 = ck.join(1, servers(1)).await.unwrap();
    assert_eq!(c1.num, 1);
    assert_eq!(c1.groups[&1], servers(1), "server list order kept");
    assert_eq!(c1.shards, vec![1; SHARDS]);

    let c2 = ck.join(2, servers(2)).await.unwrap();
    assert_eq!(c2.num, 2);
    check_balanced(&c2);
    // Joining again with the same servers changes nothing.
    assert_eq!(ck.join(2, servers(2)).await.unwrap(), c2);

    let c3 = ck.leave(1).await.unwrap();
    assert_eq!((c3.num, c3.shards.clone()), (3, vec![2; SHARDS]));
    // Leaving again, or leaving a gid never seen, is harmless.
    assert_eq!(ck.leave(1).await.unwrap(), c3);
    assert_eq!(ck.leave(77).await.unwrap(), c3);

    // Bad input: a clear refusal, and no new configuration.
    for (what, result) in [
        ("gid 0", ck.join(0, servers(0)).await),
        ("no servers", ck.join(5, vec![]).await),
        ("shard out of range", ck.r#move(SHARDS as u64, 2).await),
        ("unknown gid", ck.r#move(0, 77).await),
        ("leave gid 0", ck.leave(0).await),
    ] {
        assert!(
            matches!(result, Err(ClientError::Rejected(_))),
            "{what}: {result:?}"
        );
    }
    assert_eq!(ck.query(None).await.unwrap(), c3);

    // A gid that left is retired: joining it again is refused, by name,
    // and changes nothing. Another gid joins.
    match ck.join(1, servers(1)).await {
        Err(ClientError::Rejected(why)) => assert!(
            why.contains("gid 1 left in configuration 3 and is retired"),
            "{why}"
        ),
        other => panic!("a retired gid joined again: {other:?}"),
    }
    assert_eq!(ck.query(None).await.unwrap(), c3);
    let c4 = ck.join(3, servers(3)).await.unwrap();
    assert_eq!(c4.num, 4);
    check_balanced(&c4);
    // Bad server addresses are refused, naming the entry.
    for bad in [
        "",
        "host",
        "host:0",
        "host:port",
        "two words:1",
        "[::1:1",
        "http://h:1",
    ] {
        match ck.join(9, vec!["ok:1".to_string(), bad.to_string()]).await {
            Err(ClientError::Rejected(why)) => {
                assert!(why.contains(&format!("{bad:?}")), "{bad}: {why}")
            }
            other => panic!("joined with server {bad:?}: {other:?}"),
        }
    }
    assert_eq!(ck.query(None).await.unwrap(), c4);
    ck.join(
        9,
        vec!["[::1]:7".into(), "10.0.0.1:7".into(), "a-b.c_d:7".into()],
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn historical_queries_return_every_saved_configuration() {
    let cluster = Cluster::start(1000).await;
    let ck = cluster.client();
    let mut saved = vec![ck.query(Some(0)).await.unwrap()];
    for gid in 1..=4 {
        saved.push(ck.join(gid, servers(gid)).await.unwrap());
    }
    saved.push(ck.leave(2).await.unwrap());
    saved.push(ck.r#move(3, 1).await.unwrap());
    for (i, config) in saved.iter().enumerate() {
        assert_eq!(config.num, i as u64);
        // Asked of each replica in turn.
        let asker = cluster.client();
        asker.prefer(i % 3);
        assert_eq!(
            &asker.query(Some(i as u64)).await.unwrap(),
            config,
            "config {i}"
        );
    }
    assert_eq!(&ck.query(Some(1000)).await.unwrap(), saved.last().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_assigns_shards_and_advances_only_on_change() {
    let cluster = Cluster::start(1000).await;
    let ck = cluster.client();
    ck.join(1, servers(1)).await.unwrap();
    let mut num = ck.join(2, servers(2)).await.unwrap().num;
    for shard in 0..SHARDS as u64 {
        let gid = if shard < 5 { 1 } else { 2 };
        let before = ck.query(None).await.unwrap();
        let after = ck.r#move(shard, gid).await.unwrap();
        let changed = before.shards[shard as usize] != gid;
        assert_eq!(after.num, num + u64::from(changed), "move of shard {shard}");
        num = after.num;
    }
    let config = ck.query(None).await.unwrap();
    assert_eq!(config.shards, vec![1, 1, 1, 1, 1, 2, 2, 2, 2, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_leave_join_with_each_client_bound_to_one_replica() {
    let cluster = Cluster::start(1000).await;
    let tasks: Vec<_> = (0..10u64)
        .map(|i| {
            // Each client knows only one replica; followers forward.
            let ck = cluster.bound_client(i as usize % 3, TIMEOUT);
            tokio::spawn(async move {
                let gid = 100 + i;
                ck.join(gid + 1000, servers(gid + 1000)).await.unwrap();
                ck.join(gid, servers(gid)).await.unwrap();
                ck.leave(gid + 1000).await.unwrap();
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let config = cluster.client().query(None).await.unwrap();
    let expected: BTreeSet<Gid> = (100..110).collect();
    assert_eq!(
        config.groups.keys().copied().collect::<BTreeSet<_>>(),
        expected
    );
    check_balanced(&config);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minimal_transfers_after_joins_and_leaves() {
    let cluster = Cluster::start(1000).await;
    let ck = cluster.client();
    for gid in 1..=5 {
        ck.join(gid, servers(gid)).await.unwrap();
    }
    let mut before = ck.query(None).await.unwrap();
    for gid in 6..=10 {
        let after = ck.join(gid, servers(gid)).await.unwrap();
        for (b, a) in before.shards.iter().zip(&after.shards) {
            assert!(
                a == b || *a == gid,
                "join {gid}: a shard moved between old groups"
            );
        }
        check_balanced(&after);
        before = after;
    }
    for gid in 6..=10 {
        let after = ck.leave(gid).await.unwrap();
        for (b, a) in before.shards.iter().zip(&after.shards) {
            assert!(
                *b == gid || a == b,
                "leave {gid}: a remaining group's shard moved"
            );
        }
        check_balanced(&after);
        before = after;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_is_compacted_as_configurations_accumulate() {
    let cluster = Cluster::start(5).await;
    let ck = cluster.client();
    for gid in 1..=30 {
        ck.join(gid, servers(gid)).await.unwrap();
    }
    let latest = ck.query(None).await.unwrap();
    assert_eq!(latest.num, 30);
    // Every replica snapshots, so the low-water mark passes the early slots
    // and the log holds only the recent tail.
    for r in &cluster.replicas {
        let ok = r
            .wait_for(TIMEOUT, |s| s.snapshot_index >= 25 && s.log_len <= 10)
            .await;
        assert!(ok, "replica not compacted: {:?}", r.status());
    }
    // History survives compaction: it lives in the snapshot.
    assert_eq!(ck.query(Some(7)).await.unwrap().num, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_leave_join_with_a_failed_replica() {
    let mut cluster = Cluster::start(1000).await;
    cluster.client().join(1, servers(1)).await.unwrap();
    cluster.kill(2);
    let tasks: Vec<_> = (0..10u64)
        .map(|i| {
            let ck = cluster.client();
            ck.prefer(i as usize % 3); // some start at the dead replica
            tokio::spawn(async move {
                let (a, b) = (10 + 2 * i, 11 + 2 * i);
                ck.join(a, servers(a)).await.unwrap();
                ck.join(b, servers(b)).await.unwrap();
                ck.leave(b).await.unwrap();
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let config = cluster.client().query(None).await.unwrap();
    let expected: BTreeSet<Gid> = std::iter::once(1)
        .chain((0..10).map(|i| 10 + 2 * i))
        .collect();
    assert_eq!(
        config.groups.keys().copied().collect::<BTreeSet<_>>(),
        expected
    );
    check_balanced(&config);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_at_a_cut_off_replica_never_answers_stale() {
    let cluster = Cluster::start(1000).await;
    let ck = cluster.client();
    ck.join(1, servers(1)).await.unwrap();
    // Cut replica 2 off from its peers, and wait until it notices (it asks
    // for pre-votes on its own; nobody answers).
    cluster.net.set_isolated(2, true);
    let noticed = cluster.replicas[2]
        .wait_for(TIMEOUT, |s| s.role == RoleKind::PreCandidate)
        .await;
    assert!(
        noticed,
        "isolated replica never asked to stand for election"
    );
    let joined = ck.join(2, servers(2)).await.unwrap();
    // Ask the cut-off replica. It must not answer from its own stale state:
    // either it cannot answer yet, or its answer includes the join.
    let bound = cluster.bound_client(2, TIMEOUT);
    let pending = tokio::spawn(async move { bound.query(None).await });
    // Let it stay cut off with the query pending for two more of its
    // rounds of asking.
    let campaigns = cluster.replicas[2].status().campaigns;
    let waited = cluster.replicas[2]
        .wait_for(TIMEOUT, |s| s.campaigns >= campaigns + 2)
        .await;
    assert!(
        waited,
        "isolated replica stopped asking to stand for election"
    );
    if pending.is_finished() {
        let answer = pending.await.unwrap();
        assert!(
            answer.as_ref().is_ok_and(|c| c.num >= joined.num),
            "stale answer: {answer:?}"
        );
        return;
    }
    cluster.net.set_isolated(2, false);
    let answer = pending.await.unwrap().expect("answers once reconnected");
    assert!(
        answer.num >= joined.num,
        "stale answer after reconnecting: {answer:?}"
    );
    assert!(answer.groups.contains_key(&2));
}
