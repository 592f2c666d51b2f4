//! `sweep-worker`: the worker daemon (default) and the worker's offline tools.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use clap::{Parser, Subcommand, ValueEnum};
use sweep_core::Backbone;
use sweep_core::lr::LrDecay;
use sweep_worker::artifacts::ArtifactStore;
use sweep_worker::daemon::{self, DaemonOptions};
use sweep_worker::{devices, dist, tools, train};

const EXAMPLES: &str = "\
Examples:
  sweep-worker --coordinator http://coordinator:7070
  sweep-worker --coordinator http://127.0.0.1:7070 --devices cpu --threads 4
  sweep-worker --coordinator http://coordinator:7070 --devices cuda:0,cuda:1
  sweep-worker allreduce-check --devices cuda:0,cuda:1     # NCCL on this machine, verified and timed
  SWEEP_WEIGHTS_DIR=/models sweep-worker      # ImageNet weights as <backbone>.safetensors
  sweep-worker inspect --backbone vgg16_bn --lr-decay linear --head-lr 1e-4 --final-lr 1e-7
  sweep-worker predict --backbone resnet50 --weights .sweep/artifacts/<sweep>/t003/best.safetensors rose.jpg";

#[derive(Parser)]
#[command(name = "sweep-worker", version, about = "Trains the trials of sweeps with libtorch and reports to a coordinator", after_help = EXAMPLES)]
struct Args {
    #[command(subcommand)]
    tool: Option<Tool>,
    /// Coordinator URL.
    #[arg(long, env = "SWEEP_COORDINATOR", default_value = "http://127.0.0.1:7070")]
    coordinator: String,
    /// Name shown in `sweep workers` (default: host name and process id).
    #[arg(long, env = "SWEEP_WORKER_NAME")]
    name: Option<String>,
    /// Devices to announce and train on: `cpu`, CPU slots `cpu:0,cpu:1` (one trial each, or
    /// one trial data-parallel over them), or `cuda:0,cuda:1` [default: every CUDA device
    /// libtorch sees, else cpu]. The tools use the first.
    #[arg(long, visible_alias = "device", env = "SWEEP_DEVICES", global = true, value_name = "LIST")]
    devices: Option<String>,
    /// Threads libtorch may use inside one operation, and the threads that decode images and
    /// augment CPU batches (default: all cores).
    #[arg(long, env = "SWEEP_THREADS", global = true)]
    threads: Option<usize>,
    /// Directory of ImageNet weights, `<backbone>.safetensors`.
    #[arg(long, env = train::WEIGHTS_DIR_ENV)]
    weights_dir: Option<PathBuf>,
    /// The artifact store for checkpoints and resume points (`<sweep>/<trial>/…`): a
    /// directory, or `s3://bucket/prefix` on an S3-compatible store configured by the usual
    /// AWS_* variables (AWS_ENDPOINT for MinIO and others). Every worker of a sweep must use
    /// the same one.
    #[arg(long, env = "SWEEP_ARTIFACTS", default_value = ".sweep/artifacts", value_name = "DIR|URL")]
    artifacts: String,
    /// Where pretrained weights are cached (share it between the workers of a machine); local
    /// copies of artifacts pass through `<dir>/scratch`.
    #[arg(long, env = "SWEEP_CACHE_DIR", default_value = ".sweep/cache")]
    cache_dir: PathBuf,
    #[command(flatten)]
    client: sweep_session::connect::ClientArgs,
    /// Serve Prometheus `/metrics` and `/healthz` over HTTP here (e.g. 0.0.0.0:9091).
    #[arg(long, env = "SWEEP_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Memory this worker may fill with decoded images (`16G`, `512M`, or bytes) [default: the
    /// machine's memory, or its container's limit]. A trial whose dataset needs more fails at
    /// once, saying how much it needs, instead of exhausting the machine.
    #[arg(long, env = "SWEEP_MEMORY_LIMIT", value_name = "SIZE", value_parser = parse_size)]
    memory_limit: Option<u64>,
    /// Longest wait of one request for work, in seconds.
    #[arg(long, default_value_t = 20)]
    poll_wait: u64,
    /// Print this machine's devices as announced to the coordinator, and exit.
    #[arg(long)]
    list_devices: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Strategy {
    Linear,
    Exponential,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Precision {
    Fp32,
    Fp16,
}

/// How the bench's Adam holds its parameters.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum AdamLayout {
    /// What training uses: flat buffers on CUDA, one parameter at a time on the CPU.
    Auto,
    /// One flat buffer, a few kernels per learning-rate group.
    Flat,
    /// One parameter at a time.
    Loop,
}

#[derive(Subcommand)]
enum Tool {
    /// Check the data-parallel collectives on --devices [default: every CUDA device]: build
    /// the group training builds (NCCL for CUDA devices, in-process for CPU slots),
    /// all-reduce known gradients through the training code path (25 MB buckets), broadcast
    /// parameters, verify every element, and time the gradient all-reduce. Fails when a
    /// result is wrong or the backend is missing.
    AllreduceCheck {
        /// Timed gradient all-reduces (after one untimed).
        #[arg(long, default_value_t = 20)]
        repetitions: usize,
        #[arg(long, short, value_enum, default_value = "table")]
        output: Output,
    },
    /// Measure training throughput (images/s) of a backbone on random images: forward,
    /// cross-entropy, backward and Adam over every parameter; compare with
    /// tools/bench_torch_train.py (PyTorch eager, same work).
    Bench {
        #[arg(long, default_value = "resnet50")]
        backbone: String,
        #[arg(long, default_value_t = 64)]
        batch: i64,
        #[arg(long, default_value_t = 224)]
        image_size: i64,
        #[arg(long, default_value_t = 30)]
        steps: usize,
        #[arg(long, default_value_t = 5)]
        warmup: usize,
        #[arg(long, value_enum, default_value = "fp32")]
        precision: Precision,
        /// Adam as training runs it (auto), over flat buffers, or one parameter at a time.
        #[arg(long, value_enum, default_value = "auto")]
        adam: AdamLayout,
        /// Instead of timing: step the flat-buffer Adam and the per-parameter one with the same
        /// gradients and say whether they stay bit-identical (exit status 1 if not).
        #[arg(long)]
        compare_adam: bool,
        #[arg(long, short, value_enum, default_value = "table")]
        output: Output,
    },
    /// Show a backbone's parameters, head, and layer groups with their fine-tuning learning
    /// rates (the recipe's exploratory model analysis).
    Inspect {
        /// Backbone name (see `sweep validate` for the list).
        #[arg(long)]
        backbone: String,
        /// Learning-rate decay strategy to apply to the groups.
        #[arg(long, value_enum)]
        lr_decay: Option<Strategy>,
        /// Learning rate of the head group [default: 1e-4].
        #[arg(long)]
        head_lr: Option<f64>,
        /// linear: learning rate of the group at the input [default: head_lr / 1000].
        #[arg(long)]
        final_lr: Option<f64>,
        /// exponential: divisor from one group to the next towards the input [default: 3].
        #[arg(long)]
        factor: Option<f64>,
        /// Learning rate of parameters in no group.
        #[arg(long, default_value_t = 1e-8)]
        default_lr: f64,
        /// Outputs of the head.
        #[arg(long, default_value_t = 1000)]
        num_classes: i64,
        #[arg(long, short, value_enum, default_value = "table")]
        output: Output,
    },
    /// Classify images with trained weights (the validation transforms: resize, centre crop,
    /// ImageNet normalisation).
    Predict {
        /// The architecture [default: the one the weights' .json metadata names].
        #[arg(long)]
        backbone: Option<String>,
        /// A `.safetensors` state dict, e.g. a trial's best.safetensors (its .json metadata
        /// supplies class names and image size): a path, or `s3://bucket/key` as `sweep trial`
        /// shows it.
        #[arg(long, value_name = "PATH|URL")]
        weights: String,
        /// Outputs of the head [default: from the metadata or the weights].
        #[arg(long)]
        num_classes: Option<i64>,
        /// Crop size [default: from the metadata, else 224].
        #[arg(long)]
        image_size: Option<u32>,
        /// How many classes to show per image.
        #[arg(long, default_value_t = 5)]
        top: usize,
        #[arg(long, short, value_enum, default_value = "table")]
        output: Output,
        /// Images to classify.
        #[arg(required = true)]
        images: Vec<PathBuf>,
    },
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "worker".into())
}

fn main() -> ExitCode {
    // Before anything allocates: libtorch's buffers are reused, not mapped afresh every step.
    let tuned = sweep_worker::alloc::tune();
    let args = Args::parse();
    // The tools end quietly on a closed pipe (`sweep-worker inspect | head`); SIGPIPE stays
    // ignored, so that a connection that breaks mid-write is an error, never a silent death.
    sweep_session::exit_quietly_on_closed_stdout();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: logs in files stay greppable.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if std::env::var("SWEEP_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().with_current_span(false).init();
    } else {
        builder.with_ansi(ansi).init();
    }
    if tuned == sweep_worker::alloc::Tuned::Refused {
        tracing::warn!("malloc refused the settings that keep tensor memory for reuse; training may be slower");
    }
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Errors quote the coordinator's messages and files' names.
            eprintln!("error: {}", sweep_core::text::terminal(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}

fn backbone(name: &str) -> anyhow::Result<Backbone> {
    Backbone::from_name(name).ok_or_else(|| {
        anyhow::anyhow!("unknown backbone `{name}`; valid: {}", sweep_core::backbone::names().join(", "))
    })
}

fn positive(flag: &str, v: f64) -> anyhow::Result<f64> {
    if !v.is_finite() || v <= 0.0 {
        bail!("{flag} must be a number greater than 0, got {v}");
    }
    Ok(v)
}

fn decay(
    strategy: Option<Strategy>,
    head_lr: Option<f64>,
    final_lr: Option<f64>,
    factor: Option<f64>,
) -> anyhow::Result<Option<LrDecay>> {
    let head = positive("--head-lr", head_lr.unwrap_or(1e-4))?;
    match strategy {
        None => {
            if head_lr.is_some() || final_lr.is_some() || factor.is_some() {
                bail!("--head-lr, --final-lr and --factor need --lr-decay linear|exponential");
            }
            Ok(None)
        }
        Some(Strategy::Linear) => {
            if factor.is_some() {
                bail!("--factor is a setting of --lr-decay exponential, not linear");
            }
            let final_lr = positive("--final-lr", final_lr.unwrap_or(head / 1000.0))?;
            Ok(Some(LrDecay::Linear { head_lr: head, final_lr }))
        }
        Some(Strategy::Exponential) => {
            if final_lr.is_some() {
                bail!("--final-lr is a setting of --lr-decay linear, not exponential");
            }
            let factor = factor.unwrap_or(3.0);
            if !factor.is_finite() || factor < 1.0 {
                bail!("--factor must be a number of at least 1, got {factor}");
            }
            Ok(Some(LrDecay::Exponential { head_lr: head, factor }))
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    if let Some(n) = args.threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        train::set_threads(n);
    }
    let selected = match &args.devices {
        Some(list) => Some(devices::parse_devices(list).map_err(|e| anyhow::anyhow!("--devices {list}: {e}"))?),
        None => None,
    };
    let device = selected.as_ref().map_or_else(daemon::default_device, |s| s[0].1);
    match args.tool {
        Some(Tool::Inspect { backbone: b, lr_decay, head_lr, final_lr, factor, default_lr, num_classes, output }) => {
            let decay = decay(lr_decay, head_lr, final_lr, factor)?;
            if num_classes < 1 {
                bail!("--num-classes must be at least 1");
            }
            let report =
                tools::inspect(backbone(&b)?, num_classes, decay.as_ref(), positive("--default-lr", default_lr)?)?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
                Output::Table => print!("{}", sweep_core::text::terminal(&tools::inspection_text(&report))),
            }
            return Ok(());
        }
        Some(Tool::Bench { backbone: b, batch, image_size, steps, warmup, precision, adam, compare_adam, output }) => {
            let options = tools::BenchOptions {
                backbone: backbone(&b)?,
                batch,
                image_size,
                steps,
                warmup,
                fp16: precision == Precision::Fp16,
                flat_adam: match adam {
                    AdamLayout::Auto => None,
                    AdamLayout::Flat => Some(true),
                    AdamLayout::Loop => Some(false),
                },
                device,
            };
            if compare_adam {
                let c = tools::compare_adam_layouts(&options)?;
                match output {
                    Output::Json => println!("{}", serde_json::to_string(&c)?),
                    Output::Table => println!(
                        "{} on {}, {} steps, {} parameters: flat-buffer and per-parameter Adam {}",
                        c.backbone,
                        c.device,
                        c.steps,
                        c.parameters,
                        if c.identical {
                            "bit-identical".to_string()
                        } else {
                            format!("DIFFER in {}", c.differing.join(", "))
                        }
                    ),
                }
                if !c.identical {
                    std::process::exit(1);
                }
                return Ok(());
            }
            let r = tools::bench_training(&options)?;
            match output {
                Output::Json => println!("{}", serde_json::to_string(&r)?),
                Output::Table => println!(
                    "{} {} batch {} at {} px on {}: {:.1} images/s ({} steps in {:.2}s); per step: forward {:.1} ms, \
                     backward {:.1} ms, optimizer {:.1} ms",
                    r.backbone,
                    r.precision,
                    r.batch,
                    r.image_size,
                    r.device,
                    r.images_per_second,
                    r.steps,
                    r.seconds,
                    r.phases.forward * 1e3,
                    r.phases.backward * 1e3,
                    r.phases.optimizer * 1e3
                ),
            }
            return Ok(());
        }
        Some(Tool::Predict { backbone: b, weights, num_classes, image_size, top, output, images }) => {
            let download = tempfile::tempdir()?;
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
            let weights = sweep_worker::artifacts::fetch_url(&weights, download.path(), rt.handle())?;
            let predictor = tools::Predictor::load(&tools::PredictOptions {
                backbone: b.as_deref().map(backbone).transpose()?,
                weights,
                num_classes,
                image_size,
                top,
                device,
            })?;
            let all = images.iter().map(|i| predictor.predict(i)).collect::<anyhow::Result<Vec<_>>>()?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&all)?),
                Output::Table => print!("{}", sweep_core::text::terminal(&tools::predictions_text(&all))),
            }
            return Ok(());
        }
        Some(Tool::AllreduceCheck { repetitions, output }) => {
            let report = match &selected {
                Some(s) => dist::check::allreduce_check(&s.iter().map(|(_, d)| *d).collect::<Vec<_>>(), repetitions),
                None => dist::check::allreduce_check_visible(repetitions).map_err(|e| {
                    dist::DistError::Unavailable(format!("{e}; give --devices cpu:0,cpu:1 to check the CPU backend"))
                }),
            }
            .map_err(|e| anyhow::anyhow!("all-reduce check: {e}"))?;
            let mut report = report;
            if let Some(s) = &selected {
                // The ids as given (`cpu:0`, `cpu:1`), not the libtorch device (`cpu`, `cpu`).
                report.devices = s.iter().map(|(id, _)| id.clone()).collect();
            }
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
                Output::Table => print!("{}", dist::check::report_text(&report)),
            }
            if !report.ok {
                bail!("all-reduce check: wrong results (see above)");
            }
            return Ok(());
        }
        None => {}
    }
    let cpu_slots = selected.as_ref().map_or(0, |s| s.iter().filter(|(_, d)| *d == tch::Device::Cpu).count());
    if cpu_slots > 1 && args.threads.is_none() {
        // Trials on different slots run at once: share the cores instead of oversubscribing.
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        train::set_intra_op_threads((cores / cpu_slots).max(1));
    }
    if let Some(limit) = args.memory_limit {
        sweep_worker::data::set_memory_limit(limit);
    }
    let devices = daemon::inventory(selected.as_deref());
    if args.list_devices {
        for d in &devices {
            println!("{}\t{}\t{}", d.id, d.name, d.memory_bytes);
        }
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let cache_dir = std::path::absolute(&args.cache_dir)?;
    let artifacts = ArtifactStore::open(&args.artifacts, &cache_dir.join("scratch"), runtime.handle().clone())?;
    // A store that does not answer stops start-up, not every trial later.
    runtime.block_on(artifacts.check())?;
    artifacts.clean_stale_scratch();
    // Unreadable token or certificate files stop start-up here, naming the file.
    let security = args.client.security()?;
    let options = DaemonOptions {
        coordinator: args.coordinator,
        name: args.name.unwrap_or_else(|| format!("{}-{}", host_name(), std::process::id())),
        device,
        devices,
        weights_dir: args.weights_dir,
        artifacts,
        cache_dir,
        poll_wait: Duration::from_secs(args.poll_wait.clamp(1, 30)),
        security,
    };
    tracing::info!("{}", daemon::describe(&options));
    let metrics_devices = std::sync::Arc::new(options.devices.clone());
    runtime.block_on(async move {
        if let Some(listen) = args.metrics_listen {
            let (bound, _task) = sweep_session::http::serve(listen, sweep_worker::metrics::router(metrics_devices))
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {listen} (metrics): {e}"))?;
            tracing::info!(addr = %bound, "metrics on http://{bound}/metrics");
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let shutdown = async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        };
        daemon::run(options, shutdown).await
    })
}

/// A size in bytes, with an optional `K`, `M`, `G` or `T` suffix (powers of 1024).
fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (digits, shift) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 10),
        Some('M') => (&t[..t.len() - 1], 20),
        Some('G') => (&t[..t.len() - 1], 30),
        Some('T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    digits
        .trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1u64 << shift))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("`{text}` is not a size (bytes, or a number with K, M, G or T)"))
}
