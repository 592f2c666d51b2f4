//! The worker's `/metrics` (Prometheus text format) and `/healthz`, served over HTTP on
//! `--metrics-listen`.
//!
//! | metric | type | what |
//! |---|---|---|
//! | `sweep_worker_images_per_second` | gauge | training images per second of the last epoch (train + validation time) |
//! | `sweep_worker_epoch_seconds` | histogram | wall-clock seconds per epoch |
//! | `sweep_worker_epochs_total` | counter | epochs trained and reported |
//! | `sweep_worker_running_attempts` | gauge | attempts running now |
//! | `sweep_worker_device_memory_bytes{device,kind}` | gauge | each announced device's memory (CUDA: as the driver reports it) |
//! | `sweep_worker_up` | gauge | 1 while the daemon's loop runs |

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use sweep_proto::v1;
use sweep_session::http::{label, metrics_response, text};

/// Upper bounds of the epoch-duration histogram: a second to a few hours.
pub const EPOCH_BOUNDS: [f64; 12] = [1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 10800.0];

/// What this process counts.
pub struct WorkerMetrics {
    images_per_second: AtomicU64,
    pub epoch_seconds: Histogram,
    pub epochs: Counter,
    pub running: AtomicUsize,
    /// False once the daemon loop has ended (the liveness probe then fails).
    pub up: AtomicBool,
    /// The feature cache (`train`): caches built and kept, one per attempt's feature-extraction
    /// phase whatever its replicas.
    pub feature_caches_built: Counter,
    /// Caches given up (building failed, or a batch computed afresh differed from the cache):
    /// on a device whose kernels depend on a sample's batch, feature extraction then runs the
    /// backbone every epoch.
    pub feature_caches_abandoned: Counter,
    /// Training batches (each replica's part counted) whose features were read from a cache.
    pub feature_cache_batches_read: Counter,
    /// Training batches of cached epochs whose size is not the cache's, computed afresh.
    pub feature_cache_batches_computed: Counter,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        WorkerMetrics {
            images_per_second: AtomicU64::new(0f64.to_bits()),
            epoch_seconds: Histogram::new(EPOCH_BOUNDS),
            epochs: Counter::default(),
            running: AtomicUsize::new(0),
            up: AtomicBool::new(true),
            feature_caches_built: Counter::default(),
            feature_caches_abandoned: Counter::default(),
            feature_cache_batches_read: Counter::default(),
            feature_cache_batches_computed: Counter::default(),
        }
    }
}

/// The process's metrics.
pub fn global() -> &'static WorkerMetrics {
    static M: OnceLock<WorkerMetrics> = OnceLock::new();
    M.get_or_init(WorkerMetrics::default)
}

fn gauge(v: f64) -> Gauge<f64, AtomicU64> {
    let g = Gauge::<f64, AtomicU64>::default();
    g.set(v);
    g
}

impl WorkerMetrics {
    /// One reported epoch of `train_images` images that took `seconds`.
    pub fn epoch(&self, train_images: usize, seconds: f64) {
        self.epochs.inc();
        if seconds.is_finite() {
            self.epoch_seconds.observe(seconds);
        }
        if seconds > 0.0 {
            self.images_per_second.store((train_images as f64 / seconds).to_bits(), Ordering::Relaxed);
        }
    }

    pub fn images_per_second(&self) -> f64 {
        f64::from_bits(self.images_per_second.load(Ordering::Relaxed))
    }

    /// The metrics now, with the devices this worker announces.
    pub fn registry(&self, devices: &[v1::Device]) -> Registry {
        let mut r = Registry::default();
        r.register(
            "sweep_worker_up",
            "1 while the daemon's loop runs",
            gauge(f64::from(u8::from(self.up.load(Ordering::Relaxed)))),
        );
        r.register(
            "sweep_worker_images_per_second",
            "Training images per second of the last epoch (its training and validation time)",
            gauge(self.images_per_second()),
        );
        r.register("sweep_worker_epoch_seconds", "Wall-clock seconds per epoch", self.epoch_seconds.clone());
        r.register("sweep_worker_epochs", "Epochs trained and reported", self.epochs.clone());
        r.register(
            "sweep_worker_running_attempts",
            "Attempts running now",
            gauge(self.running.load(Ordering::Relaxed) as f64),
        );
        for (name, help, counter) in [
            (
                "sweep_worker_feature_caches_built",
                "Feature caches built and kept (one per feature-extraction phase of an attempt)",
                &self.feature_caches_built,
            ),
            (
                "sweep_worker_feature_caches_abandoned",
                "Feature caches given up: building failed, or a batch computed afresh differed from it",
                &self.feature_caches_abandoned,
            ),
            (
                "sweep_worker_feature_cache_batches_read",
                "Training batches (replicas' parts) whose backbone features were read from the cache",
                &self.feature_cache_batches_read,
            ),
            (
                "sweep_worker_feature_cache_batches_computed",
                "Training batches of cached epochs computed afresh (not of the cache's size)",
                &self.feature_cache_batches_computed,
            ),
        ] {
            r.register(name, help, counter.clone());
        }
        let memory = Family::<Vec<(&'static str, String)>, Gauge<f64, AtomicU64>>::default();
        for d in devices.iter().filter(|d| d.memory_bytes > 0) {
            memory.get_or_create(&vec![("device", label(&d.id)), ("kind", label(&d.kind))]).set(d.memory_bytes as f64);
        }
        r.register("sweep_worker_device_memory_bytes", "Memory of each announced device", memory);
        r
    }
}

/// `/metrics`, `/healthz` (200 while the daemon's loop runs, 503 after), 404 otherwise.
pub fn router(devices: Arc<Vec<v1::Device>>) -> Router {
    Router::new()
        .route("/metrics", get(move || async move { metrics_response(&global().registry(&devices)) }))
        .route(
            "/healthz",
            get(|| async {
                if global().up.load(Ordering::Relaxed) {
                    text(StatusCode::OK, "ok\n")
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, "the daemon has stopped\n")
                }
            }),
        )
        .fallback(|| async { text(StatusCode::NOT_FOUND, "try /metrics or /healthz\n") })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_epoch_sets_the_rate_and_the_histogram() {
        let m = WorkerMetrics::default();
        m.running.store(1, Ordering::Relaxed);
        m.epoch(6149, 20.0);
        assert!((m.images_per_second() - 307.45).abs() < 1e-9);
        let devices =
            vec![v1::Device { id: "cuda:0".into(), kind: "cuda".into(), name: "H100".into(), memory_bytes: 80 << 30 }];
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &m.registry(&devices)).unwrap();
        assert!(text.contains("sweep_worker_images_per_second 307.45\n"), "{text}");
        assert!(text.contains("sweep_worker_epoch_seconds_bucket{le=\"30.0\"} 1\n"), "{text}");
        assert!(text.contains("sweep_worker_epochs_total 1\n"), "{text}");
        assert!(
            text.contains("sweep_worker_device_memory_bytes{device=\"cuda:0\",kind=\"cuda\"} 85899345920.0\n"),
            "{text}"
        );
        assert!(text.contains("sweep_worker_running_attempts 1.0\n"), "{text}");
        m.feature_caches_built.inc();
        m.feature_cache_batches_read.inc_by(3);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &m.registry(&devices)).unwrap();
        assert!(text.contains("sweep_worker_feature_caches_built_total 1\n"), "{text}");
        assert!(text.contains("sweep_worker_feature_caches_abandoned_total 0\n"), "{text}");
        assert!(text.contains("sweep_worker_feature_cache_batches_read_total 3\n"), "{text}");
        assert!(text.contains("sweep_worker_feature_cache_batches_computed_total 0\n"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
