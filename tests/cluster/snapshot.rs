//! Snapshots streamed between the replicas of a group, on real processes:
//! a replica far behind the log gets its peers' state from their stores,
//! and a transfer cut short by `kill -9` of either side completes later.

use std::time::{Duration, Instant};

use bytes::Bytes;
use shardkv_cluster_tests::{await_serving, Cluster, WAIT};

/// Checkpoint often and keep little log, so a replica that misses a few
/// hundred writes can only catch up from a snapshot.
const FLAGS: &[&str] = &["--snapshot-every-slots", "20", "--log-retain-slots", "40"];
const KEYS: usize = 600;
const VALUE_BYTES: usize = 64 << 10;

/// Polls `pred` until it holds or `timeout` passes.
async fn eventually(timeout: Duration, what: &str, pred: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !pred() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn value(i: usize) -> String {
    format!("{i:08}").repeat(VALUE_BYTES / 8)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_transfer_cut_short_on_either_side_completes_later() {
    let mut cluster = Cluster::start_with("127.0.0.21", 1, 3, FLAGS).await;
    cluster.join(1).await;
    let leader = cluster.await_kv_leader(1).await;
    let behind = (leader + 1) % 3;
    cluster.groups[0][behind].kill9();
    // 38 MiB the stopped replica misses, in a few hundred slots.
    let clerk = cluster.clerk(WAIT);
    for chunk in (0..KEYS).collect::<Vec<_>>().chunks(16) {
        let puts = chunk.iter().map(|&i| clerk.put(format!("k{i}"), value(i)));
        for result in futures::future::join_all(puts).await {
            result.expect("put");
        }
    }
    let streamed = |cluster: &Cluster, i: usize| -> usize {
        cluster.groups[0][i].log_count("streaming a snapshot to a peer")
    };
    let peers: Vec<usize> = (0..3).filter(|&i| i != behind).collect();

    // The receiver dies mid-transfer: the partial import stays behind.
    cluster.groups[0][behind].start();
    eventually(WAIT, "the first fetch", || {
        cluster.groups[0][behind].log_count("fetching a snapshot from a peer") == 1
    })
    .await;
    cluster.groups[0][behind].kill9();
    let state_dir = cluster.dir.path().join(format!("group-1-{behind}"));
    assert!(
        state_dir.join("state.import").exists(),
        "the transfer finished before it could be cut short"
    );
    assert_eq!(
        cluster.groups[0][behind].log_count("installed a snapshot"),
        0
    );

    // It starts over; this time the sender dies mid-transfer, and the
    // receiver gets the state from the other peer.
    let before: Vec<usize> = peers.iter().map(|&i| streamed(&cluster, i)).collect();
    cluster.groups[0][behind].start();
    let sending = || {
        (peers.iter().zip(&before))
            .find(|(&i, &n)| streamed(&cluster, i) > n)
            .map(|(&i, _)| i)
    };
    eventually(WAIT, "a peer streaming", || sending().is_some()).await;
    let sender = sending().expect("a sender");
    cluster.groups[0][sender].kill9();
    eventually(WAIT, "the install", || {
        cluster.groups[0][behind].log_count("installed a snapshot from a peer") == 1
    })
    .await;
    assert!(
        !state_dir.join("state.import").exists(),
        "the import was switched in"
    );
    await_serving(&cluster.groups[0][behind].addr).await;

    // Only the receiver and one other are up: every write must be there.
    let check = |clerk: shardkv::shardkv::clerk::Clerk| async move {
        for i in (0..KEYS).step_by(7) {
            let got = clerk.get(format!("k{i}")).await.expect("get");
            assert_eq!(got, Some(Bytes::from(value(i))), "k{i}");
        }
    };
    check(cluster.clerk(WAIT)).await;

    // A restart of the whole group replays only the log past the store's
    // checkpoint: time to the first served read is bounded.
    for i in 0..3 {
        if cluster.groups[0][i].is_running() {
            cluster.groups[0][i].kill9();
        }
    }
    let started = Instant::now();
    for i in 0..3 {
        cluster.groups[0][i].start();
    }
    let got = cluster
        .clerk(WAIT)
        .get("k1".to_string())
        .await
        .expect("get");
    let restart = started.elapsed();
    assert_eq!(got, Some(Bytes::from(value(1))));
    println!("restart of the group to the first served read: {restart:?}");
    assert!(restart < Duration::from_secs(5), "restart took {restart:?}");
    check(cluster.clerk(WAIT)).await;
}
