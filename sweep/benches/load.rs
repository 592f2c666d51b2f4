//! Load benchmark: simulated workers (`sweep_cli::sim`) against one real coordinator.
//!
//! ```sh
//! cargo bench -p sweep --bench load
//! SWEEP_LOAD_WORKERS=200 SWEEP_LOAD_SECONDS=30 cargo bench -p sweep --bench load
//! ```
//!
//! Starts the `sweep coordinator` binary of this build as a child process on a temporary state
//! directory, submits enough sweeps ([`sim::load_spec`], 9,963 trials each) that trials stay
//! pending for the whole run, runs the simulated workers for the duration, stops them (their
//! running attempts are handed back, as `sweep-worker` does on SIGTERM), reads the
//! coordinator's peak RSS (`VmHWM`) and CPU time, stops it with SIGTERM, and looks every
//! acknowledged report up in its `sweep.db` (read only). Prints the figures; exits non-zero
//! when a report was lost.
//!
//! Settings (environment): `SWEEP_LOAD_WORKERS` (1000), `SWEEP_LOAD_SECONDS` (120),
//! `SWEEP_LOAD_EPOCH_MS` (1000: one simulated epoch), `SWEEP_LOAD_DEVICES` (1 fake device per
//! worker), `SWEEP_LOAD_PER_CONNECTION` (50 workers per HTTP/2 connection),
//! `SWEEP_LOAD_KEEP` (set: keep the state directory and the coordinator's log, and print where).

use std::io::{BufRead, BufReader};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use sweep_cli::client::Client;
use sweep_cli::sim::{self, Counters, SimOptions};

struct Settings {
    workers: usize,
    seconds: u64,
    epoch_ms: u64,
    devices: usize,
    per_connection: usize,
    keep: bool,
}

fn env_number(name: &str, default: u64, min: u64) -> anyhow::Result<u64> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(n) if n >= min => Ok(n),
            _ => bail!("{name} must be a whole number of at least {min}, got `{v}`"),
        },
    }
}

impl Settings {
    fn from_env() -> anyhow::Result<Settings> {
        Ok(Settings {
            workers: env_number("SWEEP_LOAD_WORKERS", 1000, 1)? as usize,
            seconds: env_number("SWEEP_LOAD_SECONDS", 120, 1)?,
            epoch_ms: env_number("SWEEP_LOAD_EPOCH_MS", 1000, 1)?,
            devices: env_number("SWEEP_LOAD_DEVICES", 1, 1)? as usize,
            per_connection: env_number("SWEEP_LOAD_PER_CONNECTION", 50, 1)? as usize,
            keep: std::env::var_os("SWEEP_LOAD_KEEP").is_some(),
        })
    }
}

fn main() -> ExitCode {
    // `cargo bench` passes `--bench`; this harness takes no arguments.
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match runtime.block_on(bench(settings)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The coordinator child process; killed if still running when dropped.
struct Coordinator {
    child: std::process::Child,
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `VmHWM` (peak resident set) of a process, in bytes.
fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().trim_end_matches("kB").trim();
    kb.parse::<u64>().ok().map(|k| k * 1024)
}

/// User + system CPU seconds of a process.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ticks as f64 / per_second)
}

/// CPU seconds this process (the simulated workers) used so far.
fn own_cpu_seconds() -> f64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct we pass.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(usage.ru_utime) + t(usage.ru_stime)
}

async fn bench(s: Settings) -> anyhow::Result<ExitCode> {
    let dir =
        tempfile::Builder::new().prefix("sweep-load-").tempdir().context("cannot create a temporary directory")?;
    let state = dir.path().join("state");
    let log_path = dir.path().join("coordinator.log");
    let log = std::fs::File::create(&log_path).with_context(|| format!("cannot create {}", log_path.display()))?;
    let bin = env!("CARGO_BIN_EXE_sweep");
    let mut coordinator = Coordinator {
        child: std::process::Command::new(bin)
            .args(["coordinator", "--listen", "127.0.0.1:0", "--state-dir"])
            .arg(&state)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("cannot start {bin}"))?,
    };
    let pid = coordinator.child.id();
    // "coordinator listening on ADDR (state in DIR)"
    let stdout = coordinator.child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut first = String::new();
    BufReader::new(stdout).read_line(&mut first)?;
    let addr = first
        .strip_prefix("coordinator listening on ")
        .and_then(|r| r.split_whitespace().next())
        .ok_or_else(|| anyhow!("the coordinator did not start (see {}): {first:?}", log_path.display()))?;
    let url = format!("http://{addr}");

    // Enough work that workers never run out: the most epochs the fleet could run, 1.5 times,
    // plus one trial per device. A sweep computes the epochs of its stage tree (its shared
    // epochs once), far fewer than its trials' epochs.
    let slots = s.workers * s.devices;
    let epochs = slots as f64 * (s.seconds as f64 * 1000.0 / s.epoch_ms as f64);
    let per_sweep = 123 * sim::LOAD_SPEC_TRIALS_PER_DECAY;
    let tree = sweep_core::stages::StageTree::build(
        &sweep_core::spec::parse_with(
            &sim::load_spec("load", 123),
            sweep_core::spec::ParseOptions { max_trials: per_sweep, ..Default::default() },
        )?,
        true,
    );
    let per_sweep_epochs = tree.stage_epochs().total() as f64;
    let sweeps = ((epochs * 1.5 + slots as f64) / per_sweep_epochs).ceil().max(1.0) as usize;
    let mut client = Client::connect(&url).await?;
    for i in 1..=sweeps {
        client.submit_text(sim::load_spec(&format!("load-{i}"), 123), "load.yaml".into()).await?;
    }
    eprintln!(
        "load: {} simulated workers × {} device(s), epochs of {} ms, for {} s, against {url} \
         (pid {pid}); {sweeps} sweeps of {per_sweep} trials submitted",
        s.workers, s.devices, s.epoch_ms, s.seconds
    );

    let mut options = SimOptions::new(&url, s.workers);
    options.devices_per_worker = s.devices;
    options.epoch = Duration::from_millis(s.epoch_ms);
    options.workers_per_connection = s.per_connection;
    let counters = Arc::new(Counters::default());
    let started = Instant::now();
    let progress = sim::print_progress(counters.clone(), started, move || {
        format!(", coordinator RSS peak {:.1} MiB", peak_rss(pid).unwrap_or(0) as f64 / (1 << 20) as f64)
    });
    let cpu_before = cpu_seconds(pid).unwrap_or(0.0);
    let own_before = own_cpu_seconds();
    let report = sim::run_counting(options, counters, tokio::time::sleep(Duration::from_secs(s.seconds))).await?;
    progress.abort();
    let coordinator_cpu = cpu_seconds(pid).unwrap_or(0.0) - cpu_before;
    let workers_cpu = own_cpu_seconds() - own_before;
    let pending: u32 = client
        .raw()
        .list_sweeps(sweep_proto::v1::ListSweepsRequest::default())
        .await
        .map_err(|e| anyhow!("ListSweeps: {}", e.message()))?
        .into_inner()
        .sweeps
        .iter()
        .filter_map(|x| x.counts.as_ref())
        .map(|c| c.pending)
        .sum();
    drop(client);
    let rss = peak_rss(pid).ok_or_else(|| anyhow!("cannot read /proc/{pid}/status"))?;

    // Stop the coordinator as an operator would, then read what it committed.
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGTERM);
    }
    let stopped = tokio::task::spawn_blocking(move || {
        let status = coordinator.child.wait();
        (coordinator, status)
    });
    let (coordinator, exit) =
        tokio::time::timeout(Duration::from_secs(30), stopped).await.context("the coordinator did not stop")??;
    drop(coordinator);
    let exit = exit?;
    let stored = sweep_coordinator::history::stored_metrics(&state.join("sweep.db"))?;
    let lost = sim::lost_in(&stored, &report.reports);

    let mut lines = sim::report_lines(&report, Some(&lost));
    let last = lines.pop().unwrap_or_default();
    lines.push(format!(
        "trials pending at end    {pending} ({})",
        if pending > 0 { "workers never waited for work" } else { "ran out of work: latency includes waiting" }
    ));
    lines.push(format!("coordinator peak RSS     {:.1} MiB (VmHWM)", rss as f64 / (1 << 20) as f64));
    lines.push(format!(
        "CPU                      coordinator {coordinator_cpu:.1} s ({:.0}% of one core), simulated workers {workers_cpu:.1} s",
        100.0 * coordinator_cpu / report.elapsed.as_secs_f64()
    ));
    lines.push(format!("coordinator exit         {exit}"));
    lines.push(format!("{last} (looked up in sweep.db after the coordinator stopped)"));
    println!();
    for l in &lines {
        println!("{l}");
    }
    if s.keep {
        let kept = dir.keep();
        println!("state and coordinator log kept in {}", kept.display());
    }
    if !lost.is_empty() {
        eprintln!("error: {} acknowledged reports are not in the store", lost.len());
        return Ok(ExitCode::FAILURE);
    }
    if report.reports.is_empty() {
        eprintln!("error: no report was acknowledged");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
