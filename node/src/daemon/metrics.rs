//! Prometheus metrics for one node, served as text on `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::replica::Status;

type Labels = Vec<(&'static str, String)>;

/// A node's metrics. Cheap to clone; clones share the values.
#[derive(Clone)]
pub struct Metrics {
    /// Everything below, registered for encoding.
    registry: Arc<Registry>,
    /// Client operations by `op` and `result`.
    pub operations: Family<Labels, Counter>,
    /// Client operation latency by `op`, in seconds.
    pub latency_seconds: Family<Labels, Histogram>,
    decided_slot: Gauge,
    applied_slot: Gauge,
    is_leader: Gauge,
    ballot_round: Gauge,
    snapshot_slot: Gauge,
    snapshot_bytes: Gauge,
    log_entries: Gauge,
    inbox_dropped: Gauge,
    storage_syncs: Gauge,
    pub config_num: Gauge,
    pub shards_serving: Gauge,
    pub shards_pulling: Gauge,
    pub shards_outgoing: Gauge,
}

fn latency_histogram() -> Histogram {
    // 50 µs to about 13 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 19))
}

impl Metrics {
    /// `role` and `group` label every series, so one Prometheus can scrape
    /// many nodes.
    pub fn new(role: &str, group: &str, replica: u32) -> Self {
        let mut registry = Registry::with_prefix_and_labels(
            "shardkv",
            [
                ("role".into(), role.to_string().into()),
                ("group".into(), group.to_string().into()),
                ("replica".into(), replica.to_string().into()),
            ]
            .into_iter(),
        );
        let operations = Family::<Labels, Counter>::default();
        let latency_seconds = Family::<Labels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "operations",
            "Client operations by type and result",
            operations.clone(),
        );
        registry.register(
            "operation_latency_seconds",
            "Client operation latency, from request to reply",
            latency_seconds.clone(),
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let decided_slot = gauge(&mut registry, "decided_slot", "Highest slot known decided");
        let applied_slot = gauge(
            &mut registry,
            "applied_slot",
            "Highest slot applied to the state machine",
        );
        let is_leader = gauge(
            &mut registry,
            "is_leader",
            "1 if this replica leads its group",
        );
        let ballot_round = gauge(&mut registry, "ballot_round", "Round of the current ballot");
        let snapshot_slot = gauge(
            &mut registry,
            "snapshot_slot",
            "Slot of the latest snapshot",
        );
        let snapshot_bytes = gauge(
            &mut registry,
            "snapshot_bytes",
            "Size of the latest snapshot",
        );
        let log_entries = gauge(
            &mut registry,
            "log_entries",
            "Log entries held above the snapshot",
        );
        let inbox_dropped = gauge(
            &mut registry,
            "inbox_dropped",
            "Peer messages dropped at a full inbox",
        );
        let storage_syncs = gauge(&mut registry, "storage_syncs", "Storage syncs since start");
        let config_num = gauge(
            &mut registry,
            "config_num",
            "Configuration applied (kv) or latest (master)",
        );
        let shards_serving = gauge(&mut registry, "shards_serving", "Shards owned and served");
        let shards_pulling = gauge(
            &mut registry,
            "shards_pulling",
            "Shards owned, data not yet arrived",
        );
        let shards_outgoing = gauge(
            &mut registry,
            "shards_outgoing",
            "Handed-off copies held until their new owner confirms",
        );
        Metrics {
            registry: Arc::new(registry),
            operations,
            latency_seconds,
            decided_slot,
            applied_slot,
            is_leader,
            ballot_round,
            snapshot_slot,
            snapshot_bytes,
            log_entries,
            inbox_dropped,
            storage_syncs,
            config_num,
            shards_serving,
            shards_pulling,
            shards_outgoing,
        }
    }

    /// Records one client operation.
    pub fn observe(&self, op: &'static str, result: &'static str, elapsed: Duration) {
        self.operations
            .get_or_create(&vec![
                ("op", op.to_string()),
                ("result", result.to_string()),
            ])
            .inc();
        self.latency_seconds
            .get_or_create(&vec![("op", op.to_string())])
            .observe(elapsed.as_secs_f64());
    }

    pub fn update_replica(&self, s: &Status) {
        let set = |g: &Gauge, v: u64| {
            g.set(i64::try_from(v).unwrap_or(i64::MAX));
        };
        set(&self.decided_slot, s.commit);
        set(&self.applied_slot, s.applied);
        set(
            &self.is_leader,
            u64::from(s.role == crate::paxos::RoleKind::Leader),
        );
        set(&self.ballot_round, s.ballot.round);
        set(&self.snapshot_slot, s.snapshot_index);
        set(&self.snapshot_bytes, s.snapshot_bytes as u64);
        set(&self.log_entries, s.log_len as u64);
        set(&self.inbox_dropped, s.inbox_dropped);
        set(&self.storage_syncs, s.syncs);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        render_registry(&self.registry)
    }
}

/// A registry in the Prometheus text exposition format.
pub fn render_registry(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut out, registry);
    out
}

/// Serves `/metrics` on `listener` until `shutdown` resolves.
pub fn serve_on(
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    serve_text_on(listener, move || metrics.render(), shutdown)
}

/// Serves what `render` returns as Prometheus text on `/metrics`, and "ok"
/// on `/healthz` (a liveness probe), on `addr` until `shutdown` resolves.
/// The node and the operator both serve their metrics through it.
pub async fn serve_text(
    addr: SocketAddr,
    render: impl Fn() -> String + Clone + Send + Sync + 'static,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    Ok(serve_text_on(listener, render, shutdown))
}

/// [`serve_text`] on a bound listener: a node binds its ports before it
/// opens its store, so a port in use fails it before anything starts.
pub fn serve_text_on(
    listener: tokio::net::TcpListener,
    render: impl Fn() -> String + Clone + Send + Sync + 'static,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let render = render.clone();
                async move {
                    (
                        [(
                            "content-type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        render(),
                    )
                }
            }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok\n" }));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::warn!(error = %e, "metrics server stopped");
        }
    })
}
