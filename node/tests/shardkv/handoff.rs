//! Shard handoff: old copies are dropped, and duplicate tables travel.

use std::collections::BTreeSet;

use bytes::Bytes;
use shardkv::proto::kv::shard_kv_client::ShardKvClient;
use shardkv::proto::kv::{KvRequest, OpKind, Outcome};
use shardkv::shardkv::key_to_shard;

use crate::common::{key, Cluster, SHARDS};

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
