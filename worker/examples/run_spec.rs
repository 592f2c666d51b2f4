//! Runs the trials of a sweep spec in this process, one after the other, and prints every
//! epoch's metrics: a way to try a spec (and time the trainer) without a coordinator.
//!
//! ```text
//! cargo run --release -p sweep-worker --example run_spec -- sweeps/quickstart.yaml [--threads N] [--trial t003 ...]
//! ```

use std::process::ExitCode;

use sweep_core::{grid, spec};
use sweep_worker::train::{self, Control, TrainOptions};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut path = None;
    let mut threads = None;
    let mut only = Vec::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--threads" => threads = args.next().and_then(|v| v.parse::<usize>().ok()),
            "--trial" => only.extend(args.next()),
            _ if path.is_none() => path = Some(a),
            _ => {
                eprintln!("usage: run_spec SPEC.yaml [--threads N] [--trial ID ...]");
                return ExitCode::from(2);
            }
        }
    }
    let Some(path) = path else {
        eprintln!("usage: run_spec SPEC.yaml [--threads N] [--trial ID ...]");
        return ExitCode::from(2);
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{path}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let spec = match spec::parse(&text) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{path}: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(n) = threads {
        train::set_intra_op_threads(n);
    }
    let device = tch::Device::cuda_if_available();
    let options = TrainOptions::new(device);
    println!("device {device:?}, {} intra-op thread(s)", tch::get_num_threads());
    let start = std::time::Instant::now();
    let mut failed = false;
    for trial in grid::expand(&spec.grid) {
        if !only.is_empty() && !only.contains(&trial.id) {
            continue;
        }
        let t0 = std::time::Instant::now();
        println!("{} {} {} {}", trial.id, trial.backbone.name(), trial.lr_decay, trial.split_label());
        let result = train::run_trial(&spec, &trial, &options, &mut |r| {
            let m = r.metrics;
            println!(
                "  epoch {:>2} {:<18} train loss {:.4} acc {:.3} | val loss {:.4} acc {:.3} | {:.2}s",
                m.epoch,
                m.phase.as_str(),
                m.train_loss,
                m.train_accuracy,
                m.val_loss,
                m.val_accuracy,
                m.seconds
            );
            Control::Continue
        });
        match result {
            Ok(s) => println!("  done in {:.1}s, {} parameters", t0.elapsed().as_secs_f64(), s.parameters),
            Err(e) => {
                failed = true;
                println!("  failed ({}): {e}", if e.is_permanent() { "permanent" } else { "retryable" });
            }
        }
    }
    println!("total {:.1}s", start.elapsed().as_secs_f64());
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}
