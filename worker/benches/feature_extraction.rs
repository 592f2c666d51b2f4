//! What an epoch of feature extraction costs against one of fine-tuning, with and without the
//! feature cache, in one command:
//!
//! ```text
//! cargo bench -p sweep-worker --bench feature_extraction
//! ```
//!
//! Trains one trial on a synthetic dataset (`SWEEP_BENCH_BACKBONE`, default resnet50;
//! `SWEEP_BENCH_IMAGES` training images, default 240, and a quarter as many for validation,
//! 10 classes; `SWEEP_BENCH_SIZE` px, default 128; batch `SWEEP_BENCH_BATCH`, default 16;
//! BatchNorm frozen and no augmentation during feature extraction, so that the cache applies)
//! for 3 feature-extraction epochs and 1 fine-tuning epoch, twice: with the feature cache off
//! (every epoch runs the frozen backbone over every image, as before the cache) and on. It
//! checks that both runs give the same metrics and weights, and prints each epoch's seconds and
//! the ratios: a feature-extraction epoch against the fine-tuning epoch of the same run, and the
//! cached run against the uncached one. Threads: `SWEEP_BENCH_THREADS` (default: the CPUs).
//! Devices: `SWEEP_BENCH_DEVICES` (default `cpu`; a list such as `cuda:0,cuda:1` or `cpu:0,cpu:1`
//! trains data-parallel, one replica per device, `SWEEP_BENCH_BATCH` images each).

use std::time::Instant;

use sweep_core::grid;
use sweep_core::leaderboard::EpochMetrics;
use sweep_core::spec;
use sweep_worker::train::{TrainOptions, Trainer};
use tch::Device;

const FE_EPOCHS: u32 = 3;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok()).filter(|&v| v > 0).unwrap_or(default)
}

struct Run {
    epochs: Vec<EpochMetrics>,
    state: Vec<(String, tch::Tensor)>,
    /// Seconds to build the trainer (dataset, model).
    setup: f64,
}

fn run(spec: &spec::SweepSpec, devices: &[Device], cache: bool) -> Run {
    let trial = grid::expand(&spec.grid).remove(0);
    let start = Instant::now();
    let options = TrainOptions { feature_cache: cache, ..TrainOptions::data_parallel(devices.to_vec()) };
    let mut trainer = Trainer::new(spec, &trial, &options).expect("the trainer");
    let setup = start.elapsed().as_secs_f64();
    let mut epochs = Vec::new();
    for _ in 0..trial.fe_epochs + trial.ft_epochs {
        let m = trainer.run_epoch().expect("an epoch");
        eprintln!(
            "  cache {}: epoch {} ({:?}) {:.3} s, val accuracy {:.3}",
            if cache { "on " } else { "off" },
            m.epoch,
            m.phase,
            m.seconds,
            m.val_accuracy
        );
        epochs.push(m);
    }
    eprintln!("  cache {}: {:?}", if cache { "on " } else { "off" }, trainer.feature_cache_stats());
    let state = trainer.model().state_dict().into_iter().map(|(n, t)| (n, t.detach().copy())).collect();
    Run { epochs, state, setup }
}

fn main() {
    let backbone = std::env::var("SWEEP_BENCH_BACKBONE").unwrap_or_else(|_| "resnet50".into());
    let images = env_usize("SWEEP_BENCH_IMAGES", 240);
    let size = env_usize("SWEEP_BENCH_SIZE", 128);
    let batch = env_usize("SWEEP_BENCH_BATCH", 16);
    let threads = env_usize("SWEEP_BENCH_THREADS", std::thread::available_parallelism().map_or(1, |n| n.get()));
    tch::set_num_threads(threads as i32);
    let list = std::env::var("SWEEP_BENCH_DEVICES").unwrap_or_else(|_| "cpu".into());
    let devices: Vec<Device> = sweep_worker::devices::parse_devices(&list)
        .unwrap_or_else(|e| panic!("SWEEP_BENCH_DEVICES={list}: {e}"))
        .into_iter()
        .map(|(_, d)| d)
        .collect();
    let classes = 10;
    let yaml = format!(
        "name: fe-bench
dataset: {{ kind: synthetic, classes: {classes}, train_per_class: {}, val_per_class: {}, image_size: {size}, seed: 1 }}
model: {{ weights: none }}
training:
  batch_size: {batch}
  seed: 0
  freeze_bn_stats: true
  augment: {{ hflip: false, rotation_deg: 0, shear_deg: 0, color_jitter: 0 }}
grid:
  backbone: [{backbone}]
  lr_decay: [{{ strategy: exponential, head_lr: 1.0e-4, factor: 3 }}]
  epoch_split: [[{FE_EPOCHS}, 1]]
",
        images.div_ceil(classes),
        images.div_ceil(classes * 4).max(1),
    );
    let spec = spec::parse(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));

    eprintln!("{backbone}: {images} training images at {size} px, batch {batch}, {threads} thread(s), on {list}");
    let off = run(&spec, &devices, false);
    let on = run(&spec, &devices, true);

    let strip = |m: &[EpochMetrics]| m.iter().map(|e| EpochMetrics { seconds: 0.0, ..*e }).collect::<Vec<_>>();
    let same_metrics = strip(&off.epochs) == strip(&on.epochs);
    let same_weights = off.state.len() == on.state.len()
        && off.state.iter().zip(&on.state).all(|((n, a), (m, b))| n == m && a.equal(b));

    let secs = |r: &Run, i: usize| r.epochs[i].seconds;
    let ft = |r: &Run| secs(r, FE_EPOCHS as usize);
    let later = |r: &Run| (1..FE_EPOCHS as usize).map(|i| secs(r, i)).sum::<f64>() / (FE_EPOCHS - 1) as f64;
    let cpu = sweep_worker::tools::cpu_model();
    println!();
    println!(
        "Feature extraction against fine-tuning: {backbone}, {} training + {} validation images at {size} px, batch {batch} per replica, {threads} thread(s), {cpu}, devices {list}",
        spec.dataset.image_counts().map_or(0, |s| s.0),
        spec.dataset.image_counts().map_or(0, |s| s.1),
    );
    println!("(trainer set-up: {:.2} s without the cache, {:.2} s with it)", off.setup, on.setup);
    println!();
    println!("| {:<40} | {:>12} | {:>12} | {:>14} |", "epoch, seconds", "cache off", "cache on", "on / off");
    println!("|{:-<42}|{:-<14}|{:-<14}|{:-<16}|", "", "", "", "");
    let row = |label: &str, a: f64, b: f64| {
        println!("| {label:<40} | {a:>12.3} | {b:>12.3} | {:>14} |", format!("{:.3}×", b / a));
    };
    row("feature extraction, first (cache built)", secs(&off, 0), secs(&on, 0));
    row(&format!("feature extraction, later (mean of {})", FE_EPOCHS - 1), later(&off), later(&on));
    row("fine-tuning", ft(&off), ft(&on));
    println!();
    println!("| {:<40} | {:>12} | {:>12} |", "feature extraction / fine-tuning", "cache off", "cache on");
    println!("|{:-<42}|{:-<14}|{:-<14}|", "", "", "");
    println!("| {:<40} | {:>11.3}× | {:>11.3}× |", "first epoch", secs(&off, 0) / ft(&off), secs(&on, 0) / ft(&on));
    println!("| {:<40} | {:>11.3}× | {:>11.3}× |", "later epochs", later(&off) / ft(&off), later(&on) / ft(&on));
    println!();
    println!(
        "Same metrics in every epoch: {}; same weights after the trial: {}",
        if same_metrics { "yes" } else { "NO" },
        if same_weights { "yes" } else { "NO" }
    );
    if !(same_metrics && same_weights) {
        std::process::exit(1);
    }
}
