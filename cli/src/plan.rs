//! `sweep plan SPEC`: before anything runs, what a sweep computes — its trials, the stage tree
//! of the epochs they share, epochs naive against shared by phase, and an estimated device time
//! per backbone and phase ([`sweep_core::stages`]). Sweeps still run every trial alone; the
//! shared figures are what running the tree saves.

use std::path::Path;
use std::process::ExitCode;

use serde_json::{Value, json};
use sweep_core::backbone::Backbone;
use sweep_core::grid;
use sweep_core::leaderboard::Phase;
use sweep_core::spec::{ParseOptions, SweepSpec};
use sweep_core::stages::{self, EpochKind, Epochs, Stage, StageTree};

use crate::client::load_spec;
use crate::output::{self, Format};

/// Most trial ids listed on one stage's line.
const IDS_SHOWN: usize = 8;

/// Naive and shared device-seconds of one backbone and phase.
struct Cost {
    backbone: Backbone,
    phase: Phase,
    naive: f64,
    shared: f64,
}

/// Device-seconds per backbone and phase at `tflops`, or `None` when the spec does not tell
/// the image count.
fn costs(spec: &SweepSpec, tree: &StageTree, tflops: f64) -> Option<Vec<Cost>> {
    let rate = tflops * 1e12;
    let mut out: Vec<Cost> = Vec::new();
    let mut add = |backbone: Backbone, kind: &EpochKind, flops: f64, naive: bool| -> Option<()> {
        let seconds = flops / rate;
        let phase = kind.phase();
        let i = match out.iter().position(|c| c.backbone == backbone && c.phase == phase) {
            Some(i) => i,
            None => {
                out.push(Cost { backbone, phase, naive: 0.0, shared: 0.0 });
                out.len() - 1
            }
        };
        if naive {
            out[i].naive += seconds
        } else {
            out[i].shared += seconds
        }
        Some(())
    };
    for t in &tree.trials {
        let fe = EpochKind::FeatureExtraction;
        add(t.backbone, &fe, stages::run_flops(spec, t.backbone, &fe, t.fe_epochs)?, true)?;
        let ft = EpochKind::FineTuning(t.lr_decay);
        add(t.backbone, &ft, stages::run_flops(spec, t.backbone, &ft, t.ft_epochs)?, true)?;
    }
    for s in &tree.stages {
        // The attempt that runs this stage: it starts at the first stage up the tree that does
        // not continue its parent's, and runs its runner's chain — the feature cache lives as
        // long as it, built in its first feature-extraction epoch.
        let mut start = s;
        while let Some(p) = start.parent.filter(|_| tree.continues_parent(start.index)) {
            start = &tree.stages[p];
        }
        let fe = tree.runner(s.index).map_or(0, |r| tree.trials[r].fe_epochs);
        let run = (fe + 1).saturating_sub(start.first_epoch);
        let flops = stages::part_of_run_flops(spec, s.backbone, &s.kind, s.epochs(), run, start.index == s.index)?;
        add(s.backbone, &s.kind, flops, false)?;
    }
    Some(out)
}

/// `feature extraction` or `fine-tuning`, for tables.
fn phase_label(phase: Phase) -> &'static str {
    match phase {
        Phase::FeatureExtraction => "feature extraction",
        Phase::FineTuning => "fine-tuning",
    }
}

fn ids(list: &[usize]) -> String {
    let mut shown: Vec<String> = list.iter().take(IDS_SHOWN).map(|&i| grid::trial_id(i)).collect();
    if list.len() > IDS_SHOWN {
        shown.push(format!("… {} more", list.len() - IDS_SHOWN));
    }
    shown.join(" ")
}

/// `epochs 9–12`, or `epoch 9` for one.
fn epoch_range(first: u32, last: u32) -> String {
    if first == last { format!("epoch {first}") } else { format!("epochs {first}–{last}") }
}

/// One line per stage, children indented under their parent, columns aligned.
fn tree_text(tree: &StageTree) -> String {
    /// (tree column, epochs, kind, trials) of each line, or a backbone's heading.
    enum Row {
        Heading(&'static str),
        Stage([String; 4]),
    }
    fn rows(tree: &StageTree, s: &Stage, indent: &str, last: bool, out: &mut Vec<Row>) {
        let (branch, more) = if last { ("└─ ", "   ") } else { ("├─ ", "│  ") };
        let n = s.trials.len();
        let mut trials = format!("{n:>3} {} {}", if n == 1 { "trial: " } else { "trials:" }, ids(&s.trials));
        if !s.ends.is_empty() {
            trials.push_str(&format!("  → ends {}", ids(&s.ends)));
        }
        out.push(Row::Stage([
            format!("{indent}{branch}{}", s.id()),
            epoch_range(s.first_epoch, s.last_epoch),
            s.kind.to_string(),
            trials,
        ]));
        let next = format!("{indent}{more}");
        for (i, &c) in s.children.iter().enumerate() {
            rows(tree, &tree.stages[c], &next, i + 1 == s.children.len(), out);
        }
    }
    let mut all = Vec::new();
    let mut backbone = None;
    for (i, &r) in tree.roots.iter().enumerate() {
        let s = &tree.stages[r];
        if backbone != Some(s.backbone) {
            all.push(Row::Heading(s.backbone.name()));
            backbone = Some(s.backbone);
        }
        let last = tree.roots.get(i + 1).is_none_or(|&n| tree.stages[n].backbone != s.backbone);
        rows(tree, s, "", last, &mut all);
    }
    let width = |k: usize| {
        all.iter()
            .map(|r| match r {
                Row::Stage(cols) => cols[k].chars().count(),
                Row::Heading(_) => 0,
            })
            .max()
            .unwrap_or(0)
    };
    let widths = [width(0), width(1), width(2)];
    let mut out = String::new();
    for r in &all {
        match r {
            Row::Heading(name) => out.push_str(&format!("{name}\n")),
            Row::Stage([tree_col, epochs, kind, trials]) => {
                let pad =
                    |text: &str, w: usize| format!("{text}{}", " ".repeat(w.saturating_sub(text.chars().count())));
                out.push_str(&format!(
                    "{}  {}  {}  {trials}\n",
                    pad(tree_col, widths[0]),
                    pad(epochs, widths[1]),
                    pad(kind, widths[2])
                ));
            }
        }
    }
    out
}

/// Device time: `0.31s`, `42s`, `3m07s`, `1h02m`.
fn device_time(seconds: f64) -> String {
    if seconds > 0.0 && seconds < 10.0 { format!("{seconds:.2}s") } else { output::duration(seconds) }
}

fn saved(naive: u64, shared: u64) -> String {
    if naive == 0 { "-".into() } else { format!("{:.1}%", 100.0 * (naive - shared.min(naive)) as f64 / naive as f64) }
}

fn epochs_text(naive: Epochs, shared: Epochs) -> String {
    let mut rows = vec![format!("{:<20} {:>7} {:>7} {:>7}", "PHASE", "NAIVE", "SHARED", "SAVED")];
    for (name, n, s) in [
        ("feature extraction", naive.feature_extraction, shared.feature_extraction),
        ("fine-tuning", naive.fine_tuning, shared.fine_tuning),
        ("total", naive.total(), shared.total()),
    ] {
        rows.push(format!("{name:<20} {n:>7} {s:>7} {:>7}", saved(n, s)));
    }
    rows.join("\n") + "\n"
}

fn costs_text(costs: &[Cost]) -> String {
    let mut rows = vec![format!("{:<16} {:<20} {:>9} {:>9}", "BACKBONE", "PHASE", "NAIVE", "SHARED")];
    let (mut naive, mut shared) = (0.0, 0.0);
    for c in costs {
        naive += c.naive;
        shared += c.shared;
        rows.push(format!(
            "{:<16} {:<20} {:>9} {:>9}",
            c.backbone.name(),
            phase_label(c.phase),
            device_time(c.naive),
            device_time(c.shared)
        ));
    }
    rows.push(format!("{:<16} {:<20} {:>9} {:>9}", "total", "", device_time(naive), device_time(shared)));
    rows.join("\n") + "\n"
}

/// The backbones of the sweep whose feature extraction the workers' feature cache serves, in
/// the tree's order.
fn cached_backbones(spec: &SweepSpec, tree: &StageTree) -> Vec<Backbone> {
    let mut out: Vec<Backbone> = Vec::new();
    for t in &tree.trials {
        if !out.contains(&t.backbone) && stages::feature_cache_applies(spec, t.backbone) {
            out.push(t.backbone);
        }
    }
    out
}

/// What the estimate assumes of the feature cache, or nothing when it serves no backbone.
fn cache_text(cached: &[Backbone]) -> String {
    if cached.is_empty() {
        return String::new();
    }
    let names: Vec<&str> = cached.iter().map(|b| b.name()).collect();
    format!(
        "\nFeature extraction of {} runs the backbone in the first feature-extraction epoch of each attempt only \
         (per trial naive; shared, per branch of the tree that starts an attempt): BatchNorm is frozen and the \
         phase unaugmented, so the workers' feature cache serves the later epochs.\n",
        names.join(", ")
    )
}

fn stage_json(s: &Stage) -> Value {
    json!({
        "stage": s.id(),
        "parent": s.parent.map(|p| format!("s{p:02}")),
        "backbone": s.backbone.name(),
        "phase": s.kind.phase().as_str(),
        "lr_decay": match &s.kind { EpochKind::FineTuning(d) => Value::String(d.to_string()), _ => Value::Null },
        "first_epoch": s.first_epoch,
        "last_epoch": s.last_epoch,
        "trials": s.trials.iter().map(|&i| grid::trial_id(i)).collect::<Vec<_>>(),
        "ends": s.ends.iter().map(|&i| grid::trial_id(i)).collect::<Vec<_>>(),
        "key": s.key.0,
    })
}

/// `sweep plan`: prints the plan of the spec at `path`; `tflops` is the device throughput the
/// time estimate assumes.
pub fn plan(path: &Path, max_trials: usize, format: Format, tflops: f64) -> anyhow::Result<ExitCode> {
    if !tflops.is_finite() || tflops <= 0.0 {
        anyhow::bail!("--tflops must be a positive number of TFLOP/s, got {tflops}");
    }
    let (_, spec) = load_spec(path, ParseOptions::with_max_trials(max_trials))?;
    let tree = StageTree::build(&spec, spec.sharing);
    let (naive, shared) = (tree.naive_epochs(), tree.stage_epochs());
    let costs = costs(&spec, &tree, tflops);
    let cached = cached_backbones(&spec, &tree);
    match format {
        Format::Json => {
            let epochs = |e: Epochs| json!({"feature_extraction": e.feature_extraction, "fine_tuning": e.fine_tuning, "total": e.total()});
            let trials: Vec<Value> = output::trials_json(&tree.trials)
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .zip(&tree.trials)
                .map(|(mut v, t)| {
                    v["stages"] = json!(tree.path(t.index).iter().map(|&s| format!("s{s:02}")).collect::<Vec<_>>());
                    v["shared"] = json!(tree.shared_label(t.index));
                    v
                })
                .collect();
            let device_seconds = costs.as_ref().map(|cs| {
                cs.iter()
                    .map(|c| {
                        json!({"backbone": c.backbone.name(), "phase": c.phase.as_str(), "naive": c.naive, "shared": c.shared})
                    })
                    .collect::<Vec<_>>()
            });
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({
                    "name": spec.name,
                    "trial_count": tree.trials.len(),
                    "trials": trials,
                    "stages": tree.stages.iter().map(stage_json).collect::<Vec<_>>(),
                    "epochs": {"naive": epochs(naive), "shared": epochs(shared)},
                    "tflops": tflops,
                    "device_seconds": device_seconds,
                    "feature_cache": cached.iter().map(|b| b.name()).collect::<Vec<_>>(),
                }))?
            );
        }
        Format::Table => {
            let time = match &costs {
                Some(c) => format!(
                    "Estimated device time at {tflops} TFLOP/s (--tflops; from each backbone's multiply-adds and the \
                     image counts — a plan, not a measurement):\n\n{}{}",
                    costs_text(c),
                    cache_text(&cached)
                ),
                None => {
                    "Estimated device time: unknown (an image folder's image count is known only when it is read).\n"
                        .to_string()
                }
            };
            output::print(&format!(
                "{}: sweep `{}`, {} trials, {} stages\n\n{}\n\nStage tree (the epochs trials share; a child stage starts \
                 from its parent's end):\n\n{}\nEpochs, naive (every trial alone, `sharing: off`) and shared (each \
                 stage once{}):\n\n{}\n{time}",
                path.display(),
                spec.name,
                tree.trials.len(),
                tree.stages.len(),
                output::trials_table(&tree.trials),
                tree_text(&tree),
                if spec.sharing { "" } else { "; this spec has `sharing: off`, so every trial runs alone" },
                epochs_text(naive, shared),
            ));
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// resnet18, one strategy, `splits`; 90 training images in batches of 32 (the last, of 26,
    /// is not the feature cache's size), BatchNorm frozen and feature extraction unaugmented.
    fn fe_costs(splits: &str) -> (f64, f64, f64, f64) {
        let yaml = format!(
            "name: c\ndataset: {{ kind: synthetic, classes: 3, train_per_class: 30 }}\n\
             training: {{ freeze_bn_stats: true, feature_extraction: {{ augment: false }} }}\n\
             grid:\n  backbone: [resnet18]\n  lr_decay: [{{ strategy: linear, head_lr: 1.0e-4, final_lr: 1.0e-7 }}]\n\
             \x20 epoch_split: {splits}\n"
        );
        let spec = sweep_core::spec::parse(&yaml).unwrap();
        let tree = StageTree::build(&spec, true);
        let costs = costs(&spec, &tree, 1.0).unwrap();
        let fe = costs.iter().find(|c| c.phase == Phase::FeatureExtraction).unwrap();
        let one = stages::epoch_flops(&spec, Backbone::Resnet18, &EpochKind::FeatureExtraction).unwrap() / 1e12;
        let afresh = stages::cached_epoch_flops(&spec, Backbone::Resnet18).unwrap() / 1e12;
        assert!(afresh > 0.0 && afresh < one);
        (fe.naive, fe.shared, one, afresh)
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * b.abs().max(1.0)
    }

    #[test]
    fn the_cache_is_priced_per_attempt_with_what_it_does_not_serve() {
        // Epoch 1 shared; its runner is [2, 3] (the longer chain), which runs on into epoch 2
        // in the same attempt: one cache serves both epochs but their last batches. Alone,
        // [1, 3] builds no cache (one feature-extraction epoch).
        let (naive, shared, one, afresh) = fe_costs("[[2, 3], [1, 3]]");
        assert!(close(naive, (one + 2.0 * afresh) + one), "{naive} {one} {afresh}");
        assert!(close(shared, one + 2.0 * afresh), "{shared} {one} {afresh}");
        // Equal chains: epoch 1's runner is the one with more feature extraction, [2, 2], so
        // the cache serves its epoch 2 too (not [1, 3], the lower grid index, which would stop
        // there and leave epoch 2 to an attempt of one feature-extraction epoch: two passes).
        let (naive, shared, one, afresh) = fe_costs("[[1, 3], [2, 2]]");
        assert!(close(naive, one + (one + 2.0 * afresh)), "{naive} {one} {afresh}");
        assert!(close(shared, one + 2.0 * afresh), "{shared} {one} {afresh}");
        // Only epoch 1, shared: an attempt of one feature-extraction epoch, no cache.
        let (naive, shared, one, _) = fe_costs("[[1, 3], [1, 2]]");
        assert!(close(naive, 2.0 * one) && close(shared, one), "{naive} {shared} {one}");
    }
}
