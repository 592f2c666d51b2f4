//! How the CLI shows things: tables for people, JSON for scripts.
//!
//! The JSON shapes are a stable interface (documented in README.md): field names only ever get
//! added, never renamed or removed.

use comfy_table::{Cell, CellAlignment, ContentArrangement, Table, presets};
use serde_json::{Value, json};
use sweep_core::grid::Trial;
use sweep_core::state::TrialState;
use sweep_proto::v1;

/// `--output` choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// `--output` choices of the commands that also print CSV (`leaderboard`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TableFormat {
    Table,
    Json,
    Csv,
}

pub use sweep_core::text::{escape, terminal};
use sweep_proto::json::lr_json;
pub use sweep_proto::json::{
    event_json, export_json, leaderboard_json, metrics_json, status_json, sweep_json, sweeps_json, trial_detail_json,
    trial_json, workers_json,
};

/// Milliseconds since the Unix epoch.
fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Prints a human text on standard output, through [`terminal`].
pub fn print(text: &str) {
    println!("{}", terminal(text));
}

/// Prints a human text on standard error, through [`terminal`].
pub fn eprint(text: &str) {
    eprintln!("{}", terminal(text));
}

/// One CSV field: quoted when it holds a comma, a quote or a line break (RFC 4180).
pub fn csv_field(v: &str) -> String {
    if v.contains([',', '"', '\n', '\r']) { format!("\"{}\"", v.replace('"', "\"\"")) } else { v.to_string() }
}

/// Rows as CSV text, header first, `\n` line ends.
pub fn csv(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut out = header.join(",");
    out.push('\n');
    for r in rows {
        out.push_str(&r.iter().map(|f| csv_field(f)).collect::<Vec<_>>().join(","));
        out.push('\n');
    }
    out
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|x| x.to_string()).unwrap_or_default()
}

/// Strategy, head lr, final lr, factor as CSV fields (empty where they do not apply).
fn lr_fields(d: Option<&v1::LrDecay>) -> [String; 4] {
    match d {
        Some(d) if d.strategy == "linear" => {
            [d.strategy.clone(), d.head_lr.to_string(), d.final_lr.to_string(), String::new()]
        }
        Some(d) if d.strategy == "exponential" => {
            [d.strategy.clone(), d.head_lr.to_string(), String::new(), d.factor.to_string()]
        }
        Some(d) => [d.strategy.clone(), String::new(), String::new(), String::new()],
        None => Default::default(),
    }
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.iter().map(|h| Cell::new(h.to_uppercase())));
    t
}

fn right(t: &mut Table, columns: &[usize]) {
    for &c in columns {
        if let Some(col) = t.column_mut(c) {
            col.set_cell_alignment(CellAlignment::Right);
        }
    }
}

/// `62.5%`, or `-` when there is no value.
pub fn percent(v: Option<f64>) -> String {
    v.map(|x| format!("{:.1}%", x * 100.0)).unwrap_or_else(|| "-".into())
}

/// `23.5M`, `850k`, `-` for 0.
/// `1.5 MiB`, `320 B`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[unit]) }
}

pub fn count(n: u64) -> String {
    match n {
        0 => "-".into(),
        n if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n if n >= 10_000 => format!("{}k", n / 1000),
        n => n.to_string(),
    }
}

/// `42s`, `3m07s`, `1h02m`.
pub fn duration(seconds: f64) -> String {
    if !seconds.is_finite() || seconds <= 0.0 {
        return "-".into();
    }
    let s = seconds.round() as u64;
    match s {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// `t003 resnet50 exponential(1e-4/3) 16+8`.
pub fn trial_label(t: &v1::TrialSummary) -> String {
    format!("{} {} {} {}+{}", t.trial_id, t.backbone, lr_label(t.lr_decay.as_ref()), t.fe_epochs, t.ft_epochs)
}

fn lr_label(d: Option<&v1::LrDecay>) -> String {
    d.map(v1::LrDecay::label).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------

/// `sweep validate`: the trials a spec expands to.
pub fn trials_table(trials: &[Trial]) -> String {
    let mut t = table(&["trial", "backbone", "lr_decay", "split", "epochs"]);
    for trial in trials {
        t.add_row(vec![
            trial.id.clone(),
            trial.backbone.name().into(),
            trial.lr_decay.to_string(),
            trial.split_label(),
            trial.epochs().to_string(),
        ]);
    }
    right(&mut t, &[4]);
    t.to_string()
}

pub fn trials_json(trials: &[Trial]) -> Value {
    Value::Array(
        trials
            .iter()
            .map(|t| {
                json!({
                    "trial": t.id,
                    "backbone": t.backbone.name(),
                    "lr_decay": lr_json(Some(&v1::LrDecay::from(&t.lr_decay))),
                    "epoch_split": [t.fe_epochs, t.ft_epochs],
                })
            })
            .collect(),
    )
}

// ---------------------------------------------------------------------------------------------

/// `3/8 done, 2 running, 1 failed`.
pub fn counts_line(s: &v1::SweepSummary) -> String {
    let c = s.counts.unwrap_or_default();
    let mut parts = vec![format!("{}/{} completed", c.completed, s.trial_count)];
    // Completed first (above), then stopped early, what is still going on, what ended otherwise.
    let order = [
        TrialState::Stopped,
        TrialState::Running,
        TrialState::Paused,
        TrialState::Pending,
        TrialState::Unschedulable,
        TrialState::Failed,
        TrialState::Cancelled,
    ];
    for state in order {
        let n = c.get(state);
        if n > 0 {
            parts.push(format!("{n} {state}"));
        }
    }
    parts.join(", ")
}

pub fn sweeps_table(sweeps: &[v1::SweepSummary]) -> String {
    if sweeps.is_empty() {
        return "no sweeps yet; submit one with `sweep submit SPEC`".into();
    }
    let mut t = table(&["sweep", "name", "tags", "state", "trials", "progress", "age"]);
    let now = now_ms();
    for s in sweeps {
        t.add_row(vec![
            s.id.clone(),
            s.name.clone(),
            if s.tags.is_empty() { "-".into() } else { s.tags.join(",") },
            s.state.clone(),
            s.trial_count.to_string(),
            counts_line(s),
            duration((now - s.created_at_ms) as f64 / 1000.0),
        ]);
    }
    right(&mut t, &[4, 6]);
    t.to_string()
}

/// A sweep's tags and note, as `sweep tag` and `sweep note` print them.
pub fn labels_text(s: &v1::SweepSummary) -> String {
    let tags = if s.tags.is_empty() { "no tags".to_string() } else { format!("tags: {}", s.tags.join(", ")) };
    let note =
        if s.note.is_empty() { "no note".to_string() } else { format!("note: {}", s.note.replace('\n', "\n      ")) };
    format!("sweep {} ({}): {tags}\n{note}", s.id, s.name)
}

pub fn status_text(status: &v1::SweepStatus) -> String {
    let Some(s) = &status.sweep else { return String::new() };
    let dropped = if s.dropped_at_ms > 0 { " (dropped: its files may be collected)" } else { "" };
    let mut out = format!("sweep {} ({}): {}{dropped}\n{}\n", s.id, s.name, s.state, counts_line(s));
    if !s.tags.is_empty() {
        out.push_str(&format!("tags: {}\n", s.tags.join(", ")));
    }
    if !s.note.is_empty() {
        // Its further lines indented: a note never reads as lines of the status.
        out.push_str(&format!("note: {}\n", s.note.replace('\n', "\n      ")));
    }
    out.push('\n');
    let mut t = table(&[
        "trial", "backbone", "lr_decay", "split", "state", "epoch", "last val", "best ft", "attempts", "worker",
    ]);
    for trial in &status.trials {
        t.add_row(vec![
            trial.trial_id.clone(),
            trial.backbone.clone(),
            lr_label(trial.lr_decay.as_ref()),
            format!("{}+{}", trial.fe_epochs, trial.ft_epochs),
            trial.state.clone(),
            format!("{}/{}", trial.epochs_done, trial.fe_epochs + trial.ft_epochs),
            percent(trial.latest_val_accuracy),
            percent(trial.best_val_accuracy),
            trial.attempts.to_string(),
            if trial.worker_id.is_empty() {
                "-".into()
            } else {
                format!("{} ({})", trial.worker_id, trial.devices.join(","))
            },
        ]);
    }
    right(&mut t, &[5, 6, 7, 8]);
    out.push_str(&t.to_string());
    out.push_str("\n\nlast val: the newest epoch's validation accuracy; best ft: the best during fine-tuning, which the leaderboard ranks by");
    let failed: Vec<_> = status.trials.iter().filter(|t| !t.error.is_empty()).collect();
    if !failed.is_empty() {
        out.push_str("\n\n");
        for trial in failed {
            out.push_str(&format!("{} ({}): {}\n", trial.trial_id, trial.state, trial.error));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------

/// The sweep of a leaderboard entry (older coordinators leave the entry's empty).
fn entry_sweep<'a>(board: &'a v1::Leaderboard, e: &'a v1::LeaderboardEntry) -> &'a str {
    if e.sweep_id.is_empty() { &board.sweep_id } else { &e.sweep_id }
}

/// Whether the leaderboard mixes trials of several sweeps.
fn several_sweeps(board: &v1::Leaderboard) -> bool {
    board.entries.first().is_some_and(|first| {
        let first = entry_sweep(board, first);
        board.entries.iter().any(|e| entry_sweep(board, e) != first)
    })
}

/// One leaderboard of several sweeps' trials, ranked together as each sweep ranks its own
/// (trials with a score first, those stopped early after the others, then best fine-tuning
/// accuracy, then accuracy after feature extraction; ties keep the order the sweeps were
/// given in). Its id is the sweeps' ids joined by `, `, its state theirs when they agree.
pub fn merge_leaderboards(boards: Vec<v1::Leaderboard>) -> v1::Leaderboard {
    if boards.len() == 1 {
        return boards.into_iter().next().unwrap_or_default();
    }
    let id = boards.iter().map(|b| b.sweep_id.as_str()).collect::<Vec<_>>().join(", ");
    let state = match boards.first() {
        Some(first) if boards.iter().all(|b| b.sweep_state == first.sweep_state) => first.sweep_state.clone(),
        _ => "mixed".into(),
    };
    let mut entries: Vec<v1::LeaderboardEntry> = boards
        .iter()
        .flat_map(|b| {
            b.entries.iter().map(|e| v1::LeaderboardEntry { sweep_id: entry_sweep(b, e).to_string(), ..e.clone() })
        })
        .collect();
    let scores: Vec<sweep_core::leaderboard::Score> = entries
        .iter()
        .map(|e| sweep_core::leaderboard::Score {
            fe_val_accuracy: e.fe_val_accuracy,
            best_val_accuracy: e.best_val_accuracy,
            best_epoch: e.best_epoch,
        })
        .collect();
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_by(|&a, &b| {
        let ranked = |i: usize| sweep_core::leaderboard::Ranked {
            score: &scores[i],
            stopped: TrialState::parse(&entries[i].state) == Some(TrialState::Stopped),
            index: i,
        };
        sweep_core::leaderboard::rank(ranked(a), ranked(b))
    });
    let mut slots: Vec<Option<v1::LeaderboardEntry>> = entries.drain(..).map(Some).collect();
    let entries = order
        .into_iter()
        .enumerate()
        .filter_map(|(rank, i)| slots[i].take().map(|e| v1::LeaderboardEntry { rank: rank as u32 + 1, ..e }))
        .collect();
    v1::Leaderboard { sweep_id: id, sweep_state: state, entries }
}

pub fn leaderboard_table(board: &v1::Leaderboard) -> String {
    let several = several_sweeps(board);
    let mut header = vec![
        "rank",
        "trial",
        "backbone",
        "lr_decay",
        "split",
        "state",
        "fe acc",
        "best ft acc",
        "epoch",
        "params",
        "wall",
    ];
    if several {
        header.insert(1, "sweep");
    }
    let mut t = table(&header);
    for e in &board.entries {
        let mut row = vec![
            e.rank.to_string(),
            e.trial_id.clone(),
            e.backbone.clone(),
            lr_label(e.lr_decay.as_ref()),
            format!("{}+{}", e.fe_epochs, e.ft_epochs),
            e.state.clone(),
            percent(e.fe_val_accuracy),
            percent(e.best_val_accuracy),
            e.best_epoch.map(|x| x.to_string()).unwrap_or_else(|| "-".into()),
            count(e.parameters),
            duration(e.wall_seconds),
        ];
        if several {
            row.insert(1, entry_sweep(board, e).to_string());
        }
        t.add_row(row);
    }
    let shift = usize::from(several);
    right(&mut t, &[0, 6 + shift, 7 + shift, 8 + shift, 9 + shift, 10 + shift]);
    t.to_string()
}

/// `leaderboard --output csv`: one row per trial, best first.
pub fn leaderboard_csv(board: &v1::Leaderboard) -> String {
    let rows: Vec<Vec<String>> = board
        .entries
        .iter()
        .map(|e| {
            let [strategy, head, fin, factor] = lr_fields(e.lr_decay.as_ref());
            vec![
                e.rank.to_string(),
                e.trial_id.clone(),
                e.backbone.clone(),
                strategy,
                head,
                fin,
                factor,
                e.fe_epochs.to_string(),
                e.ft_epochs.to_string(),
                e.state.clone(),
                opt(e.fe_val_accuracy),
                opt(e.best_val_accuracy),
                opt(e.best_epoch),
                e.parameters.to_string(),
                e.wall_seconds.to_string(),
                e.best_checkpoint.as_ref().map(|c| c.uri.clone()).unwrap_or_default(),
                entry_sweep(board, e).to_string(),
            ]
        })
        .collect();
    csv(
        &[
            "rank",
            "trial",
            "backbone",
            "lr_strategy",
            "head_lr",
            "final_lr",
            "factor",
            "fe_epochs",
            "ft_epochs",
            "state",
            "fe_val_accuracy",
            "best_val_accuracy",
            "best_epoch",
            "parameters",
            "wall_seconds",
            "best_checkpoint",
            "sweep",
        ],
        &rows,
    )
}

/// One backbone of `leaderboard --by backbone`: its best trial (the first of its entries in the
/// leaderboard's order) and what all its trials cost.
#[derive(Debug, Clone, PartialEq)]
pub struct BackboneRank<'a> {
    pub rank: u32,
    pub backbone: &'a str,
    pub trials: u32,
    pub completed: u32,
    pub best: &'a v1::LeaderboardEntry,
    /// The sweep of its best trial.
    pub best_sweep: &'a str,
    /// The leaderboard mixes several sweeps (the table then names the best trial's sweep).
    pub several: bool,
    /// Wall-clock seconds of all its trials together.
    pub wall_seconds: f64,
}

/// The leaderboard grouped by backbone, best backbone first.
pub fn by_backbone(board: &v1::Leaderboard) -> Vec<BackboneRank<'_>> {
    let several = several_sweeps(board);
    let mut out: Vec<BackboneRank> = Vec::new();
    for e in &board.entries {
        match out.iter_mut().find(|b| b.backbone == e.backbone) {
            Some(b) => {
                b.trials += 1;
                b.completed += u32::from(TrialState::parse(&e.state) == Some(TrialState::Completed));
                b.wall_seconds += e.wall_seconds;
            }
            None => out.push(BackboneRank {
                rank: out.len() as u32 + 1,
                backbone: &e.backbone,
                trials: 1,
                completed: u32::from(TrialState::parse(&e.state) == Some(TrialState::Completed)),
                best: e,
                best_sweep: entry_sweep(board, e),
                several,
                wall_seconds: e.wall_seconds,
            }),
        }
    }
    out
}

pub fn backbone_table(ranks: &[BackboneRank]) -> String {
    let mut t = table(&[
        "rank",
        "backbone",
        "trials",
        "done",
        "best trial",
        "lr_decay",
        "split",
        "fe acc",
        "best ft acc",
        "params",
        "wall (all)",
    ]);
    for b in ranks {
        t.add_row(vec![
            b.rank.to_string(),
            b.backbone.to_string(),
            b.trials.to_string(),
            b.completed.to_string(),
            if b.several { format!("{} {}", b.best_sweep, b.best.trial_id) } else { b.best.trial_id.clone() },
            lr_label(b.best.lr_decay.as_ref()),
            format!("{}+{}", b.best.fe_epochs, b.best.ft_epochs),
            percent(b.best.fe_val_accuracy),
            percent(b.best.best_val_accuracy),
            count(b.best.parameters),
            duration(b.wall_seconds),
        ]);
    }
    right(&mut t, &[0, 2, 3, 7, 8, 9, 10]);
    t.to_string()
}

pub fn backbone_json(ranks: &[BackboneRank]) -> Value {
    Value::Array(
        ranks
            .iter()
            .map(|b| {
                json!({
                    "rank": b.rank,
                    "backbone": b.backbone,
                    "trials": b.trials,
                    "completed": b.completed,
                    "best_trial": b.best.trial_id,
                    "best_sweep": b.best_sweep,
                    "lr_decay": lr_json(b.best.lr_decay.as_ref()),
                    "epoch_split": [b.best.fe_epochs, b.best.ft_epochs],
                    "fe_val_accuracy": b.best.fe_val_accuracy,
                    "best_val_accuracy": b.best.best_val_accuracy,
                    "best_epoch": b.best.best_epoch,
                    "parameters": b.best.parameters,
                    "wall_seconds": b.wall_seconds,
                })
            })
            .collect(),
    )
}

pub fn backbone_csv(ranks: &[BackboneRank]) -> String {
    let rows: Vec<Vec<String>> = ranks
        .iter()
        .map(|b| {
            let [strategy, head, fin, factor] = lr_fields(b.best.lr_decay.as_ref());
            vec![
                b.rank.to_string(),
                b.backbone.to_string(),
                b.trials.to_string(),
                b.completed.to_string(),
                b.best.trial_id.clone(),
                strategy,
                head,
                fin,
                factor,
                b.best.fe_epochs.to_string(),
                b.best.ft_epochs.to_string(),
                opt(b.best.fe_val_accuracy),
                opt(b.best.best_val_accuracy),
                opt(b.best.best_epoch),
                b.best.parameters.to_string(),
                b.wall_seconds.to_string(),
                b.best_sweep.to_string(),
            ]
        })
        .collect();
    csv(
        &[
            "rank",
            "backbone",
            "trials",
            "completed",
            "best_trial",
            "lr_strategy",
            "head_lr",
            "final_lr",
            "factor",
            "fe_epochs",
            "ft_epochs",
            "fe_val_accuracy",
            "best_val_accuracy",
            "best_epoch",
            "parameters",
            "wall_seconds",
            "best_sweep",
        ],
        &rows,
    )
}

/// `sweep export --format csv`: every stored epoch of every trial, one row each, in trial and
/// epoch order.
pub fn export_csv(sweep_id: &str, trials: &[v1::TrialDetail]) -> String {
    let mut rows = Vec::new();
    for d in trials {
        let Some(t) = &d.trial else { continue };
        let [strategy, head, fin, factor] = lr_fields(t.lr_decay.as_ref());
        for m in &d.metrics {
            rows.push(vec![
                sweep_id.to_string(),
                t.trial_id.clone(),
                t.backbone.clone(),
                strategy.clone(),
                head.clone(),
                fin.clone(),
                factor.clone(),
                t.fe_epochs.to_string(),
                t.ft_epochs.to_string(),
                m.epoch.to_string(),
                m.phase.clone(),
                m.train_loss.to_string(),
                m.train_accuracy.to_string(),
                m.val_loss.to_string(),
                m.val_accuracy.to_string(),
                m.seconds.to_string(),
                m.attempt_id.to_string(),
                m.shared_with.join(" "),
                m.reused_from.clone(),
            ]);
        }
    }
    csv(
        &[
            "sweep",
            "trial",
            "backbone",
            "lr_strategy",
            "head_lr",
            "final_lr",
            "factor",
            "fe_epochs",
            "ft_epochs",
            "epoch",
            "phase",
            "train_loss",
            "train_accuracy",
            "val_loss",
            "val_accuracy",
            "seconds",
            "attempt",
            "shared_with",
            "reused_from",
        ],
        &rows,
    )
}

// ---------------------------------------------------------------------------------------------

pub fn trial_detail_text(d: &v1::TrialDetail) -> String {
    let Some(trial) = &d.trial else { return String::new() };
    let mut out = format!(
        "trial {}: {} {} {}+{} — {}, {} parameters\n",
        trial.trial_id,
        trial.backbone,
        lr_label(trial.lr_decay.as_ref()),
        trial.fe_epochs,
        trial.ft_epochs,
        trial.state,
        count(d.parameters)
    );
    if !trial.error.is_empty() {
        out.push_str(&format!("error: {}\n", trial.error));
    }
    for (what, c) in [("best", &d.best_checkpoint), ("last", &d.last_checkpoint)] {
        if let Some(c) = c {
            out.push_str(&format!("{what} checkpoint: {} (epoch {})\n", c.uri, c.epoch));
        }
    }
    if d.skipped_images > 0 {
        out.push_str(&format!("skipped {} unreadable images (skip_corrupt)\n", d.skipped_images));
    }
    let epochs: Vec<(u32, Vec<String>)> = d.metrics.iter().map(|m| (m.epoch, m.shared_with.clone())).collect();
    let runs = sweep_core::stages::stored_runs(&epochs);
    if !runs.is_empty() {
        out.push_str(&format!("computed once: {}\n", sweep_core::stages::runs_label(&runs)));
    }
    let reused = reused_label(&d.metrics);
    if !reused.is_empty() {
        out.push_str(&format!("reused from earlier sweeps: {reused}\n"));
    }
    out.push('\n');
    let mut t = table(&["epoch", "phase", "train loss", "train acc", "val loss", "val acc", "seconds"]);
    for m in &d.metrics {
        t.add_row(vec![
            m.epoch.to_string(),
            m.phase.clone(),
            format!("{:.4}", m.train_loss),
            percent(Some(m.train_accuracy)),
            format!("{:.4}", m.val_loss),
            percent(Some(m.val_accuracy)),
            format!("{:.1}", m.seconds),
        ]);
    }
    right(&mut t, &[0, 2, 3, 4, 5, 6]);
    out.push_str(&t.to_string());
    out.push_str("\n\n");
    // Numbered within the trial (1, 2, …), as status and watch count them; the id is the
    // coordinator's, shared by every trial.
    let mut a = table(&["attempt", "id", "worker", "state", "error"]);
    for (n, at) in d.attempts.iter().enumerate() {
        a.add_row(vec![
            (n + 1).to_string(),
            at.attempt_id.to_string(),
            at.worker_id.clone(),
            at.state.clone(),
            at.error.clone(),
        ]);
    }
    out.push_str(&a.to_string());
    out
}

/// What a submission took from earlier sweeps, as one line (`None`: nothing).
pub fn reused_line(r: &v1::SubmitSweepResponse) -> Option<String> {
    (r.reused_epochs > 0).then(|| {
        format!(
            "reused {} epochs that {} computed exactly (same stage keys); {} of {} trials are done already",
            r.reused_epochs,
            r.reused_from.join(", "),
            r.reused_trials,
            r.trial_count
        )
    })
}

/// `"epochs 1–4 from s-3f2a/t001"` for each run of consecutive epochs another sweep's trial
/// computed (empty when none).
pub fn reused_label(metrics: &[v1::EpochMetrics]) -> String {
    let mut runs: Vec<(u32, u32, &str)> = Vec::new();
    for m in metrics.iter().filter(|m| !m.reused_from.is_empty()) {
        match runs.last_mut() {
            Some((_, last, from)) if *last + 1 == m.epoch && *from == m.reused_from => *last = m.epoch,
            _ => runs.push((m.epoch, m.epoch, &m.reused_from)),
        }
    }
    runs.iter()
        .map(|(first, last, from)| {
            let epochs = if first == last { format!("epoch {first}") } else { format!("epochs {first}–{last}") };
            format!("{epochs} from {from}")
        })
        .collect::<Vec<_>>()
        .join("; ")
}

// ---------------------------------------------------------------------------------------------

pub fn workers_table(workers: &[v1::WorkerInfo]) -> String {
    if workers.is_empty() {
        return "no workers registered; start one with `sweep-worker --coordinator URL`".into();
    }
    let mut t = table(&["worker", "name", "state", "device", "model", "memory", "busy with", "last seen"]);
    let now = now_ms();
    for w in workers {
        // One row per device: which are free and which run what.
        for (i, d) in w.devices.iter().enumerate() {
            let busy: Vec<String> =
                w.busy.iter().filter(|u| u.device == d.id).map(|u| format!("{}/{}", u.sweep_id, u.trial_id)).collect();
            let first = i == 0;
            t.add_row(vec![
                if first { w.worker_id.clone() } else { String::new() },
                if first { w.name.clone() } else { String::new() },
                if first { w.state.clone() } else { String::new() },
                d.id.clone(),
                d.name.clone(),
                if d.memory_bytes == 0 {
                    "-".into()
                } else {
                    format!("{:.0} GiB", d.memory_bytes as f64 / (1u64 << 30) as f64)
                },
                if busy.is_empty() { "free".into() } else { busy.join(",") },
                if first {
                    format!("{} ago", duration(((now - w.last_seen_ms) as f64 / 1000.0).max(1.0)))
                } else {
                    String::new()
                },
            ]);
        }
    }
    let mut out = t.to_string();
    for w in workers.iter().filter(|w| !w.note.is_empty()) {
        out.push_str(&format!("\n{} ({}): {}", w.worker_id, w.name, w.note));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_only_what_needs_it() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv(&["a", "b"], &[vec!["1".into(), "x\ny".into()]]), "a,b\n1,\"x\ny\"\n");
    }

    #[test]
    fn backbones_are_ranked_by_their_best_trial_and_cost_all_their_trials() {
        let e = |rank, trial: &str, backbone: &str, state: &str, wall| v1::LeaderboardEntry {
            rank,
            trial_id: trial.into(),
            backbone: backbone.into(),
            state: state.into(),
            wall_seconds: wall,
            ..Default::default()
        };
        let board = v1::Leaderboard {
            sweep_id: "s".into(),
            sweep_state: "running".into(),
            entries: vec![
                e(1, "t002", "resnet50", "completed", 10.0),
                e(2, "t000", "resnet18", "completed", 5.0),
                e(3, "t003", "resnet50", "running", 7.0),
            ],
        };
        let ranks = by_backbone(&board);
        let got: Vec<_> = ranks
            .iter()
            .map(|b| (b.rank, b.backbone, b.trials, b.completed, b.best.trial_id.as_str(), b.wall_seconds))
            .collect();
        assert_eq!(got, [(1, "resnet50", 2, 1, "t002", 17.0), (2, "resnet18", 1, 1, "t000", 5.0)]);
    }

    #[test]
    fn several_sweeps_are_ranked_together_and_each_row_names_its_sweep() {
        let e = |rank, trial: &str, best: Option<f64>, fe: Option<f64>, state: &str| v1::LeaderboardEntry {
            rank,
            trial_id: trial.into(),
            backbone: "resnet18".into(),
            state: state.into(),
            best_val_accuracy: best,
            fe_val_accuracy: fe,
            ..Default::default()
        };
        let a = v1::Leaderboard {
            sweep_id: "a-1".into(),
            sweep_state: "completed".into(),
            entries: vec![
                e(1, "t001", Some(0.8), Some(0.5), "completed"),
                e(2, "t000", Some(0.9), Some(0.5), "stopped"),
                e(3, "t002", None, None, "failed"),
            ],
        };
        let b = v1::Leaderboard {
            sweep_id: "b-2".into(),
            sweep_state: "running".into(),
            entries: vec![
                e(1, "t000", Some(0.85), Some(0.4), "completed"),
                e(2, "t001", Some(0.8), Some(0.6), "running"),
            ],
        };
        let merged = merge_leaderboards(vec![a.clone(), b]);
        let got: Vec<_> = merged.entries.iter().map(|e| (e.rank, e.sweep_id.as_str(), e.trial_id.as_str())).collect();
        assert_eq!(
            got,
            [(1, "b-2", "t000"), (2, "b-2", "t001"), (3, "a-1", "t001"), (4, "a-1", "t000"), (5, "a-1", "t002")],
            "best first; a tie on the best broken by the feature-extraction accuracy; stopped, then unscored, last"
        );
        assert_eq!((merged.sweep_id.as_str(), merged.sweep_state.as_str()), ("a-1, b-2", "mixed"));
        let table = leaderboard_table(&merged);
        assert!(table.lines().next().unwrap().contains("SWEEP"), "{table}");
        assert!(table.lines().nth(1).unwrap().contains("b-2"), "{table}");
        let csv = leaderboard_csv(&merged);
        assert!(csv.starts_with("rank,trial,") && csv.lines().next().unwrap().ends_with(",sweep"), "{csv}");
        let first = csv.lines().nth(1).unwrap();
        assert!(first.starts_with("1,t000,") && first.ends_with(",b-2"), "{csv}");
        assert_eq!(leaderboard_json(&merged)[2]["sweep"], "a-1");
        // One sweep: no sweep column in the table, the sweep in CSV and JSON all the same.
        let one = merge_leaderboards(vec![a]);
        assert!(!leaderboard_table(&one).contains("SWEEP"));
        assert!(leaderboard_csv(&one).lines().nth(1).unwrap().ends_with(",a-1"));
        assert_eq!(leaderboard_json(&one)[0]["sweep"], "a-1");
        let backbones = by_backbone(&merged);
        assert_eq!((backbones[0].best_sweep, backbones[0].best.trial_id.as_str()), ("b-2", "t000"));
        assert!(backbone_table(&backbones).contains("b-2 t000"));
    }

    #[test]
    fn formats() {
        assert_eq!(percent(Some(0.625)), "62.5%");
        assert_eq!(percent(None), "-");
        assert_eq!(count(23_528_522), "23.5M");
        assert_eq!(count(85_000), "85k");
        assert_eq!(count(0), "-");
        assert_eq!(duration(42.4), "42s");
        assert_eq!(duration(187.0), "3m07s");
        assert_eq!(duration(3720.0), "1h02m");
    }
}
