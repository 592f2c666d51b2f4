//! Compute benchmark: the same sweep run to the end (the reference) and with early stopping,
//! on this machine's CPU, through `sweep run` with real `sweep-worker` processes.
//!
//! ```sh
//! make build && cargo bench -p sweep --bench compute
//! SWEEP_COMPUTE_WORKERS=1 cargo bench -p sweep --bench compute
//! ```
//!
//! The sweep has the quickstart's shape with three epoch splits (2 backbones × 2 strategies ×
//! `[4, 2]`, `[3, 3]`, `[2, 4]`: 12 trials of 6 epochs; no pretraining). Each run gets a fresh
//! state directory. For each it prints the epochs run, the device-seconds (the sum of every
//! stored epoch's own time: what the devices spent training and validating), the wall time, and
//! the top trial with its best validation accuracy; then the ratios to the reference and whether
//! the top trial is the same. Runs with a stage tree shared across trials join this table when
//! the coordinator schedules stages.
//!
//! Settings (environment): `SWEEP_COMPUTE_WORKERS` (2 workers), `SWEEP_COMPUTE_THREADS` (1
//! thread each), `SWEEP_COMPUTE_KEEP` (set: keep the state directories and print where).

use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{Context, bail};

const SPEC: &str = "\
name: compute
dataset: { kind: synthetic, classes: 10, train_per_class: 48, val_per_class: 24, image_size: 32, seed: 7 }
model: { weights: none }
training:
  batch_size: 32
  seed: 0
  augment: { hflip: true, rotation_deg: 10, shear_deg: 5, color_jitter: 0.2 }
grid:
  backbone: [resnet18, resnet50]
  lr_decay:
    - { strategy: linear, head_lr: 1.0e-3, final_lr: 1.0e-5 }
    - { strategy: exponential, head_lr: 1.0e-3, factor: 3 }
  epoch_split: [[4, 2], [3, 3], [2, 4]]
";

/// The runs: a name and what is added to the spec.
const RUNS: [(&str, &str); 3] = [
    ("independent", ""),
    ("asha", "early_stopping: { strategy: asha, metric: val_accuracy, eta: 3, min_epochs: 1 }\n"),
    ("median", "early_stopping: { strategy: median, metric: val_accuracy, min_epochs: 1, min_trials: 3 }\n"),
];

struct Outcome {
    name: &'static str,
    trials: usize,
    stopped: usize,
    epochs: usize,
    device_seconds: f64,
    wall_seconds: f64,
    top: String,
    top_accuracy: f64,
}

fn env_number(name: &str, default: usize) -> anyhow::Result<usize> {
    match std::env::var(name) {
        Ok(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| *n >= 1)
            .with_context(|| format!("{name} must be a whole number ≥ 1, got `{v}`")),
        Err(_) => Ok(default),
    }
}

fn run(
    name: &'static str,
    extra: &str,
    workers: usize,
    threads: usize,
    dir: &std::path::Path,
) -> anyhow::Result<Outcome> {
    let spec = dir.join(format!("{name}.yaml"));
    std::fs::write(&spec, format!("{SPEC}{extra}"))?;
    let state = dir.join(name);
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_sweep"))
        .arg("run")
        .arg(&spec)
        .args(["--workers", &workers.to_string(), "--threads-per-worker", &threads.to_string(), "--output", "json"])
        .arg("--state-dir")
        .arg(&state)
        .output()
        .context("cannot start `sweep run`")?;
    let wall_seconds = started.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("`sweep run` ({name}) failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    let board: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("`sweep run` ({name}) printed no JSON leaderboard"))?;
    let entries = board.as_array().context("the leaderboard is a list")?;
    let top = &entries.first().context("an empty leaderboard")?;
    let stored = sweep_coordinator::history::stored_metrics(&state.join("sweep.db"))?;
    let report = sweep_coordinator::history::check_state_dir(&state)?;
    if !report.is_clean() {
        bail!("the state of run {name} breaks invariants: {report}");
    }
    Ok(Outcome {
        name,
        trials: entries.len(),
        stopped: entries.iter().filter(|e| e["state"] == "stopped").count(),
        epochs: stored.len(),
        device_seconds: stored.values().map(|v| v[4]).sum(),
        wall_seconds,
        top: format!(
            "{} {} {} {}+{}",
            top["trial"].as_str().unwrap_or("?"),
            top["backbone"].as_str().unwrap_or("?"),
            top["lr_decay"]["strategy"].as_str().unwrap_or("?"),
            top["epoch_split"][0],
            top["epoch_split"][1]
        ),
        top_accuracy: top["best_val_accuracy"].as_f64().unwrap_or(f64::NAN),
    })
}

fn main() -> ExitCode {
    match bench() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("compute benchmark: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn bench() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; this benchmark has no filters.
    let workers = env_number("SWEEP_COMPUTE_WORKERS", 2)?;
    let threads = env_number("SWEEP_COMPUTE_THREADS", 1)?;
    let keep = std::env::var_os("SWEEP_COMPUTE_KEEP").is_some();
    let dir = tempfile::tempdir()?;
    println!("compute benchmark: 12 trials of 6 epochs, {workers} workers × {threads} thread(s), CPU");
    let mut outcomes = Vec::new();
    for (name, extra) in RUNS {
        let o = run(name, extra, workers, threads, dir.path())?;
        println!("  {name}: done in {:.0} s", o.wall_seconds);
        outcomes.push(o);
    }
    let reference = &outcomes[0];
    println!();
    println!(
        "{:<12} {:>6} {:>7} {:>6} {:>9} {:>7} {:>9} {:>7}  {:<30} {:>8}",
        "RUN", "TRIALS", "STOPPED", "EPOCHS", "DEVICE-S", "RATIO", "WALL-S", "RATIO", "TOP TRIAL", "BEST VAL"
    );
    for o in &outcomes {
        println!(
            "{:<12} {:>6} {:>7} {:>6} {:>9.1} {:>6.2}× {:>9.1} {:>6.2}×  {:<30} {:>7.1}%{}",
            o.name,
            o.trials,
            o.stopped,
            o.epochs,
            o.device_seconds,
            o.device_seconds / reference.device_seconds,
            o.wall_seconds,
            o.wall_seconds / reference.wall_seconds,
            o.top,
            o.top_accuracy * 100.0,
            if o.top == reference.top { "" } else { "  (another top trial)" }
        );
    }
    if keep {
        let kept = dir.keep();
        println!("\nstate directories kept in {}", kept.display());
    }
    Ok(())
}
