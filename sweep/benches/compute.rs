//! Compute benchmark: the same sweep run with every trial alone (the reference, `sharing:
//! off`), with its shared stages run once (`sharing: on`, the default), and shared with early
//! stopping, on this machine's CPU, through `sweep run` with real `sweep-worker` processes.
//!
//! ```sh
//! make build && cargo bench -p sweep --bench compute
//! SWEEP_COMPUTE_WORKERS=1 cargo bench -p sweep --bench compute
//! ```
//!
//! The sweep has the quickstart's shape with three epoch splits (2 backbones × 2 strategies ×
//! `[4, 2]`, `[3, 3]`, `[2, 4]`: 12 trials of 6 epochs; no pretraining). Each run gets a fresh
//! state directory. For each it prints the epochs computed (an epoch shared by several trials
//! is computed once and stored for each), the device-seconds (the sum of every computed
//! epoch's own time: what the devices spent training and validating), the wall time, and the
//! top trial with its best validation accuracy; then the ratios to the reference, whether the
//! top trial is the same, and how many of the reference's stored epochs the run stored with
//! exactly the same losses and accuracies (bit for bit). From the reference's own epoch times it
//! then prints what no scheduler can beat: the ratio sharing gives at those times (it saves
//! feature-extraction epochs only), and early stopping's floor (every trial's distinct epochs up
//! to its first rung).
//!
//! Then the guide's grid (`sweeps/flowers102.yaml`: 3 backbones × 2 strategies × 3 splits, 18
//! trials of 24 epochs) under the simulator: simulated GPUs against an in-process coordinator,
//! each epoch costing what `sweep plan` estimates for its backbone and phase at 50 TFLOP/s
//! (reported as its time; slept for 1/`SWEEP_COMPUTE_SIM_SPEEDUP` of it), alone, shared and
//! shared with ASHA: device-hours and the simulated wall time on 6 GPUs.
//!
//! Settings (environment): `SWEEP_COMPUTE_WORKERS` (2 workers), `SWEEP_COMPUTE_THREADS` (1
//! thread each), `SWEEP_COMPUTE_KEEP` (set: keep the state directories and print where),
//! `SWEEP_COMPUTE_SIM_SPEEDUP` (400), `SWEEP_COMPUTE_ONLY_SIM` (set: the simulated part alone).

use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
const RUNS: [(&str, &str); 4] = [
    ("independent", "sharing: off\n"),
    ("shared", ""),
    ("shared+asha", "early_stopping: { strategy: asha, metric: val_accuracy, eta: 3, min_epochs: 1 }\n"),
    ("shared+median", "early_stopping: { strategy: median, metric: val_accuracy, min_epochs: 1, min_trials: 3 }\n"),
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
    /// Stored losses and accuracies by (trial, epoch).
    stored: std::collections::HashMap<(String, u32), [f64; 4]>,
    /// Each stored epoch's seconds by (trial, epoch).
    seconds: std::collections::HashMap<(String, u32), f64>,
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
    run_in(name, &format!("{SPEC}{extra}"), &dir.join(name), workers, threads, dir)
}

/// The sweep ids a state directory holds (none when it has no database yet).
fn sweep_ids(state: &std::path::Path) -> anyhow::Result<std::collections::BTreeSet<String>> {
    use sweep_coordinator::store::StateReader as _;
    let db = state.join("sweep.db");
    if !db.exists() {
        return Ok(Default::default());
    }
    Ok(sweep_coordinator::store::sqlite::ReadOnly::open(&db)?.history()?.specs.into_keys().collect())
}

/// `sweep run` of `text` over the state directory `state` (which may hold earlier sweeps: what
/// they stored is reused); the outcome counts what this sweep computed itself.
fn run_in(
    name: &'static str,
    text: &str,
    state: &std::path::Path,
    workers: usize,
    threads: usize,
    dir: &std::path::Path,
) -> anyhow::Result<Outcome> {
    let spec = dir.join(format!("{name}.yaml"));
    std::fs::write(&spec, text)?;
    let before = sweep_ids(state)?;
    let state = state.to_path_buf();
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_sweep"))
        .arg("run")
        .arg(&spec)
        .args(["--workers", &workers.to_string(), "--threads", &threads.to_string(), "--output", "json"])
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
    let report = sweep_coordinator::history::check_state_dir(&state)?;
    if !report.is_clean() {
        bail!("the state of run {name} breaks invariants: {report}");
    }
    let sweep = sweep_ids(&state)?.difference(&before).next().cloned().context("the run stored no new sweep")?;
    let stored: std::collections::HashMap<_, _> = sweep_coordinator::history::stored_metrics(&state.join("sweep.db"))?
        .into_iter()
        .filter(|((s, _, _), _)| *s == sweep)
        .collect();
    // Each computed epoch once: rows stored for several trials from one report share the
    // attempt that computed them; rows another sweep computed (reused) cost this one nothing.
    use sweep_coordinator::store::StateReader as _;
    let snapshot = sweep_coordinator::store::sqlite::ReadOnly::open(&state.join("sweep.db"))?.history()?;
    let own: std::collections::HashSet<i64> =
        snapshot.attempts.iter().filter(|a| a.trial.0 == sweep).map(|a| a.id).collect();
    let mut computed = std::collections::HashMap::new();
    for m in snapshot.metrics.iter().filter(|m| m.trial.0 == sweep && own.contains(&m.attempt_id)) {
        computed.insert((m.attempt_id, m.epoch), m.values[4]);
    }
    Ok(Outcome {
        name,
        trials: entries.len(),
        stopped: entries.iter().filter(|e| e["state"] == "stopped").count(),
        epochs: computed.len(),
        // `+ 0.0`: an empty sum is -0.0.
        device_seconds: computed.values().sum::<f64>() + 0.0,
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
        seconds: stored.iter().map(|((_, trial, epoch), v)| ((trial.clone(), *epoch), v[4])).collect(),
        stored: stored.into_iter().map(|((_, trial, epoch), v)| ((trial, epoch), [v[0], v[1], v[2], v[3]])).collect(),
    })
}

/// What the reference's epoch times allow, whatever the scheduler: the cost of a feature-extraction
/// epoch against a fine-tuning one (how much sharing can save: it saves feature-extraction
/// epochs only here), and the floor of early stopping with `min_epochs: 1` — the distinct
/// epochs every trial computes up to its first rung, which no rule can stop earlier.
fn limits(reference: &Outcome) -> anyhow::Result<()> {
    let spec = sweep_core::spec::parse(&format!("{SPEC}{}", RUNS[2].1))?;
    let rule = spec.early_stopping.context("the ASHA run has early stopping")?;
    let trials = sweep_core::grid::expand(&spec.grid);
    let seconds = |t: &sweep_core::grid::Trial, e: u32| reference.seconds.get(&(t.id.clone(), e)).copied();
    let (mut fe, mut ft) = ((0.0, 0), (0.0, 0));
    let (mut seen, mut floor) = (std::collections::HashSet::new(), 0.0);
    let (mut fe_seen, mut fe_distinct) = (std::collections::HashSet::new(), 0.0);
    for t in &trials {
        let keys = sweep_core::stages::epoch_keys(&spec, t);
        for e in 1..=t.epochs() {
            let s = seconds(t, e).context("the reference stored every epoch")?;
            let sum = if e <= t.fe_epochs { &mut fe } else { &mut ft };
            *sum = (sum.0 + s, sum.1 + 1);
            if e <= t.fe_epochs && fe_seen.insert(keys[e as usize - 1].clone()) {
                fe_distinct += s;
            }
        }
        let first_rung = (1..t.ft_epochs).find(|&f| rule.decides_at(f, t.ft_epochs)).unwrap_or(t.ft_epochs);
        for e in 1..=t.fe_epochs + first_rung {
            if seen.insert(keys[e as usize - 1].clone()) {
                floor += seconds(t, e).unwrap_or(0.0);
            }
        }
    }
    let r = (fe.0 / fe.1.max(1) as f64) / (ft.0 / ft.1.max(1) as f64);
    println!(
        "\nlimits from the reference's epoch times: a feature-extraction epoch costs {r:.2}× a fine-tuning one; \
         sharing computes {} of its {} feature-extraction epochs: {:.2}× at these times;",
        fe_seen.len(),
        fe.1,
        (ft.0 + fe_distinct) / (ft.0 + fe.0)
    );
    println!(
        "early stopping's floor (every trial's distinct epochs up to its first rung, fine-tuning epoch 1): \
         {floor:.1} s, {:.2}× the reference",
        floor / (fe.0 + ft.0)
    );
    Ok(())
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

/// The guide's grid.
const GUIDE: &str = include_str!("../../sweeps/flowers102.yaml");
/// Simulated GPUs for the guide's grid.
const SIM_GPUS: usize = 6;
/// The throughput `sweep plan` assumes by default.
const SIM_FLOPS: f64 = 50e12;

struct SimOutcome {
    name: &'static str,
    epochs: usize,
    device_seconds: f64,
    wall_seconds: f64,
    stopped: usize,
}

/// One run of the guide's grid under the simulator.
async fn simulate(name: &'static str, extra: &str, speedup: f64) -> anyhow::Result<SimOutcome> {
    use sweep_coordinator::store::StateReader as _;
    let dir = tempfile::tempdir()?;
    let config = sweep_coordinator::server::Config::new("127.0.0.1:0".parse()?, dir.path().to_path_buf());
    let running = sweep_coordinator::server::start(config).await?;
    let url = format!("http://{}", running.addr);
    let text = format!("{GUIDE}{extra}");
    let spec = sweep_core::spec::parse(&text)?;
    let mut client = sweep_cli::client::Client::connect(&url).await?;
    let sweep_id = client.submit_text(text, format!("{name}.yaml")).await?.sweep_id;
    let mut options = sweep_cli::sim::SimOptions::new(&url, SIM_GPUS);
    options.poll_wait = Duration::from_secs(2);
    options.time_scale = 1.0 / speedup;
    let trials = sweep_core::grid::expand(&spec.grid);
    options.epoch_cost = Some(sweep_cli::sim::EpochCost(Arc::new(move |a, epoch| {
        let Some(t) = trials.get(a.trial_index as usize) else { return 0.0 };
        let kind = sweep_core::stages::EpochKind::of(t, epoch);
        sweep_core::stages::epoch_flops(&spec, t.backbone, &kind).unwrap_or(0.0) / SIM_FLOPS
    })));
    let started = Instant::now();
    let watch = sweep_id.clone();
    let ended = async move {
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            match client.get_status(&watch).await {
                Ok(s) if s.sweep.as_ref().is_some_and(|s| s.finished_at_ms != 0) => return,
                _ => {}
            }
        }
    };
    let report = sweep_cli::sim::run(options, ended).await?;
    let wall = started.elapsed().as_secs_f64() * speedup;
    running.stop().await?;
    if report.error_count() > 0 {
        bail!("the simulated run {name} had errors: {:?}", report.error_samples);
    }
    let check = sweep_coordinator::history::check_state_dir(dir.path())?;
    if !check.is_clean() {
        bail!("the state of simulated run {name} breaks invariants: {check}");
    }
    let snapshot = sweep_coordinator::store::sqlite::ReadOnly::open(&dir.path().join("sweep.db"))?.history()?;
    let mut computed = std::collections::HashMap::new();
    for m in &snapshot.metrics {
        computed.insert((m.attempt_id, m.epoch), m.values[4]);
    }
    let stopped = snapshot.trials.values().filter(|t| t.state == "stopped").count();
    Ok(SimOutcome {
        name,
        epochs: computed.len(),
        // `+ 0.0`: an empty sum is -0.0.
        device_seconds: computed.values().sum::<f64>() + 0.0,
        wall_seconds: wall,
        stopped,
    })
}

fn simulated(speedup: f64) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    println!(
        "\nthe guide's grid (sweeps/flowers102.yaml, 18 trials of 24 epochs) under the simulator: {SIM_GPUS} GPUs,"
    );
    println!("each epoch's time as `sweep plan` estimates it for its backbone and phase at 50 TFLOP/s");
    let runs: [(&str, &str); 3] = [
        ("independent", "sharing: off\n"),
        ("shared", ""),
        ("shared+asha", "early_stopping: { strategy: asha, metric: val_accuracy, eta: 3, min_epochs: 1 }\n"),
    ];
    let mut outcomes = Vec::new();
    for (name, extra) in runs {
        outcomes.push(rt.block_on(simulate(name, extra, speedup))?);
    }
    let reference = &outcomes[0];
    println!(
        "{:<14} {:>7} {:>6} {:>10} {:>7} {:>10} {:>7}",
        "RUN", "STOPPED", "EPOCHS", "DEVICE-H", "RATIO", "WALL-H", "RATIO"
    );
    for o in &outcomes {
        println!(
            "{:<14} {:>7} {:>6} {:>10.2} {:>6.2}× {:>10.2} {:>6.2}×",
            o.name,
            o.stopped,
            o.epochs,
            o.device_seconds / 3600.0,
            o.device_seconds / reference.device_seconds,
            o.wall_seconds / 3600.0,
            o.wall_seconds / reference.wall_seconds
        );
    }
    println!("(the simulator's metrics are made up: which trials ASHA stops here says nothing about real ones)");
    Ok(())
}

fn bench() -> anyhow::Result<()> {
    let speedup = env_number("SWEEP_COMPUTE_SIM_SPEEDUP", 400)? as f64;
    if std::env::var_os("SWEEP_COMPUTE_ONLY_SIM").is_some() {
        return simulated(speedup);
    }
    // `cargo bench` passes `--bench`; this benchmark has no filters.
    let workers = env_number("SWEEP_COMPUTE_WORKERS", 2)?;
    let threads = env_number("SWEEP_COMPUTE_THREADS", 1)?;
    let keep = std::env::var_os("SWEEP_COMPUTE_KEEP").is_some();
    let dir = tempfile::tempdir()?;
    println!("compute benchmark: 12 trials of 6 epochs, {workers} workers × {threads} thread(s), CPU");
    let plan = sweep_core::stages::StageTree::build(&sweep_core::spec::parse(SPEC)?, true);
    println!(
        "  stage tree: {} stages, {} of {} epochs distinct",
        plan.stages.len(),
        plan.stage_epochs().total(),
        plan.naive_epochs().total()
    );
    let mut outcomes = Vec::new();
    for (name, extra) in RUNS {
        let o = run(name, extra, workers, threads, dir.path())?;
        println!("  {name}: done in {:.0} s", o.wall_seconds);
        outcomes.push(o);
        // Checkpoints take gigabytes per run; only the shared run's are read again (below).
        if !keep && name != RUNS[1].0 {
            let _ = std::fs::remove_dir_all(dir.path().join(name).join("artifacts"));
        }
    }
    let reference = &outcomes[0];
    println!();
    println!(
        "{:<14} {:>6} {:>7} {:>6} {:>9} {:>7} {:>9} {:>7}  {:<30} {:>8}  {:>9}",
        "RUN",
        "TRIALS",
        "STOPPED",
        "EPOCHS",
        "DEVICE-S",
        "RATIO",
        "WALL-S",
        "RATIO",
        "TOP TRIAL",
        "BEST VAL",
        "IDENTICAL"
    );
    for o in &outcomes {
        // Stored epochs bit-identical to the reference's (a stopped trial stores fewer).
        let same = o.stored.iter().filter(|(k, v)| reference.stored.get(k) == Some(v)).count();
        println!(
            "{:<14} {:>6} {:>7} {:>6} {:>9.1} {:>6.2}× {:>9.1} {:>6.2}×  {:<30} {:>7.1}%{}  {same:>4}/{:<4}",
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
            if o.top == reference.top { "" } else { "  (another top trial)" },
            o.stored.len()
        );
    }
    limits(reference)?;
    // Reuse across sweeps, on the shared run's state directory: the same spec submitted again,
    // then the grid extended by a third strategy (what `sweep extend` submits).
    let shared_state = dir.path().join(RUNS[1].0);
    let third = "    - { strategy: exponential, head_lr: 1.0e-3, factor: 3 }\n";
    let extended =
        SPEC.replace(third, &format!("{third}    - {{ strategy: exponential, head_lr: 1.0e-3, factor: 2 }}\n"));
    let reuse = [("resubmitted", SPEC.to_string(), 72), ("extended", extended.clone(), 108)];
    let mut reused = Vec::new();
    for (name, text, naive) in reuse {
        let o = run_in(name, &text, &shared_state, workers, threads, dir.path())?;
        println!("  {name}: done in {:.0} s", o.wall_seconds);
        reused.push((o, naive));
    }
    println!();
    println!("reuse across sweeps (the shared run's state directory; ratios to the independent run of 72 epochs):");
    println!(
        "{:<14} {:>6} {:>8} {:>8} {:>9} {:>7} {:>9}  {:<30} {:>8}  {:>9}",
        "RUN", "TRIALS", "NAIVE", "EPOCHS", "DEVICE-S", "RATIO", "WALL-S", "TOP TRIAL", "BEST VAL", "IDENTICAL"
    );
    for (o, naive) in &reused {
        let same = o.stored.iter().filter(|(k, v)| reference.stored.get(k) == Some(v)).count();
        let identical = if o.name == "resubmitted" { format!("{same:>4}/{:<4}", o.stored.len()) } else { "-".into() };
        println!(
            "{:<14} {:>6} {:>8} {:>8} {:>9.1} {:>6.2}× {:>9.1}  {:<30} {:>7.1}%  {identical:>9}",
            o.name,
            o.trials,
            naive,
            o.epochs,
            o.device_seconds,
            o.device_seconds / reference.device_seconds,
            o.wall_seconds,
            o.top,
            o.top_accuracy * 100.0,
        );
    }
    if keep {
        let kept = dir.keep();
        println!("\nstate directories kept in {}", kept.display());
    }
    simulated(speedup)
}
