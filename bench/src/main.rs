//! `shardkv-bench`: a load generator for shardkv and etcd, and a
//! side-by-side comparison of the two on one machine.
//!
//! ```text
//! shardkv-bench run --masters A,B,C [WORKLOAD] [--json]
//! shardkv-bench run --etcd http://A,http://B [WORKLOAD] [--json]
//! shardkv-bench compare [--seconds S] [--clients 1,64] [--read-ratios 0,0.5,0.95] [--json FILE]
//! ```

mod cluster;
mod compare;
mod runner;
mod target;
mod workload;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};

use target::TargetSpec;
use workload::{KeyDistribution, Length, Workload};

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Runs one workload against a running store.
    Run(RunArgs),
    /// Starts etcd (3 members) and shardkv (1 group of 3; 3 groups of 3)
    /// on this machine, one at a time, runs the same workloads against
    /// each and prints a side-by-side table.
    Compare(compare::CompareArgs),
}

#[derive(Args)]
struct RunArgs {
    /// shardkv: the shardmasters' addresses (host:port).
    #[arg(
        long,
        value_delimiter = ',',
        conflicts_with = "etcd",
        env = "SHARDKV_MASTERS"
    )]
    masters: Vec<String>,
    /// etcd: the members' client URLs (http://host:port).
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    #[command(flatten)]
    workload: WorkloadArgs,
    /// Write every key once before the run, so reads find values.
    #[arg(long)]
    preload: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Clone)]
pub struct WorkloadArgs {
    /// Fraction of operations that are reads (0 to 1); the rest are puts.
    #[arg(long, default_value_t = 0.5)]
    read_ratio: f64,
    #[arg(long, default_value_t = 10_000)]
    key_count: u64,
    #[arg(long, default_value_t = 256)]
    value_bytes: usize,
    #[arg(long, value_enum, default_value_t = KeyDistribution::Uniform)]
    distribution: KeyDistribution,
    /// Concurrent closed-loop clients.
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// Measure for this long ...
    #[arg(long, default_value_t = 10.0, conflicts_with = "operations")]
    seconds: f64,
    /// ... or until this many operations.
    #[arg(long)]
    operations: Option<u64>,
    #[arg(long, default_value_t = 1.0)]
    warmup_seconds: f64,
    /// Seeds the key and operation choices (printed with every report).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Client i uses only keys of shard i (modulo the shards; shardkv
    /// only): a shard that moves then holds up its own clients alone.
    #[arg(long)]
    shard_per_client: bool,
}

impl WorkloadArgs {
    fn workload(&self) -> anyhow::Result<Workload> {
        if !(0.0..=1.0).contains(&self.read_ratio) {
            bail!("--read-ratio must be between 0 and 1");
        }
        if self.key_count == 0 || self.clients == 0 {
            bail!("--key-count and --clients must be at least 1");
        }
        if !(self.seconds > 0.0 && self.warmup_seconds >= 0.0) {
            bail!("--seconds must be positive and --warmup-seconds not negative");
        }
        Ok(Workload {
            read_ratio: self.read_ratio,
            key_count: self.key_count,
            value_bytes: self.value_bytes,
            distribution: self.distribution,
            clients: self.clients,
            length: match self.operations {
                Some(n) => Length::Operations(n),
                None => Length::Seconds(self.seconds),
            },
            warmup: Duration::from_secs_f64(self.warmup_seconds),
            seed: self.seed,
            shard_per_client: self.shard_per_client,
        })
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Commands::Run(args) => run(args).await,
        Commands::Compare(args) => compare::compare(args).await,
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let target = match (args.masters.is_empty(), args.etcd.is_empty()) {
        (false, true) => TargetSpec::Shardkv {
            masters: args.masters,
        },
        (true, false) => TargetSpec::Etcd {
            endpoints: args.etcd,
        },
        _ => bail!("give the target: --masters (shardkv) or --etcd (etcd)"),
    };
    let workload = args.workload.workload()?;
    if args.preload {
        runner::preload(&target, &workload)
            .await
            .map_err(anyhow::Error::msg)
            .context("preload")?;
    }
    let report = runner::run(&target, &workload)
        .await
        .map_err(anyhow::Error::msg)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{} (seed {})", report.human(), workload.seed);
    }
    if report.errors > 0 {
        bail!("{} operations failed", report.errors);
    }
    Ok(())
}

/// The directory of this executable: where `cargo build` put the node.
fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating shardkv-bench")?;
    let dir = exe.parent().context("shardkv-bench has no directory")?;
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} not found; build it first: cargo build --release --bins",
            path.display()
        );
    }
    Ok(path)
}
