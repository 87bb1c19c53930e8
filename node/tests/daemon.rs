//! A node as the binaries run it (`run_kv`), in this process.

use std::time::{Duration, Instant};

use shardkv::daemon::{run_kv, run_master, NodeError, NodeOptions};
use shardkv::replica::members::MembersAdmin;
use shardkv::shardkv::state::KvState;
use shardkv::shardkv::Limits;

/// A node whose metrics address is in use fails before it opens its store
/// or starts its replica: the store is free at once. It used to fail only
/// after starting the replica, which then ran on with the store open (in
/// `shardkv-node local` every node shares the process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_port_is_taken_fails_before_it_starts_anything() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = free.local_addr().unwrap().to_string();
    drop(free);
    let options = NodeOptions {
        id: 0,
        peers: vec![listen],
        data_dir: dir.path().to_path_buf(),
        metrics_addr: Some(taken.local_addr().unwrap()),
        ..NodeOptions::defaults()
    };
    let failed = run_kv(
        options,
        1,
        vec!["127.0.0.1:1".into()],
        Limits::default(),
        std::future::pending(),
    )
    .await;
    assert!(
        matches!(failed, Err(NodeError::Listen { .. })),
        "a taken metrics address gave {failed:?}"
    );
    let reopened = KvState::open(1, &dir.path().join("state"), None, Default::default());
    assert!(
        reopened.is_ok(),
        "the failed node's store is still held: {:?}",
        reopened.err()
    );
}

/// Free loopback addresses, one per replica.
fn free_addresses(count: usize) -> Vec<String> {
    let listeners: Vec<_> = (0..count)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect()
}

/// Asks `addr` who it is until it answers with `role`, or fails after 20 s
/// with what it last said.
async fn await_role(addr: &str, role: &str) {
    let admin = MembersAdmin::new(vec![addr.to_string()], Duration::from_secs(1));
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = String::new();
    while Instant::now() < deadline {
        match admin.identify(addr).await {
            Ok(who) if who.role == role => return,
            Ok(who) => last = format!("role {}", who.role),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{addr} never became {role}: {last}");
}

/// A shardmaster replica of the group whose every possible replica
/// `peers` names, `initial` of them its first voters.
fn master_options(dir: &std::path::Path, peers: &[String], id: u32, initial: u32) -> NodeOptions {
    NodeOptions {
        id,
        peers: peers.to_vec(),
        data_dir: dir.join(format!("master-{id}")),
        tick: Duration::from_millis(10),
        initial_replicas: Some(initial),
        ..NodeOptions::defaults()
    }
}

/// `--peers` may name every replica the group may grow to (as the
/// operator's pod template does): ids below `--initial-replicas` form the
/// group, the others wait as new members until added.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_beyond_the_initial_size_wait_to_be_added() {
    let dir = tempfile::tempdir().unwrap();
    let peers = free_addresses(3);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let first = tokio::spawn(run_master(
        master_options(dir.path(), &peers, 0, 1),
        10,
        until_stopped(stopped.clone()),
    ));
    await_role(&peers[0], "leader").await;
    let second = tokio::spawn(run_master(
        master_options(dir.path(), &peers, 2, 1),
        10,
        until_stopped(stopped.clone()),
    ));
    await_role(&peers[2], "not-member").await;
    let admin = MembersAdmin::new(vec![peers[0].clone()], Duration::from_secs(2));
    let waiting = admin.identify(&peers[2]).await.expect("identify");
    assert_eq!(waiting.epoch, 0, "a new replica knows no membership");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let members = admin
        .add(&peers[2], "shardmaster", deadline)
        .await
        .expect("the waiting replica is added");
    let voters: Vec<u32> = members
        .members
        .iter()
        .filter(|m| m.voter)
        .map(|m| m.id)
        .collect();
    assert_eq!(voters, [0, 2]);
    // A change planned from an older membership is refused, not made.
    let stale = admin
        .change_in_epoch(
            shardkv::proto::change_members_request::Change::Remove(2),
            Some(0),
            deadline,
        )
        .await
        .expect_err("planned in epoch 0");
    assert_eq!(stale.code(), tonic::Code::FailedPrecondition, "{stale:?}");
    assert!(stale.message().contains("epoch 0"), "{}", stale.message());
    // Removed, it says so: not a member, knowing the epoch that removed it
    // (the operator never adds such a replica again with its old data).
    admin
        .remove(&peers[2], deadline)
        .await
        .expect("the replica is removed");
    await_role(&peers[2], "not-member").await;
    let removed = admin.identify(&peers[2]).await.expect("identify");
    assert!(removed.epoch > 0, "{removed:?}");
    stop.send(true).unwrap();
    first.await.unwrap().expect("replica 0 ran");
    second.await.unwrap().expect("replica 2 ran");
}

/// A group first started alone and grown since: its first replica, started
/// again from a blank disk with `--initial-cluster-state existing`, waits
/// to be added rather than leading a new, empty group of one under the
/// group's name. Without the flag it leads (the case the flag is for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blank_replica_of_an_existing_group_first_started_alone_waits_to_be_added() {
    let dir = tempfile::tempdir().unwrap();
    let peers = free_addresses(3);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let existing = NodeOptions {
        existing_group: true,
        ..master_options(dir.path(), &peers, 0, 1)
    };
    let waiting = tokio::spawn(run_master(existing, 10, until_stopped(stopped.clone())));
    await_role(&peers[0], "not-member").await;
    stop.send(true).unwrap();
    waiting.await.unwrap().expect("the waiting replica ran");

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let new = NodeOptions {
        data_dir: dir.path().join("new"),
        ..master_options(dir.path(), &peers, 0, 1)
    };
    let alone = tokio::spawn(run_master(new, 10, until_stopped(stopped.clone())));
    await_role(&peers[0], "leader").await;
    stop.send(true).unwrap();
    alone.await.unwrap().expect("the new group's replica ran");
}

/// `--initial-replicas` outside 1..=peers is refused with a clear error.
#[tokio::test]
async fn an_initial_size_larger_than_the_peer_list_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let peers = free_addresses(3);
    let options = master_options(dir.path(), &peers, 0, 4);
    let refused = run_master(options, 10, std::future::pending()).await;
    match refused {
        Err(NodeError::Config(message)) => {
            assert!(message.contains("--initial-replicas 4"), "{message}")
        }
        other => panic!("expected a configuration error, got {other:?}"),
    }
}
