//! The training input pipeline, sweep's against torchvision's, on the same JPEG files.
//!
//! ```text
//! cargo bench -p sweep-worker --bench input_pipeline
//! ```
//!
//! 1. Generates (once; reused from the same directory later) `SWEEP_BENCH_IMAGES` (2,000) JPEGs
//!    of varied sizes around 500×375, quality 90, in 10 class directories, with textured
//!    content (gradients, blobs, stripes, noise) so that decoding costs what it costs on photos.
//! 2. sweep: builds the uint8 cache (parallel decode, resize 256 + centre crop 224:
//!    `data::decode_split`, as `image_folder` and `flowers102` do), then runs
//!    `SWEEP_BENCH_EPOCHS` (3) epochs of training batches of 32 exactly as `train_pass` gets them
//!    (`data::prefetch::TrainBatches`: gather, flip, rotation + shear, colour jitter, normalise),
//!    in a seeded random order, inline unless `SWEEP_PREFETCH` sets a depth.
//! 3. torchvision: `tools/bench_torchvision_pipeline.py` with the venv's python
//!    (`SWEEP_PYTHON`, else `<repo>/.venv/bin/python`): `ImageFolder` + `DataLoader`, the same
//!    transforms, decoding every epoch.
//!
//! Both sides get `SWEEP_BENCH_THREADS` threads (default: the CPUs available): sweep uses that
//! many rayon threads to decode and augment (the CPU kernel; libtorch intra-op threads for the
//! tensor-operation epoch); torchvision that many
//! DataLoader worker processes (one torch thread each) and `torch.set_num_threads` in the main
//! process. Prints a table of images/s: the first epoch (sweep's including the cache build), the
//! later epochs, and the ratio sweep / torchvision. One more row decodes every file and does
//! nothing else, with the same decoder and threads: the ceiling of any first epoch that decodes
//! each image at full size, against torchvision's first epoch. And one more epoch augments by
//! tensor operations (`augment::train_batch_tensor_ops`: what CUDA devices run, and the CPU did
//! before its fused kernel), inline, for the before/after of that kernel. `SWEEP_BENCH_DIR` sets where the images go
//! (default: `sweep-bench-input-pipeline` in the system's temporary directory).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use image::codecs::jpeg::JpegEncoder;
use image::{Rgb, RgbImage};
use rayon::prelude::*;
use sweep_core::spec::Augment;
use sweep_worker::augment::{self, SampleParams};
use sweep_worker::data::{self, prefetch};
use sweep_worker::rng::{Rng, STREAM_AUGMENT, STREAM_SHUFFLE};
use sweep_worker::train;
use tch::Device;

const CLASSES: usize = 10;
const BATCH: usize = 32;
const IMAGE_SIZE: u32 = 224;
const SEED: u64 = 0;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok()).filter(|&v| v > 0).unwrap_or(default)
}

/// One textured image: a two-colour gradient, a few soft blobs ("petals"), stripes and noise.
fn draw(seed: u64, i: usize) -> RgbImage {
    let mut r = Rng::derive(seed, &[i as u64]);
    let portrait = r.bernoulli(0.25);
    let (long, short) = (450 + r.below(101) as u32, 340 + r.below(71) as u32);
    let (w, h) = if portrait { (short, long) } else { (long, short) };
    let c0 = [r.uniform(), r.uniform(), r.uniform()];
    let c1 = [r.uniform(), r.uniform(), r.uniform()];
    let blobs: Vec<(f64, f64, f64, [f64; 3])> = (0..3 + r.below(5))
        .map(|_| (r.uniform(), r.uniform(), r.uniform_in(0.05, 0.25), [r.uniform(), r.uniform(), r.uniform()]))
        .collect();
    let freq = r.uniform_in(5.0, 40.0);
    let angle = r.uniform_in(0.0, std::f64::consts::PI);
    let (sa, ca) = angle.sin_cos();
    let mut noise = Rng::derive(seed, &[i as u64, 1]);
    RgbImage::from_fn(w, h, |x, y| {
        let (u, v) = (x as f64 / w as f64, y as f64 / h as f64);
        let t = 0.5 * (u + v);
        let stripe = 0.08 * (freq * (u * ca + v * sa) * std::f64::consts::TAU).sin();
        let mut c = [0.0; 3];
        for k in 0..3 {
            c[k] = c0[k] * (1.0 - t) + c1[k] * t + stripe;
        }
        for &(bx, by, br, bc) in &blobs {
            let d2 = ((u - bx).powi(2) + (v - by).powi(2)) / (br * br);
            let a = (-d2).exp();
            for k in 0..3 {
                c[k] = c[k] * (1.0 - a) + bc[k] * a;
            }
        }
        Rgb(c.map(|v| ((v + 0.04 * noise.normal()).clamp(0.0, 1.0) * 255.0) as u8))
    })
}

/// The benchmark images (`dir/c00/i0000.jpg` …), generated unless a previous run completed them.
fn images(dir: &Path, n: usize) -> Vec<(PathBuf, i64)> {
    let items: Vec<(PathBuf, i64)> = (0..n)
        .map(|i| (dir.join(format!("c{:02}", i % CLASSES)).join(format!("i{i:05}.jpg")), (i % CLASSES) as i64))
        .collect();
    let stamp = dir.join(format!(".complete-{n}"));
    if stamp.is_file() {
        eprintln!("reusing {n} JPEGs in {}", dir.display());
        return items;
    }
    let start = Instant::now();
    for c in 0..CLASSES {
        std::fs::create_dir_all(dir.join(format!("c{c:02}"))).expect("create the image directory");
    }
    items.par_iter().enumerate().for_each(|(i, (path, _))| {
        let img = draw(0xbe7c4, i);
        let mut out = Vec::new();
        JpegEncoder::new_with_quality(&mut out, 90).encode_image(&img).expect("encode a JPEG");
        std::fs::write(path, out).expect("write a JPEG");
    });
    std::fs::write(&stamp, b"").expect("write the stamp");
    eprintln!("generated {n} JPEGs in {} in {:.1} s", dir.display(), start.elapsed().as_secs_f64());
    items
}

struct Figures {
    /// Seconds of one later epoch with the augmentation by tensor operations (sweep), the CPU's
    /// path before its fused kernel and what CUDA devices run; 0 for torchvision.
    tensor_ops: f64,
    /// Seconds to decode every file and nothing else (sweep) or 0 (torchvision).
    decode: f64,
    /// Seconds to build the cache (sweep) or 0 (torchvision).
    build: f64,
    /// Seconds of each epoch.
    epochs: Vec<f64>,
}

impl Figures {
    fn first(&self, n: usize) -> f64 {
        n as f64 / (self.build + self.epochs[0])
    }

    fn later(&self, n: usize) -> Option<f64> {
        let later = &self.epochs[1..];
        (!later.is_empty()).then(|| n as f64 * later.len() as f64 / later.iter().sum::<f64>())
    }
}

/// Seconds to decode every file to RGB and nothing else (`data::decode_rgb`, the cache build's
/// decode step, on the same threads): the floor under any first epoch that decodes each
/// image once at full size.
fn decode_alone(items: &[(PathBuf, i64)]) -> f64 {
    let start = Instant::now();
    items.par_iter().for_each(|(path, _)| {
        std::hint::black_box(data::decode_rgb(path).expect("decode a JPEG"));
    });
    start.elapsed().as_secs_f64()
}

/// The prefetch depth here: 0 (inline) unless `SWEEP_PREFETCH` says otherwise. Inline, the CPU
/// kernel spreads a batch over every thread; in the prefetch thread it runs on that thread alone,
/// since in training the model's step has the cores. With no model here, inline is the
/// pipeline's throughput.
fn bench_depth() -> usize {
    if std::env::var_os(prefetch::PREFETCH_ENV).is_some() { prefetch::prefetch_depth() } else { 0 }
}

fn sweep_pipeline(items: &[(PathBuf, i64)], epochs: usize) -> Figures {
    let decode = decode_alone(items);
    eprintln!("decode alone: {} images in {decode:.2} s = {:.1} images/s", items.len(), items.len() as f64 / decode);
    let start = Instant::now();
    let mut skipped = Vec::new();
    let split = data::decode_split(items, IMAGE_SIZE, false, &mut skipped).expect("decode the images");
    let build = start.elapsed().as_secs_f64();
    eprintln!("sweep cache build: {} images in {build:.2} s = {:.1} images/s", items.len(), items.len() as f64 / build);
    let (x, y) = split.to_tensors(Device::Cpu).expect("tensors");
    let aug = Augment::default();
    let depth = bench_depth();
    let mut times = Vec::new();
    for epoch in 1..=epochs as u64 {
        let order = Rng::derive(SEED, &[STREAM_SHUFFLE, epoch]).permutation(split.len());
        let batches: Vec<Vec<i64>> = train::batches(&order, BATCH).into_iter().map(<[i64]>::to_vec).collect();
        let rng = Rng::derive(SEED, &[STREAM_AUGMENT, epoch]);
        let start = Instant::now();
        let mut n = 0;
        for b in prefetch::TrainBatches::new(&x, &y, batches, aug, rng, depth) {
            let b = b.expect("a batch");
            n += b.len;
            std::hint::black_box(&b.images);
        }
        let s = start.elapsed().as_secs_f64();
        eprintln!("sweep epoch {epoch}: {n} images in {s:.2} s = {:.1} images/s", n as f64 / s);
        times.push(s);
    }
    let tensor_ops = tensor_ops_epoch(&x, &y, split.len(), epochs as u64 + 1);
    eprintln!("sweep epoch by tensor operations: {} images in {tensor_ops:.2} s", split.len());
    Figures { tensor_ops, decode, build, epochs: times }
}

/// Seconds of one epoch whose batches are gathered and augmented inline by the tensor operations
/// (`augment::train_batch_tensor_ops`) instead of the CPU kernel; same order and draws as an
/// epoch of [`sweep_pipeline`].
fn tensor_ops_epoch(x: &tch::Tensor, y: &tch::Tensor, n: usize, epoch: u64) -> f64 {
    let order = Rng::derive(SEED, &[STREAM_SHUFFLE, epoch]).permutation(n);
    let aug = Augment::default();
    let mut rng = Rng::derive(SEED, &[STREAM_AUGMENT, epoch]);
    let start = Instant::now();
    tch::no_grad(|| {
        for b in train::batches(&order, BATCH) {
            let params: Vec<SampleParams> = b.iter().map(|_| SampleParams::draw(&aug, &mut rng)).collect();
            let t = tch::Tensor::from_slice(b);
            let images = augment::train_batch_tensor_ops(&x.index_select(0, &t), &aug, &params).expect("a batch");
            let _ = std::hint::black_box((images, y.index_select(0, &t)));
        }
    });
    start.elapsed().as_secs_f64()
}

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("SWEEP_PYTHON") {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python")
}

fn torchvision_pipeline(dir: &Path, threads: usize, epochs: usize) -> Result<(Figures, String), String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/bench_torchvision_pipeline.py");
    let python = python();
    let out = Command::new(&python)
        .arg(&script)
        .args(["--root", &dir.display().to_string()])
        .args(["--threads", &threads.to_string(), "--epochs", &epochs.to_string(), "--json"])
        .args(["--batch-size", &BATCH.to_string(), "--image-size", &IMAGE_SIZE.to_string()])
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run {}: {e} (set SWEEP_PYTHON)", python.display()))?;
    if !out.status.success() {
        return Err(format!("{} {} failed with {}", python.display(), script.display(), out.status));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("bad JSON from the script: {e}"))?;
    let epochs: Vec<f64> =
        v["epochs"].as_array().map(|a| a.iter().filter_map(|e| e["seconds"].as_f64()).collect()).unwrap_or_default();
    if epochs.is_empty() {
        return Err(format!("no epoch in the script's output: {line}"));
    }
    let versions = format!(
        "torch {}, torchvision {}",
        v["torch"].as_str().unwrap_or("?"),
        v["torchvision"].as_str().unwrap_or("?")
    );
    Ok((Figures { tensor_ops: 0.0, decode: 0.0, build: 0.0, epochs }, versions))
}

fn main() {
    // malloc as the worker process sets it (first thing, before libtorch allocates).
    let malloc = sweep_worker::alloc::tune();
    let n = env_usize("SWEEP_BENCH_IMAGES", 2000);
    let epochs = env_usize("SWEEP_BENCH_EPOCHS", 3).max(2);
    let threads = env_usize("SWEEP_BENCH_THREADS", std::thread::available_parallelism().map_or(1, |n| n.get()));
    let dir = std::env::var_os("SWEEP_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("sweep-bench-input-pipeline"));
    train::set_threads(threads);

    let items = images(&dir, n);
    let ours = sweep_pipeline(&items, epochs);
    let theirs = torchvision_pipeline(&dir, threads, epochs);

    let cpu = sweep_worker::tools::cpu_model();
    println!();
    println!(
        "Input pipeline: {n} JPEGs (~500×375, q90), batch {BATCH}, {IMAGE_SIZE} px, {threads} thread(s), {cpu}, prefetch depth {}, malloc {:?}",
        bench_depth(),
        malloc
    );
    if let Ok((_, versions)) = &theirs {
        println!("torchvision baseline: {versions}, {threads} DataLoader worker(s)");
    }
    println!();
    println!("| {:<44} | {:>12} | {:>12} | {:>8} |", "images/s", "sweep", "torchvision", "ratio");
    println!("|{:-<46}|{:-<14}|{:-<14}|{:-<10}|", "", "", "", "");
    let row = |label: &str, ours: f64, theirs: Option<f64>| {
        let (t, ratio) = match theirs {
            Some(t) => (format!("{t:.1}"), format!("{:.1}×", ours / t)),
            None => ("—".into(), "—".into()),
        };
        println!("| {label:<44} | {ours:>12.1} | {t:>12} | {ratio:>8} |");
    };
    let tv = theirs.as_ref().ok().map(|(f, _)| f);
    println!(
        "| {:<44} | {:>12} | {:>12} | {:>8} |",
        "cache build (decode + resize + crop), s",
        format!("{:.2}", ours.build),
        "—",
        "—"
    );
    row("first epoch (sweep: cache build included)", ours.first(n), tv.map(|f| f.first(n)));
    // No first epoch that decodes every image at full size can beat this row.
    row("decode alone: the first epoch's ceiling", n as f64 / ours.decode, tv.map(|f| f.first(n)));
    row(&format!("later epochs (mean of {})", epochs - 1), ours.later(n).unwrap_or(0.0), tv.and_then(|f| f.later(n)));
    row("later epoch, augmented by tensor operations", n as f64 / ours.tensor_ops, tv.and_then(|f| f.later(n)));
    if let Err(e) = &theirs {
        println!("\ntorchvision baseline not run: {e}");
    }
}
