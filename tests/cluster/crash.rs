//! kill -9, restarts and pauses of real processes: the cluster recovers and
//! every acknowledged write reads back.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use shardkv::shardkv::clerk::ClerkError;
use shardkv_cluster_tests::{await_serving, Cluster, WAIT};
use tokio::sync::watch;

/// Writes unique keys until stopped; returns the acknowledged ones.
fn start_writer(
    cluster: &Cluster,
    name: &'static str,
) -> (
    watch::Sender<bool>,
    tokio::task::JoinHandle<Vec<(String, String)>>,
) {
    let clerk = cluster.clerk(Duration::from_secs(5));
    let (stop, mut stopped) = watch::channel(false);
    let task = tokio::spawn(async move {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let mut i = 0u64;
        while !*stopped.borrow_and_update() {
            i += 1;
            let (k, v) = (format!("{name}-{i}"), format!("value-{i}"));
            match clerk.put(k.clone(), v.clone()).await {
                Ok(()) => acked.lock().unwrap().push((k, v)),
                // Unknown outcome during a fault: not acknowledged, so not
                // required to survive.
                Err(ClerkError::Timeout { .. }) => {}
                Err(e) => panic!("writer: {e}"),
            }
        }
        let acked = acked.lock().unwrap().clone();
        acked
    });
    (stop, task)
}

async fn check_acked(cluster: &Cluster, acked: &[(String, String)]) {
    let clerk = cluster.clerk(WAIT);
    for (k, v) in acked {
        let got = clerk.get(k.clone()).await.expect("read back");
        assert_eq!(
            got,
            Some(Bytes::from(v.clone())),
            "acknowledged write {k} lost"
        );
    }
}

/// Lets the writer run through `fault`, then checks everything it got
/// acknowledged, and that it made progress after the fault.
async fn through(cluster: &mut Cluster, name: &'static str, fault: impl AsyncFnOnce(&mut Cluster)) {
    let (stop, writer) = start_writer(cluster, name);
    tokio::time::sleep(Duration::from_millis(300)).await;
    fault(cluster).await;
    // Progress after recovery: a fresh write must succeed.
    cluster
        .clerk(WAIT)
        .put(format!("{name}-after"), "x")
        .await
        .expect("cluster recovered");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = stop.send(true);
    let acked = writer.await.unwrap();
    assert!(
        acked.len() > 5,
        "{name}: only {} writes acknowledged",
        acked.len()
    );
    check_acked(cluster, &acked).await;
    println!("{name}: {} acknowledged writes all read back", acked.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_and_restart_followers_leaders_groups_and_masters() {
    let mut cluster = Cluster::start("127.0.0.13", 1, 3).await;
    cluster.join(1).await;

    through(&mut cluster, "follower", async |c: &mut Cluster| {
        let leader = c.await_kv_leader(1).await;
        let follower = (leader + 1) % 3;
        c.groups[0][follower].kill9();
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.groups[0][follower].start();
        await_serving(&c.groups[0][follower].addr).await;
    })
    .await;

    through(&mut cluster, "leader", async |c: &mut Cluster| {
        let leader = c.await_kv_leader(1).await;
        c.groups[0][leader].kill9();
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.groups[0][leader].start();
        await_serving(&c.groups[0][leader].addr).await;
    })
    .await;

    through(&mut cluster, "whole-group", async |c: &mut Cluster| {
        for n in c.groups[0].iter_mut() {
            n.kill9();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        for n in c.groups[0].iter_mut() {
            n.start();
        }
    })
    .await;

    through(&mut cluster, "masters", async |c: &mut Cluster| {
        for n in c.masters.iter_mut() {
            n.kill9();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        for n in c.masters.iter_mut() {
            n.start();
        }
        // Reconfiguration still works after the masters' restart.
        let config = c.admin().query(None).await.expect("masters recovered");
        assert_eq!(config.num, 1);
    })
    .await;

    through(&mut cluster, "everything", async |c: &mut Cluster| {
        for n in c.masters.iter_mut().chain(c.groups.iter_mut().flatten()) {
            n.kill9();
        }
        for n in c.masters.iter_mut().chain(c.groups.iter_mut().flatten()) {
            n.start();
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_is_replaced_and_rejoins() {
    let mut cluster = Cluster::start("127.0.0.14", 1, 3).await;
    cluster.join(1).await;
    through(&mut cluster, "paused", async |c: &mut Cluster| {
        let leader = c.await_kv_leader(1).await;
        c.groups[0][leader].pause();
        // The others elect a new leader and carry on meanwhile.
        c.clerk(WAIT)
            .put("during-pause", "x")
            .await
            .expect("served without the paused leader");
        c.groups[0][leader].resume();
        await_serving(&c.groups[0][leader].addr).await;
    })
    .await;
    // The resumed old leader's replica agrees with the rest.
    assert_eq!(
        cluster.clerk(WAIT).get("during-pause").await.unwrap(),
        Some(Bytes::from("x"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_shuts_down_cleanly() {
    let mut cluster = Cluster::start("127.0.0.15", 1, 3).await;
    cluster.join(1).await;
    let clerk = cluster.clerk(WAIT);
    clerk.put("k", "v").await.unwrap();
    for n in cluster.groups[0]
        .iter_mut()
        .chain(cluster.masters.iter_mut())
    {
        let status = n.terminate();
        assert!(
            status.success(),
            "{} exited with {status}: {}",
            n.name,
            n.log_tail()
        );
    }
    for n in cluster
        .masters
        .iter_mut()
        .chain(cluster.groups[0].iter_mut())
    {
        n.start();
    }
    assert_eq!(clerk.get("k").await.unwrap(), Some(Bytes::from("v")));
}

/// A replica whose disk is lost must not vote until it has recovered what
/// it may have promised or accepted; otherwise writes that only it and one
/// other replica held could vanish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_a_lost_disk_recovers_before_it_votes() {
    let mut cluster = Cluster::start("127.0.0.17", 1, 3).await;
    cluster.join(1).await;
    let clerk = cluster.clerk(WAIT);
    let leader = cluster.await_kv_leader(1).await;
    let (x, y) = ((leader + 1) % 3, (leader + 2) % 3);
    let mut acked = Vec::new();
    for i in 0..20 {
        clerk.put(format!("a{i}"), format!("{i}")).await.unwrap();
        acked.push((format!("a{i}"), format!("{i}")));
    }
    // Y stops: the next writes live only on the leader and X.
    cluster.groups[0][y].kill9();
    for i in 0..20 {
        clerk.put(format!("b{i}"), format!("{i}")).await.unwrap();
        acked.push((format!("b{i}"), format!("{i}")));
    }
    // X loses its disk. The leader is paused, so Y, which comes back
    // without the b writes, cannot catch up from it.
    cluster.groups[0][x].kill9();
    let x_dir = cluster.dir.path().join(format!("group-1-{x}"));
    std::fs::remove_dir_all(&x_dir).unwrap();
    cluster.groups[0][leader].pause();
    cluster.groups[0][y].start();
    cluster.groups[0][x].start();
    // Had X come back as an empty voter, X and Y would now form a majority
    // without the b writes, and this write would take one of their slots.
    let impatient = cluster.clerk(Duration::from_secs(3));
    let _ = impatient.put("during-pause", "x").await;
    cluster.groups[0][leader].resume();
    await_serving(&cluster.groups[0][x].addr).await;
    await_serving(&cluster.groups[0][y].addr).await;
    // Now only X and Y remain: X must hold what it recovered.
    cluster.groups[0][leader].kill9();
    check_acked(&cluster, &acked).await;
    let log = std::fs::read_to_string(cluster.dir.path().join(format!("group-1-{x}.log"))).unwrap();
    // Once at the group's first start (all blank), once after the loss.
    assert_eq!(
        log.matches("recovered acceptor state").count(),
        2,
        "X's log: {log}"
    );
}

/// Starts `shardkv-node` with `args`, which must make it exit at once with
/// an error (one that serves instead is stopped and fails the test, naming
/// `started_on`); returns what it wrote to stderr.
fn refused_at_start(
    args: impl IntoIterator<Item = impl AsRef<std::ffi::OsStr>>,
    started_on: &str,
) -> String {
    let mut child = std::process::Command::new(shardkv_cluster_tests::bin("shardkv-node"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run shardkv-node");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("shardkv-node started on {started_on}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("collect output");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "exit 0; stderr: {stderr}");
    stderr
}

/// A data directory from before the write-ahead log must not be opened as
/// a blank one: a group whose every member did so would take itself for new.
#[test]
fn a_data_directory_in_the_old_storage_format_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("paxos.redb"), b"redb").unwrap();
    let flags = ["master", "--id", "0", "--listen", "127.0.0.13:0"];
    let peers = [
        "--peers",
        "127.0.0.13:1,127.0.0.13:2,127.0.0.13:3",
        "--data-dir",
    ];
    let args =
        (flags.iter().chain(&peers).map(std::ffi::OsStr::new)).chain([dir.path().as_os_str()]);
    let stderr = refused_at_start(args, "a data directory holding paxos.redb");
    assert!(stderr.contains("paxos.redb"), "{stderr}");
    assert!(
        !dir.path().join("paxos").exists(),
        "no new storage was created beside the old one"
    );
}

/// A second node started on a data directory a running node holds exits at
/// once with a clear error, and the first keeps serving: two nodes on one
/// log and one store would corrupt both.
#[tokio::test]
async fn a_data_directory_in_use_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("master-0");
    let args = |listen: &str| -> Vec<String> {
        [
            "master",
            "--id",
            "0",
            "--listen",
            listen,
            "--peers",
            "127.0.0.13:7300",
            "--data-dir",
        ]
        .iter()
        .map(|a| a.to_string())
        .chain([data.display().to_string()])
        .collect()
    };
    let mut first = shardkv_cluster_tests::Node::new(
        "master-0",
        "127.0.0.13:7300",
        args("127.0.0.13:7300"),
        dir.path(),
    );
    first.start();
    await_serving(&first.addr).await;
    // Same identity, same directory, another port: the lock refuses it
    // before it writes anything.
    let stderr = refused_at_start(args("127.0.0.13:7301"), "a data directory in use");
    assert!(
        stderr.contains("in use by another running node"),
        "{stderr}"
    );
    assert!(
        first.alive(),
        "the first node stopped:\n{}",
        first.log_tail()
    );
    await_serving(&first.addr).await;
    // The lock goes with its holder, even on kill -9: a restart takes it.
    first.kill9();
    first.start();
    await_serving(&first.addr).await;
}
