//! `shardkv-node`: runs a shardmaster replica, a kvserver, or a whole local
//! cluster. Every flag can also be set from a `SHARDKV_*` environment
//! variable, which is how a pod template passes them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use shardkv::daemon::local::{self, LocalOptions};
use shardkv::daemon::{run_kv, run_master, terminate_signal, NodeOptions};
use shardkv::shardkv::store::StoreOptions;
use shardkv::shardkv::Limits;

#[derive(Parser)]
#[command(
    name = "shardkv-node",
    version,
    about = "A shardkv node: shardmaster, kvserver, or a local cluster"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A shardmaster replica.
    Master {
        #[command(flatten)]
        node: NodeArgs,
        /// Shards in the deployment; fixed once the data directory exists.
        #[arg(long, env = "SHARDKV_SHARDS", default_value_t = shardkv::shardmaster::DEFAULT_SHARDS)]
        shards: usize,
    },
    /// A kvserver: one replica of a replica group.
    Kv {
        #[command(flatten)]
        node: NodeArgs,
        /// The replica group's id (> 0).
        #[arg(long, env = "SHARDKV_GID")]
        gid: u64,
        /// The shardmaster replicas, host:port, comma-separated.
        #[arg(long, env = "SHARDKV_MASTERS", value_delimiter = ',', required = true)]
        masters: Vec<String>,
        #[arg(long, env = "SHARDKV_KEY_BYTES_MAX", default_value_t = Limits::default().key_bytes_max)]
        key_bytes_max: usize,
        #[arg(long, env = "SHARDKV_VALUE_BYTES_MAX", default_value_t = Limits::default().value_bytes_max)]
        value_bytes_max: usize,
    },
    /// A shardmaster group of 3 and replica groups on loopback, in this
    /// process. Started again on the same data directory, it resumes.
    Local {
        #[arg(long, default_value_t = 3)]
        groups: usize,
        #[arg(long, default_value_t = 3)]
        replicas: usize,
        /// The address every node listens on.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// The first port; the cluster uses ports from here up.
        #[arg(long, default_value_t = 7000)]
        port: u16,
        #[arg(long, default_value = "./shardkv-data")]
        data_dir: PathBuf,
    },
}

#[derive(Args)]
struct NodeArgs {
    /// This replica's index in --peers: a number, or a name ending in
    /// `-N` (a StatefulSet pod name), whose N is taken.
    #[arg(long, env = "SHARDKV_ID")]
    id: String,
    /// Every replica of the group, host:port, comma-separated, in id order.
    /// Once the group has changed its members, the membership it recorded
    /// decides; this list only says where to find them at first.
    #[arg(long, env = "SHARDKV_PEERS", value_delimiter = ',', required = true)]
    peers: Vec<String>,
    /// Join a running group as a new member (a new id, or a replica whose
    /// disk was lost): on blank storage it votes in nothing until
    /// `shardkvctl member add` adds it. Ignored once it holds state.
    #[arg(long, env = "SHARDKV_JOIN")]
    join: bool,
    /// The group's size when it was created (default: every replica in
    /// --peers). Replicas with ids from here up join as new members, so
    /// --peers may name every replica the group may grow to.
    #[arg(long, env = "SHARDKV_INITIAL_REPLICAS")]
    initial_replicas: Option<u32>,
    /// `new` while the group is being created, `existing` after (as
    /// etcd's flag): a replica of an existing group that starts from a
    /// blank disk never takes itself for a new group.
    #[arg(long, env = "SHARDKV_INITIAL_CLUSTER_STATE", value_enum, default_value_t = ClusterState::New)]
    initial_cluster_state: ClusterState,
    #[arg(long, env = "SHARDKV_DATA_DIR")]
    data_dir: PathBuf,
    /// Where to listen (default: this replica's entry in --peers).
    #[arg(long, env = "SHARDKV_LISTEN")]
    listen: Option<String>,
    /// Serve Prometheus metrics on http://ADDR/metrics.
    #[arg(long, env = "SHARDKV_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// The Paxos tick: heartbeats every 2 ticks, elections after 10 to 20
    /// (by default 100 ms and 0.5 to 1 s, near etcd's 100 ms and 1 s).
    #[arg(long, env = "SHARDKV_TICK_MS", default_value_t = NodeOptions::defaults().tick.as_millis() as u64)]
    tick_ms: u64,
    /// Applied slots between checkpoints: a store sync, after which the
    /// log is compacted (a restart replays at most this much).
    #[arg(long, env = "SHARDKV_SNAPSHOT_EVERY_SLOTS", default_value_t = NodeOptions::defaults().snapshot_every_slots)]
    snapshot_every_slots: u64,
    /// Log entries kept for a lagging replica; one further behind is sent
    /// a snapshot streamed from a peer's store.
    #[arg(long, env = "SHARDKV_LOG_RETAIN_SLOTS", default_value_t = NodeOptions::defaults().log_retain_slots)]
    log_retain_slots: u64,
    /// A kvserver's block cache, in MiB: with the memtables, what bounds
    /// its store's memory whatever the data size.
    #[arg(long, env = "SHARDKV_STORE_CACHE_MIB", default_value_t = StoreOptions::default().cache_bytes >> 20)]
    store_cache_mib: u64,
    /// A kvserver's memtable size, in MiB: each keyspace holds up to five
    /// (one written, four being flushed) before writes wait.
    #[arg(long, env = "SHARDKV_STORE_MEMTABLE_MIB", default_value_t = StoreOptions::default().memtable_bytes >> 20)]
    store_memtable_mib: u64,
    /// A kvserver's store threads for flushes and compactions (1 to 8).
    #[arg(long, env = "SHARDKV_STORE_ENGINE_THREADS", default_value_t = StoreOptions::default().engine_threads as u64,
          value_parser = clap::value_parser!(u64).range(1..=8))]
    store_engine_threads: u64,
    /// A kvserver's store journal, kept until flushed, at most (MiB, 64
    /// or more): an open replays it.
    #[arg(long, env = "SHARDKV_STORE_JOURNAL_MIB", default_value_t = StoreOptions::default().journal_bytes_max >> 20,
          value_parser = clap::value_parser!(u64).range(64..=65536))]
    store_journal_mib: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum ClusterState {
    New,
    Existing,
}

fn parse_id(id: &str) -> anyhow::Result<u32> {
    let digits = id.rsplit('-').next().unwrap_or(id);
    digits
        .parse()
        .with_context(|| format!("--id {id:?} is neither a number nor a name ending in -N"))
}

impl NodeArgs {
    fn into_options(self) -> anyhow::Result<NodeOptions> {
        if self.tick_ms == 0 {
            anyhow::bail!("--tick-ms must be at least 1");
        }
        let id = parse_id(&self.id)?;
        // Connect from the address we listen on, when it is one address.
        let listen = self
            .listen
            .as_deref()
            .or_else(|| self.peers.get(id as usize).map(String::as_str));
        if let Some(ip) = listen
            .and_then(|l| l.rsplit_once(':'))
            .and_then(|(host, _)| {
                host.trim_matches(['[', ']'])
                    .parse::<std::net::IpAddr>()
                    .ok()
            })
        {
            shardkv::net::connect_from(ip);
        }
        Ok(NodeOptions {
            id,
            peers: self.peers,
            data_dir: self.data_dir,
            listen: self.listen,
            metrics_addr: self.metrics_addr,
            tick: Duration::from_millis(self.tick_ms),
            snapshot_every_slots: self.snapshot_every_slots,
            log_retain_slots: self.log_retain_slots,
            store: StoreOptions {
                cache_bytes: self.store_cache_mib.saturating_mul(1 << 20),
                memtable_bytes: self.store_memtable_mib.saturating_mul(1 << 20),
                engine_threads: self.store_engine_threads as usize,
                journal_bytes_max: self.store_journal_mib.saturating_mul(1 << 20),
            },
            join: self.join,
            initial_replicas: self.initial_replicas,
            existing_group: self.initial_cluster_state == ClusterState::Existing,
        })
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    shardkv::daemon::init_logging();
    match Cli::parse().command {
        Command::Master { node, shards } => {
            run_master(node.into_options()?, shards, terminate_signal()).await?;
        }
        Command::Kv {
            node,
            gid,
            masters,
            key_bytes_max,
            value_bytes_max,
        } => {
            let limits = Limits {
                key_bytes_max,
                value_bytes_max,
            };
            run_kv(
                node.into_options()?,
                gid,
                masters,
                limits,
                terminate_signal(),
            )
            .await?;
        }
        Command::Local {
            groups,
            replicas,
            host,
            port,
            data_dir,
        } => {
            let options = LocalOptions {
                groups,
                replicas,
                host,
                port,
                data_dir: data_dir.clone(),
            };
            let on_ready = |cluster: &local::LocalCluster| {
                let masters = cluster.masters.join(",");
                println!(
                    "shardkv local cluster is up: 3 shardmasters and {} groups of {} kvservers, data in {}",
                    cluster.groups.len(),
                    replicas,
                    data_dir.display()
                );
                println!("masters: {masters}");
                for (gid, addrs) in &cluster.groups {
                    println!("group {gid}: {}", addrs.join(","));
                }
                println!("try, in another shell:");
                println!("  export SHARDKV_MASTERS={masters}");
                println!("  shardkvctl put greeting hello");
                println!("  shardkvctl get greeting");
                println!("  shardkvctl query");
                println!(
                    "Ctrl-C stops the cluster; started again on the same data dir it resumes."
                );
            };
            local::run(options, on_ready, terminate_signal()).await?;
        }
    }
    Ok(())
}
