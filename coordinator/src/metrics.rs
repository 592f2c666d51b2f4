//! The coordinator's `/metrics` (Prometheus text format) and `/healthz`, served over HTTP on
//! `--metrics-listen`.
//!
//! | metric | type | what |
//! |---|---|---|
//! | `sweep_trials{state}` | gauge | trials of every sweep by state |
//! | `sweep_sweeps{state}` | gauge | sweeps by state |
//! | `sweep_workers{state}` | gauge | registered workers by state |
//! | `sweep_reports_total` | counter | acknowledged `ReportEpoch` calls (`rate()` gives reports/s) |
//! | `sweep_scheduling_latency_seconds` | histogram | a free worker's request to its committed assignment |
//! | `sweep_store_write_seconds` | histogram | one store batch: its calls and its commit |

use std::collections::BTreeMap;
use std::sync::Arc;

use sweep_proto::httpd::{Handler, Reply};
use sweep_proto::metrics::{CONTENT_TYPE, Exposition};

use crate::server::Shared;

const TRIAL_STATES: [&str; 6] = ["pending", "unschedulable", "running", "completed", "failed", "cancelled"];

/// The HTTP handler: `/metrics`, `/healthz` (200 while the store answers), 404 otherwise.
pub fn handler(shared: Arc<Shared>) -> Handler {
    Arc::new(move |path: String| {
        let shared = Arc::clone(&shared);
        Box::pin(async move {
            match path.as_str() {
                "/metrics" => match render(&shared).await {
                    Ok(body) => Reply { status: 200, content_type: CONTENT_TYPE, body },
                    Err(e) => Reply::text(503, format!("the store does not answer: {e}\n")),
                },
                "/healthz" => match shared.call(|s| s.last_sequence()).await {
                    Ok(_) => Reply::text(200, "ok\n"),
                    Err(e) => Reply::text(503, format!("the store does not answer: {}\n", e.message())),
                },
                _ => Reply::text(404, "try /metrics or /healthz\n"),
            }
        })
    })
}

async fn render(shared: &Arc<Shared>) -> Result<String, String> {
    let (sweeps, workers) =
        shared.call(|s| Ok((s.list_sweeps()?, s.workers()?))).await.map_err(|s| s.message().to_string())?;
    let mut trials: BTreeMap<&str, u64> = TRIAL_STATES.iter().map(|s| (*s, 0)).collect();
    let mut sweep_states: BTreeMap<String, u64> =
        ["running", "completed", "failed", "cancelled"].iter().map(|s| (s.to_string(), 0)).collect();
    for sw in &sweeps {
        *sweep_states.entry(sw.state.clone()).or_default() += 1;
        let c = sw.counts.unwrap_or_default();
        for (state, n) in [
            ("pending", c.pending),
            ("unschedulable", c.unschedulable),
            ("running", c.running),
            ("completed", c.completed),
            ("failed", c.failed),
            ("cancelled", c.cancelled),
        ] {
            *trials.entry(state).or_default() += n as u64;
        }
    }
    let mut worker_states: BTreeMap<String, u64> =
        [crate::store::WORKER_ACTIVE, crate::store::WORKER_QUARANTINED, crate::store::WORKER_GONE]
            .iter()
            .map(|s| (s.to_string(), 0))
            .collect();
    for w in &workers {
        *worker_states.entry(w.state.clone()).or_default() += 1;
    }
    let mut e = Exposition::default();
    e.gauge(
        "sweep_trials",
        "Trials of every sweep, by state.",
        &trials.iter().map(|(k, v)| (vec![("state", *k)], *v as f64)).collect::<Vec<_>>(),
    );
    e.gauge(
        "sweep_sweeps",
        "Sweeps, by state.",
        &sweep_states.iter().map(|(k, v)| (vec![("state", k.as_str())], *v as f64)).collect::<Vec<_>>(),
    );
    e.gauge(
        "sweep_workers",
        "Registered workers, by state.",
        &worker_states.iter().map(|(k, v)| (vec![("state", k.as_str())], *v as f64)).collect::<Vec<_>>(),
    );
    let m = &shared.metrics;
    e.counter("sweep_reports_total", "Acknowledged ReportEpoch calls (committed epochs).", m.reports.get());
    e.histogram(
        "sweep_scheduling_latency_seconds",
        "From a free worker's AcquireTrial (or its wake-up by new work) to its committed assignment.",
        &m.scheduling,
    );
    e.histogram("sweep_store_write_seconds", "One store batch: its calls and its commit.", &m.store_write);
    Ok(e.finish())
}
