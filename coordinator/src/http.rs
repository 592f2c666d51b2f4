//! The coordinator's HTTP endpoints on `--metrics-listen`, beside gRPC: `/metrics` (OpenMetrics
//! text, which Prometheus reads), `/healthz`, and the dashboard (`crate::dashboard`). A new page is a route in [`router`]; the
//! connection bounds are `sweep_session::http`'s.
//!
//! | metric | type | what |
//! |---|---|---|
//! | `sweep_trials{state}` | gauge | trials of every sweep by state |
//! | `sweep_sweeps{state}` | gauge | sweeps by state |
//! | `sweep_workers{state}` | gauge | registered workers by state |
//! | `sweep_reports_total` | counter | acknowledged `ReportEpoch` calls (`rate()` gives reports/s) |
//! | `sweep_scheduling_latency_seconds` | histogram | a free worker's request to its committed assignment |
//! | `sweep_store_write_seconds` | histogram | one store batch: its calls and its commit |

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use sweep_core::state::{SweepState, TrialState, WorkerState};
use sweep_session::http::{label, metrics_response, text};

use crate::server::Shared;

/// Upper bounds of the latency histograms: a millisecond to a minute.
pub const LATENCY_BOUNDS: [f64; 16] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// What the coordinator counts between scrapes (the gauges are read from the store at each).
#[derive(Debug, Clone)]
pub struct CoordinatorMetrics {
    /// Acknowledged `ReportEpoch` calls.
    pub reports: Counter,
    /// From the moment a worker with a free device asked (or was woken by new work) to its
    /// committed assignment.
    pub scheduling: Histogram,
    /// One store batch: its calls and its commit.
    pub store_write: Histogram,
}

impl Default for CoordinatorMetrics {
    fn default() -> Self {
        CoordinatorMetrics {
            reports: Counter::default(),
            scheduling: Histogram::new(LATENCY_BOUNDS),
            store_write: Histogram::new(LATENCY_BOUNDS),
        }
    }
}

/// The routes: `/metrics`, `/healthz` (200 while the store answers, else 503), the dashboard
/// (`crate::dashboard`); 404 otherwise.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .merge(crate::dashboard::router(Arc::clone(&shared)))
        .fallback(|| async { text(StatusCode::NOT_FOUND, "try / (the dashboard), /metrics or /healthz\n") })
        .with_state(shared)
}

async fn healthz(State(shared): State<Arc<Shared>>) -> Response {
    match shared.call(|s| s.last_sequence()).await {
        Ok(_) => text(StatusCode::OK, "ok\n"),
        Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("the store does not answer: {}\n", e.message())),
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    match registry(&shared).await {
        Ok(r) => metrics_response(&r),
        Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("the store does not answer: {e}\n")),
    }
}

type ByState = Family<Vec<(&'static str, String)>, Gauge>;

/// A gauge family with one sample per state, every state present (0 when none).
fn by_state<'a>(states: impl IntoIterator<Item = &'a str>) -> ByState {
    let family = ByState::default();
    for s in states {
        let _ = family.get_or_create(&vec![("state", label(s))]);
    }
    family
}

fn add(family: &ByState, state: &str, n: i64) {
    family.get_or_create(&vec![("state", label(state))]).inc_by(n);
}

async fn registry(shared: &Arc<Shared>) -> Result<Registry, String> {
    let (sweeps, workers) =
        shared.call(|s| Ok((s.list_sweeps()?, s.workers()?))).await.map_err(|s| s.message().to_string())?;
    let trials = by_state(TrialState::ALL.iter().map(|s| s.as_str()));
    let sweep_states = by_state(
        [SweepState::Running, SweepState::Completed, SweepState::Failed, SweepState::Cancelled].map(SweepState::as_str),
    );
    for sw in &sweeps {
        add(&sweep_states, sw.state.as_str(), 1);
        for (state, n) in sw.counts.by_state() {
            add(&trials, state.as_str(), i64::from(n));
        }
    }
    let worker_states = by_state(WorkerState::ALL.iter().map(|s| s.as_str()));
    for w in &workers {
        add(&worker_states, w.state.as_str(), 1);
    }
    let mut r = Registry::default();
    r.register("sweep_trials", "Trials of every sweep, by state", trials);
    r.register("sweep_sweeps", "Sweeps, by state", sweep_states);
    r.register("sweep_workers", "Registered workers, by state", worker_states);
    let m = &shared.metrics;
    r.register("sweep_reports", "Acknowledged ReportEpoch calls (committed epochs)", m.reports.clone());
    r.register(
        "sweep_scheduling_latency_seconds",
        "From a free worker's AcquireTrial (or its wake-up by new work) to its committed assignment",
        m.scheduling.clone(),
    );
    r.register("sweep_store_write_seconds", "One store batch: its calls and its commit", m.store_write.clone());
    Ok(r)
}
