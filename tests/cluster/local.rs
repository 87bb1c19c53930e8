//! `shardkv-node local`: start, write, stop, start again, read back.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use shardkv_cluster_tests::{bin, ctl, signal};

const HOST: &str = "127.0.0.16";

/// Kills the cluster if the test fails before stopping it.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the local cluster and waits for its "up" line; returns the child
/// and the masters it printed.
fn start(data_dir: &std::path::Path) -> (Running, String) {
    let mut child = Command::new(bin("shardkv-node"))
        .args(["local", "--host", HOST, "--port", "7000", "--data-dir"])
        .arg(data_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start local cluster");
    let stdout = child.stdout.take().unwrap();
    let child = Running(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // Up in a few seconds, even on a loaded machine. A fetch that blocked
    // the process's runtime (every group is in it) stalled it 30 s at a
    // time: the deadline catches one such stall.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut masters = None;
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("local cluster printed its masters in time");
        if let Some(m) = line.strip_prefix("masters: ") {
            masters = Some(m.to_string());
        }
        if line.contains("shardkvctl get greeting") {
            break;
        }
    }
    (child, masters.expect("a masters line"))
}

#[test]
fn start_write_stop_start_read() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, masters) = start(dir.path());
    assert_eq!(masters, format!("{HOST}:7000,{HOST}:7001,{HOST}:7002"));
    let out = ctl(&masters, &["put", "greeting", "hello"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config: serde_json::Value =
        serde_json::from_slice(&ctl(&masters, &["query"], None).stdout).unwrap();
    assert_eq!(config["groups"].as_object().unwrap().len(), 3);
    signal(child.0.id(), "TERM");
    let status = child.0.wait().unwrap();
    assert!(status.success(), "local cluster exited with {status}");

    let (mut child, masters) = start(dir.path());
    let out = ctl(&masters, &["get", "greeting"], None);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Restarting re-joined nothing new.
    let config: serde_json::Value =
        serde_json::from_slice(&ctl(&masters, &["query"], None).stdout).unwrap();
    assert_eq!(config["num"], 3);
    signal(child.0.id(), "TERM");
    assert!(child.0.wait().unwrap().success());
}
