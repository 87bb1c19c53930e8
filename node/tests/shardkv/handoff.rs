//! Shard handoff: old copies are dropped, and duplicate tables travel.

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use shardkv::proto::kv::shard_kv_client::ShardKvClient;
use shardkv::proto::kv::{KvRequest, OpKind, Outcome};
use shardkv::shardkv::key_to_shard;
use shardkv::shardkv::server::{KvServerOptions, Unreliable};
use shardkv::shardkv::state::ShardStatus;

use crate::common::{key, wait_until, Cluster, SHARDS};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_owners_hold_no_copies_after_many_moves() {
    let cluster = Cluster::start(2, 3, None).await;
    let ck = cluster.clerk();
    cluster.join(100).await;
    cluster.join(101).await;
    for i in 0..50 {
        ck.put(key(i), format!("v{i}")).await.unwrap();
    }
    // Every shard back and forth ten times.
    for round in 0..10u64 {
        for shard in 0..SHARDS as u64 {
            let gid = 100 + (shard + round) % 2;
            cluster.admin().r#move(shard, gid).await.unwrap();
        }
        cluster.await_settled().await;
    }
    for i in 0..50 {
        let got = ck.get(key(i)).await.unwrap();
        assert_eq!(got, Some(Bytes::from(format!("v{i}"))));
    }
    let config = cluster.admin().query(None).await.unwrap();
    for gid in [100, 101] {
        let mine: BTreeSet<u64> = (0..SHARDS as u64)
            .filter(|s| config.shards[*s as usize] == gid)
            .collect();
        let expected_keys = (0..50)
            .filter(|i| mine.contains(&(key_to_shard(key(*i).as_bytes(), SHARDS) as u64)))
            .count();
        for (i, state) in cluster.states(gid).iter().enumerate() {
            let s = state.lock();
            assert!(
                s.outgoing.is_empty(),
                "group {gid} replica {i} still holds old copies"
            );
            assert_eq!(s.owned.keys().copied().collect::<BTreeSet<_>>(), mine);
            assert_eq!(
                s.count_keys().unwrap(),
                expected_keys as u64,
                "group {gid} replica {i}"
            );
        }
        // The same, as the status RPC reports it.
        let status = cluster.status(gid, 0).await;
        assert!(status.outgoing.is_empty() && status.pulling.is_empty());
        // An estimate, but never below the keys held, and 0 exactly when
        // there are none.
        let reported = status.keys as usize;
        assert!(reported >= expected_keys, "{reported} < {expected_keys}");
        assert_eq!(reported == 0, expected_keys == 0);
    }
}

/// An Append is applied, its reply is lost, its shard moves, and the
/// client's retry reaches the new owner: the new owner must recognise it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_migration_is_applied_once() {
    let cluster = Cluster::start(2, 3, None).await;
    cluster.join(100).await;
    let ck = cluster.clerk();
    ck.put("k", "a").await.unwrap();
    let shard = key_to_shard(b"k", SHARDS) as u64;
    let request = KvRequest {
        client: 4242,
        seq: 7,
        first_unacked: 7,
        op: OpKind::Append as i32,
        key: Bytes::from("k"),
        value: Bytes::from("b"),
    };
    // Ask every replica of group 100 until the leader applies it; the
    // reply is "lost": we ignore it.
    let mut applied = false;
    for addr in &cluster.group(100).addrs {
        let mut c = ShardKvClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        if let Ok(r) = c.execute(request.clone()).await {
            assert_eq!(r.into_inner().outcome, Outcome::Ok as i32);
            applied = true;
            break;
        }
    }
    assert!(applied, "no replica of group 100 took the append");
    cluster.join(101).await;
    cluster.admin().r#move(shard, 101).await.unwrap();
    cluster.await_settled().await;
    // The retry, at the new owner.
    let mut answered = false;
    for addr in &cluster.group(101).addrs {
        let mut c = ShardKvClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        if let Ok(r) = c.execute(request.clone()).await {
            assert_eq!(r.into_inner().outcome, Outcome::Ok as i32);
            answered = true;
            break;
        }
    }
    assert!(answered, "no replica of group 101 answered the retry");
    assert_eq!(ck.get("k").await.unwrap(), Some(Bytes::from("ab")));
    // And the old owner now refuses the key.
    let mut refused = false;
    for addr in &cluster.group(100).addrs {
        let mut c = ShardKvClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let get = KvRequest {
            op: OpKind::Get as i32,
            seq: 0,
            ..request.clone()
        };
        if let Ok(r) = c.execute(get).await {
            assert_eq!(r.into_inner().outcome, Outcome::WrongGroup as i32);
            refused = true;
        }
    }
    assert!(refused);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_and_nothing_is_stored() {
    let cluster = Cluster::start(1, 3, None).await;
    cluster.join(100).await;
    let ck = cluster.clerk();
    // Refused by the Clerk before sending.
    assert!(ck.put("", "v").await.is_err());
    assert!(ck.put("k".repeat(5000), "v").await.is_err());
    assert!(ck.put("k", vec![0u8; (1 << 20) + 1]).await.is_err());
    // Refused by the server, bypassing the Clerk's checks.
    let addr = &cluster.group(100).addrs[0];
    let mut c = ShardKvClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let base = KvRequest {
        client: 1,
        seq: 1,
        first_unacked: 1,
        op: OpKind::Put as i32,
        key: Bytes::from("k"),
        value: Bytes::from("v"),
    };
    let cases = [
        KvRequest {
            key: Bytes::new(),
            ..base.clone()
        },
        KvRequest {
            key: Bytes::from(vec![b'k'; 5000]),
            ..base.clone()
        },
        KvRequest {
            value: Bytes::from(vec![0u8; (1 << 20) + 1]),
            ..base.clone()
        },
        KvRequest {
            op: 99,
            ..base.clone()
        },
        KvRequest {
            seq: 0,
            ..base.clone()
        },
    ];
    for (i, case) in cases.into_iter().enumerate() {
        let status = c.execute(case).await.expect_err("must be refused");
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "case {i}: {status}"
        );
        assert!(!status.message().is_empty());
    }
    assert_eq!(ck.get("k").await.unwrap(), None);
    for s in cluster.states(100) {
        assert_eq!(s.lock().count_keys().unwrap(), 0);
    }
}

/// A shard whose source is slow holds up its own install and no other:
/// the rest of the move is served meanwhile. The leader used to fetch
/// every copy of a move before its next round of installs, so one slow
/// copy kept every moved shard from being served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_copy_holds_up_only_its_own_shard() {
    // The shardmaster gives a joining second group the highest shards.
    const SLOW: u64 = SHARDS as u64 / 2;
    let stall = Duration::from_secs(8);
    let options = KvServerOptions {
        unreliable: Some(Unreliable {
            drop_request: 0.0,
            drop_reply: 0.0,
            seed: 0,
            refuse_deletes: false,
            stall_copy_stream: Some((SLOW, stall)),
        }),
        ..Default::default()
    };
    let cluster = Cluster::start_with(2, 3, options).await;
    let ck = cluster.clerk();
    cluster.join(100).await;
    let keys = 100;
    for i in 0..keys {
        ck.put(key(i), format!("v{i}")).await.unwrap();
    }
    cluster.join(101).await;
    let config = cluster.admin().query(None).await.unwrap();
    let moved: BTreeSet<u64> = (0..SHARDS as u64)
        .filter(|s| config.shards[*s as usize] == 101)
        .collect();
    assert!(moved.contains(&SLOW) && moved.len() > 1, "moved: {moved:?}");
    // From when both groups have taken the configuration: the old owner
    // serves none of the moved shards, and the slow one's stall has begun
    // or is about to.
    for gid in [100, 101] {
        wait_until("both groups take the configuration", async || {
            (cluster.states(gid).iter()).all(|s| s.lock().config.num == config.num)
        })
        .await;
    }
    let taken = tokio::time::Instant::now();
    let shard_of = |i: usize| key_to_shard(key(i).as_bytes(), SHARDS) as u64;
    // Half the stall: without the fix the others came after all of it.
    let deadline = taken + stall / 2;
    for i in (0..keys).filter(|i| moved.contains(&shard_of(*i)) && shard_of(*i) != SLOW) {
        let got = tokio::time::timeout_at(deadline, ck.get(key(i)))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "shard {} was not served {:?} after the configuration was taken",
                    shard_of(i),
                    stall / 2
                )
            })
            .unwrap();
        assert_eq!(got, Some(Bytes::from(format!("v{i}"))));
    }
    for state in cluster.states(101) {
        let status = state.lock().owned.get(&SLOW).map(|o| o.status);
        assert_eq!(
            status,
            Some(ShardStatus::Pulling),
            "the slow shard was installed before its stall ended: the test shows nothing"
        );
    }
    // And the slow one arrives whole.
    for i in (0..keys).filter(|i| shard_of(*i) == SLOW) {
        let got = ck.get(key(i)).await.unwrap();
        assert_eq!(got, Some(Bytes::from(format!("v{i}"))));
    }
}
