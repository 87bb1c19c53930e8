//! `shardkv-operator`: runs the ReplicaGroup controller, or prints its CRDs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use shardkv_operator::controller::{self, Context};
use shardkv_operator::lease::Elector;
use shardkv_operator::metrics::Metrics;
use shardkv_operator::resources::{Settings, DEFAULT_POD_ADDRESS_TEMPLATE};

#[derive(Parser)]
#[command(
    name = "shardkv-operator",
    version,
    about = "The shardkv Kubernetes operator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions as YAML.
    Crd,
    /// Reconcile ReplicaGroups (and resize the shardmaster) until SIGTERM.
    Run(Box<RunArgs>),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Watch ReplicaGroups in this namespace only (default: all namespaces).
    #[arg(long, env = "SHARDKV_OPERATOR_NAMESPACE")]
    namespace: Option<String>,
    /// How a pod's address is formed; placeholders {pod}, {service},
    /// {namespace}, {gid} (0 for the shardmaster), {ordinal} and {port}.
    #[arg(long, env = "SHARDKV_OPERATOR_POD_ADDRESS_TEMPLATE", default_value = DEFAULT_POD_ADDRESS_TEMPLATE)]
    pod_address_template: String,
    /// The kvserver image for ReplicaGroups that name none.
    #[arg(
        long,
        env = "SHARDKV_OPERATOR_DEFAULT_IMAGE",
        default_value = "shardkv:latest"
    )]
    default_image: String,
    /// Serve /metrics and /healthz here.
    #[arg(
        long,
        env = "SHARDKV_OPERATOR_METRICS_ADDR",
        default_value = "0.0.0.0:8080"
    )]
    metrics_addr: SocketAddr,
    /// Take a coordination Lease before reconciling, so that only one
    /// operator replica acts at a time.
    #[arg(long, env = "SHARDKV_OPERATOR_LEADER_ELECT")]
    leader_elect: bool,
    /// The Lease's namespace (default: the watched namespace, or "default").
    #[arg(long, env = "SHARDKV_OPERATOR_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    /// This replica's name in the Lease and in events (default: the host name).
    #[arg(long, env = "SHARDKV_OPERATOR_IDENTITY")]
    identity: Option<String>,
    #[arg(long, env = "SHARDKV_OPERATOR_LEASE_SECONDS", default_value_t = 15)]
    lease_seconds: u64,
    /// The shardmaster StatefulSet to resize, NAMESPACE/NAME: the chart
    /// names its own release's. Its `shardkv.io/replicas` annotation says
    /// the size asked for. Unset: the shardmaster is not resized.
    #[arg(long, env = "SHARDKV_OPERATOR_SHARDMASTER", value_parser = parse_statefulset)]
    shardmaster: Option<(String, String)>,
}

fn parse_statefulset(value: &str) -> Result<(String, String), String> {
    match value.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_string(), name.to_string()))
        }
        _ => Err(format!("{value:?} is not NAMESPACE/NAME")),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    shardkv::daemon::init_logging();
    match Cli::parse().command {
        Command::Crd => {
            print!("{}", shardkv_operator::crd::crds_yaml());
            Ok(())
        }
        Command::Run(args) => run(*args).await,
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    if args.lease_seconds < 3 {
        anyhow::bail!("--lease-seconds must be at least 3");
    }
    let client = Client::try_default()
        .await
        .context("cannot configure a Kubernetes client (in-cluster or KUBECONFIG)")?;
    let identity = args.identity.clone().unwrap_or_else(|| {
        std::env::var("HOSTNAME")
            .unwrap_or_else(|_| format!("shardkv-operator-{}", std::process::id()))
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shardkv::daemon::terminate_signal().await;
        let _ = stop_tx.send(true);
    });
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };

    let metrics = Metrics::default();
    let rendered = metrics.clone();
    shardkv::daemon::metrics::serve_text(args.metrics_addr, move || rendered.render(), stopped())
        .await
        .with_context(|| format!("cannot serve metrics on {}", args.metrics_addr))?;

    let settings = Settings {
        pod_address_template: args.pod_address_template,
        default_image: args.default_image,
    };
    let ctx = Arc::new(Context::new(
        client.clone(),
        settings,
        metrics,
        Some(identity.clone()),
    ));

    if !args.leader_elect {
        controller::run(ctx, args.namespace, args.shardmaster, stopped()).await;
        return Ok(());
    }
    let lease_ns = args
        .lease_namespace
        .or_else(|| args.namespace.clone())
        .unwrap_or_else(|| "default".into());
    let elector = Elector {
        api: Api::<Lease>::namespaced(client, &lease_ns),
        name: "shardkv-operator".into(),
        identity,
        duration: Duration::from_secs(args.lease_seconds),
    };
    tokio::select! {
        _ = elector.acquire() => {}
        _ = stopped() => return Ok(()),
    }
    tokio::select! {
        _ = controller::run(ctx, args.namespace, args.shardmaster, stopped()) => Ok(()),
        _ = elector.hold() => anyhow::bail!("lost the leader lease; exiting so that a restart rejoins as a follower"),
    }
}
