//! `sweep-worker`: the worker daemon (default) and the worker's offline tools.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use sweep_worker::daemon::{self, DaemonOptions};
use sweep_worker::train;

const EXAMPLES: &str = "\
Examples:
  sweep-worker --coordinator http://coordinator:7070
  sweep-worker --coordinator http://127.0.0.1:7070 --device cpu --threads 4
  SWEEP_WEIGHTS_DIR=/models sweep-worker      # ImageNet weights as <backbone>.safetensors";

#[derive(Parser)]
#[command(name = "sweep-worker", version, about = "Trains the trials of sweeps with libtorch and reports to a coordinator", after_help = EXAMPLES)]
struct Args {
    /// Coordinator URL.
    #[arg(long, env = "SWEEP_COORDINATOR", default_value = "http://127.0.0.1:7070")]
    coordinator: String,
    /// Name shown in `sweep workers` (default: host name and process id).
    #[arg(long, env = "SWEEP_WORKER_NAME")]
    name: Option<String>,
    /// Training device: `cpu` or `cuda:N` (default: cuda:0 when CUDA is usable, else cpu).
    #[arg(long, env = "SWEEP_DEVICE")]
    device: Option<String>,
    /// Threads libtorch may use inside one operation (default: all cores).
    #[arg(long, env = "SWEEP_THREADS")]
    threads: Option<usize>,
    /// Directory of ImageNet weights, `<backbone>.safetensors`.
    #[arg(long, env = train::WEIGHTS_DIR_ENV)]
    weights_dir: Option<PathBuf>,
    /// Where checkpoints are written (`<dir>/<sweep>/<trial>/{best,last}.safetensors`).
    #[arg(long, env = "SWEEP_ARTIFACTS_DIR", default_value = ".sweep/artifacts")]
    artifacts: PathBuf,
    /// Longest wait of one request for work, in seconds.
    #[arg(long, default_value_t = 20)]
    poll_wait: u64,
    /// Print this machine's devices as announced to the coordinator, and exit.
    #[arg(long)]
    list_devices: bool,
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "worker".into())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let devices = daemon::inventory();
    if args.list_devices {
        for d in &devices {
            println!("{}\t{}\t{}", d.id, d.name, d.memory_bytes);
        }
        return Ok(());
    }
    if let Some(n) = args.threads {
        if n == 0 {
            anyhow::bail!("--threads must be at least 1");
        }
        train::set_intra_op_threads(n);
    }
    let device = match &args.device {
        Some(d) => daemon::parse_device(d)?,
        None => daemon::default_device(),
    };
    let options = DaemonOptions {
        coordinator: args.coordinator,
        name: args.name.unwrap_or_else(|| format!("{}-{}", host_name(), std::process::id())),
        device,
        devices,
        weights_dir: args.weights_dir,
        // Checkpoint paths go to the coordinator and are read by other processes.
        artifacts: std::path::absolute(&args.artifacts)?,
        poll_wait: Duration::from_secs(args.poll_wait.clamp(1, 30)),
    };
    tracing::info!("{}", daemon::describe(&options));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move {
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
