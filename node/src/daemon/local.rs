//! `shardkv-node local`: a whole cluster in one process on loopback, for
//! trying the system and for development. Every node is a real replica with
//! its own storage and gRPC port; only the process is shared.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

use super::{run_kv, run_master, stopped, NodeError, NodeOptions};
use crate::proto::kv::shard_kv_client::ShardKvClient;
use crate::proto::kv::GroupStatusRequest;
use crate::shardkv::Limits;
use crate::shardmaster::client::ShardMasterClient;
use crate::shardmaster::{Gid, DEFAULT_SHARDS};

#[derive(Clone, Debug)]
pub struct LocalOptions {
    pub groups: usize,
    pub replicas: usize,
    /// The loopback address to listen on (any of 127.0.0.0/8).
    pub host: String,
    /// The first master listens here; everything else above it.
    pub port: u16,
    pub data_dir: PathBuf,
}

/// Where everything is, once started.
#[derive(Clone, Debug)]
pub struct LocalCluster {
    pub masters: Vec<String>,
    pub groups: Vec<(Gid, Vec<String>)>,
}

const MASTERS: usize = 3;

impl LocalOptions {
    /// Masters on `port..port+3`; group g (gids 1, 2, ...) on
    /// `port + 10*g ..`. Ten ports per group: up to 9 replicas.
    pub fn layout(&self) -> Result<LocalCluster, NodeError> {
        if !(1..=9).contains(&self.replicas) {
            return Err(NodeError::Config(format!(
                "--replicas must be 1 to 9, not {}",
                self.replicas
            )));
        }
        if !(1..=50).contains(&self.groups) {
            return Err(NodeError::Config(format!(
                "--groups must be 1 to 50, not {}",
                self.groups
            )));
        }
        let port = |offset: usize| -> Result<String, NodeError> {
            u16::try_from(usize::from(self.port) + offset)
                .map(|p| format!("{}:{p}", self.host))
                .map_err(|_| {
                    NodeError::Config(format!(
                        "--port {} leaves no room for the cluster",
                        self.port
                    ))
                })
        };
        let masters = (0..MASTERS).map(port).collect::<Result<_, _>>()?;
        let groups = (1..=self.groups)
            .map(|g| {
                let addrs = (0..self.replicas)
                    .map(|i| port(10 * g + i))
                    .collect::<Result<_, _>>()?;
                Ok((g as Gid, addrs))
            })
            .collect::<Result<_, NodeError>>()?;
        Ok(LocalCluster { masters, groups })
    }
}

/// Runs the cluster until `shutdown`; calls `on_ready` once every group has
/// joined and serves its shards. Started again on the same data directory it resumes.
pub async fn run(
    options: LocalOptions,
    on_ready: impl FnOnce(&LocalCluster) + Send,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    let cluster = options.layout()?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut nodes = JoinSet::new();
    let tick = Duration::from_millis(10);
    for (id, _) in cluster.masters.iter().enumerate() {
        let node = NodeOptions {
            id: id as u32,
            peers: cluster.masters.clone(),
            data_dir: options.data_dir.join(format!("master-{id}")),
            listen: None,
            metrics_addr: None,
            tick,
            ..NodeOptions::defaults()
        };
        nodes.spawn(run_master(node, DEFAULT_SHARDS, stopped(stop_rx.clone())));
    }
    for (gid, addrs) in &cluster.groups {
        for id in 0..addrs.len() {
            let node = NodeOptions {
                id: id as u32,
                peers: addrs.clone(),
                data_dir: options.data_dir.join(format!("group-{gid}-{id}")),
                listen: None,
                metrics_addr: None,
                tick,
                ..NodeOptions::defaults()
            };
            nodes.spawn(run_kv(
                node,
                *gid,
                cluster.masters.clone(),
                Limits::default(),
                stopped(stop_rx.clone()),
            ));
        }
    }
    let stopper = stop_tx.clone();
    tokio::spawn(async move {
        shutdown.await;
        let _ = stopper.send(true);
    });
    let joined = async {
        let admin = ShardMasterClient::new(&cluster.masters, Duration::from_secs(30))
            .map_err(|e| NodeError::Config(e.to_string()))?;
        // Joining an already joined group with the same servers changes
        // nothing, so a restart re-joins harmlessly.
        for (gid, addrs) in &cluster.groups {
            admin
                .join(*gid, addrs.clone())
                .await
                .map_err(|e| NodeError::Serve(format!("joining group {gid}: {e}")))?;
        }
        await_settled(&admin, &cluster.groups).await;
        Ok::<(), NodeError>(())
    };
    let mut first_error = None;
    tokio::select! {
        r = joined => match r {
            Ok(()) => on_ready(&cluster),
            Err(e) => first_error = Some(e),
        },
        Some(done) = nodes.join_next() => {
            first_error = Some(node_result(done).err().unwrap_or_else(|| NodeError::Serve("a node stopped early".into())));
        }
    }
    if first_error.is_none() {
        // Run until a node fails or shutdown is asked for (every node then ends).
        if let Some(done) = nodes.join_next().await {
            if let Err(e) = node_result(done) {
                first_error = Some(e);
            }
        }
    }
    // Stop everything that is left.
    let _ = stop_tx.send(true);
    while let Some(done) = nodes.join_next().await {
        if let Err(e) = node_result(done) {
            first_error.get_or_insert(e);
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Waits until every group has applied the latest configuration and pulls
/// nothing, so the first request a user sends does not wait behind the
/// shard moves the joins started.
async fn await_settled(admin: &ShardMasterClient, groups: &[(Gid, Vec<String>)]) {
    loop {
        if let Ok(latest) = admin.query(None).await {
            let mut settled = true;
            for (_, addrs) in groups {
                settled &= group_settled(addrs, latest.num).await;
            }
            if settled {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether the group's leader reports configuration `num` applied and no
/// shard still to pull.
async fn group_settled(addrs: &[String], num: u64) -> bool {
    for addr in addrs {
        let Ok(mut client) = ShardKvClient::connect(format!("http://{addr}")).await else {
            continue;
        };
        let Ok(reply) = client.group_status(GroupStatusRequest {}).await else {
            continue;
        };
        let status = reply.into_inner();
        if status.leader {
            return status.config_num >= num && status.pulling.is_empty();
        }
    }
    false
}

fn node_result(
    done: Result<Result<(), NodeError>, tokio::task::JoinError>,
) -> Result<(), NodeError> {
    done.map_err(|e| NodeError::Serve(format!("node task failed: {e}")))?
}
