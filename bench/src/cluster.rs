//! Starts the stores being compared as local processes: a 3-member etcd
//! cluster, and shardkv (3 shardmasters and some groups of 3 kvservers).
//! Each system gets a fresh data directory on the same file system, and
//! every process is killed when its handle drops.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shardkv::daemon::probe::check_serving;
use shardkv::shardmaster::client::ShardMasterClient;

use crate::target::TargetSpec;

/// How long a cluster may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Child processes, killed (and reaped) on drop.
pub struct Processes {
    children: Vec<(String, Child)>,
    /// Where the processes' logs are, for the error message if one dies.
    log_dir: PathBuf,
}

impl Processes {
    fn new(log_dir: &Path) -> Self {
        Processes {
            children: Vec::new(),
            log_dir: log_dir.to_path_buf(),
        }
    }

    fn spawn(&mut self, name: &str, program: &Path, args: &[String]) -> Result<(), String> {
        let log = std::fs::File::create(self.log_dir.join(format!("{name}.log")))
            .map_err(|e| format!("creating {name}.log: {e}"))?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", program.display()))?;
        self.children.push((name.to_string(), child));
        Ok(())
    }

    /// An error if any process has exited.
    fn check_alive(&mut self) -> Result<(), String> {
        for (name, child) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "{name} exited ({status}); see {}",
                    self.log_dir.join(format!("{name}.log")).display()
                ));
            }
        }
        Ok(())
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A running system under test.
pub struct System {
    pub name: String,
    pub target: TargetSpec,
    _processes: Processes,
}

/// Three etcd members on `host`, client ports `base_port`..+2 and peer
/// ports `base_port+10`..+12, with etcd's defaults otherwise.
pub async fn start_etcd(
    etcd: &Path,
    host: &str,
    base_port: u16,
    dir: &Path,
) -> Result<System, String> {
    let mut processes = Processes::new(dir);
    let client = |i: u16| format!("http://{host}:{}", base_port + i);
    let peer = |i: u16| format!("http://{host}:{}", base_port + 10 + i);
    let initial_cluster = (0..3)
        .map(|i| format!("etcd-{i}={}", peer(i)))
        .collect::<Vec<_>>()
        .join(",");
    for i in 0..3u16 {
        let args: Vec<String> = [
            "--name",
            &format!("etcd-{i}"),
            "--data-dir",
            &dir.join(format!("etcd-{i}")).display().to_string(),
            "--listen-client-urls",
            &client(i),
            "--advertise-client-urls",
            &client(i),
            "--listen-peer-urls",
            &peer(i),
            "--initial-advertise-peer-urls",
            &peer(i),
            "--initial-cluster",
            &initial_cluster,
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            "shardkv-bench",
            // etcd's documented maximum (the default, 2 GiB, is too small
            // for the benchmark at 1 GiB of data and its revisions).
            "--quota-backend-bytes",
            "8589934592",
            "--logger",
            "zap",
            "--log-level",
            "warn",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        processes.spawn(&format!("etcd-{i}"), etcd, &args)?;
    }
    let endpoints: Vec<String> = (0..3).map(client).collect();
    let target = TargetSpec::Etcd { endpoints };
    await_writable(&target, &mut processes).await?;
    Ok(System {
        name: "etcd".into(),
        target,
        _processes: processes,
    })
}

/// 3 shardmasters on `host:base_port`..+2 and `groups` groups of 3
/// kvservers (group g replica i on `base_port + 10g + i`), all joined, with
/// the node's default settings.
pub async fn start_shardkv(
    node: &Path,
    host: &str,
    base_port: u16,
    groups: usize,
    dir: &Path,
) -> Result<System, String> {
    let mut processes = Processes::new(dir);
    let masters: Vec<String> = (0..3)
        .map(|i| format!("{host}:{}", base_port + i))
        .collect();
    let mut all = masters.clone();
    for (i, addr) in masters.iter().enumerate() {
        let args = vec![
            "master".into(),
            "--id".into(),
            i.to_string(),
            "--peers".into(),
            masters.join(","),
            "--listen".into(),
            addr.clone(),
            "--data-dir".into(),
            dir.join(format!("master-{i}")).display().to_string(),
        ];
        processes.spawn(&format!("master-{i}"), node, &args)?;
    }
    let mut group_addrs = Vec::new();
    for g in 1..=groups as u16 {
        let addrs: Vec<String> = (0..3)
            .map(|i| format!("{host}:{}", base_port + 10 * g + i))
            .collect();
        for (i, addr) in addrs.iter().enumerate() {
            let args = vec![
                "kv".into(),
                "--gid".into(),
                g.to_string(),
                "--id".into(),
                i.to_string(),
                "--peers".into(),
                addrs.join(","),
                "--masters".into(),
                masters.join(","),
                "--listen".into(),
                addr.clone(),
                "--data-dir".into(),
                dir.join(format!("group-{g}-{i}")).display().to_string(),
            ];
            processes.spawn(&format!("group-{g}-{i}"), node, &args)?;
        }
        all.extend(addrs.iter().cloned());
        group_addrs.push((u64::from(g), addrs));
    }
    for addr in &all {
        await_serving(addr, &mut processes).await?;
    }
    let admin =
        ShardMasterClient::new(&masters, START_TIMEOUT).map_err(|e| format!("shardmaster: {e}"))?;
    for (gid, addrs) in group_addrs {
        admin
            .join(gid, addrs)
            .await
            .map_err(|e| format!("joining group {gid}: {e}"))?;
    }
    let target = TargetSpec::Shardkv { masters };
    await_writable(&target, &mut processes).await?;
    Ok(System {
        name: format!("shardkv {groups}x3"),
        target,
        _processes: processes,
    })
}

async fn await_serving(addr: &str, processes: &mut Processes) -> Result<(), String> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        processes.check_alive()?;
        let last = match check_serving(addr, Duration::from_secs(2)).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if Instant::now() > deadline {
            return Err(format!("not serving after {START_TIMEOUT:?}: {last}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until a write succeeds: leaders elected, groups joined.
async fn await_writable(target: &TargetSpec, processes: &mut Processes) -> Result<(), String> {
    let deadline = Instant::now() + START_TIMEOUT;
    let mut last = String::new();
    while Instant::now() < deadline {
        processes.check_alive()?;
        match target.connect().await {
            Ok(mut store) => match store.put("bench-ready", b"1".to_vec()).await {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            },
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!(
        "{} not writable after {START_TIMEOUT:?}: {last}",
        target.name()
    ))
}
