//! Shared stages at run time, with real workers: every trial of a sweep that runs its shared
//! epochs once ends with the metrics and weights it gets alone (`sharing: off`), bit for bit,
//! with one replica and with two data-parallel replicas.

use std::collections::BTreeMap;
use std::time::Duration;

use sweep_proto::v1;

use super::util::*;
use super::{client, runtime};

/// 2 strategies × `[1, 1]`, `[1, 2]`, `[2, 1]`: feature extraction epoch 1 shared by all six,
/// epoch 2 by the two `[2, 1]`; fine-tuning epoch 2 shared by `[1, 1]` and `[1, 2]` of one
/// strategy. 16 epochs, 8 distinct.
fn spec(name: &str, sharing: &str, replicas: u32) -> String {
    spec_with_splits(name, sharing, replicas, "[[1, 1], [1, 2], [2, 1]]")
}

fn spec_with_splits(name: &str, sharing: &str, replicas: u32, splits: &str) -> String {
    format!(
        "name: {name}
dataset: {{ kind: synthetic, classes: 3, train_per_class: 8, val_per_class: 4, image_size: 32, seed: 5 }}
training:
  batch_size: 4
  augment: {{ hflip: true, rotation_deg: 5, shear_deg: 2, color_jitter: 0.1 }}
resources: {{ gpus_per_trial: {replicas} }}
grid:
  backbone: [resnet18]
  lr_decay:
    - {{ strategy: exponential, head_lr: 1.0e-3, factor: 3 }}
    - {{ strategy: linear, head_lr: 1.0e-3, final_lr: 1.0e-5 }}
  epoch_split: {splits}
sharing: {sharing}
"
    )
}

/// What a trial ends with: per epoch its losses and accuracies (bits), and the SHA-256 of its
/// last and best weights.
type Outcome = (Vec<[u64; 4]>, String, String);

fn outcomes(url: &str, sweep: &str) -> BTreeMap<String, Outcome> {
    outcomes_of(url, sweep, 6).into_iter().map(|(id, (_, o))| (id, o)).collect()
}

/// Each of the sweep's first `n` trials by id: its cell (`<strategy> <fe>+<ft>`) and outcome.
fn outcomes_of(url: &str, sweep: &str, n: usize) -> BTreeMap<String, (String, Outcome)> {
    let rt = runtime();
    (0..n)
        .map(|i| {
            let id = format!("t{i:03}");
            let t = rt
                .block_on(async {
                    client(url)
                        .await
                        .get_trial(v1::GetTrialRequest { sweep_id: sweep.into(), trial_id: id.clone() })
                        .await
                })
                .expect("get trial")
                .into_inner();
            let epochs = t
                .metrics
                .iter()
                .map(|m| {
                    [m.train_loss.to_bits(), m.train_accuracy.to_bits(), m.val_loss.to_bits(), m.val_accuracy.to_bits()]
                })
                .collect();
            let sha = |c: &Option<v1::CheckpointRef>| c.as_ref().map(|c| c.sha256.clone()).unwrap_or_default();
            let s = t.trial.expect("a trial summary");
            let cell =
                format!("{} {}+{}", s.lr_decay.map(|d| d.strategy).unwrap_or_default(), s.fe_epochs, s.ft_epochs);
            (id, (cell, (epochs, sha(&t.last_checkpoint), sha(&t.best_checkpoint))))
        })
        .collect()
}

/// Distinct epochs computed by the sweep itself: (attempt, epoch) pairs over every trial's
/// stored rows that no earlier sweep computed.
fn computed(url: &str, id: &str) -> usize {
    let out = output(sweep().args(["export", id, "--coordinator", url, "--format", "csv"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let mut header = text.lines().next().unwrap().split(',');
    let epoch = header.clone().position(|h| h == "epoch").unwrap();
    let attempt = header.clone().position(|h| h == "attempt").unwrap();
    let reused = header.position(|h| h == "reused_from").unwrap();
    let pairs: std::collections::HashSet<(String, String)> = text
        .lines()
        .skip(1)
        .filter(|l| l.split(',').nth(reused).is_some_and(str::is_empty))
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[attempt].to_string(), f[epoch].to_string())
        })
        .collect();
    pairs.len()
}

#[test]
fn every_trial_ends_bit_identical_whether_its_shared_epochs_ran_once_or_it_ran_alone() {
    let _bound = sweep_tests::bound(600);
    let dir = tempfile::tempdir().unwrap();
    let (_coord, url) = coordinator(&dir.path().join("state"), &[]);
    // One worker with two CPU slots: one-replica trials run two at a time, two-replica trials
    // one at a time on both.
    let _w = worker_with(&url, "w", dir.path(), &["--devices", "cpu:0,cpu:1"]);
    let mut ids = Vec::new();
    for (name, sharing, replicas) in
        [("alone-1", "off", 1), ("shared-1", "on", 1), ("alone-2", "off", 2), ("shared-2", "on", 2)]
    {
        let path = write(dir.path(), &format!("{name}.yaml"), &spec(name, sharing, replicas));
        let out = output(sweep().args(["submit", "--coordinator", &url]).arg(&path));
        assert!(out.status.success(), "{}", stderr(&out));
        ids.push(stdout(&out).lines().last().unwrap().trim().to_string());
    }
    for id in &ids {
        wait_for(Duration::from_secs(500), &format!("sweep {id} to complete"), || {
            let out = output(sweep().args(["status", id, "--coordinator", &url, "--output", "json"]));
            let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
            let log = std::fs::read_to_string(dir.path().join("w.log")).unwrap_or_default();
            assert_ne!(v["state"], "failed", "{v:#}\n{log}");
            (v["state"] == "completed").then_some(())
        });
    }
    for pair in ids.chunks(2) {
        let (alone, shared) = (&pair[0], &pair[1]);
        let (a, s) = (outcomes(&url, alone), outcomes(&url, shared));
        for (trial, expected) in &a {
            assert_eq!(expected.0.len(), s[trial].0.len(), "{trial}: epochs");
            assert_eq!(&s[trial], expected, "{trial} of {shared} differs from {trial} of {alone}");
            assert!(!expected.1.is_empty() && !expected.2.is_empty(), "{trial} has weights");
        }
        assert_eq!(computed(&url, alone), 16, "alone: every trial's every epoch");
        assert_eq!(computed(&url, shared), 8, "shared: each distinct epoch once");
    }

    // Reuse across sweeps: a wider grid (two more splits) starts each trial from the longest
    // run of its first epochs the sweeps above stored — whole trials, `[2, 2]` from `[2, 1]`'s
    // last point (epochs 1–3), `[3, 1]` from the shared feature extraction's end (epochs 1–2) —
    // and every trial still ends bit-identical to running alone.
    let splits = "[[1, 1], [1, 2], [2, 1], [2, 2], [3, 1]]";
    let mut more = Vec::new();
    for (name, sharing) in [("alone-wide", "off"), ("wide", "on")] {
        let path = write(dir.path(), &format!("{name}.yaml"), &spec_with_splits(name, sharing, 1, splits));
        let out = output(sweep().args(["submit", "--coordinator", &url]).arg(&path));
        assert!(out.status.success(), "{}", stderr(&out));
        let text = stdout(&out);
        if sharing == "on" {
            assert!(text.contains("reused 26 epochs"), "{text}");
        }
        more.push(text.lines().last().unwrap().trim().to_string());
    }
    for id in &more {
        wait_for(Duration::from_secs(300), &format!("sweep {id} to complete"), || {
            let out = output(sweep().args(["status", id, "--coordinator", &url, "--output", "json"]));
            let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
            assert_ne!(v["state"], "failed", "{v:#}");
            (v["state"] == "completed").then_some(())
        });
    }
    let (alone, wide) = (outcomes_of(&url, &more[0], 10), outcomes_of(&url, &more[1], 10));
    for (trial, expected) in &alone {
        assert_eq!(&wide[trial], expected, "{trial} of {} differs from {trial} of {}", more[1], more[0]);
    }
    // Computed by the wide sweep itself: epoch 4 of each `[2, 2]`, epoch 3 of `[3, 1]` (once,
    // for both strategies) and epoch 4 of each `[3, 1]`.
    assert_eq!(computed(&url, &more[0]), 32, "alone: every epoch");
    assert_eq!(computed(&url, &more[1]), 5, "wide: only what no sweep had stored");
    let out = output(sweep().args(["trial", &more[1], "t003", "--coordinator", &url]));
    assert!(stdout(&out).contains("reused from earlier sweeps: epochs 1–3 from"), "{}", stdout(&out));
    assert_history_clean(&dir.path().join("state"));
}

/// Checkpoint files (`.safetensors`) under `<artifacts>/<sweep>/`, as `<trial>/<file>`.
fn files(artifacts: &std::path::Path, sweep: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for trial in std::fs::read_dir(artifacts.join(sweep)).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(trial.path()).into_iter().flatten().flatten() {
            let name = f.file_name().to_string_lossy().to_string();
            if name.ends_with(".safetensors") {
                out.insert(format!("{}/{name}", trial.file_name().to_string_lossy()));
            }
        }
    }
    out
}

/// Every checkpoint reference the sweep's trials hold exists.
fn assert_references_exist(url: &str, sweep: &str, n: usize) {
    let rt = runtime();
    for i in 0..n {
        let t = rt
            .block_on(async {
                client(url)
                    .await
                    .get_trial(v1::GetTrialRequest { sweep_id: sweep.into(), trial_id: format!("t{i:03}") })
                    .await
            })
            .expect("get trial")
            .into_inner();
        for c in [&t.last_checkpoint, &t.best_checkpoint].into_iter().flatten() {
            assert!(std::path::Path::new(&c.uri).exists(), "{sweep}/t{i:03} holds {}, which is gone", c.uri);
        }
    }
}

fn run_cli(args: &[&str]) -> String {
    let out = output(sweep().args(args));
    assert!(out.status.success(), "sweep {args:?}: {}", stderr(&out));
    stdout(&out)
}

fn wait_completed(url: &str, id: &str) {
    wait_for(Duration::from_secs(300), &format!("sweep {id} to complete"), || {
        let v: serde_json::Value =
            serde_json::from_str(&run_cli(&["status", id, "--coordinator", url, "--output", "json"])).unwrap();
        assert_ne!(v["state"], "failed", "{v:#}");
        (v["state"] == "completed").then_some(())
    });
}

#[test]
fn an_extended_sweep_computes_only_what_is_new_and_gc_removes_only_what_no_kept_sweep_references() {
    let _bound = sweep_tests::bound(500);
    let dir = tempfile::tempdir().unwrap();
    let (_coord, url) = coordinator(&dir.path().join("state"), &[]);
    let _w = worker_with(&url, "w", dir.path(), &["--devices", "cpu:0,cpu:1"]);
    let artifacts = dir.path().join("artifacts");
    let store = artifacts.to_str().unwrap();
    let path = write(dir.path(), "base.yaml", &spec_with_splits("base", "on", 1, "[[1, 1], [2, 1]]"));
    let submitted = run_cli(&["submit", "--coordinator", &url, path.to_str().unwrap()]);
    let base = submitted.lines().last().unwrap().trim().to_string();
    wait_completed(&url, &base);
    assert_eq!(computed(&url, &base), 6, "feature extraction epoch 1 once, epoch 2 once, 4 fine-tuning epochs");

    // One more split and one more strategy: 9 trials, 5 new. The 4 old ones are complete at
    // once (10 epochs); `[2, 2]` of the old strategies starts from `[2, 1]`'s end (3 epochs
    // each); the new strategy's three from the feature extraction stored (1, 2 and 2 epochs).
    let text = run_cli(&[
        "extend",
        &base,
        "--coordinator",
        &url,
        "--epoch-split",
        "2+2",
        "--lr-decay",
        "{ strategy: linear, head_lr: 1.0e-3, final_lr: 1.0e-4 }",
    ]);
    assert!(text.contains(&format!("extended {base}: 9 trials (5 new)")), "{text}");
    assert!(text.contains("reused 21 epochs") && text.contains("4 of 9 trials are done already"), "{text}");
    let wide = text.lines().last().unwrap().trim().to_string();
    wait_completed(&url, &wide);
    // Computed: epoch 4 of the two old strategies' `[2, 2]`; the new strategy's epoch 2 of
    // `[1, 1]`, and its epochs 3 (shared by `[2, 1]` and `[2, 2]`) and 4.
    assert_eq!(computed(&url, &wide), 5);
    assert_references_exist(&url, &wide, 9);

    // A dry run removes nothing.
    let before = files(&artifacts, &base);
    run_cli(&["gc", "--coordinator", &url, "--artifacts", store, "--min-age", "0", "--dry-run"]);
    assert_eq!(files(&artifacts, &base), before);
    // The base sweep dropped: what the wide sweep references stays, the rest of its folders go.
    run_cli(&["drop", &base, "--coordinator", &url]);
    let status = run_cli(&["status", &base, "--coordinator", &url]);
    assert!(status.contains("(dropped"), "{status}");
    // Without `--min-age 0`, files written in the last 10 minutes stay.
    let text = run_cli(&["gc", "--coordinator", &url, "--artifacts", store]);
    assert_eq!(files(&artifacts, &base), before, "{text}");
    let text = run_cli(&["gc", "--coordinator", &url, "--artifacts", store, "--min-age", "0"]);
    assert!(text.contains(&format!("{base}: removed")), "{text}");
    let left = files(&artifacts, &base);
    let referenced: std::collections::BTreeSet<String> = runtime()
        .block_on(async {
            client(&url).await.list_references(v1::ListReferencesRequest { sweep_id: base.clone() }).await
        })
        .expect("references")
        .into_inner()
        .keys
        .iter()
        .map(|k| k.strip_prefix(&format!("{base}/")).unwrap().to_string())
        .collect();
    assert!(!referenced.is_empty(), "the wide sweep reuses the base sweep's files");
    assert_eq!(left, referenced, "what is left of the base sweep is what kept sweeps reference");
    assert_references_exist(&url, &wide, 9);
    // A resubmitted base spec starts from the wide sweep's points: done at once.
    let again = run_cli(&["submit", "--coordinator", &url, path.to_str().unwrap()]);
    assert!(again.contains("reused 10 epochs") && again.contains(&wide), "{again}");
    let again = again.lines().last().unwrap().trim().to_string();
    wait_completed(&url, &again);
    assert_references_exist(&url, &again, 4);
    // Nothing kept references anything of these sweeps: their folders hold no checkpoint.
    for id in [&wide, &again] {
        run_cli(&["drop", id, "--coordinator", &url]);
    }
    run_cli(&["gc", "--coordinator", &url, "--artifacts", store, "--min-age", "0"]);
    for id in [&base, &wide, &again] {
        assert!(files(&artifacts, id).is_empty(), "{id}: {:?}", files(&artifacts, id));
    }
    assert_history_clean(&dir.path().join("state"));
}
