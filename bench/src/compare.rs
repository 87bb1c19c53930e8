//! `shardkv-bench compare`: etcd and shardkv on this machine, one system at
//! a time (so they never share the CPU), the same workloads against each,
//! and a table with the ratios shardkv/etcd.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;

use crate::cluster::{self, System};
use crate::runner::{self, ms, Report};
use crate::workload::{KeyDistribution, Length, Workload};

#[derive(Args)]
pub struct CompareArgs {
    /// Measured seconds per workload (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    #[arg(long, default_value_t = 1.0)]
    warmup_seconds: f64,
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    clients: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "0,0.5,0.95")]
    read_ratios: Vec<f64>,
    #[arg(long, default_value_t = 256)]
    value_bytes: usize,
    #[arg(long, default_value_t = 10_000)]
    key_count: u64,
    #[arg(long, value_enum, default_value_t = KeyDistribution::Uniform)]
    distribution: KeyDistribution,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The systems, in order: `etcd`, and `shardkv-G` for G groups of 3.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "etcd,shardkv-1,shardkv-3"
    )]
    systems: Vec<String>,
    /// Loopback address every process listens on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// First port; etcd uses the next 13, shardkv the next 40.
    #[arg(long, default_value_t = 17000)]
    base_port: u16,
    /// The etcd server binary (Debian's etcd-server).
    #[arg(long, default_value = "/usr/bin/etcd")]
    etcd_bin: PathBuf,
    /// Data directories go in a fresh directory under this one (the same
    /// file system for every system: they all fsync).
    #[arg(long, default_value = "target/bench")]
    data_dir: PathBuf,
    /// Also write every report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Serialize)]
struct Comparison {
    cores: usize,
    reports: Vec<Report>,
}

pub async fn compare(args: CompareArgs) -> anyhow::Result<()> {
    let workloads = workloads(&args)?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut columns: Vec<(String, Vec<Report>)> = Vec::new();
    for system in &args.systems {
        let dir = tempfile::Builder::new()
            .prefix(&format!("{system}-"))
            .tempdir_in(&args.data_dir)
            .context("creating a data directory")?;
        let running = start(system, &args, dir.path()).await?;
        eprintln!(
            "{}: started; preloading {} keys",
            running.name, args.key_count
        );
        runner::preload(&running.target, &workloads[0])
            .await
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("{}: preload", running.name))?;
        let mut reports = Vec::new();
        for w in &workloads {
            let mut report = runner::run(&running.target, w)
                .await
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("{}: {}", running.name, w.label()))?;
            report.target = running.name.clone();
            eprintln!("{}", report.human());
            reports.push(report);
        }
        columns.push((running.name.clone(), reports));
        drop(running);
    }
    println!(
        "\n{} s per workload, {}-byte values, {} keys ({:?}), {cores} cores, seed {}\n",
        args.seconds, args.value_bytes, args.key_count, args.distribution, args.seed
    );
    println!("{}", table(&workloads, &columns));
    let failed: u64 = columns.iter().flat_map(|(_, r)| r).map(|r| r.errors).sum();
    if let Some(path) = &args.json {
        let all = Comparison {
            cores,
            reports: columns.into_iter().flat_map(|(_, r)| r).collect(),
        };
        std::fs::write(path, serde_json::to_string_pretty(&all)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if failed > 0 {
        bail!("{failed} operations failed");
    }
    Ok(())
}

/// Every read ratio with every client count, in that order.
fn workloads(args: &CompareArgs) -> anyhow::Result<Vec<Workload>> {
    if args.read_ratios.iter().any(|r| !(0.0..=1.0).contains(r)) {
        bail!("--read-ratios must be between 0 and 1");
    }
    if args.clients.is_empty() || args.read_ratios.is_empty() {
        bail!("--clients and --read-ratios need at least one value each");
    }
    if args.clients.contains(&0) || args.key_count == 0 {
        bail!("--clients and --key-count must be at least 1");
    }
    let mut all = Vec::new();
    for &read_ratio in &args.read_ratios {
        for &clients in &args.clients {
            all.push(Workload {
                read_ratio,
                key_count: args.key_count,
                value_bytes: args.value_bytes,
                distribution: args.distribution,
                clients,
                length: Length::Seconds(args.seconds),
                warmup: Duration::from_secs_f64(args.warmup_seconds),
                seed: args.seed,
                shard_per_client: false,
            });
        }
    }
    Ok(all)
}

async fn start(system: &str, args: &CompareArgs, dir: &std::path::Path) -> anyhow::Result<System> {
    let started = if system == "etcd" {
        cluster::start_etcd(&args.etcd_bin, &args.host, args.base_port, dir).await
    } else if let Some(groups) = system.strip_prefix("shardkv-") {
        let groups: usize = groups
            .parse()
            .ok()
            .filter(|g| (1..=3).contains(g))
            .with_context(|| format!("{system}: shardkv-G takes 1 to 3 groups"))?;
        let node = crate::sibling_binary("shardkv-node")?;
        cluster::start_shardkv(&node, &args.host, args.base_port, groups, dir).await
    } else {
        bail!("unknown system {system:?}: etcd or shardkv-G");
    };
    started.map_err(anyhow::Error::msg)
}

/// A Markdown table: a row per workload; per system, throughput and p99;
/// per shardkv system, its ratios to etcd (the first system).
fn table(workloads: &[Workload], columns: &[(String, Vec<Report>)]) -> String {
    let mut header = vec!["workload".to_string()];
    for (i, (name, _)) in columns.iter().enumerate() {
        header.push(format!("{name} ops/s"));
        header.push(format!("{name} p99"));
        if i > 0 {
            header.push(format!("{name} / {} ops/s", columns[0].0));
            header.push(format!("{name} / {} p99", columns[0].0));
        }
    }
    let mut out = format!("| {} |\n", header.join(" | "));
    out += &format!("|{}\n", " --- |".repeat(header.len()));
    for (row, w) in workloads.iter().enumerate() {
        let mut cells = vec![w.label()];
        for (i, (_, reports)) in columns.iter().enumerate() {
            let r = &reports[row];
            let errors = if r.errors > 0 {
                format!(" ({} errors)", r.errors)
            } else {
                String::new()
            };
            cells.push(format!("{:.0}{errors}", r.throughput_ops_per_second));
            cells.push(ms(r.latency_us.p99));
            if i > 0 {
                let base = &columns[0].1[row];
                cells.push(ratio(
                    r.throughput_ops_per_second,
                    base.throughput_ops_per_second,
                ));
                cells.push(ratio(r.latency_us.p99 as f64, base.latency_us.p99 as f64));
            }
        }
        out += &format!("| {} |\n", cells.join(" | "));
    }
    out
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "-".into()
    }
}
