//! Changing a replica group's members on real processes, with
//! `shardkvctl member`: a group of 3 goes to 5 and then to a different 3,
//! and a member whose data directory was deleted is replaced, with a
//! `kill -9` of the group's leader between the steps of three changes
//! (after a learner is added, before it is promoted; between two
//! removals), while clients write. Every acknowledged write reads back, and the history is
//! linearizable.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use shardkv::linearizability::{check, Input, Operation, Verdict};
use shardkv::proto::ListMembersReply;
use shardkv::replica::members::MembersAdmin;
use shardkv_cluster_tests::{Cluster, Node, WAIT};

const HOST: &str = "127.0.0.31";
const CLIENTS: u64 = 3;
const KEYS: usize = 4;

fn addr(id: usize) -> String {
    format!("{HOST}:{}", 7010 + id)
}

/// A kvserver of group 1 started with `--join`: a new member under `id`.
fn joiner(cluster: &Cluster, id: usize) -> Node {
    let peers: Vec<String> = (0..=id.max(4)).map(addr).collect();
    let args = vec![
        "kv".to_string(),
        "--gid".into(),
        "1".into(),
        "--id".into(),
        id.to_string(),
        "--peers".into(),
        peers.join(","),
        "--masters".into(),
        cluster.master_addrs().join(","),
        "--data-dir".into(),
        data_dir(cluster, id),
        "--tick-ms".into(),
        "5".into(),
        "--join".into(),
    ];
    Node::new(
        &format!("group-1-{id}"),
        &addr(id),
        args,
        cluster.dir.path(),
    )
}

fn data_dir(cluster: &Cluster, id: usize) -> String {
    let name = if id < 3 {
        format!("group-1-{id}")
    } else {
        format!("joined-1-{id}")
    };
    cluster.dir.path().join(name).display().to_string()
}

/// `shardkvctl member ACTION 1 ADDR`, which must succeed.
async fn member(cluster: &Cluster, action: &str, address: &str) -> String {
    let masters = cluster.master_addrs().join(",");
    ctl_ok(&masters, &["member", action, "1", address]).await
}

fn admin(servers: &[String]) -> MembersAdmin {
    MembersAdmin::new(servers.to_vec(), Duration::from_secs(2))
}

/// Polls the group's membership until `done` holds.
async fn await_members(servers: &[String], what: &str, done: impl Fn(&ListMembersReply) -> bool) {
    let deadline = Instant::now() + WAIT;
    let mut last = None;
    while Instant::now() < deadline {
        if let Ok(members) = admin(servers).list().await {
            if done(&members) {
                return;
            }
            last = Some(members);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what}: never happened (last membership seen: {last:?})");
}

/// The address of the group's leader, as a member reports it.
async fn leader(servers: &[String]) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(m) = admin(servers).list().await {
            if m.has_leader && !m.leader_address.is_empty() {
                return m.leader_address;
            }
        }
        assert!(Instant::now() < deadline, "the group elected no leader");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `change` (a `shardkvctl member` call) while the group's leader is
/// killed with `kill -9` once `started` shows the change under way, and
/// started again.
async fn with_leader_killed<F: std::future::Future<Output = String> + Send + 'static>(
    nodes: &mut [Option<Node>],
    servers: &[String],
    started: impl Fn(&ListMembersReply) -> bool,
    change: F,
) -> String {
    // Runs on its own: the kill happens while it does.
    let change = tokio::spawn(change);
    await_members(servers, "the change under way", &started).await;
    let victim = leader(servers).await;
    let node = nodes
        .iter_mut()
        .flatten()
        .find(|n| n.addr == victim)
        .expect("the leader is one of the nodes");
    node.kill9();
    node.start();
    change.await.expect("the change")
}

struct History {
    ops: Mutex<Vec<Operation>>,
    acked: Mutex<Vec<(Bytes, Bytes)>>,
    failed: std::sync::atomic::AtomicUsize,
    epoch: Instant,
}

impl History {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_goes_from_3_to_5_to_another_3_and_replaces_a_lost_disk_while_clients_write() {
    let mut cluster = Cluster::start_at(
        HOST,
        1,
        3,
        &|i| format!("{HOST}:{}", 7000 + i),
        &|_, i| addr(i),
        &[],
    )
    .await;
    cluster.join(1).await;
    // The group's replicas, by id: the first three, then those that join.
    let mut nodes: Vec<Option<Node>> = std::mem::take(&mut cluster.groups[0])
        .into_iter()
        .map(Some)
        .collect();
    nodes.extend([None, None]);
    let all: Vec<String> = (0..5).map(addr).collect();

    let history = Arc::new(History {
        ops: Mutex::default(),
        acked: Mutex::default(),
        failed: Default::default(),
        epoch: Instant::now(),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let clerk = cluster.clerk(Duration::from_secs(20));
        let (history, stop) = (history.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let key = Bytes::from(format!("key-{}", i as usize % KEYS));
                let call = history.now();
                let (input, output, ok) = if i.is_multiple_of(3) {
                    match clerk.get(key.clone()).await {
                        Ok(v) => (Input::Get, v, true),
                        Err(_) => (Input::Get, None, false),
                    }
                } else {
                    let value = Bytes::from(format!("[c{c}-{i}]"));
                    let ok = clerk.append(key.clone(), value.clone()).await.is_ok();
                    if ok {
                        history
                            .acked
                            .lock()
                            .unwrap()
                            .push((key.clone(), value.clone()));
                    }
                    (Input::Append(value), None, ok)
                };
                if !ok {
                    history.failed.fetch_add(1, Ordering::Relaxed);
                    if input == Input::Get {
                        continue; // a read that failed changed nothing
                    }
                }
                let ret = if ok { history.now() } else { u64::MAX };
                history.ops.lock().unwrap().push(Operation {
                    client: c,
                    key,
                    input,
                    output,
                    call,
                    ret,
                });
            }
        }));
    }

    // 3 -> 5: two new members join, each added as a learner and promoted;
    // the leader dies while the second is added.
    for id in [3, 4] {
        let mut node = joiner(&cluster, id);
        node.start();
        nodes[id] = Some(node);
    }
    let out = member(&cluster, "add", &addr(3)).await;
    assert!(
        out.contains(&format!("3  {}  voter", addr(3)))
            || out.contains(&format!("3  {}  leader", addr(3))),
        "{out}"
    );
    let servers = all.clone();
    let masters = cluster.master_addrs().join(",");
    let adding = {
        let masters = masters.clone();
        async move { ctl_ok(&masters, &["member", "add", "1", &addr(4)]).await }
    };
    with_leader_killed(
        &mut nodes,
        &servers,
        |m| m.members.iter().any(|m| m.id == 4),
        adding,
    )
    .await;
    await_members(&servers, "five voters", |m| {
        m.members.len() == 5 && m.members.iter().all(|m| m.voter)
    })
    .await;

    // 5 -> another 3: replicas 0 and 1 leave; the leader dies during the
    // second removal.
    member(&cluster, "remove", &addr(0)).await;
    let removing = {
        let masters = masters.clone();
        async move { ctl_ok(&masters, &["member", "remove", "1", &addr(1)]).await }
    };
    with_leader_killed(
        &mut nodes,
        &servers,
        |m| m.members.iter().all(|m| m.id != 0),
        removing,
    )
    .await;
    let three = |m: &ListMembersReply| {
        let mut ids: Vec<u32> = m.members.iter().map(|m| m.id).collect();
        ids.sort();
        ids == [2, 3, 4]
    };
    await_members(&servers, "members 2, 3 and 4", three).await;
    // The shardmaster learns the group's servers from the group.
    let admin_client = cluster.admin();
    await_recorded(&admin_client, &[addr(2), addr(3), addr(4)]).await;
    // The removed replicas take no part: stopped, the group serves on.
    for id in [0, 1] {
        if let Some(mut node) = nodes[id].take() {
            node.terminate();
        }
    }

    // A member loses its disk: started again blank under its id (with
    // --join) it is a new life, not the member; removed and added anew.
    let lost = 3;
    if let Some(node) = nodes[lost].as_mut() {
        node.kill9();
    }
    std::fs::remove_dir_all(data_dir(&cluster, lost)).expect("delete the data directory");
    nodes[lost] = Some(joiner(&cluster, lost));
    if let Some(node) = nodes[lost].as_mut() {
        node.start();
    }
    await_serving_or_not(&addr(lost)).await;
    member(&cluster, "remove", &addr(lost)).await;
    let readding = {
        let masters = masters.clone();
        async move { ctl_ok(&masters, &["member", "add", "1", &addr(lost)]).await }
    };
    with_leader_killed(
        &mut nodes,
        &servers,
        |m| m.members.iter().any(|m| m.id == lost as u32),
        readding,
    )
    .await;
    await_members(&servers, "members 2, 3 and 4 again, all voters", |m| {
        three(m) && m.members.iter().all(|m| m.voter)
    })
    .await;

    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.expect("client");
    }
    // The shardmaster names the group's servers as they are now: no late
    // report of an earlier list stays in their place.
    await_recorded(&admin_client, &[addr(2), addr(3), addr(4)]).await;
    let acked = history.acked.lock().unwrap().clone();
    assert!(
        acked.len() >= 20,
        "too few writes were acknowledged: {}",
        acked.len()
    );
    // Every acknowledged append is in its key's value.
    let clerk = cluster.clerk(WAIT);
    for k in 0..KEYS {
        let key = Bytes::from(format!("key-{k}"));
        let value = clerk
            .get(key.clone())
            .await
            .expect("final read")
            .unwrap_or_default();
        let value = String::from_utf8_lossy(&value).to_string();
        for (_, v) in acked.iter().filter(|(key2, _)| *key2 == key) {
            let v = String::from_utf8_lossy(v);
            assert!(
                value.contains(v.as_ref()),
                "acknowledged {v} is lost from key-{k}"
            );
        }
    }
    let ops = history.ops.lock().unwrap().clone();
    match check(&ops, Duration::from_secs(60)).expect("a well-formed history") {
        Verdict::Linearizable => {}
        other => panic!("the history of {} operations: {other:?}", ops.len()),
    }
    eprintln!(
        "{} operations, {} acknowledged appends, {} failed",
        ops.len(),
        acked.len(),
        history.failed.load(Ordering::Relaxed)
    );
}

/// Waits until the shardmaster records `servers` as group 1's.
async fn await_recorded(
    admin: &shardkv::shardmaster::client::ShardMasterClient,
    servers: &[String],
) {
    let deadline = Instant::now() + WAIT;
    loop {
        let config = admin.query(None).await.expect("query");
        if config.groups.get(&1).map(Vec::as_slice) == Some(servers) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the shardmaster never recorded {servers:?} as group 1's servers: {:?}",
            config.groups
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the node at `addr` answers at all (a replaced member is not
/// SERVING until it is added).
async fn await_serving_or_not(addr: &str) {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if admin(&[addr.to_string()]).identify(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{addr} never answered");
}

async fn ctl_ok(masters: &str, args: &[&str]) -> String {
    let masters = masters.to_string();
    let mut all = vec!["--timeout".to_string(), "60".to_string()];
    all.extend(args.iter().map(|a| a.to_string()));
    let out = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = all.iter().map(String::as_str).collect();
        shardkv_cluster_tests::ctl(&masters, &args, None)
    })
    .await
    .expect("shardkvctl");
    assert!(
        out.status.success(),
        "shardkvctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}
