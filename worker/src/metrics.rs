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

use sweep_proto::httpd::{Handler, Reply};
use sweep_proto::metrics::{CONTENT_TYPE, Counter, EPOCH_BOUNDS, Exposition, Histogram};
use sweep_proto::v1;

/// What this process counts.
pub struct WorkerMetrics {
    images_per_second: AtomicU64,
    pub epoch_seconds: Histogram,
    pub epochs: Counter,
    pub running: AtomicUsize,
    /// False once the daemon loop has ended (the liveness probe then fails).
    pub up: AtomicBool,
}

/// The process's metrics.
pub fn global() -> &'static WorkerMetrics {
    static M: OnceLock<WorkerMetrics> = OnceLock::new();
    M.get_or_init(|| WorkerMetrics {
        images_per_second: AtomicU64::new(0f64.to_bits()),
        epoch_seconds: Histogram::new(EPOCH_BOUNDS),
        epochs: Counter::default(),
        running: AtomicUsize::new(0),
        up: AtomicBool::new(true),
    })
}

impl WorkerMetrics {
    /// One reported epoch of `train_images` images that took `seconds`.
    pub fn epoch(&self, train_images: usize, seconds: f64) {
        self.epochs.inc();
        self.epoch_seconds.observe(seconds);
        if seconds > 0.0 {
            self.images_per_second.store((train_images as f64 / seconds).to_bits(), Ordering::Relaxed);
        }
    }

    pub fn images_per_second(&self) -> f64 {
        f64::from_bits(self.images_per_second.load(Ordering::Relaxed))
    }

    /// The exposition text, with the devices this worker announces.
    pub fn render(&self, devices: &[v1::Device]) -> String {
        let mut e = Exposition::default();
        e.gauge(
            "sweep_worker_up",
            "1 while the daemon's loop runs.",
            &[(vec![], f64::from(u8::from(self.up.load(Ordering::Relaxed))))],
        );
        e.gauge(
            "sweep_worker_images_per_second",
            "Training images per second of the last epoch (its training and validation time).",
            &[(vec![], self.images_per_second())],
        );
        e.histogram("sweep_worker_epoch_seconds", "Wall-clock seconds per epoch.", &self.epoch_seconds);
        e.counter("sweep_worker_epochs_total", "Epochs trained and reported.", self.epochs.get());
        e.gauge(
            "sweep_worker_running_attempts",
            "Attempts running now.",
            &[(vec![], self.running.load(Ordering::Relaxed) as f64)],
        );
        let memory: Vec<(Vec<(&str, &str)>, f64)> = devices
            .iter()
            .filter(|d| d.memory_bytes > 0)
            .map(|d| (vec![("device", d.id.as_str()), ("kind", d.kind.as_str())], d.memory_bytes as f64))
            .collect();
        e.gauge("sweep_worker_device_memory_bytes", "Memory of each announced device.", &memory);
        e.finish()
    }
}

/// `/metrics`, `/healthz` (200 while the daemon's loop runs, 503 after), 404 otherwise.
pub fn handler(devices: Arc<Vec<v1::Device>>) -> Handler {
    Arc::new(move |path: String| {
        let devices = Arc::clone(&devices);
        Box::pin(async move {
            let m = global();
            match path.as_str() {
                "/metrics" => Reply { status: 200, content_type: CONTENT_TYPE, body: m.render(&devices) },
                "/healthz" if m.up.load(Ordering::Relaxed) => Reply::text(200, "ok\n"),
                "/healthz" => Reply::text(503, "the daemon has stopped\n"),
                _ => Reply::text(404, "try /metrics or /healthz\n"),
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_epoch_sets_the_rate_and_the_histogram() {
        let m = WorkerMetrics {
            images_per_second: AtomicU64::new(0f64.to_bits()),
            epoch_seconds: Histogram::new(EPOCH_BOUNDS),
            epochs: Counter::default(),
            running: AtomicUsize::new(1),
            up: AtomicBool::new(true),
        };
        m.epoch(6149, 20.0);
        assert!((m.images_per_second() - 307.45).abs() < 1e-9);
        let devices =
            vec![v1::Device { id: "cuda:0".into(), kind: "cuda".into(), name: "H100".into(), memory_bytes: 80 << 30 }];
        let text = m.render(&devices);
        assert!(text.contains("sweep_worker_images_per_second 307.45\n"), "{text}");
        assert!(text.contains("sweep_worker_epoch_seconds_bucket{le=\"30\"} 1\n"), "{text}");
        assert!(
            text.contains("sweep_worker_device_memory_bytes{device=\"cuda:0\",kind=\"cuda\"} 85899345920\n"),
            "{text}"
        );
        assert!(text.contains("sweep_worker_running_attempts 1\n"), "{text}");
    }
}
