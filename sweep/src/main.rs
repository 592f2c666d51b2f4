//! `sweep`: the command line of the sweep system, and the coordinator itself (`sweep
//! coordinator`, `sweep run`): `sweep-cli`'s commands and `sweep-coordinator`'s server in one
//! binary.

mod run;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sweep_cli::client::{self as cli, Client};
use sweep_cli::output::{Format, TableFormat};

const EXAMPLES: &str = "\
Examples:
  sweep run sweeps/quickstart.yaml --workers 2      run a whole sweep on this machine
  sweep validate sweeps/flowers102.yaml             check a spec and list its trials
  sweep coordinator --listen 0.0.0.0:7070 --state-dir /var/lib/sweep
  sweep submit sweeps/flowers102.yaml --watch       submit, then follow it live
  id=$(sweep submit sweeps/flowers102.yaml | tail -n1)
  sweep watch \"$id\"
  sweep leaderboard \"$id\" --by backbone
  sweep export \"$id\" --format csv > epochs.csv
  sweep plot \"$id\" --out plots/

Settings come from flags, then SWEEP_* environment variables, then the config file
(--config FILE, $SWEEP_CONFIG, or ~/.config/sweep/config.toml), e.g.:
  coordinator = \"http://coordinator:7070\"
  output = \"table\"";

const WATCH_EXAMPLES: &str = "\
On a terminal: a progress bar per running trial (phase, epoch, latest validation accuracy) under
the sweep's counts, elapsed time and ETA. Elsewhere (a pipe, a file, CI): one line per change.
Exits when the sweep ends: status 0 if it completed, 1 if it failed or was cancelled. A broken
connection is retried from the last event seen.

Examples:
  sweep watch quickstart-b630
  sweep watch quick                      # any unique prefix of the id
  sweep watch quick --output json | jq -c 'select(.type == \"epoch\")'";

const EXTEND_EXAMPLES: &str = "\
The sweep's spec stays as it is but for the grid; the new sweep is a sweep of its own (the old
one is never changed). Each of its trials starts from the longest run of its first epochs that
any earlier sweep stored (same content key) at a stage end or a trial's last epoch: the old
sweep's finished trials are complete at once, with the metrics and weights they had; a new
strategy starts from the end of the shared feature extraction, a new split from the longest
shared run or whole trial it contains. Needs `sharing: on` (the default).

Examples:
  sweep extend quickstart-b630 --lr-decay '{ strategy: exponential, head_lr: 1.0e-3, factor: 2 }'
  sweep extend quick --epoch-split 4+4 --epoch-split 2+6 --watch
  sweep extend quick --backbone resnet50";

/// `8+16` (or `8,16`): feature-extraction and fine-tuning epochs.
fn epoch_split(s: &str) -> Result<(u32, u32), String> {
    let (fe, ft) = s.split_once(['+', ',']).ok_or_else(|| format!("`{s}` is not FE+FT, such as 8+16"))?;
    let n = |x: &str| x.trim().parse::<u32>().map_err(|e| format!("`{}` in `{s}`: {e}", x.trim()));
    Ok((n(fe)?, n(ft)?))
}

const GC_EXAMPLES: &str = "\
Removes, from the folders of sweeps whose trials have all ended, every checkpoint file that no
kept sweep references: weights of superseded attempts, resume points no stage needs, and the
files of dropped sweeps (`sweep drop`) that no other sweep reuses. What a kept sweep references
stays, wherever it lies; sweeps still running are left alone.

Examples:
  sweep gc --artifacts .sweep/quickstart/artifacts --dry-run
  sweep drop quickstart-b630 && sweep gc --artifacts s3://bucket/sweeps";

const LEADERBOARD_EXAMPLES: &str = "\
Examples:
  sweep leaderboard quick                          ranked trials
  sweep leaderboard quick --by backbone            each backbone by its best trial, with its cost
  sweep leaderboard quick --output csv > board.csv
  sweep leaderboard quick-b630 quick-77e1          two sweeps' trials ranked together";

const EXPORT_EXAMPLES: &str = "\
Examples:
  sweep export quick --format csv > epochs.csv     one row per trial and epoch
  sweep export quick --format json --out quick.json";

const PLOT_EXAMPLES: &str = "\
Writes <trial>.png for every trial with finished epochs (training and validation loss and
accuracy per epoch, a red line at the switch from feature extraction to fine-tuning) and
backbones.png (each backbone's accuracy after feature extraction and its best during
fine-tuning). Prints the files written.

Example:
  sweep plot quick --out plots/";

const COMPLETIONS_EXAMPLES: &str = "\
Examples:
  sweep completions bash > ~/.local/share/bash-completion/completions/sweep
  sweep completions zsh > ~/.zfunc/_sweep
  sweep completions fish > ~/.config/fish/completions/sweep.fish";

const SIMULATE_EXAMPLES: &str = "\
Each simulated worker is a real WorkerService client that does what sweep-worker does (register,
heartbeat, long-poll AcquireTrial, ReportEpoch after every epoch, FinishAttempt), but an epoch is
a sleep of --epoch-ms. Submit sweeps with enough trials first; the simulated workers run them.

Scheduling latency: per assignment, from the moment the worker had a free device and was asking
for work (the later of sending the AcquireTrial and sending the FinishAttempt that freed the
device) to the arrival of the assignment. Lost reports: acknowledged ReportEpoch calls whose
metrics GetTrial does not return afterwards (the exit status is 1 if there is any).

Example:
  sweep coordinator --state-dir /tmp/load &
  sweep submit big-sweep.yaml
  sweep simulate-workers --coordinator http://127.0.0.1:7070 --count 1000 --epoch-ms 1000 --duration 120";

#[derive(Parser)]
#[command(name = "sweep", version, about = "Transfer-learning hyperparameter sweeps over GPU workers", after_help = EXAMPLES)]
struct Args {
    /// Config file of default settings [default: $SWEEP_CONFIG, else ~/.config/sweep/config.toml].
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// Where the coordinator is and how to prove who we are.
#[derive(clap::Args, Clone)]
struct Conn {
    /// Coordinator to talk to (`https://` for TLS).
    #[arg(long, env = "SWEEP_COORDINATOR", default_value = cli::DEFAULT_COORDINATOR)]
    coordinator: String,
    #[command(flatten)]
    client: sweep_session::connect::ClientArgs,
}

impl Conn {
    /// The TLS and token settings, every file read now.
    fn security(&self) -> anyhow::Result<sweep_session::connect::ClientSecurity> {
        Ok(self.client.security()?)
    }

    async fn connect(&self) -> anyhow::Result<Client> {
        Client::connect_with(&self.coordinator, &self.security()?).await
    }
}

#[derive(clap::Args, Clone)]
struct Remote {
    #[command(flatten)]
    conn: Conn,
    /// Output format.
    #[arg(long, short, value_enum, env = "SWEEP_OUTPUT", default_value = "table")]
    output: Format,
}

/// Tags and a note for a new sweep.
#[derive(clap::Args, Clone, Default)]
struct LabelArgs {
    /// A tag for the sweep (repeatable; letters, digits, . _ - : /); `sweep list --tag` finds it.
    #[arg(long = "tag", value_name = "TAG")]
    tags: Vec<String>,
    /// A note for the sweep (free text), shown by `status` and the dashboard.
    #[arg(long, value_name = "TEXT", default_value = "")]
    note: String,
}

impl LabelArgs {
    fn labels(&self) -> cli::Labels {
        cli::Labels { tags: self.tags.clone(), note: self.note.clone() }
    }
}

/// Where a read command reads: a coordinator, or a state directory directly.
#[derive(clap::Args, Clone)]
struct Read {
    #[command(flatten)]
    remote: Remote,
    /// Read this state directory (a finished `sweep run`'s, say) instead of a coordinator: a
    /// consistent snapshot of it, taken even while a coordinator runs on it; nothing in it
    /// changes.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

/// As [`Read`], for the commands whose `--output` has formats of their own.
#[derive(clap::Args, Clone)]
struct ReadConn {
    #[command(flatten)]
    conn: Conn,
    /// Read this state directory instead of a coordinator (see `sweep status --help`).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the coordinator: gRPC services over a durable state directory.
    Coordinator {
        /// Address to listen on.
        #[arg(long, env = "SWEEP_LISTEN", default_value = "127.0.0.1:7070")]
        listen: std::net::SocketAddr,
        /// Directory of the state database (created if missing).
        #[arg(long, env = "SWEEP_STATE_DIR", default_value = ".sweep")]
        state_dir: PathBuf,
        /// Seconds without a heartbeat after which a worker is suspect.
        #[arg(long, env = "SWEEP_HEARTBEAT_TTL", default_value_t = 10)]
        heartbeat_ttl: u64,
        /// Further seconds after which its lease ends and its trials are re-queued.
        #[arg(long, env = "SWEEP_LEASE_GRACE", default_value_t = 20)]
        lease_grace: u64,
        /// Failed attempts in a row after which a worker gets no more trials (0: never).
        #[arg(long, env = "SWEEP_QUARANTINE_AFTER", default_value_t = sweep_coordinator::store::DEFAULT_QUARANTINE_AFTER)]
        quarantine_after: u32,
        /// Hours after which a worker that is gone (lease ended) is forgotten.
        #[arg(long, env = "SWEEP_FORGET_WORKERS_AFTER", default_value_t = 24, value_name = "HOURS")]
        forget_workers_after: u64,
        /// Largest number of trials one sweep may have.
        #[arg(long, default_value_t = sweep_core::spec::DEFAULT_MAX_TRIALS)]
        max_trials: usize,
        /// Also serve `grpc.health.v1` alone, in plaintext, here (for probes that cannot
        /// speak TLS).
        #[arg(long, env = "SWEEP_HEALTH_LISTEN", value_name = "ADDR")]
        health_listen: Option<std::net::SocketAddr>,
        /// Serve Prometheus `/metrics`, `/healthz` and the web dashboard (`/`) over HTTP here
        /// (HTTPS with the certificate of `--tls-cert` when given).
        #[arg(long, env = "SWEEP_METRICS_LISTEN", value_name = "ADDR")]
        metrics_listen: Option<std::net::SocketAddr>,
        /// TLS certificate (PEM, with its chain) of the gRPC port and the HTTP port.
        #[arg(long, env = "SWEEP_TLS_CERT", value_name = "FILE", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// TLS key (PEM).
        #[arg(long, env = "SWEEP_TLS_KEY", value_name = "FILE", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Require client certificates signed by this CA (PEM): mutual TLS.
        #[arg(long, env = "SWEEP_CLIENT_CA", value_name = "FILE", requires = "tls_cert")]
        client_ca: Option<PathBuf>,
        /// Bearer tokens with roles, `ROLE TOKEN [NAME]` per line (roles: admin, client,
        /// viewer, worker); without it every call is allowed.
        #[arg(long, env = "SWEEP_TOKENS", value_name = "FILE")]
        tokens: Option<PathBuf>,
        /// The workers' artifact store (a directory or s3://bucket/prefix, as their
        /// `--artifacts`): the dashboard offers checkpoint downloads from it.
        #[arg(long, env = "SWEEP_ARTIFACTS", value_name = "LOCATION")]
        artifacts: Option<String>,
    },
    /// Run a sweep on this machine: an embedded coordinator, N local workers, progress, the
    /// leaderboard.
    Run {
        /// Sweep spec (YAML).
        spec: PathBuf,
        /// Worker processes to start.
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// State directory (read it afterwards with `sweep status ID --state-dir DIR`, or serve it
        /// with `sweep coordinator --state-dir DIR`).
        #[arg(long, env = "SWEEP_STATE_DIR", default_value = ".sweep")]
        state_dir: PathBuf,
        /// Intra-op threads per worker, as `sweep-worker --threads` (default: CPU cores /
        /// workers; `--threads-per-worker` is an older name).
        #[arg(long = "threads", alias = "threads-per-worker", value_name = "N")]
        threads_per_worker: Option<usize>,
        /// The `sweep-worker` binary (default: next to `sweep`, then PATH).
        #[arg(long, env = "SWEEP_WORKER_BIN")]
        worker_bin: Option<PathBuf>,
        /// The workers' artifact store: a directory, or `s3://bucket/prefix` (AWS_* variables
        /// configure it) [default: <state-dir>/artifacts].
        #[arg(long, env = "SWEEP_ARTIFACTS", value_name = "DIR|URL")]
        artifacts: Option<String>,
        /// Output format of the final leaderboard.
        #[arg(long, short, value_enum, default_value = "table")]
        output: TableFormat,
        #[command(flatten)]
        labels: LabelArgs,
    },
    /// Check a spec offline: its errors, or the table of its trials and the spec as it will run
    /// (every default filled in).
    Validate {
        spec: PathBuf,
        #[arg(long, default_value_t = sweep_core::spec::DEFAULT_MAX_TRIALS)]
        max_trials: usize,
        /// Print only the resolved spec (YAML; it parses back to the same spec).
        #[arg(long)]
        resolved: bool,
        #[arg(long, short, value_enum, default_value = "table")]
        output: Format,
    },
    /// Show offline what a spec will compute: its trials, the stage tree of epochs they share
    /// (each stage runs once), epochs naive vs shared by phase, and an estimated device time
    /// per backbone and phase.
    Plan {
        spec: PathBuf,
        #[arg(long, default_value_t = sweep_core::spec::DEFAULT_MAX_TRIALS)]
        max_trials: usize,
        /// Device throughput the time estimate assumes, in TFLOP/s (50: about one A100 or H100
        /// training in TF32).
        #[arg(long, default_value_t = 50.0)]
        tflops: f64,
        #[arg(long, short, value_enum, default_value = "table")]
        output: Format,
    },
    /// Submit a spec; prints the new sweep's id alone on the last line.
    Submit {
        spec: PathBuf,
        /// Then follow the sweep as `sweep watch` does, until it ends.
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        labels: LabelArgs,
        #[command(flatten)]
        remote: Remote,
    },
    /// Add grid values to a sweep: submits its spec with the new values as a new sweep, whose
    /// trials start from every stage already stored (the old sweep's trials whole), so only
    /// what is new is computed. Prints the new sweep's id alone on the last line.
    #[command(after_help = EXTEND_EXAMPLES)]
    Extend {
        /// Sweep id (or a unique prefix of it).
        id: String,
        /// A backbone to add (repeatable).
        #[arg(long = "backbone", value_name = "NAME")]
        backbones: Vec<String>,
        /// A learning-rate strategy to add, as YAML (repeatable):
        /// '{ strategy: exponential, head_lr: 1.0e-4, factor: 3 }'.
        #[arg(long = "lr-decay", value_name = "YAML")]
        lr_decays: Vec<String>,
        /// An epoch split to add, feature extraction + fine-tuning epochs (repeatable): 8+16.
        #[arg(long = "epoch-split", value_name = "FE+FT", value_parser = epoch_split)]
        epoch_splits: Vec<(u32, u32)>,
        /// Then follow the new sweep as `sweep watch` does, until it ends.
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// Follow a sweep live until it ends.
    #[command(after_help = WATCH_EXAMPLES)]
    Watch {
        /// Sweep id (or a unique prefix of it).
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// List sweeps, newest first.
    List {
        /// Only the newest N.
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        /// Only sweeps with this tag.
        #[arg(long, value_name = "TAG")]
        tag: Option<String>,
        #[command(flatten)]
        read: Read,
    },
    /// A sweep's state and its trials.
    Status {
        /// Sweep id (or a unique prefix of it).
        id: String,
        /// Print the sweep's spec as it runs, every default filled in (YAML), instead of its
        /// trials (`-o json`: the submitted and the resolved spec).
        #[arg(long)]
        spec: bool,
        #[command(flatten)]
        read: Read,
    },
    /// Trials ranked by best validation accuracy during fine-tuning; of several sweeps, ranked
    /// together with a sweep column.
    #[command(after_help = LEADERBOARD_EXAMPLES)]
    Leaderboard {
        /// Sweep ids (or unique prefixes); several compare their trials in one ranking.
        #[arg(required = true, value_name = "ID")]
        ids: Vec<String>,
        /// Rank trials, or backbones by their best trial.
        #[arg(long, value_enum, default_value = "trial")]
        by: cli::By,
        #[command(flatten)]
        read: ReadConn,
        /// Output format.
        #[arg(long, short, value_enum, env = "SWEEP_OUTPUT", default_value = "table")]
        output: TableFormat,
    },
    /// Every per-epoch metric of every trial of a sweep.
    #[command(after_help = EXPORT_EXAMPLES)]
    Export {
        id: String,
        /// Output format (`--format` is an older name).
        #[arg(long = "output", short = 'o', alias = "format", value_enum, default_value = "csv")]
        format: cli::ExportFormat,
        /// Write to this file instead of standard output (`--out` is an older name).
        #[arg(long = "file", short = 'f', alias = "out", value_name = "FILE")]
        out: Option<PathBuf>,
        #[command(flatten)]
        read: ReadConn,
    },
    /// PNG figures of a sweep: per-trial loss and accuracy curves, per-backbone accuracy.
    #[command(after_help = PLOT_EXAMPLES)]
    Plot {
        id: String,
        /// Directory to write the PNG files into (created).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        #[command(flatten)]
        read: Read,
    },
    /// Shell completion script for bash, zsh, fish, elvish or PowerShell.
    #[command(after_help = COMPLETIONS_EXAMPLES)]
    Completions { shell: clap_complete::Shell },
    /// One trial's per-epoch metrics and attempts.
    Trial {
        id: String,
        /// Trial id, e.g. t003.
        trial: String,
        #[command(flatten)]
        read: Read,
    },
    /// The best checkpoint of a sweep's top trial: its path (or URL) alone, for scripts
    /// (`--output json`: the trial and its checkpoint).
    Best {
        id: String,
        #[command(flatten)]
        read: Read,
    },
    /// Add or remove a sweep's tags (letters, digits, . _ - : /; at most 20); prints them.
    #[command(
        after_help = "Examples:\n  sweep tag quick --add baseline --add resnet\n  sweep tag quick --remove resnet\n  sweep list --tag baseline"
    )]
    Tag {
        id: String,
        /// A tag to add (repeatable).
        #[arg(long = "add", value_name = "TAG")]
        add: Vec<String>,
        /// A tag to remove (repeatable).
        #[arg(long = "remove", value_name = "TAG")]
        remove: Vec<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Set a sweep's note (free text, at most 2000 characters; an empty one removes it); prints it.
    Note {
        id: String,
        /// The note.
        text: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Cancel a sweep: pending trials at once, running ones at their next heartbeat.
    Cancel {
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Re-queue a sweep's failed trials with a fresh attempt budget (they resume from their
    /// last checkpoint).
    Retry {
        id: String,
        /// Only these trials (repeatable) [default: every failed trial].
        #[arg(long = "trial", value_name = "TRIAL")]
        trials: Vec<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Stop keeping an ended sweep: later sweeps no longer start from its stages, and `sweep gc`
    /// may remove its files that no kept sweep references. Its records stay.
    Drop {
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Remove the checkpoint files that no kept sweep references from the artifact store.
    #[command(after_help = GC_EXAMPLES)]
    Gc {
        /// The artifact store the workers write to: a directory or s3://bucket/prefix.
        #[arg(long, env = "SWEEP_ARTIFACTS", value_name = "DIR|URL")]
        artifacts: String,
        /// Only these sweeps' folders (repeatable) [default: every sweep].
        #[arg(long = "sweep", value_name = "ID")]
        sweeps: Vec<String>,
        /// Say what would be removed; remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Leave files written less than this many seconds ago (a sweep reopened by `sweep
        /// retry` meanwhile may be writing them; the store's clock may differ from this one).
        #[arg(long, value_name = "SECONDS", default_value_t = sweep_cli::gc::MIN_AGE_SECONDS)]
        min_age: u64,
        #[command(flatten)]
        remote: Remote,
    },
    /// Registered workers, their devices and what they run.
    Workers {
        #[command(flatten)]
        read: Read,
    },
    /// Check a state directory's history against the coordinator's invariants (read-only; a
    /// coordinator may be running on it). Exits 1 if any is broken, 2 if it cannot be read.
    CheckState {
        /// Directory of the state database.
        #[arg(long, env = "SWEEP_STATE_DIR", default_value = ".sweep")]
        state_dir: PathBuf,
        #[arg(long, short, value_enum, default_value = "table")]
        output: Format,
    },
    /// Copy a state directory's database to a new file, consistently, while a coordinator may
    /// be writing to it (the copy holds what the write-ahead log held too); then check the copy.
    /// Exits 1 if the copy's history breaks an invariant, 2 if no copy was made.
    #[command(
        after_help = "Examples:\n  sweep backup --state-dir /var/lib/sweep /var/lib/sweep/backup/sweep-$(date -u +%Y%m%dT%H%M%SZ).db\n\nRestore (coordinator stopped): move sweep.db, sweep.db-wal and sweep.db-shm aside, copy the\nbackup to sweep.db, run `sweep check-state`, start the coordinator."
    )]
    Backup {
        /// Directory of the state database.
        #[arg(long, env = "SWEEP_STATE_DIR", default_value = ".sweep")]
        state_dir: PathBuf,
        /// The file to write (must not exist).
        out: PathBuf,
    },
    /// Load-test a coordinator with simulated workers (fake devices and trials, no training);
    /// prints reports/s, scheduling latency and lost reports.
    #[command(after_help = SIMULATE_EXAMPLES)]
    SimulateWorkers {
        /// The coordinator to load, and how to reach it: TLS, client certificates and a token,
        /// as `sweep-worker` takes them (a `worker` token; with `--no-verify` unset it must
        /// also be allowed to read: an `admin` token, or none on a coordinator without tokens).
        #[command(flatten)]
        conn: Conn,
        /// Simulated workers to run.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=100_000))]
        count: u64,
        /// Fake devices each worker announces.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1024))]
        devices_per_worker: u64,
        /// Kind of the fake devices: cpu slots (cpu:0, …) or GPUs (cuda:0, …).
        #[arg(long, value_enum, default_value = "cpu")]
        device_kind: sweep_cli::sim::DeviceKind,
        /// Milliseconds one simulated epoch takes.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(0..=86_400_000))]
        epoch_ms: u64,
        /// Seconds to run; without it, runs until Ctrl-C.
        #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
        duration: Option<u64>,
        /// Workers sharing one HTTP/2 connection.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=sweep_cli::sim::MAX_WORKERS_PER_CONNECTION as u64))]
        workers_per_connection: u64,
        /// Workers are named NAME-1, NAME-2, …
        #[arg(long, default_value = "sim")]
        name: String,
        /// Do not check afterwards that every acknowledged report is stored.
        #[arg(long)]
        no_verify: bool,
        /// Output format of the figures.
        #[arg(long, short, value_enum, default_value = "table")]
        output: Format,
    },
}

fn main() -> ExitCode {
    // The config file supplies defaults to the parse (as SWEEP_* variables that are not set).
    let raw: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Err(e) = sweep_cli::config::apply(sweep_cli::config::explicit_path(&raw).as_deref()) {
        eprintln!("error: {e:#}");
        return ExitCode::from(2);
    }
    let args = Args::parse();
    // Client commands end quietly on a closed pipe (`sweep list | head`). SIGPIPE stays
    // ignored everywhere: a coordinator that closes a connection while a client (or a server)
    // writes to it must give an error message, not kill the process without one.
    sweep_session::exit_quietly_on_closed_stdout();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(args.command)) {
        Ok(code) => code,
        Err(e) => {
            // Errors quote names and messages from the coordinator and from files.
            sweep_cli::output::eprint(&format!("error: {e:#}"));
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Coordinator {
            listen,
            state_dir,
            heartbeat_ttl,
            lease_grace,
            quarantine_after,
            forget_workers_after,
            max_trials,
            health_listen,
            metrics_listen,
            tls_cert,
            tls_key,
            client_ca,
            tokens,
            artifacts,
        } => {
            init_logging();
            let mut config = sweep_coordinator::server::Config::new(listen, state_dir);
            config.health_listen = health_listen;
            config.metrics_listen = metrics_listen;
            config.artifacts = artifacts;
            if let (Some(cert), Some(key)) = (tls_cert, tls_key) {
                config.tls = Some(sweep_coordinator::server::TlsFiles { cert, key, client_ca });
            }
            if let Some(path) = tokens {
                config.tokens = Some(std::sync::Arc::new(sweep_coordinator::auth::Tokens::load(&path)?));
            }
            config.heartbeat_ttl = std::time::Duration::from_secs(heartbeat_ttl.max(1));
            config.lease_grace = std::time::Duration::from_secs(lease_grace);
            config.quarantine_after = quarantine_after;
            config.forget_workers_after = std::time::Duration::from_secs(forget_workers_after.saturating_mul(3600));
            config.parse.max_trials = max_trials;
            coordinator(config).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { spec, workers, state_dir, threads_per_worker, worker_bin, artifacts, output, labels } => {
            labels.labels().check()?;
            let options = run::RunOptions {
                spec,
                workers,
                state_dir,
                threads_per_worker,
                worker_bin,
                artifacts,
                output,
                labels: labels.labels(),
            };
            run::run(options).await
        }
        Command::Validate { spec, max_trials, resolved, output } => cli::validate(&spec, max_trials, output, resolved),
        Command::Plan { spec, max_trials, tflops, output } => sweep_cli::plan::plan(&spec, max_trials, output, tflops),
        Command::Submit { spec, watch, labels, remote } => {
            let format = remote.output;
            labels.labels().check()?;
            let mut client = remote.conn.connect().await?;
            let id = client.submit(&spec, format, &labels.labels()).await?;
            if watch { client.watch_sweep(&id, format).await } else { Ok(ExitCode::SUCCESS) }
        }
        Command::Extend { id, backbones, lr_decays, epoch_splits, watch, remote } => {
            let format = remote.output;
            let mut client = remote.conn.connect().await?;
            let add = sweep_core::spec::GridAdditions { backbones, lr_decays, epoch_splits };
            let new = client.extend(&id, &add, format).await?;
            if watch { client.watch_sweep(&new, format).await } else { Ok(ExitCode::SUCCESS) }
        }
        Command::Watch { id, remote } => {
            let format = remote.output;
            remote.conn.connect().await?.watch_sweep(&id, format).await
        }
        Command::List { limit, tag, read } => {
            let format = read.remote.output;
            let mut source = Source::open(&read.remote.conn, read.state_dir.as_deref()).await?;
            source.client.list(format, limit.filter(|&n| n > 0), tag.as_deref().unwrap_or("")).await?;
            source.close().await
        }
        Command::Status { id, spec, read } => {
            let format = read.remote.output;
            let mut source = Source::open(&read.remote.conn, read.state_dir.as_deref()).await?;
            source.client.status(&id, format, spec).await?;
            source.close().await
        }
        Command::Leaderboard { ids, by, read, output } => {
            let mut source = Source::open(&read.conn, read.state_dir.as_deref()).await?;
            source.client.leaderboard(&ids, by, output).await?;
            source.close().await
        }
        Command::Export { id, format, out, read } => {
            let mut source = Source::open(&read.conn, read.state_dir.as_deref()).await?;
            source.client.export(&id, format, out.as_deref()).await?;
            source.close().await
        }
        Command::Plot { id, out, read } => {
            let format = read.remote.output;
            let mut source = Source::open(&read.remote.conn, read.state_dir.as_deref()).await?;
            source.client.plot(&id, &out, format).await?;
            source.close().await
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Args::command(), "sweep", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Trial { id, trial, read } => {
            let format = read.remote.output;
            let mut source = Source::open(&read.remote.conn, read.state_dir.as_deref()).await?;
            source.client.trial(&id, &trial, format).await?;
            source.close().await
        }
        Command::Best { id, read } => {
            let format = read.remote.output;
            let mut source = Source::open(&read.remote.conn, read.state_dir.as_deref()).await?;
            source.client.best(&id, format).await?;
            source.close().await
        }
        Command::Tag { id, add, remove, remote } => {
            if add.is_empty() && remove.is_empty() {
                anyhow::bail!("nothing to change: give --add TAG or --remove TAG");
            }
            let format = remote.output;
            remote.conn.connect().await?.update_sweep(&id, &add, &remove, None, format).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Note { id, text, remote } => {
            let format = remote.output;
            remote.conn.connect().await?.update_sweep(&id, &[], &[], Some(text), format).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Cancel { id, remote } => {
            let format = remote.output;
            remote.conn.connect().await?.cancel(&id, format).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Retry { id, trials, remote } => {
            let format = remote.output;
            remote.conn.connect().await?.retry(&id, trials, format).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Drop { id, remote } => {
            let format = remote.output;
            remote.conn.connect().await?.drop_sweep(&id, format).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Gc { artifacts, sweeps, dry_run, min_age, remote } => {
            let format = remote.output;
            let mut client = remote.conn.connect().await?;
            let collected = sweep_cli::gc::gc(&mut client, &artifacts, &sweeps, min_age, dry_run).await?;
            sweep_cli::gc::print(&collected, dry_run, format);
            Ok(ExitCode::SUCCESS)
        }
        Command::Workers { read } => {
            let format = read.remote.output;
            let mut source = Source::open(&read.remote.conn, read.state_dir.as_deref()).await?;
            source.client.workers(format).await?;
            source.close().await
        }
        Command::CheckState { state_dir, output } => Ok(check_state(&state_dir, output)),
        Command::Backup { state_dir, out } => Ok(backup(&state_dir, &out)),
        Command::SimulateWorkers {
            conn,
            count,
            devices_per_worker,
            device_kind,
            epoch_ms,
            duration,
            workers_per_connection,
            name,
            no_verify,
            output,
        } => {
            let mut options = sweep_cli::sim::SimOptions::new(&conn.coordinator, count as usize);
            options.security = conn.security()?;
            options.devices_per_worker = devices_per_worker as usize;
            options.device_kind = device_kind;
            options.epoch = std::time::Duration::from_millis(epoch_ms);
            options.workers_per_connection = workers_per_connection as usize;
            options.name = name;
            let duration = duration.map(std::time::Duration::from_secs);
            sweep_cli::sim::command(options, duration, !no_verify, output).await
        }
    }
}

/// What a read command reads from: the coordinator of `--coordinator`, or, with `--state-dir`,
/// a snapshot of that directory served by a private coordinator of this process: the database
/// is copied consistently (`VACUUM INTO`, as `sweep backup` does, so a coordinator may be
/// running on the directory) into a temporary folder only this user can read, and served on a
/// loopback port that answers only a random token of this process. The commands are then the
/// same calls, the same output; the snapshot goes when the command ends, and nothing in the
/// directory is written.
struct Source {
    client: Client,
    local: Option<(sweep_coordinator::server::Running, tempfile::TempDir)>,
}

impl Source {
    async fn open(conn: &Conn, state_dir: Option<&Path>) -> anyhow::Result<Source> {
        let Some(dir) = state_dir else {
            return Ok(Source { client: conn.connect().await?, local: None });
        };
        use anyhow::Context;
        let what = || format!("cannot read the state directory {}", dir.display());
        if !dir.is_dir() {
            anyhow::bail!("{}: no such directory", what());
        }
        let copy =
            tempfile::Builder::new().prefix("sweep-read-").tempdir().context("cannot create a temporary folder")?;
        let db = copy.path().join(sweep_coordinator::history::DB_FILE);
        let dir_owned = dir.to_path_buf();
        let db_copy = db.clone();
        tokio::task::spawn_blocking(move || sweep_coordinator::store::sqlite::backup(&dir_owned, &db_copy, |_| Ok(())))
            .await?
            .with_context(what)?;
        let token = random_token().context("cannot make a token for the snapshot's port")?;
        let mut config = sweep_coordinator::server::Config::new(([127, 0, 0, 1], 0).into(), copy.path().to_path_buf());
        // A snapshot: no lease ends while it is read (its reaper waits a century first).
        config.lease_grace = std::time::Duration::from_secs(100 * 365 * 24 * 3600);
        config.tokens =
            Some(std::sync::Arc::new(sweep_coordinator::auth::Tokens::parse(&format!("viewer {token} snapshot"))?));
        let running = sweep_coordinator::server::start(config).await.with_context(what)?;
        let files = sweep_session::connect::ClientFiles { token: Some(token), ..Default::default() };
        let security = sweep_session::connect::ClientSecurity::load(&files)?;
        let client = Client::connect_with(&format!("http://{}", running.addr), &security).await?;
        Ok(Source { client, local: Some((running, copy)) })
    }

    /// Stops the snapshot's server (its folder goes with it); the command's exit status.
    async fn close(self) -> anyhow::Result<ExitCode> {
        drop(self.client);
        if let Some((running, copy)) = self.local {
            running.stop().await?;
            drop(copy);
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// 32 random bytes from the kernel, hex.
fn random_token() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Logs to stderr; `RUST_LOG` filters (default `info`), `SWEEP_LOG_FORMAT=json` for JSON lines.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: logs in files stay greppable.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if std::env::var("SWEEP_LOG_FORMAT").is_ok_and(|f| f == "json") {
        let _ = builder.json().with_current_span(false).try_init();
    } else {
        let _ = builder.with_ansi(ansi).try_init();
    }
}

/// `sweep coordinator`: serves until interrupted (Ctrl-C or SIGTERM).
async fn coordinator(config: sweep_coordinator::server::Config) -> anyhow::Result<()> {
    let state_dir = config.state_dir.clone();
    let running = sweep_coordinator::server::start(config).await?;
    tracing::info!(addr = %running.addr, state_dir = %state_dir.display(), "coordinator listening");
    println!("coordinator listening on {} (state in {})", running.addr, state_dir.display());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    running.stop().await
}

/// `sweep backup`: copies the state, prints what the copy holds and whether its history is clean.
fn backup(state_dir: &Path, out: &Path) -> std::process::ExitCode {
    match sweep_coordinator::history::backup(state_dir, out) {
        Ok(report) => {
            sweep_cli::output::print(&format!(
                "backed up {} to {}: {report}",
                state_dir.join(sweep_coordinator::history::DB_FILE).display(),
                out.display()
            ));
            if report.is_clean() { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::from(1) }
        }
        Err(e) => {
            sweep_cli::output::eprint(&format!("error: cannot back up {}: {e}", state_dir.display()));
            std::process::ExitCode::from(2)
        }
    }
}

/// `sweep check-state`: prints the report (a table of violations, or JSON) and exits 0 when the
/// history is clean, 1 when it is not, 2 when the state cannot be read.
fn check_state(state_dir: &Path, format: sweep_cli::output::Format) -> std::process::ExitCode {
    let report = match sweep_coordinator::history::check_state_dir(state_dir) {
        Ok(r) => r,
        Err(e) => {
            sweep_cli::output::eprint(&format!("error: cannot check {}: {e}", state_dir.display()));
            return std::process::ExitCode::from(2);
        }
    };
    match format {
        sweep_cli::output::Format::Table => sweep_cli::output::print(&report.to_string()),
        sweep_cli::output::Format::Json => {
            let violations: Vec<_> = report
                .violations
                .iter()
                .map(|v| serde_json::json!({ "rule": v.rule, "subject": v.subject, "message": v.message }))
                .collect();
            let json = serde_json::json!({
                "state_dir": state_dir.display().to_string(),
                "sweeps": report.sweeps,
                "trials": report.trials,
                "attempts": report.attempts,
                "metrics": report.metrics,
                "events": report.events,
                "violations": violations,
            });
            println!("{}", serde_json::to_string_pretty(&json).unwrap_or_default());
        }
    }
    if report.is_clean() { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::from(1) }
}
