//! The operator's Prometheus metrics, served with its `/healthz` by the
//! node's `serve_text`.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, &'static str)>;

/// Cheap to clone; clones share the values.
#[derive(Clone)]
pub struct Metrics {
    /// Everything below, registered for encoding.
    registry: Arc<Registry>,
    /// Reconciles by `result` (ok, error): a rising error count is the first
    /// sign of an operator that cannot reach the API or the shardmaster.
    reconciles: Family<Labels, Counter>,
    /// How long a reconcile takes, shardmaster and kvserver calls included.
    reconcile_seconds: Histogram,
    /// Join, Leave and finalizer releases carried out, by `step`.
    steps: Family<Labels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("shardkv_operator");
        let reconciles = Family::<Labels, Counter>::default();
        let steps = Family::<Labels, Counter>::default();
        // 1 ms to about 16 s.
        let reconcile_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        registry.register("reconciles", "Reconciles by result", reconciles.clone());
        registry.register(
            "reconcile_duration_seconds",
            "Time per reconcile",
            reconcile_seconds.clone(),
        );
        registry.register("steps", "Join, Leave and finalizer releases", steps.clone());
        Metrics {
            registry: Arc::new(registry),
            reconciles,
            reconcile_seconds,
            steps,
        }
    }
}

impl Metrics {
    pub fn reconciled(&self, elapsed: Duration, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.reconciles
            .get_or_create(&vec![("result", result)])
            .inc();
        self.reconcile_seconds.observe(elapsed.as_secs_f64());
    }

    pub fn step(&self, step: &'static str) {
        self.steps.get_or_create(&vec![("step", step)]).inc();
    }

    pub fn render(&self) -> String {
        shardkv::daemon::metrics::render_registry(&self.registry)
    }
}
