//! A group's life at its edges, as an operator drives it: every disk lost,
//! pods rescheduled at new addresses, a group removed before the deletes it
//! was sent were acknowledged.

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use shardkv::proto::kv::GroupStatusRequest;
use shardkv::shardkv::clerk::{Clerk, ClerkError};
use shardkv::shardkv::key_to_shard;
use shardkv::shardkv::pool::ChannelPool;
use shardkv::shardkv::server::{KvServerOptions, Unreliable};
use shardkv::shardkv::state::KvState;

use crate::common::{key, wait_until, Cluster, SHARDS, WAIT};

const KEYS: usize = 40;

fn shard_of(i: usize) -> usize {
    key_to_shard(key(i).as_bytes(), SHARDS)
}

/// Every key written as `v{i}` reads back through `ck`.
async fn every_key_reads_back(ck: &Clerk) {
    for i in 0..KEYS {
        let got = ck.get(key(i)).await.unwrap();
        assert_eq!(got, Some(Bytes::from(format!("v{i}"))), "key {i}");
    }
}

/// A replica of the group that took some of the keys holds exactly those
/// of the shards it serves: nothing missing, no copy left behind.
fn holds_exactly_the_keys_it_serves(s: &KvState) {
    let moved = (0..KEYS).filter(|&i| s.serves(key(i).as_bytes())).count();
    assert!(moved > 0, "it serves some of the keys");
    assert_eq!(s.count_keys().unwrap(), moved as u64);
}

/// Every replica of a serving group loses its storage and starts blank
/// under the same gid. Before groups claimed an incarnation, it replayed
/// history from configuration 1 as a new group and served its shards empty:
/// acknowledged keys read as not found. Now the shardmaster refuses it; its
/// shards are unavailable, never wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_that_lost_every_disk_is_refused_not_served_empty() {
    let mut cluster = Cluster::start(2, 3, None).await;
    let ck = cluster.clerk();
    cluster.join(100).await;
    for i in 0..KEYS {
        ck.put(key(i), format!("v{i}")).await.unwrap();
    }
    cluster.join(101).await;
    cluster.await_settled().await;
    let config = cluster.admin().query(None).await.unwrap();
    let lost: BTreeSet<usize> = (0..KEYS)
        .filter(|i| config.shards[shard_of(*i)] == 100)
        .collect();
    assert!(!lost.is_empty() && lost.len() < KEYS);

    cluster.wipe_group(100).await;
    // Refused, or (as before) replayed up to the latest configuration.
    let refused = async || {
        for r in 0..3 {
            let status = cluster.status(100, r).await;
            if status.refused.contains("all started from blank storage") {
                return true;
            }
        }
        false
    };
    wait_until("the wiped group settles one way or the other", async || {
        refused().await || (cluster.states(100).iter()).any(|s| s.lock().config.num >= config.num)
    })
    .await;
    let impatient = cluster.clerk_with_timeout(Duration::from_secs(2));
    let sampled_lost: Vec<usize> = lost.iter().copied().take(3).collect();
    for i in (0..KEYS).filter(|i| !lost.contains(i) || sampled_lost.contains(i)) {
        let got = impatient.get(key(i)).await;
        if lost.contains(&i) {
            assert!(
                matches!(got, Err(ClerkError::Timeout { .. })),
                "key {i} of the wiped group: {got:?}"
            );
        } else {
            assert_eq!(got.unwrap(), Some(Bytes::from(format!("v{i}"))));
        }
    }
    assert!(refused().await, "the refusal is reported");
    for (r, state) in cluster.states(100).iter().enumerate() {
        let s = state.lock();
        assert_eq!(s.config.num, 0, "replica {r} took a configuration");
        assert_eq!(s.count_keys().unwrap(), 0);
    }
}

/// A group is stopped and comes back at new addresses while another group
/// still has to pull from it; the admin re-joins it with the new list. The
/// puller must follow it there: before, it dialled only the addresses of
/// the configuration it pulled for, and never took another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_follows_its_source_to_new_addresses() {
    let mut cluster = Cluster::start(2, 3, None).await;
    let ck = cluster.clerk();
    cluster.join(100).await;
    for i in 0..KEYS {
        ck.put(key(i), format!("v{i}")).await.unwrap();
    }
    cluster.kill_group(100).await;
    cluster.join(101).await;
    let pulling = async || {
        let states = cluster.states(101);
        let s = states[0].lock();
        s.config.num == 2 && !s.ready_for_next_config()
    };
    wait_until("group 101 starts pulling from the stopped group", pulling).await;
    cluster.readdress_group(100).await;
    cluster.join(100).await;
    cluster.await_settled().await;
    every_key_reads_back(&ck).await;
}

/// A group leaves; its new owner pulls everything, but no delete ever
/// reaches the old holder (every DeleteShard is refused). Then the holder
/// is either removed, or stays.
///
/// Removed: before, the new owner kept its pending deletes and dialled the
/// dead addresses on every round, forever. Now, once the holder is out of
/// the configuration and has failed it past the grace, the delete counts as
/// done.
///
/// Stays, after the new owner gave up: nobody would ever tell it to delete
/// its copies, and the operator would wait for them forever. Now a group
/// that has left asks each copy's new owner, and drops what it installed.
///
/// Either way every group ends holding only what it owns.
async fn a_holder_that_cannot_acknowledge(removed: bool) {
    let options = KvServerOptions {
        departed_holder_grace: Duration::from_secs(1),
        unreliable: Some(Unreliable {
            drop_request: 0.0,
            drop_reply: 0.0,
            seed: 0,
            refuse_deletes: true,
            stall_copy_stream: None,
        }),
        ..Default::default()
    };
    let mut cluster = Cluster::start_with(2, 3, options).await;
    let ck = cluster.clerk();
    cluster.join(100).await;
    for i in 0..KEYS {
        ck.put(key(i), format!("v{i}")).await.unwrap();
    }
    cluster.join(101).await;
    cluster.leave(100).await;
    let latest = cluster.admin().query(None).await.unwrap().num;
    if removed {
        wait_until("group 101 has every shard, deletes pending", async || {
            let states = cluster.states(101);
            let s = states[0].lock();
            s.config.num == latest && s.ready_for_next_config() && !s.pending_deletes.is_empty()
        })
        .await;
        cluster.kill_group(100).await;
    }
    wait_until("group 101 lets the holder go", async || {
        (cluster.states(101).iter()).all(|s| {
            let s = s.lock();
            s.config.num == latest && s.ready_for_next_config() && s.pending_deletes.is_empty()
        })
    })
    .await;
    if !removed {
        wait_until(
            "the holder drops what the new owner installed",
            async || {
                (cluster.states(100).iter()).all(|s| {
                    let s = s.lock();
                    s.config.num == latest && s.outgoing.is_empty() && s.count_keys().unwrap() == 0
                })
            },
        )
        .await;
    }
    for state in cluster.states(101) {
        let s = state.lock();
        assert!(s.outgoing.is_empty());
        assert_eq!(s.owned.len(), SHARDS);
        assert_eq!(
            s.count_keys().unwrap(),
            KEYS as u64,
            "only the owned copies are held"
        );
    }
    every_key_reads_back(&ck).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_removed_before_acknowledging_its_deletes_is_let_go() {
    a_holder_that_cannot_acknowledge(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_let_go_while_alive_drops_its_copies_itself() {
    a_holder_that_cannot_acknowledge(false).await;
}

/// One server entry that cannot be dialled must not hide the group's
/// others. Before, the first unparsable address ended the call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_server_entry_does_not_hide_the_others() {
    let cluster = Cluster::start(1, 1, None).await;
    let pool = ChannelPool::new(Duration::from_secs(1));
    let servers = vec![
        "not an address".to_string(),
        cluster.group(100).addrs[0].clone(),
    ];
    let status = pool
        .call_group(&servers, Duration::from_secs(1), |mut c| async move {
            c.group_status(GroupStatusRequest {}).await
        })
        .await
        .unwrap();
    assert_eq!(status.gid, 100);
}

/// A replica of the new owner that is down while the others install a
/// move. Before, the previous holder dropped its copies as soon as a
/// majority had installed them, and the straggler, finding them gone, took
/// a snapshot of the whole group from a peer. Now the holder keeps them
/// (within `straggler_grace`) until every replica has fetched them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_down_during_a_move_fetches_the_shards_and_takes_no_snapshot() {
    let options = KvServerOptions {
        straggler_grace: WAIT * 4,
        ..Default::default()
    };
    let mut cluster = Cluster::start_with(2, 3, options).await;
    let ck = cluster.clerk();
    cluster.join(100).await;
    for i in 0..KEYS {
        ck.put(key(i), format!("v{i}")).await.unwrap();
    }
    cluster.kill(101, 2).await;
    cluster.join(101).await;
    let latest = cluster.admin().query(None).await.unwrap().num;
    let leader_status = async |cluster: &Cluster| {
        let leader = cluster.leader(101)?;
        let status = cluster.status(101, leader).await;
        (status.leader && status.config_num == latest).then_some(status)
    };
    let mut seen = None;
    wait_until("group 101's live replicas install the move", async || {
        let installed = (cluster.states(101).iter()).all(|s| {
            let s = s.lock();
            s.config.num == latest && s.ready_for_next_config()
        });
        // Once it has installed, its leader either waits for the replica
        // that is down, or (before) has had the copies deleted.
        seen = leader_status(&cluster)
            .await
            .filter(|s| installed && (s.releases_waiting > 0 || s.pending_deletes == 0));
        seen.is_some()
    })
    .await;
    let status = seen.unwrap();
    assert!(
        status.releases_waiting > 0,
        "the previous holder was told to delete while a replica lacked its copies"
    );
    assert!(!(cluster.states(100)[0].lock().outgoing.is_empty()));
    cluster.restart(101, 2).await;
    cluster.await_settled().await;
    let states = cluster.states(101);
    assert_eq!(states.len(), 3);
    for state in &states {
        assert_eq!(state.lock().snapshots_installed, 0);
    }
    // The restarted replica holds exactly the keys of the shards it serves.
    holds_exactly_the_keys_it_serves(&states[2].lock());
    every_key_reads_back(&ck).await;
}

/// The same when the holder is a group that has left: it drops its copies
/// by itself once the new owner serves them, and it too keeps them while a
/// replica of the owner lacks them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_departing_holder_keeps_its_copies_for_a_replica_that_is_down() {
    let options = KvServerOptions {
        straggler_grace: WAIT * 4,
        ..Default::default()
    };
    let mut cluster = Cluster::start_with(2, 3, options).await;
    let ck = cluster.clerk();
    cluster.join(100).await;
    cluster.join(101).await;
    for i in 0..KEYS {
        ck.put(key(i), format!("v{i}")).await.unwrap();
    }
    // The join's copies released first: only the leave's are kept below.
    cluster.await_settled().await;
    cluster.kill(101, 2).await;
    cluster.leave(100).await;
    let latest = cluster.admin().query(None).await.unwrap().num;
    wait_until(
        "group 100 keeps its copies for group 101's replica",
        async || {
            let installed = (cluster.states(101).iter()).all(|s| {
                let s = s.lock();
                s.config.num == latest && s.ready_for_next_config()
            });
            let Some(leader) = cluster.leader(100) else {
                return false;
            };
            installed && cluster.status(100, leader).await.releases_waiting > 0
        },
    )
    .await;
    assert!(!(cluster.states(100)[0].lock().outgoing.is_empty()));
    cluster.restart(101, 2).await;
    wait_until("group 100 drops its copies", async || {
        (cluster.states(100).iter()).all(|s| s.lock().outgoing.is_empty())
    })
    .await;
    let states = cluster.states(101);
    for state in &states {
        assert_eq!(state.lock().snapshots_installed, 0);
    }
    every_key_reads_back(&ck).await;
}

/// Past `straggler_grace` the previous holder is let go: the replica that
/// was down finds the copies gone and takes a snapshot of its group from a
/// peer instead, and serves exactly what the others do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_down_past_the_grace_catches_up_from_a_snapshot() {
    let options = KvServerOptions {
        straggler_grace: Duration::from_secs(1),
        ..Default::default()
    };
    let mut cluster = Cluster::start_with(2, 3, options).await;
    let ck = cluster.clerk();
    cluster.join(100).await;
    for i in 0..KEYS {
        ck.put(key(i), format!("v{i}")).await.unwrap();
    }
    cluster.kill(101, 2).await;
    cluster.join(101).await;
    wait_until("group 100 is let go of its copies", async || {
        let latest = cluster.admin().query(None).await.unwrap().num;
        let installed = (cluster.states(101).iter()).all(|s| {
            let s = s.lock();
            s.config.num == latest && s.ready_for_next_config()
        });
        installed && (cluster.states(100).iter()).all(|s| s.lock().outgoing.is_empty())
    })
    .await;
    cluster.restart(101, 2).await;
    cluster.await_settled().await;
    let states = cluster.states(101);
    assert_eq!(states.len(), 3);
    {
        let s = states[2].lock();
        assert_eq!(s.snapshots_installed, 1, "the copies were gone");
        holds_exactly_the_keys_it_serves(&s);
    }
    every_key_reads_back(&ck).await;
}

/// A replica killed while it streams a snapshot to a peer that reads slowly
/// comes back on its own store once the stream lets go of it. The stream
/// holds a view of the store, so the store's lock, after `kill`: before the
/// harness waited for it, the restart failed with the engine's `Locked`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_stream_restarts_on_its_store() {
    use futures::StreamExt;
    use shardkv::proto::kv::shard_kv_client::ShardKvClient;
    use shardkv::proto::kv::FetchSnapshotRequest;

    let mut cluster = Cluster::start(1, 3, None).await;
    let ck = cluster.clerk();
    cluster.join(100).await;
    // Several chunks more than the sender buffers, so the stream blocks.
    let big = |i: usize| format!("{i:08}").repeat(32 << 10);
    for i in 0..64 {
        ck.put(key(i), big(i)).await.unwrap();
    }
    let addr = cluster.group(100).addrs[0].clone();
    let mut client = ShardKvClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
        .max_decoding_message_size(64 << 20);
    let mut stream = client
        .fetch_snapshot(FetchSnapshotRequest {
            gid: 100,
            min_applied_slot: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.expect("a first chunk").unwrap();
    assert!(
        !first.last,
        "the snapshot fits one chunk: the stream would not block"
    );
    cluster.kill(100, 0).await;
    // The slow reader gives up a moment later, as a peer's chunk timeout would.
    let reader = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(stream);
    });
    cluster.restart(100, 0).await;
    reader.await.unwrap();
    for i in (0..64).step_by(7) {
        assert_eq!(ck.get(key(i)).await.unwrap(), Some(Bytes::from(big(i))));
    }
    let s = cluster.states(100)[0].lock().count_keys().unwrap();
    assert_eq!(s, 64, "the restarted replica holds every key");
}

/// An owner that leaves right after it installed a move, while one of its
/// replicas was down and lacks the shards: the shards go on to the groups
/// that stay, the straggler comes back and follows, and nothing is lost or
/// left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_that_leaves_right_after_an_install_loses_nothing() {
    let options = KvServerOptions {
        straggler_grace: WAIT * 4,
        ..Default::default()
    };
    let mut cluster = Cluster::start_with(3, 3, options).await;
    let ck = cluster.clerk();
    cluster.join(100).await;
    cluster.join(102).await;
    for i in 0..KEYS {
        ck.put(key(i), format!("v{i}")).await.unwrap();
    }
    cluster.await_settled().await;
    cluster.kill(101, 2).await;
    cluster.join(101).await;
    let joined = cluster.admin().query(None).await.unwrap();
    let moved: Vec<usize> = (0..KEYS)
        .filter(|i| joined.shards[shard_of(*i)] == 101)
        .collect();
    assert!(!moved.is_empty(), "the join moves some keys to group 101");
    wait_until("group 101's live replicas install the join", async || {
        (cluster.states(101).iter()).all(|s| {
            let s = s.lock();
            s.config.num == joined.num && s.ready_for_next_config()
        })
    })
    .await;
    // At once: its third replica has not even seen the join.
    cluster.leave(101).await;
    for i in &moved {
        assert_eq!(
            ck.get(key(*i)).await.unwrap(),
            Some(Bytes::from(format!("v{i}"))),
            "key {i} after group 101 left"
        );
    }
    cluster.restart(101, 2).await;
    cluster.await_settled().await;
    every_key_reads_back(&ck).await;
    for gid in [100, 102] {
        for state in cluster.states(gid) {
            holds_exactly_the_keys_it_serves(&state.lock());
        }
    }
    for (r, state) in cluster.states(101).iter().enumerate() {
        let s = state.lock();
        assert!(
            s.outgoing.is_empty(),
            "replica {r} of group 101 kept copies"
        );
        assert_eq!(
            s.count_keys().unwrap(),
            0,
            "replica {r} of group 101 kept keys"
        );
    }
}
