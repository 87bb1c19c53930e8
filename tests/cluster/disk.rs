//! The disk under a replica fails it, on real processes: a state store
//! damaged on disk is refused at start and rebuilt from the group's peers;
//! a full disk stops the replica with a clear error, corrupts nothing, and
//! once space is freed it starts and catches up. The group serves
//! throughout from its other two replicas.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use shardkv_cluster_tests::{await_serving, group_status, incompressible_value, Cluster, WAIT};

/// Checkpoint often and keep little log: a replica that restarts without
/// its store can only rebuild it from a peer's. Small memtables: the
/// writes spread over a keyspace per shard copy, and the damage test
/// needs them in tables.
const FLAGS: &[&str] = &[
    "--snapshot-every-slots",
    "20",
    "--log-retain-slots",
    "40",
    "--store-memtable-mib",
    "1",
];
const VALUE_BYTES: usize = 64 << 10;

/// Incompressible: the store compresses its tables, and these tests need
/// tables of a size and a disk that fills.
fn value(i: usize) -> String {
    incompressible_value(i, VALUE_BYTES)
}

async fn write(cluster: &Cluster, keys: std::ops::Range<usize>) {
    let clerk = cluster.clerk(WAIT);
    for chunk in keys.collect::<Vec<_>>().chunks(16) {
        let puts = chunk.iter().map(|&i| clerk.put(format!("k{i}"), value(i)));
        for result in futures::future::join_all(puts).await {
            result.expect("put");
        }
    }
}

async fn check(cluster: &Cluster, keys: std::ops::Range<usize>) {
    let clerk = cluster.clerk(WAIT);
    for i in keys.step_by(5) {
        let got = clerk.get(format!("k{i}")).await.expect("get");
        assert_eq!(got, Some(Bytes::from(value(i))), "k{i}");
    }
}

/// Waits until replica `i` has applied every slot the others had applied
/// when this was called (the writes before it included): it caught up.
async fn await_caught_up(cluster: &Cluster, i: usize) {
    let mut target = 0;
    for (j, node) in cluster.groups[0].iter().enumerate() {
        if j != i {
            target = target.max(group_status(&node.addr).await.map_or(0, |s| s.applied_slot));
        }
    }
    assert!(target > 0, "no other replica of the group answered");
    let deadline = Instant::now() + WAIT;
    loop {
        let applied = group_status(&cluster.groups[0][i].addr)
            .await
            .map(|s| s.applied_slot);
        if applied >= Some(target) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "replica {i} applied {applied:?}, not slot {target}:\n{}",
            cluster.groups[0][i].log_tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files(&path, out);
        } else {
            out.push(path);
        }
    }
}

/// The store's table files that hold a value (the data's).
fn data_tables(state: &Path) -> Vec<PathBuf> {
    let mut all = Vec::new();
    files(state, &mut all);
    all.retain(|p| {
        p.parent().is_some_and(|d| d.ends_with("tables"))
            && std::fs::metadata(p).unwrap().len() > VALUE_BYTES as u64
    });
    all
}

/// Starts the group, writes, and returns the cluster with replica `victim`
/// stopped; the other two keep serving.
async fn group_with_a_stopped_replica(host: &str, keys: usize, victim: usize) -> Cluster {
    let mut cluster = Cluster::start_with(host, 1, 3, FLAGS).await;
    cluster.join(1).await;
    write(&cluster, 0..keys).await;
    await_caught_up(&cluster, victim).await;
    assert!(cluster.groups[0][victim].terminate().success());
    cluster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_store_is_refused_at_start_and_rebuilt_from_peers() {
    const KEYS: usize = 600; // 38 MiB: the store flushes it into tables
    let victim = 2;
    let mut cluster = group_with_a_stopped_replica("127.0.0.23", KEYS, victim).await;
    let data_dir = cluster.dir.path().join(format!("group-1-{victim}"));
    let tables = data_tables(&data_dir.join("state"));
    assert!(!tables.is_empty(), "the store wrote no table files");
    for table in &tables {
        let mut bytes = std::fs::read(table).unwrap();
        let n = bytes.len();
        for b in &mut bytes[n - 64..] {
            *b ^= 0xa5;
        }
        std::fs::write(table, bytes).unwrap();
    }
    // It refuses to start, and says why and what to do.
    cluster.groups[0][victim].start();
    let status = cluster.groups[0][victim].await_exit(WAIT);
    assert!(!status.success(), "a damaged replica exited with {status}");
    assert_eq!(cluster.groups[0][victim].log_count("is damaged"), 1);
    assert_eq!(cluster.groups[0][victim].log_count("rebuilds it from"), 1);
    // Meanwhile the group serves from the other two.
    write(&cluster, KEYS..KEYS + 50).await;

    // The remedy the message gives: remove the store, keep the Paxos log.
    std::fs::remove_dir_all(data_dir.join("state")).unwrap();
    cluster.groups[0][victim].start();
    await_serving(&cluster.groups[0][victim].addr).await;
    await_caught_up(&cluster, victim).await;
    assert_eq!(
        cluster.groups[0][victim].log_count("installed a snapshot from a peer"),
        1,
        "rebuilt from its own log, not its peers"
    );
    // With another replica down, the rebuilt one is half of every majority.
    let other = (victim + 1) % 3;
    cluster.groups[0][other].kill9();
    check(&cluster, 0..KEYS + 50).await;
}

/// A tmpfs of its own mounted at a directory, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size_mib: u64) -> Tmpfs {
        mount(
            &["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"],
            at,
        );
        Tmpfs(at.to_path_buf())
    }

    fn resize(&self, size_mib: u64) {
        mount(&["-o", &format!("remount,size={size_mib}m")], &self.0);
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn mount(args: &[&str], at: &Path) {
    let out = Command::new("mount").args(args).arg(at).output().unwrap();
    assert!(
        out.status.success(),
        "mount {args:?} {} (the test needs root): {}",
        at.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_the_replica_with_a_clear_error_and_loses_nothing() {
    let victim = 2;
    let mut cluster = group_with_a_stopped_replica("127.0.0.24", 16, victim).await;
    // The replica's data directory moves onto a small filesystem.
    let data_dir = cluster.dir.path().join(format!("group-1-{victim}"));
    let saved = cluster.dir.path().join("saved");
    std::fs::rename(&data_dir, &saved).unwrap();
    std::fs::create_dir(&data_dir).unwrap();
    let disk = Tmpfs::mount(&data_dir, 48);
    let copied = Command::new("cp")
        .arg("-a")
        .arg(saved.join("."))
        .arg(&data_dir)
        .status()
        .unwrap();
    assert!(copied.success());
    cluster.groups[0][victim].start();
    await_serving(&cluster.groups[0][victim].addr).await;

    // Writes until the replica's disk is full and it stops; the group
    // goes on with the other two.
    let mut written = 0;
    while cluster.groups[0][victim].alive() {
        assert!(written < 4000, "256 MiB written and the replica still runs");
        write(&cluster, written..written + 64).await;
        written += 64;
    }
    let status = cluster.groups[0][victim].await_exit(WAIT);
    assert!(
        !status.success(),
        "a replica out of disk exited with {status}"
    );
    let node = &cluster.groups[0][victim];
    assert!(
        node.log_count("No space left on device") + node.log_count("the disk is full") > 0,
        "no clear error:\n{}",
        node.log_tail()
    );
    write(&cluster, written..written + 64).await;
    written += 64;

    // Space freed: it starts from what it had, which nothing corrupted,
    // and catches up.
    disk.resize(1024);
    cluster.groups[0][victim].start();
    await_serving(&cluster.groups[0][victim].addr).await;
    await_caught_up(&cluster, victim).await;
    assert_eq!(cluster.groups[0][victim].log_count("is damaged"), 0);
    let other = (victim + 1) % 3;
    cluster.groups[0][other].kill9();
    check(&cluster, 0..written).await;
    cluster.groups[0][victim].kill9();
    drop(disk);
}
