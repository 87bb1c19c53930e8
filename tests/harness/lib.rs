//! Drives the real `shardkv-node` and `shardkvctl` binaries as processes.
//!
//! Each test file uses its own loopback address (127.0.0.N) with fixed
//! ports, so tests running at once never race for ports.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use shardkv::daemon::probe::check_serving;
use shardkv::proto::kv::shard_kv_client::ShardKvClient;
use shardkv::proto::kv::GroupStatusRequest;
use shardkv::shardkv::clerk::{Clerk, ClerkOptions};
use shardkv::shardmaster::client::ShardMasterClient;

pub const WAIT: Duration = Duration::from_secs(60);

/// A binary built alongside the tests (`cargo nextest run --workspace`
/// builds the node crate's binaries for its own integration tests).
/// `bytes` of hex digits from a splitmix64 stream seeded by `seed`: a
/// value the store's compression cannot shrink, for tests that must fill
/// a disk or write tables of a size (a repeated pattern compresses to
/// almost nothing).
pub fn incompressible_value(seed: usize, bytes: usize) -> String {
    use std::fmt::Write;
    let mut state = seed as u64;
    let mut out = String::with_capacity(bytes + 16);
    while out.len() < bytes {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let _ = write!(out, "{z:016x}");
    }
    out.truncate(bytes);
    out
}

pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // A test: target/<profile>/deps/<test>-<hash>; a binary (the fault
    // runner): target/<profile>/<name>.
    let deps = exe.parent().expect("executable directory");
    let dir = if deps.ends_with("deps") {
        deps.parent().expect("target directory")
    } else {
        deps
    };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not built; run the tests with `cargo nextest run --workspace` (or `cargo build --bins` first)",
        path.display()
    );
    path
}

/// One node process, restartable with the same arguments.
pub struct Node {
    pub name: String,
    pub addr: String,
    /// Where the node serves `/metrics`.
    pub metrics_addr: String,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl Node {
    /// Metrics listen 1000 ports above `addr`.
    pub fn new(name: &str, addr: &str, mut args: Vec<String>, log_dir: &Path) -> Node {
        let (host, port) = addr.rsplit_once(':').expect("host:port");
        let port: u16 = port.parse().expect("port");
        let metrics_addr = format!("{host}:{}", port + 1000);
        args.extend(["--metrics-addr".to_string(), metrics_addr.clone()]);
        Node {
            name: name.to_string(),
            addr: addr.to_string(),
            metrics_addr,
            args,
            log: log_dir.join(format!("{name}.log")),
            child: None,
        }
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} already running", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(bin("shardkv-node"))
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start shardkv-node");
        self.child = Some(child);
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("not running").id()
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// True if started and not exited since.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM; waits for the exit and returns its status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("not running");
        signal(child.id(), "TERM");
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "{} ignored SIGTERM", self.name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the node to exit on its own, and returns its status.
    pub fn await_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("not running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} still runs after {timeout:?}:\n{}",
                self.name,
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pause(&self) {
        signal(self.pid(), "STOP");
    }

    pub fn resume(&self) {
        signal(self.pid(), "CONT");
    }

    /// How often the node's log (every life of it) holds `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches(needle)
            .count()
    }

    /// The node's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // A paused process must be resumed to die promptly.
            signal(child.id(), "CONT");
        }
        self.kill9();
    }
}

/// A failed test shows what every node said last: CI keeps nothing else.
impl Drop for Cluster {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for node in self.masters.iter().chain(self.groups.iter().flatten()) {
            eprintln!(
                "--- the end of {}'s log ---\n{}",
                node.name,
                node.log_tail()
            );
        }
    }
}

pub fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{sig} {pid} failed");
}

/// GETs `http://addr/path` (HTTP/1.1, no client library needed).
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    response
}

/// Waits until the node's gRPC health check says SERVING.
pub async fn await_serving(addr: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let last = match check_serving(addr, Duration::from_secs(2)).await {
            Ok(()) => return,
            Err(e) => e,
        };
        assert!(
            Instant::now() < deadline,
            "{addr} never became SERVING: {last}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A deployment of processes: 3 masters and some kv groups, gids 1, 2, ...
/// Master i listens on HOST:7000+i; group g replica i on HOST:7000+10g+i.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub host: String,
    pub masters: Vec<Node>,
    pub groups: Vec<Vec<Node>>,
}

impl Cluster {
    pub fn master_addrs(&self) -> Vec<String> {
        self.masters.iter().map(|n| n.addr.clone()).collect()
    }

    pub fn group_addrs(&self, gid: u64) -> Vec<String> {
        self.groups[gid as usize - 1]
            .iter()
            .map(|n| n.addr.clone())
            .collect()
    }

    /// Starts every process (groups not joined), all on `host`.
    pub async fn start(host: &str, groups: usize, replicas: usize) -> Cluster {
        Cluster::start_with(host, groups, replicas, &[]).await
    }

    /// As [`Self::start`], with `kv_args` added to every kvserver's flags.
    pub async fn start_with(
        host: &str,
        groups: usize,
        replicas: usize,
        kv_args: &[&str],
    ) -> Cluster {
        let master = |i: usize| format!("{host}:{}", 7000 + i);
        let member = |g: usize, i: usize| format!("{host}:{}", 7000 + 10 * g + i);
        Cluster::start_at(host, groups, replicas, &master, &member, kv_args).await
    }

    /// Starts every process (groups not joined): master i at `master(i)`,
    /// replica i of group g at `member(g, i)`.
    pub async fn start_at(
        host: &str,
        groups: usize,
        replicas: usize,
        master: &dyn Fn(usize) -> String,
        member: &dyn Fn(usize, usize) -> String,
        kv_args: &[&str],
    ) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let masters_addrs: Vec<String> = (0..3).map(master).collect();
        let mut masters = Vec::new();
        for i in 0..3 {
            let args = vec![
                "master".into(),
                "--id".into(),
                i.to_string(),
                "--peers".into(),
                masters_addrs.join(","),
                "--data-dir".into(),
                dir.path().join(format!("master-{i}")).display().to_string(),
                "--tick-ms".into(),
                "5".into(),
            ];
            masters.push(Node::new(
                &format!("master-{i}"),
                &masters_addrs[i],
                args,
                dir.path(),
            ));
        }
        let mut all_groups = Vec::new();
        for g in 1..=groups {
            let addrs: Vec<String> = (0..replicas).map(|i| member(g, i)).collect();
            let mut nodes = Vec::new();
            for (i, addr) in addrs.iter().enumerate() {
                let mut args: Vec<String> = vec![
                    "kv".into(),
                    "--gid".into(),
                    g.to_string(),
                    "--id".into(),
                    i.to_string(),
                    "--peers".into(),
                    addrs.join(","),
                    "--masters".into(),
                    masters_addrs.join(","),
                    "--data-dir".into(),
                    dir.path()
                        .join(format!("group-{g}-{i}"))
                        .display()
                        .to_string(),
                ];
                // A fast tick keeps the tests short; `kv_args` may set its own.
                if !kv_args.contains(&"--tick-ms") {
                    args.extend(["--tick-ms".into(), "5".into()]);
                }
                args.extend(kv_args.iter().map(|a| a.to_string()));
                nodes.push(Node::new(&format!("group-{g}-{i}"), addr, args, dir.path()));
            }
            all_groups.push(nodes);
        }
        let mut cluster = Cluster {
            dir,
            host: host.to_string(),
            masters,
            groups: all_groups,
        };
        for n in cluster
            .masters
            .iter_mut()
            .chain(cluster.groups.iter_mut().flatten())
        {
            n.start();
        }
        for n in cluster
            .masters
            .iter()
            .chain(cluster.groups.iter().flatten())
        {
            await_serving(&n.addr).await;
        }
        cluster
    }

    pub fn admin(&self) -> ShardMasterClient {
        ShardMasterClient::new(&self.master_addrs(), WAIT).expect("admin client")
    }

    pub async fn join(&self, gid: u64) {
        self.admin()
            .join(gid, self.group_addrs(gid))
            .await
            .expect("join");
    }

    pub fn clerk(&self, timeout: Duration) -> Clerk {
        let options = ClerkOptions {
            timeout,
            ..Default::default()
        };
        Clerk::new(&self.master_addrs(), options).expect("clerk")
    }

    /// Runs shardkvctl against this cluster.
    pub fn ctl(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        ctl(&self.master_addrs().join(","), args, stdin)
    }

    /// The replica of group `gid` that says it leads, if any.
    pub async fn kv_leader(&self, gid: u64) -> Option<usize> {
        for (i, n) in self.groups[gid as usize - 1].iter().enumerate() {
            if !n.is_running() {
                continue;
            }
            if let Ok(mut c) = ShardKvClient::connect(format!("http://{}", n.addr)).await {
                if let Ok(s) = c.group_status(GroupStatusRequest {}).await {
                    if s.into_inner().leader {
                        return Some(i);
                    }
                }
            }
        }
        None
    }

    pub async fn await_kv_leader(&self, gid: u64) -> usize {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(i) = self.kv_leader(gid).await {
                return i;
            }
            assert!(Instant::now() < deadline, "group {gid} elected no leader");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Runs shardkvctl with `--masters masters`.
pub fn ctl(masters: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(bin("shardkvctl"))
        .arg("--masters")
        .arg(masters)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start shardkvctl");
    if let Some(input) = stdin {
        use std::io::Write;
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(input).expect("write stdin");
    }
    child.wait_with_output().expect("shardkvctl output")
}

/// A replica's own report of its state, if it answers.
pub async fn group_status(addr: &str) -> Option<shardkv::proto::kv::GroupStatusReply> {
    let mut client = ShardKvClient::connect(format!("http://{addr}"))
        .await
        .ok()?;
    let reply = client.group_status(GroupStatusRequest {}).await.ok()?;
    Some(reply.into_inner())
}
