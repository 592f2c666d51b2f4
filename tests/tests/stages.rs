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
  epoch_split: [[1, 1], [1, 2], [2, 1]]
sharing: {sharing}
"
    )
}

/// What a trial ends with: per epoch its losses and accuracies (bits), and the SHA-256 of its
/// last and best weights.
type Outcome = (Vec<[u64; 4]>, String, String);

fn outcomes(url: &str, sweep: &str) -> BTreeMap<String, Outcome> {
    let rt = runtime();
    (0..6)
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
            (id, (epochs, sha(&t.last_checkpoint), sha(&t.best_checkpoint)))
        })
        .collect()
}

/// Distinct epochs computed: (attempt, epoch) pairs over every trial's stored rows.
fn computed(url: &str, id: &str) -> usize {
    let out = output(sweep().args(["export", id, "--coordinator", url, "--format", "csv"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let mut header = text.lines().next().unwrap().split(',');
    let epoch = header.clone().position(|h| h == "epoch").unwrap();
    let attempt = header.position(|h| h == "attempt").unwrap();
    let pairs: std::collections::HashSet<(String, String)> = text
        .lines()
        .skip(1)
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
    assert_history_clean(&dir.path().join("state"));
}
