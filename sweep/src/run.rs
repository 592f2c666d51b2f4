//! `sweep run`: a whole sweep on this machine.
//!
//! Starts an embedded coordinator on a loopback port over `--state-dir`, spawns N
//! `sweep-worker` processes pointed at it, submits the spec, prints progress from the
//! `WatchSweep` stream, prints the leaderboard when the sweep ends, and stops its workers.
//! Everything goes through the same gRPC services a cluster uses; the state directory can be
//! read afterwards with the read commands' `--state-dir`, or served with `sweep coordinator
//! --state-dir`.

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use sweep_core::spec::ParseOptions;
use sweep_core::state::SweepState;
use tokio::process::{Child, Command};

use sweep_cli::client::{self as cli, Client};
use sweep_cli::output::{self, TableFormat};
use sweep_cli::watch::{self, Stream, View};
use sweep_coordinator::server;

pub struct RunOptions {
    pub spec: PathBuf,
    pub workers: usize,
    pub state_dir: PathBuf,
    pub threads_per_worker: Option<usize>,
    pub worker_bin: Option<PathBuf>,
    /// The workers' artifact store (a directory or `s3://bucket/prefix`) [default:
    /// `<state_dir>/artifacts`].
    pub artifacts: Option<String>,
    pub output: TableFormat,
    /// Tags and a note for the sweep.
    pub labels: cli::Labels,
}

/// Finds `sweep-worker`: an explicit path, next to this executable, or on PATH.
pub fn find_worker(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        if p.is_file() {
            return Ok(p);
        }
        bail!("worker binary {} does not exist", p.display());
    }
    if let Ok(exe) = std::env::current_exe() {
        let sibling = exe.with_file_name("sweep-worker");
        if sibling.is_file() {
            return Ok(sibling);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("sweep-worker");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    bail!("cannot find `sweep-worker` next to `sweep` or on PATH; build it with `make build`, or pass --worker-bin")
}

struct Worker {
    n: usize,
    child: Child,
    log: PathBuf,
    exited: Option<std::process::ExitStatus>,
}

async fn spawn_workers(
    bin: &Path,
    url: &str,
    n: usize,
    threads: usize,
    state_dir: &Path,
    artifacts: Option<&str>,
    logs: &Path,
) -> anyhow::Result<Vec<Worker>> {
    let artifacts = match artifacts {
        Some(a) => a.to_string(),
        None => std::path::absolute(state_dir.join("artifacts"))?.display().to_string(),
    };
    let cache = std::path::absolute(state_dir.join("cache"))?;
    let mut workers = Vec::new();
    let parent = std::process::id() as libc::pid_t;
    for i in 1..=n {
        let log = logs.join(format!("worker-{i}.log"));
        let file = std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let err = file.try_clone()?;
        let mut command = Command::new(bin);
        command
            .arg("--coordinator")
            .arg(url)
            .arg("--name")
            .arg(format!("run-{i}"))
            .arg("--threads")
            .arg(threads.to_string())
            .arg("--artifacts")
            .arg(&artifacts)
            .arg("--cache-dir")
            .arg(&cache)
            .stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err))
            .kill_on_drop(true);
        // The workers end with this process, however it ends (a closed pipe, a kill, a
        // panic): the kernel sends them SIGTERM when their parent goes. Spawned from the
        // thread that lives as long as the process (the death signal follows the spawning
        // thread, not the process).
        // SAFETY: only async-signal-safe calls (prctl, getppid, _exit) between fork and exec.
        unsafe {
            command.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong, 0, 0, 0);
                // The parent may have died before the line above: then nobody stops this one.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let child = command.spawn().with_context(|| format!("cannot start {}", bin.display()))?;
        workers.push(Worker { n: i, child, log, exited: None });
    }
    Ok(workers)
}

/// Asks every worker to stop (SIGTERM), waits up to `grace`, then kills what is left.
async fn stop_workers(workers: &mut [Worker], grace: Duration) {
    for w in workers.iter() {
        if w.exited.is_none()
            && let Some(pid) = w.child.id()
        {
            // SAFETY: plain kill(2) on a child we spawned and have not reaped.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
    }
    let deadline = tokio::time::Instant::now() + grace;
    for w in workers.iter_mut() {
        if w.exited.is_some() {
            continue;
        }
        match tokio::time::timeout_at(deadline, w.child.wait()).await {
            Ok(Ok(status)) => w.exited = Some(status),
            _ => {
                let _ = w.child.start_kill();
                w.exited = w.child.wait().await.ok();
            }
        }
    }
}

pub async fn run(o: RunOptions) -> anyhow::Result<ExitCode> {
    let (text, parsed) = cli::load_spec(&o.spec, ParseOptions::default())?;
    if o.workers == 0 {
        bail!("--workers must be at least 1");
    }
    let bin = find_worker(o.worker_bin.clone())?;
    let threads = o.threads_per_worker.unwrap_or_else(|| {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        (cores / o.workers).max(1)
    });
    // The coordinator first: it locks and checks the state directory before anything is
    // written into it.
    let config = server::Config::new(([127, 0, 0, 1], 0).into(), o.state_dir.clone());
    let server = server::start(config).await?;
    let logs = o.state_dir.join("logs");
    if let Err(e) = std::fs::create_dir_all(&logs) {
        server.stop().await?;
        bail!("cannot create {}: {e}", logs.display());
    }
    let url = format!("http://{}", server.addr);
    let mut client = Client::connect(&url).await?;
    let submitted = client.submit_labelled(text, o.spec.display().to_string(), &o.labels).await?;
    let sweep_id = submitted.sweep_id.clone();
    output::eprint(&format!(
        "sweep {sweep_id}: {} trials of `{}` on {} local worker{} ({threads} thread{} each)\nstate: {}   worker logs: {}",
        submitted.trial_count,
        parsed.name,
        o.workers,
        if o.workers == 1 { "" } else { "s" },
        if threads == 1 { "" } else { "s" },
        o.state_dir.display(),
        logs.display()
    ));
    // Earlier sweeps in this state directory may have computed some of it already.
    if let Some(line) = output::reused_line(&submitted) {
        output::eprint(&line);
    }

    let mut workers =
        spawn_workers(&bin, &url, o.workers, threads, &o.state_dir, o.artifacts.as_deref(), &logs).await?;
    let result = follow(&mut client, &sweep_id, &mut workers).await;
    stop_workers(&mut workers, Duration::from_secs(10)).await;

    let outcome = match result {
        Ok(Follow::Ended) => {
            let board = client.get_leaderboard(&sweep_id).await?;
            eprintln!();
            cli::print_leaderboard(&board, o.output)?;
            let status = client.get_status(&sweep_id).await?;
            let summary = status.sweep.unwrap_or_default();
            eprintln!(
                "\nsweep {sweep_id} {}: {}. Read it later with:\n  sweep status {sweep_id} --state-dir {dir}    (also leaderboard, trial, best, export, plot)\nor serve it: sweep coordinator --state-dir {dir}",
                summary.state,
                output::counts_line(&summary),
                dir = o.state_dir.display()
            );
            let completed = SweepState::parse(&summary.state) == Some(SweepState::Completed);
            if completed { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
        Ok(Follow::Interrupted) => {
            eprintln!("\ninterrupted; sweep {sweep_id} is kept in {}", o.state_dir.display());
            ExitCode::from(130)
        }
        Err(e) => {
            server.stop().await?;
            return Err(e);
        }
    };
    server.stop().await?;
    Ok(outcome)
}

enum Follow {
    Ended,
    Interrupted,
}

/// Follows the sweep (live bars on a terminal, lines otherwise, on stderr: the leaderboard goes
/// to stdout) while checking that the local workers are alive.
async fn follow(client: &mut Client, sweep_id: &str, workers: &mut [Worker]) -> anyhow::Result<Follow> {
    let mut view = View::new(Stream::Stderr, true);
    let check_workers = |view: &View| -> anyhow::Result<()> {
        let mut alive = 0;
        for w in workers.iter_mut() {
            if w.exited.is_some() {
                continue;
            }
            match w.child.try_wait() {
                Ok(Some(status)) => {
                    w.exited = Some(status);
                    view.say(&format!("worker {} exited ({status}); its log: {}", w.n, w.log.display()));
                }
                Ok(None) => alive += 1,
                Err(e) => return Err(anyhow!("cannot check worker {}: {e}", w.n)),
            }
        }
        if alive == 0 {
            let first = workers.first().map(|w| w.log.clone()).unwrap_or_default();
            bail!(
                "every worker exited before the sweep ended; last lines of {}:\n{}",
                first.display(),
                log_tail(&first)
            );
        }
        Ok(())
    };
    tokio::select! {
        r = watch::follow(client, sweep_id, &mut view, check_workers) => r.map(|_| Follow::Ended),
        _ = tokio::signal::ctrl_c() => Ok(Follow::Interrupted),
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}
