//! The lab's shardkv tests, ported.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use shardkv::paxos::sim::{test_seed, SimRng};
use shardkv::shardkv::clerk::{Clerk, ClerkError};
use shardkv::shardkv::key_to_shard;
use shardkv::shardkv::server::Unreliable;

use crate::common::{key, Cluster, SHARDS};

async fn check_all(ck: &Clerk, expected: &HashMap<String, String>) {
    for (k, v) in expected {
        let got = ck.get(k.clone()).await.unwrap();
        assert_eq!(got.as_deref(), Some(v.as_bytes()), "key {k}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_join_and_leave_keep_every_value() {
    let cluster = Cluster::start(3, 3, None).await;
    let ck = cluster.clerk();
    cluster.join(100).await;

    ck.put("a", "x").await.unwrap();
    assert_eq!(ck.put_hash("a", "b").await.unwrap(), Bytes::from("x"));
    let hashed = shardkv::shardkv::put_hash_value(b"x", b"b");
    assert_eq!(ck.get("a").await.unwrap(), Some(hashed.clone()));
    ck.delete("a").await.unwrap();
    assert_eq!(ck.get("a").await.unwrap(), None);

    let mut expected = HashMap::new();
    for i in 0..20 {
        let v = format!("v{i}");
        ck.put(key(i), v.clone()).await.unwrap();
        expected.insert(key(i), v);
    }
    check_all(&ck, &expected).await;
    for gid in [101, 102] {
        cluster.join(gid).await;
        check_all(&ck, &expected).await;
        for i in 0..20 {
            let extra = format!("+{gid}");
            ck.append(key(i), extra.clone()).await.unwrap();
            expected.get_mut(&key(i)).unwrap().push_str(&extra);
        }
        check_all(&ck, &expected).await;
    }
    for gid in [100, 101] {
        cluster.leave(gid).await;
        check_all(&ck, &expected).await;
    }
    let config = cluster.admin().query(None).await.unwrap();
    assert!(config.shards.iter().all(|g| *g == 102));
    cluster.await_settled().await;
    // The groups that left hold nothing any more.
    for gid in [100, 101] {
        for s in cluster.states(gid) {
            assert_eq!(
                s.lock().count_keys().unwrap(),
                0,
                "group {gid} still holds keys"
            );
        }
    }
}

/// One key per shard.
fn shard_keys() -> Vec<String> {
    (0..SHARDS)
        .map(|shard| {
            (0..)
                .map(|i| format!("k{i}"))
                .find(|k| key_to_shard(k.as_bytes(), SHARDS) == shard)
                .unwrap()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_really_move() {
    let mut cluster = Cluster::start(2, 3, None).await;
    let ck = cluster.clerk();
    cluster.join(100).await;
    cluster.join(101).await;
    let keys = shard_keys();
    for k in &keys {
        ck.put(k.clone(), k.clone()).await.unwrap();
    }
    // Half the shards to each group, explicitly.
    for shard in 0..SHARDS as u64 {
        let gid = if shard < SHARDS as u64 / 2 { 101 } else { 100 };
        cluster.admin().r#move(shard, gid).await.unwrap();
    }
    cluster.await_settled().await;
    cluster.kill_group(100).await;
    let short = cluster.clerk_with_timeout(Duration::from_millis(1500));
    let mut answered = 0;
    for (shard, k) in keys.iter().enumerate() {
        match short.get(k.clone()).await {
            Ok(v) => {
                assert_eq!(v.as_deref(), Some(k.as_bytes()));
                assert!(
                    shard < SHARDS / 2,
                    "shard {shard} answered, but its group is dead"
                );
                answered += 1;
            }
            Err(ClerkError::Timeout { .. }) => {
                assert!(
                    shard >= SHARDS / 2,
                    "shard {shard} lives on group 101 yet did not answer"
                );
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!(answered, SHARDS / 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconfiguration_with_dead_replicas() {
    let mut cluster = Cluster::start(3, 3, None).await;
    // A minority of every group is down from the start.
    for gid in [100, 101, 102] {
        cluster.kill(gid, 0).await;
    }
    let ck = cluster.clerk();
    for gid in [100, 101, 102] {
        cluster.join(gid).await;
    }
    let mut expected = HashMap::new();
    for i in 0..20 {
        ck.put(key(i), format!("v{i}")).await.unwrap();
        expected.insert(key(i), format!("v{i}"));
    }
    for gid in [100, 101] {
        cluster.leave(gid).await;
        cluster.await_settled().await;
        // The group has left and its data has moved: it can die.
        cluster.kill_group(gid).await;
        check_all(&ck, &expected).await;
        for i in 0..20 {
            ck.append(key(i), "+").await.unwrap();
            expected.get_mut(&key(i)).unwrap().push('+');
        }
    }
    check_all(&ck, &expected).await;
}

/// 11 clients, each appending a chain to its own key and checking its
/// prefix, while shards move at random between operations.
async fn concurrent(unreliable: Option<Unreliable>, name: &str) {
    let seed = test_seed(name);
    let cluster =
        Arc::new(Cluster::start(3, 3, unreliable.map(|u| Unreliable { seed, ..u })).await);
    for gid in [100, 101, 102] {
        cluster.join(gid).await;
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Enough must happen to prove anything: 10 moves and 5 appends a
    // client. Clients run 4 s, and longer on a slow or busy machine until
    // that much has happened (at most a minute).
    let moves = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let appended = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let enough = {
        let (moves, appended) = (moves.clone(), appended.clone());
        move || {
            moves.load(std::sync::atomic::Ordering::Relaxed) >= 10
                && appended.load(std::sync::atomic::Ordering::Relaxed) >= 11 * 5
        }
    };
    let mover = {
        let cluster = cluster.clone();
        let stop = stop.clone();
        let moves = moves.clone();
        tokio::spawn(async move {
            let mut rng = SimRng::new(seed);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let shard = rng.below(SHARDS as u64);
                let gid = 100 + rng.below(3);
                cluster.admin().r#move(shard, gid).await.unwrap();
                moves.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(rng.below(100))).await;
            }
            moves.load(std::sync::atomic::Ordering::Relaxed)
        })
    };
    let mut clients = Vec::new();
    for c in 0..11 {
        let ck = cluster.clerk();
        let (enough, appended) = (enough.clone(), appended.clone());
        clients.push(tokio::spawn(async move {
            let k = format!("client-{c}");
            let mut expected = String::new();
            let start = tokio::time::Instant::now();
            let mut i = 0;
            while start.elapsed() < Duration::from_secs(4)
                || (!enough() && start.elapsed() < Duration::from_secs(60))
            {
                let piece = format!("{c}.{i} ");
                ck.append(k.clone(), piece.clone()).await.unwrap();
                appended.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                expected.push_str(&piece);
                if i % 4 == 0 {
                    let got = ck.get(k.clone()).await.unwrap().unwrap_or_default();
                    assert_eq!(got, expected.as_bytes(), "client {c}: chain broken");
                }
                i += 1;
            }
            (k, expected, i)
        }));
    }
    let mut appends = 0;
    let mut results = Vec::new();
    for c in clients {
        let (k, expected, n) = c.await.unwrap();
        appends += n;
        results.push((k, expected));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let moves = mover.await.unwrap();
    let ck = cluster.clerk();
    for (k, expected) in results {
        let got = ck.get(k.clone()).await.unwrap().unwrap_or_default();
        assert_eq!(
            got,
            expected.as_bytes(),
            "seed {seed}: {k}: each append exactly once, in order"
        );
    }
    println!("seed {seed}: {appends} appends by 11 clients across {moves} moves");
    assert!(
        moves >= 10 && appends >= 11 * 5,
        "too little happened to prove anything"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_while_shards_move() {
    concurrent(None, "concurrent_appends_while_shards_move").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_while_shards_move_unreliable() {
    let faults = Unreliable {
        drop_request: 0.1,
        drop_reply: 0.1,
        seed: 0,
        refuse_deletes: false,
        stall_copy_stream: None,
    };
    concurrent(
        Some(faults),
        "concurrent_appends_while_shards_move_unreliable",
    )
    .await;
}
